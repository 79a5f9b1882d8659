"""The receiver's rows on SQLite in plain sqlite3 (``storage.catalog_sqlite``): the same rows
as SQLAlchemy Core writes, the uncommon cases left to it, the same errors."""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from storage import catalog, catalog_sqlite
from storage.catalog import InstanceMeta, Recorded
from storage.db import Database
from storage.errors import DatabaseUnavailableError
from storage.files import StoredFile
from storage.models import Instance, Series, Study
from tests.unit.test_catalog import SERIES, STUDY, counts, meta

OTHER_STUDY, OTHER_SERIES = "2.25.7", "2.25.7.1"


def sqlite_db(path: Path, busy_timeout_ms: int = 200) -> Database:
    db = Database(f"sqlite:///{path}", busy_timeout_ms=busy_timeout_ms)
    db.upgrade()
    return db


@pytest.fixture
def db(tmp_path: Path) -> Any:
    database = sqlite_db(tmp_path / "fast.db")
    yield database
    database.dispose()


def other(i: int) -> InstanceMeta:
    return dataclasses.replace(meta(i, series=OTHER_SERIES), study_uid=OTHER_STUDY,
                               sop_instance_uid=f"{OTHER_SERIES}.{i}", calling_ae="CT1",
                               called_ae="AIDNODE", calling_host="10.0.0.7",
                               association_id="a" * 36, body_part="CHEST")


def items(*metas: InstanceMeta) -> list[tuple[InstanceMeta, StoredFile]]:
    return [(m, StoredFile(path=f"instances/{m.sop_instance_uid}.dcm", size=100 + k))
            for k, m in enumerate(metas)]


def rows(db: Database) -> dict[str, list[tuple[Any, ...]]]:
    """Every column of every study, series and instance row but the ids, by UID."""
    with db.read() as s:
        studies = [(r.study_instance_uid, r.study_description, r.state, r.calling_ae,
                    r.called_ae, r.calling_host, r.instance_count, r.first_received_at,
                    r.last_received_at, r.rule) for r in s.execute(select(Study)).scalars()]
        series = [(r.series_instance_uid, r.study.study_instance_uid, r.modality, r.body_part,
                   r.series_description, r.sop_class_uid, r.image_type, r.instance_count)
                  for r in s.execute(select(Series)).scalars()]
        instances = [(r.sop_instance_uid, r.study_id, r.series_id, r.sop_class_uid,
                      r.transfer_syntax_uid, r.path, r.size, r.sha256, r.received_at,
                      r.association_id) for r in s.execute(select(Instance)).scalars()]
    return {"studies": sorted(studies), "series": sorted(series),
            "instances": sorted(instances)}


def core(db: Database, group: list[tuple[InstanceMeta, StoredFile]]) -> Any:
    with db.write_connection() as conn:
        return catalog.record_instances(conn, group)


