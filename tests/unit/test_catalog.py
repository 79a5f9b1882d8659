"""The catalogue on SQLite and PostgreSQL: duplicates, and receivers racing on one study."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from storage import catalog
from storage.catalog import InstanceMeta, Recorded
from storage.db import Database
from storage.errors import DatabaseUnavailableError
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


def counts(db: Database) -> tuple[list[tuple[str, int]], list[tuple[str, int]], dict[str, str]]:
    """Studies and series with their counters, and every instance's path, by UID."""
    with db.read() as s:
        studies = s.execute(select(Study.study_instance_uid, Study.instance_count)
                            .order_by(Study.study_instance_uid)).all()
        series = s.execute(select(Series.series_instance_uid, Series.instance_count)
                           .order_by(Series.series_instance_uid)).all()
        paths = dict(s.execute(select(Instance.sop_instance_uid, Instance.path)).all())
    return [tuple(r) for r in studies], [tuple(r) for r in series], paths


def test_a_group_is_recorded_as_one_by_one_would_record_it(any_db: Database,
                                                           tmp_path: Path) -> None:
    """New instances of two studies and three series, a duplicate of a stored instance, one
    with other bytes (replaced), and one UID twice in the group: the outcomes, counters and
    rows are those of recording the same items one after the other, on a second database."""
    def other_study(i: int) -> InstanceMeta:
        return dataclasses.replace(meta(i, series="2.25.9.1"), study_uid="2.25.9",
                                   sop_instance_uid=f"2.25.9.1.{i}")

    before = [(meta(1), "instances/a.dcm"), (meta(2), "instances/b.dcm")]
    group = [(meta(3), "instances/c.dcm"), (other_study(1), "instances/d.dcm"),
             (meta(1), "instances/e.dcm"),  # the same bytes as a.dcm: a duplicate
             (meta(2, sha="c" * 64), "instances/f.dcm"),  # other bytes: replaces b.dcm
             (meta(4, series=f"{SERIES}.2"), "instances/g.dcm"),
             (meta(3, sha="d" * 64), "instances/h.dcm"),  # c's UID again, other bytes
             (other_study(2), "instances/i.dcm")]
    one_by_one = Database(f"sqlite:///{tmp_path / 'one-by-one.db'}")
    one_by_one.upgrade()
    try:
        for db in (any_db, one_by_one):
            for m, path in before:
                record(db, m, path)
        with any_db.write() as s:
            together = catalog.record_instances(
                s, [(m, StoredFile(path=p, size=10)) for m, p in group], replace=True)
        alone = []
        for m, path in group:
            with one_by_one.write() as s:
                alone.append(catalog.record_instance(s, m, StoredFile(path=path, size=10),
                                                     replace=True))
        assert together == alone == [
            (Recorded.NEW, None), (Recorded.NEW, None),
            (Recorded.DUPLICATE_SAME, "instances/e.dcm"), (Recorded.REPLACED, "instances/b.dcm"),
            (Recorded.NEW, None), (Recorded.REPLACED, "instances/c.dcm"), (Recorded.NEW, None)]
        assert counts(any_db) == counts(one_by_one)
        assert counts(any_db)[:2] == ([(STUDY, 4), ("2.25.9", 2)],
                                      [(SERIES, 3), (f"{SERIES}.2", 1), ("2.25.9.1", 2)])
    finally:
        one_by_one.dispose()


