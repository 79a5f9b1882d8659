"""Retention: purge studies (instances and results) older than a number of days.

A study is never purged while one of its jobs is QUEUED or RUNNING. Rows go first, in one
transaction per study; files are removed after the commit, so a crash leaves at worst orphan
files, which the service removes at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, select, update

from storage import clock
from storage.db import Database
from storage.files import FileStore
from storage.models import Instance, Job, JobStatus, Result, ResultObject, Series, Study


@dataclass(frozen=True)
class PurgeReport:
    studies: int
    files: int
    skipped_busy: int


def candidates(db: Database, older_than_days: float) -> list[int]:
    cutoff = clock.now() - timedelta(days=older_than_days)
    with db.read() as s:
        return list(s.execute(select(Study.id).where(Study.last_received_at < cutoff)).scalars())


def purge(db: Database, store: FileStore, older_than_days: float,
          dry_run: bool = False) -> PurgeReport:
    studies = files = busy = 0
    cutoff = clock.now() - timedelta(days=older_than_days)
    for study_id in candidates(db, older_than_days):
        with db.write() as s:
            # Locked: a receiver adding to this study waits for the purge, or the purge (which
            # waits for that receiver's commit) reads the new last_received_at and skips it.
            study = s.get(Study, study_id, with_for_update=True, populate_existing=True)
            if study is None or study.last_received_at >= cutoff:
                continue  # an instance arrived since the candidates were read
            live = s.execute(select(Job.id).where(
                Job.study_id == study_id,
                Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))).first()
            if live is not None:
                busy += 1
                continue
            paths = list(s.execute(select(Instance.path).where(Instance.study_id == study_id))
                         .scalars())
            result_ids = list(s.execute(select(Result.id).where(Result.study_id == study_id))
                              .scalars())
            paths += list(s.execute(select(ResultObject.path).where(
                ResultObject.result_id.in_(result_ids))).scalars())
            if dry_run:
                studies, files = studies + 1, files + len(paths)
                s.rollback()
                continue
            s.execute(delete(Instance).where(Instance.study_id == study_id))
            s.execute(delete(Series).where(Series.study_id == study_id))
            s.execute(update(Result).where(Result.study_id == study_id).values(superseded_by=None))
            s.execute(delete(ResultObject).where(ResultObject.result_id.in_(result_ids)))
            s.execute(delete(Result).where(Result.study_id == study_id))
            s.execute(delete(Study).where(Study.id == study_id))
        for p in paths:
            store.remove(p)
        studies, files = studies + 1, files + len(paths)
    return PurgeReport(studies=studies, files=files, skipped_busy=busy)
