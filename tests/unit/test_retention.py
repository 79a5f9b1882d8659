"""Retention on SQLite and PostgreSQL: old studies go, busy and fresh ones stay, and an instance
recorded into an old study while it is being purged is never lost."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

import storage.clock
from storage import catalog, jobs, retention
from storage.catalog import InstanceMeta
from storage.db import Database
from storage.files import FileStore
from storage.models import Instance, JobKind, Study

OLD = timedelta(days=30)


def meta(study: str, i: int) -> InstanceMeta:
    return InstanceMeta(study_uid=study, series_uid=f"{study}.1", sop_instance_uid=f"{study}.1.{i}",
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sha256=f"{i:064d}",
                        transfer_syntax_uid="1.2.840.10008.1.2.1", modality="CT")


def record(db: Database, store: FileStore, study: str, i: int) -> str:
    stored = store.write(b"DICM" + bytes(i))
    with db.write() as s:
        catalog.record_instance(s, meta(study, i), stored)
    return stored.path


def aged(monkeypatch: pytest.MonkeyPatch, db: Database, store: FileStore, study: str,
         i: int) -> str:
    """Record an instance as if it had arrived 30 days ago."""
    now = storage.clock.now()
    monkeypatch.setattr(storage.clock, "now", lambda: now - OLD)
    try:
        return record(db, store, study, i)
    finally:
        monkeypatch.undo()


def uids(db: Database) -> set[str]:
    with db.read() as s:
        return set(s.execute(select(Instance.sop_instance_uid)).scalars())


def test_old_studies_go_fresh_and_busy_ones_stay(any_db: Database, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    store = FileStore(tmp_path / "store")
    old_file = aged(monkeypatch, any_db, store, "1.1", 1)
    aged(monkeypatch, any_db, store, "2.2", 2)
    record(any_db, store, "3.3", 3)
    with any_db.write() as s:  # a queued job keeps study 2.2 however old it is
        study_id = s.execute(select(Study.id).where(Study.study_instance_uid == "2.2")).scalar()
        jobs.enqueue(s, JobKind.ANALYZE, study_id=study_id)
    report = retention.purge(any_db, store, 7)
    assert (report.studies, report.files, report.skipped_busy) == (1, 1, 1)
    assert uids(any_db) == {"2.2.1.2", "3.3.1.3"}
    assert not (store.root / old_file).exists()


def test_an_instance_recorded_during_the_purge_of_its_study_is_kept(
        any_db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A receiver adds instance 2 to a 30-day-old study and commits while the purge of that
    study runs: the acknowledged instance must survive (the purge skips the study)."""
    store = FileStore(tmp_path / "store")
    aged(monkeypatch, any_db, store, "4.4", 1)
    recorded, errors = threading.Event(), []

    def receiver() -> None:
        try:
            stored = store.write(b"DICM new")
            with any_db.write() as s:
                catalog.record_instance(s, meta("4.4", 2), stored)
                recorded.set()
                time.sleep(0.5)  # hold the transaction while the purge starts on the study
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
            recorded.set()

    candidates = retention.candidates(any_db, 7)  # read before the new instance arrives
    assert len(candidates) == 1
    monkeypatch.setattr(retention, "candidates", lambda *_: candidates)
    t = threading.Thread(target=receiver)
    t.start()
    recorded.wait(10)
    retention.purge(any_db, store, 7)
    t.join()
    assert errors == []
    assert "4.4.1.2" in uids(any_db)  # acknowledged, so it must still be there
    with any_db.read() as s:
        path = s.execute(select(Instance.path).where(
            Instance.sop_instance_uid == "4.4.1.2")).scalar_one()
    assert (store.root / path).is_file()