class HeldRecorder:
    """A GroupRecorder whose first transaction waits until ``release()``, so the instances
    of the threads started meanwhile queue and form the next group; ``sizes`` lists how many
    instances each transaction was given, ``committed`` each commit's."""

    def __init__(self, db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
        self.committed: list[int] = []
        self.recorder = catalog.GroupRecorder(db, on_commit=self.committed.append)
        self.sizes: list[int] = []
        self._go = threading.Event()
        self._threads: list[threading.Thread] = []
        self.results: dict[str, Any] = {}
        real = catalog.record_group  # each transaction the recorder runs

        def held(db: Database, items: Any, replace: bool = False) -> Any:
            self.sizes.append(len(items))
            if len(self.sizes) == 1:
                assert self._go.wait(10)
            return real(db, items, replace)

        monkeypatch.setattr(catalog, "record_group", held)

    def start(self, m: InstanceMeta, path: str) -> None:
        def run() -> None:
            try:
                self.results[m.sop_instance_uid] = self.recorder.record(
                    m, StoredFile(path=path, size=10))
            except Exception as exc:  # noqa: BLE001 - the handler's view: its own error
                self.results[m.sop_instance_uid] = exc

        t = threading.Thread(target=run)
        t.start()
        self._threads.append(t)

    def queue_then_release(self, group: list[tuple[InstanceMeta, str]]) -> None:
        deadline = time.monotonic() + 10
        while not self.sizes:  # the first instance is in its transaction
            assert time.monotonic() < deadline
            time.sleep(0.001)
        for m, path in group:
            self.start(m, path)
        while len(self.recorder._queue) < len(group):
            assert time.monotonic() < deadline
            time.sleep(0.001)
        self._go.set()
        for t in self._threads:
            t.join(10)
            assert not t.is_alive()


def test_concurrent_instances_share_one_transaction(any_db: Database,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    held = HeldRecorder(any_db, monkeypatch)
    held.start(meta(0), "instances/0.dcm")
    held.queue_then_release([(meta(i), f"instances/{i}.dcm") for i in range(1, 6)])

    assert held.sizes == [1, 5] == held.committed  # two transactions for six instances
    assert held.results == {f"{SERIES}.{i}": (Recorded.NEW, None) for i in range(6)}
    assert counts(any_db)[:2] == ([(STUDY, 6)], [(SERIES, 6)])
    # Alone again: one instance, one transaction.
    assert held.recorder.record(meta(6), StoredFile(path="instances/6.dcm", size=10)) == (
        Recorded.NEW, None)
    assert held.sizes[2:] == [1] == held.committed[2:]


def test_a_row_the_database_refuses_fails_only_its_own_instance(
        any_db: Database, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """One instance of the group names a path another row holds (a unique key): the group's
    transaction fails, each is recorded alone, and only that one is refused."""
    record(any_db, meta(9), "instances/taken.dcm")
    held = HeldRecorder(any_db, monkeypatch)
    held.start(meta(0), "instances/0.dcm")
    held.queue_then_release([(meta(1), "instances/1.dcm"), (meta(2), "instances/taken.dcm"),
                             (meta(3), "instances/3.dcm")])

    assert held.sizes == [1, 3, 1, 1, 1, 1]  # the group, then alone (the bad one twice)
    assert held.committed == [1, 1, 1]
    assert isinstance(held.results.pop(f"{SERIES}.2"), IntegrityError)
    assert held.results == {f"{SERIES}.{i}": (Recorded.NEW, None) for i in (0, 1, 3)}
    assert "recording 3 instances together failed" in caplog.text
    assert sorted(counts(any_db)[2]) == [f"{SERIES}.{i}" for i in (0, 1, 3, 9)]
    assert counts(any_db)[:2] == ([(STUDY, 4)], [(SERIES, 4)])


def test_an_unavailable_database_fails_the_whole_group(any_db: Database,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The database fails the group's statement (locked, gone): every instance of the group
    gets the error its handler answers 0xA700 for, and none is tried again alone."""
    held = HeldRecorder(any_db, monkeypatch)
    inner = catalog.record_group

    def lost(db: Database, items: Any, replace: bool = False) -> Any:
        if len(items) > 1:
            held.sizes.append(len(items))
            raise DatabaseUnavailableError("database unavailable: database is locked")
        return inner(db, items, replace)

    monkeypatch.setattr(catalog, "record_group", lost)
    held.start(meta(0), "instances/0.dcm")
    held.queue_then_release([(meta(i), f"instances/{i}.dcm") for i in range(1, 4)])

    assert held.sizes == [1, 3] and held.committed == [1]
    assert held.results.pop(f"{SERIES}.0") == (Recorded.NEW, None)
    errors = list(held.results.values())
    assert len(errors) == 3
    assert all(isinstance(e, DatabaseUnavailableError) and not e.maybe_committed
               for e in errors)
    assert counts(any_db)[2].keys() == {f"{SERIES}.0"}


def test_a_failing_commit_callback_does_not_fail_a_committed_instance(
        any_db: Database, caplog: pytest.LogCaptureFixture) -> None:
    def broken(n: int) -> None:
        raise RuntimeError("metrics registry gone")

    recorder = catalog.GroupRecorder(any_db, on_commit=broken)
    assert recorder.record(meta(1), StoredFile(path="instances/1.dcm", size=10)) == (
        Recorded.NEW, None)
    assert "the group-commit callback failed" in caplog.text
    assert counts(any_db)[2] == {f"{SERIES}.1": "instances/1.dcm"}
