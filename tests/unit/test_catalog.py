"""The catalogue on SQLite and PostgreSQL: duplicates, and receivers racing on one study."""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy import func, select, update

from storage import catalog
from storage.catalog import InstanceMeta, Recorded
from storage.db import Database
from storage.files import StoredFile
from storage.models import Instance, Series, Study, StudyState

STUDY, SERIES = "1.2.826.0.1.1", "1.2.826.0.1.1.1"


def meta(i: int, sha: str = "a" * 64, series: str = SERIES) -> InstanceMeta:
    return InstanceMeta(study_uid=STUDY, series_uid=series, sop_instance_uid=f"{SERIES}.{i}",
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sha256=sha,
                        transfer_syntax_uid="1.2.840.10008.1.2.1", modality="CT")


def record(db: Database, m: InstanceMeta, path: str) -> tuple[Recorded, str | None]:
    with db.write() as s:
        return catalog.record_instance(s, m, StoredFile(path=path, size=10))


def test_duplicates_are_recognised_by_their_bytes(any_db: Database) -> None:
    assert record(any_db, meta(1), "instances/a.dcm") == (Recorded.NEW, None)
    assert record(any_db, meta(1), "instances/b.dcm") == (Recorded.DUPLICATE_SAME,
                                                          "instances/b.dcm")
    assert record(any_db, meta(1, sha="b" * 64), "instances/c.dcm") == (
        Recorded.DUPLICATE_DIFFERENT, "instances/c.dcm")
    with any_db.read() as s:
        assert s.execute(select(Instance.path)).scalars().all() == ["instances/a.dcm"]


def test_receivers_racing_on_one_new_study_lose_no_count(any_db: Database) -> None:
    """Eight threads, each its own connection (like receivers on several machines), add
    instances to the same new study and two series at once: one study row, two series rows,
    and counters that add up: no unique-key failure, no lost update."""
    workers, per_worker = 8, 6
    errors: list[BaseException] = []
    barrier = threading.Barrier(workers)

    def run(w: int) -> None:
        try:
            barrier.wait()
            for k in range(per_worker):
                i = w * per_worker + k
                record(any_db, meta(i, series=f"{SERIES}.{w % 2}"), f"instances/{i}.dcm")
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with any_db.read() as s:
        studies = s.execute(select(Study)).scalars().all()
        series = s.execute(select(Series.instance_count)).scalars().all()
        n = s.execute(select(func.count()).select_from(Instance)).scalar_one()
    assert len(studies) == 1
    assert studies[0].instance_count == workers * per_worker == n
    assert sorted(series) == [workers * per_worker // 2] * 2


def test_replace_policy_swaps_the_file_and_reopens_the_study(any_db: Database,
                                                              frozen_clock: Any) -> None:
    record(any_db, meta(1), "instances/a.dcm")
    record(any_db, meta(2), "instances/b.dcm")
    with any_db.write() as s:
        s.execute(update(Study).values(state=StudyState.ANALYSED))
    later = frozen_clock.advance(60)
    with any_db.write() as s:
        outcome = catalog.record_instance(s, meta(1, sha="c" * 64),
                                          StoredFile(path="instances/c.dcm", size=20),
                                          replace=True)
    assert outcome == (Recorded.REPLACED, "instances/a.dcm")  # the displaced file, to remove
    with any_db.read() as s:
        rows = {i.sop_instance_uid: i for i in s.execute(select(Instance)).scalars()}
        study = s.execute(select(Study)).scalar_one()
    replaced = rows[f"{SERIES}.1"]
    assert (replaced.path, replaced.size, replaced.sha256, replaced.received_at) == (
        "instances/c.dcm", 20, "c" * 64, later)
    assert rows[f"{SERIES}.2"].path == "instances/b.dcm"  # the other instance is untouched
    assert (study.state, study.last_received_at, study.instance_count) == (
        StudyState.RECEIVING, later, 2)  # grew again: no new instance, but new content