def test_the_rows_are_those_sqlalchemy_writes(tmp_path: Path, frozen_clock: Any,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The same groups recorded by record_group (plain sqlite3 once the series exist) and by
    record_instances alone (SQLAlchemy Core) leave the same rows, column for column."""
    fast, slow = sqlite_db(tmp_path / "fast.db"), sqlite_db(tmp_path / "core.db")
    plain: list[int] = []  # the size of each group recorded in plain sqlite3
    record_new = catalog_sqlite.record_new

    def spied(conn: sqlite3.Connection, group: Any, now: Any) -> None:
        record_new(conn, group, now)
        plain.append(len(group))

    monkeypatch.setattr(catalog_sqlite, "record_new", spied)
    try:
        groups = [items(meta(0), other(0)),  # new studies and series: the general way
                  items(meta(1)), items(other(1), meta(2), other(2)),  # known: plain sqlite3
                  items(meta(3, series=f"{SERIES}.2"), meta(4))]  # one new series among them
        for group in groups:
            frozen_clock.advance(1.5)
            assert catalog.record_group(fast, group) == [(Recorded.NEW, None)] * len(group)
            assert core(slow, group) == [(Recorded.NEW, None)] * len(group)
        assert plain == [1, 3]
        assert rows(fast) == rows(slow)
        assert counts(fast)[:2] == ([(STUDY, 5), (OTHER_STUDY, 3)],
                                    [(SERIES, 4), (f"{SERIES}.2", 1), (OTHER_SERIES, 3)])
    finally:
        fast.dispose()
        slow.dispose()


@pytest.mark.parametrize("case", ["new study", "new series", "recorded before", "twice"])
def test_the_uncommon_cases_are_left_to_record_instances(db: Database, case: str) -> None:
    catalog.record_group(db, items(meta(0)))
    group = {"new study": items(meta(1), other(1)),
             "new series": items(meta(1), meta(2, series=f"{SERIES}.2")),
             "recorded before": items(meta(1), meta(0)),
             "twice": items(meta(1), dataclasses.replace(meta(1), sha256="b" * 64))}[case]
    with pytest.raises(catalog_sqlite.NotCommon, match=case), db.sqlite_write() as conn:
        catalog_sqlite.record_new(conn, group, catalog.clock.now())
    assert counts(db)[2].keys() == {f"{SERIES}.0"}  # rolled back: nothing of the group stays
    outcomes = catalog.record_group(db, group)
    assert outcomes[0] == (Recorded.NEW, None)
    assert outcomes[1] == {"new study": (Recorded.NEW, None),
                           "new series": (Recorded.NEW, None),
                           "recorded before": (Recorded.DUPLICATE_SAME, group[1][1].path),
                           "twice": (Recorded.DUPLICATE_DIFFERENT, group[1][1].path)}[case]
    studies, series, paths = counts(db)
    assert sum(n for _, n in studies) == sum(n for _, n in series) == len(paths)


def test_a_path_another_row_holds_fails_as_in_sqlalchemy(db: Database) -> None:
    catalog.record_group(db, items(meta(0)))
    taken = [(meta(1), StoredFile(path=f"instances/{SERIES}.0.dcm", size=1))]
    with pytest.raises(IntegrityError, match="UNIQUE constraint failed: instances.path"):
        catalog.record_group(db, taken)
    assert counts(db)[:2] == ([(STUDY, 1)], [(SERIES, 1)])  # the bumps were rolled back


def test_a_locked_database_is_unavailable(db: Database) -> None:
    catalog.record_group(db, items(meta(0)))
    locker = sqlite3.connect(db.url.split("///", 1)[1], isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")
        with pytest.raises(DatabaseUnavailableError, match="database is locked") as caught:
            catalog.record_group(db, items(meta(1)))
        assert not caught.value.maybe_committed
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert catalog.record_group(db, items(meta(1))) == [(Recorded.NEW, None)]


def test_an_exception_in_the_transaction_rolls_it_back(db: Database) -> None:
    catalog.record_group(db, items(meta(0)))
    with pytest.raises(RuntimeError, match="handler gone"), db.sqlite_write() as conn:
        catalog_sqlite.record_new(conn, items(meta(1)), catalog.clock.now())
        raise RuntimeError("handler gone")
    assert counts(db)[2].keys() == {f"{SERIES}.0"}
    with db.sqlite_write() as conn:  # the kept connection is usable again
        assert conn.execute("SELECT count(*) FROM instances").fetchone() == (1,)


def test_two_databases_on_one_file_lose_no_count(tmp_path: Path) -> None:
    """Two Database objects on one file (two receiver processes), four threads each, record
    into the same series at once: every instance counted once, none refused."""
    first = sqlite_db(tmp_path / "shared.db", busy_timeout_ms=5000)  # SQLite's busy handler
    second = Database(first.url, busy_timeout_ms=5000)  # waits for the other's transactions
    catalog.record_group(first, items(meta(0)))
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def run(db: Database, w: int) -> None:
        try:
            barrier.wait()
            for k in range(10):
                catalog.record_group(db, items(meta(1 + w * 10 + k)))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(first if w % 2 else second, w))
               for w in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert counts(first)[:2] == ([(STUDY, 81)], [(SERIES, 81)])
        assert len(counts(first)[2]) == 81
    finally:
        first.dispose()
        second.dispose()


def test_sqlite_write_is_for_sqlite_only() -> None:
    pg = Database("postgresql+psycopg://nobody@127.0.0.1:1/none")
    with pytest.raises(TypeError, match="SQLite databases only"), pg.sqlite_write():
        pass
    pg.dispose()


def test_dispose_gives_the_kept_connection_back(db: Database) -> None:
    catalog.record_group(db, items(meta(0)))
    catalog.record_group(db, items(meta(1)))
    db.dispose()
    assert catalog.record_group(db, items(meta(2))) == [(Recorded.NEW, None)]
