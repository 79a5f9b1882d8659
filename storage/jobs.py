"""The job state machine: the only code that changes a job's status.

Every transition is an ``UPDATE ... WHERE id = ? AND status = ?`` (and, for a running job, the
lease token), checked by its row count, and writes a ``JobEvent``. Functions take the caller's
session and never commit, so a caller can, in one transaction, mark an ANALYZE job succeeded and
enqueue its DELIVER jobs. A refused transition raises ``JobStateError``.

    QUEUED --claim--> RUNNING --succeed--> SUCCEEDED
    RUNNING --fail(retryable, attempts left)--> QUEUED (run_after = now + backoff)
    RUNNING --fail(otherwise)--> FAILED (the dead-letter list)
    RUNNING --requeue_stale (heartbeat too old)--> QUEUED (FAILED when no attempts remain)
    QUEUED | RUNNING --cancel--> CANCELLED
    FAILED | CANCELLED --retry (admin)--> QUEUED
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, text, true, update
from sqlalchemy.orm import Session

from storage import clock
from storage.errors import JobStateError
from storage.models import Job, JobEvent, JobKind, JobStatus

Q, R, S, F, C = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED, JobStatus.FAILED,
                 JobStatus.CANCELLED)

#: (from, to) -> the operation that performs it. Anything else is forbidden.
TRANSITIONS: dict[tuple[JobStatus, JobStatus], str] = {
    (Q, R): "claim",
    (R, S): "succeed",
    (R, Q): "fail (retry) or requeue_stale",
    (R, F): "fail",
    (Q, C): "cancel",
    (R, C): "cancel",
    (F, Q): "retry",
    (C, Q): "retry",
}


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter: delay_n = uniform(0.5, 1) * min(max, base * 2^n)."""

    max_attempts: int = 5
    base_s: float = 5.0
    max_s: float = 900.0
    jitter: bool = True

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        raw = min(self.max_s, self.base_s * (2 ** max(0, attempt - 1)))
        if not self.jitter:
            return raw
        return raw * (0.5 + 0.5 * (rng or random).random())


@dataclass(frozen=True)
class Claimed:
    """A job in hand: its id and the lease token that every later transition must present."""

    id: int
    kind: JobKind
    token: str
    study_id: int | None
    destination: str | None
    payload: dict[str, Any]
    attempts: int
    max_attempts: int


def _event(s: Session, job_id: int, frm: JobStatus | None, to: JobStatus, msg: str | None) -> None:
    s.add(JobEvent(job_id=job_id, at=clock.now(), from_status=frm.value if frm else None,
                   to_status=to.value, message=msg))


def _transition(s: Session, job_id: int, frm: JobStatus | tuple[JobStatus, ...], to: JobStatus,
                *, token: str | None = None, message: str | None = None,
                **values: Any) -> JobStatus:
    """Apply one guarded transition; returns the status it came from."""
    froms = frm if isinstance(frm, tuple) else (frm,)
    for f in froms:
        if (f, to) not in TRANSITIONS:
            raise JobStateError(f"transition {f} -> {to} is not allowed")
    current = s.execute(select(Job.status).where(Job.id == job_id)).scalar_one_or_none()
    if current is None:
        raise JobStateError(f"job {job_id} does not exist")
    if current not in froms:
        raise JobStateError(f"job {job_id} is {current}, not {' or '.join(froms)}")
    stmt = update(Job).where(Job.id == job_id, Job.status == current)
    if token is not None:
        stmt = stmt.where(Job.lease_token == token)
    res = s.execute(stmt.values(status=to, updated_at=clock.now(), **values)
                    .execution_options(synchronize_session=False))
    if res.rowcount != 1:  # type: ignore[attr-defined]
        raise JobStateError(f"job {job_id}: lease lost or state changed; {to} refused")
    _event(s, job_id, current, to, message)
    return current


def enqueue(s: Session, kind: JobKind, *, study_id: int | None = None,
            destination: str | None = None, payload: dict[str, Any] | None = None,
            max_attempts: int = 5, dedupe_key: str | None = None,
            run_after: datetime | None = None) -> Job | None:
    """Queue a job; with ``dedupe_key``, nothing is queued while one with that key is live or
    has succeeded (returns None then)."""
    if dedupe_key is not None:
        if s.get_bind().dialect.name == "postgresql":  # two assemblers: one enqueues, one sees it
            s.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"),
                      {"k": dedupe_key})
        live = s.execute(select(Job.id).where(
            Job.dedupe_key == dedupe_key,
            Job.status.in_([Q, R, S]))).first()
        if live is not None:
            return None
    now = clock.now()
    job = Job(kind=kind, status=Q, study_id=study_id, destination=destination,
              payload=payload or {}, max_attempts=max_attempts, dedupe_key=dedupe_key,
              run_after=run_after or now, created_at=now, updated_at=now, attempts=0)
    s.add(job)
    s.flush()
    _event(s, job.id, None, Q, "enqueued")
    return job


def claim(s: Session, kind: JobKind, worker: str, *,
          exclude_destinations: tuple[str, ...] = ()) -> Claimed | None:
    """Take the oldest due QUEUED job of ``kind`` with a fresh lease, or None.

    On PostgreSQL the candidate row is locked with ``FOR UPDATE SKIP LOCKED`` so concurrent
    claimers never collide; on SQLite the caller's BEGIN IMMEDIATE serialises claimers.
    """
    now = clock.now()
    q = (select(Job).where(Job.kind == kind, Job.status == Q, Job.run_after <= now)
         .order_by(Job.run_after, Job.id).limit(1))
    if exclude_destinations:
        q = q.where(or_(Job.destination.is_(None), Job.destination.not_in(exclude_destinations)))
    if s.get_bind().dialect.name == "postgresql":
        q = q.with_for_update(skip_locked=True)
    job = s.execute(q).scalars().first()
    if job is None:
        return None
    token = str(uuid.uuid4())
    _transition(s, job.id, Q, R, token=None, message=f"claimed by {worker}", lease_token=token,
                heartbeat_at=now, worker=worker, attempts=job.attempts + 1)
    return Claimed(id=job.id, kind=job.kind, token=token, study_id=job.study_id,
                   destination=job.destination, payload=dict(job.payload),
                   attempts=job.attempts + 1, max_attempts=job.max_attempts)


def heartbeat(s: Session, job_id: int, token: str) -> bool:
    """Renew a lease; False when the lease was lost (the worker must stop and not publish)."""
    res = s.execute(update(Job).where(Job.id == job_id, Job.status == R, Job.lease_token == token)
                    .values(heartbeat_at=clock.now())
                    .execution_options(synchronize_session=False))
    return res.rowcount == 1  # type: ignore[attr-defined]


def succeed(s: Session, job_id: int, token: str, message: str | None = None) -> None:
    _transition(s, job_id, R, S, token=token, message=message or "succeeded", lease_token=None,
                last_error=None)


def fail(s: Session, job_id: int, token: str, error: str, *, retryable: bool,
         policy: RetryPolicy | None = None, rng: random.Random | None = None) -> JobStatus:
    """Record a failure: back to QUEUED after a backoff when retryable and attempts remain,
    else FAILED. Returns the new status."""
    job = s.get(Job, job_id, populate_existing=True)  # claim() updated the row behind the ORM
    if job is None:
        raise JobStateError(f"job {job_id} does not exist")
    policy = policy or RetryPolicy(max_attempts=job.max_attempts)
    if retryable and job.attempts < policy.max_attempts:
        delay = policy.delay(job.attempts, rng)
        _transition(s, job_id, R, Q, token=token, message=f"retry in {delay:.2f}s: {error}",
                    last_error=error, lease_token=None,
                    run_after=clock.now() + timedelta(seconds=delay))
        return Q
    why = "permanent" if not retryable else f"{job.attempts} attempts"
    _transition(s, job_id, R, F, token=token, message=f"failed ({why}): {error}",
                last_error=error, lease_token=None)
    return F


def cancel(s: Session, job_id: int, reason: str = "cancelled by admin") -> None:
    _transition(s, job_id, (Q, R), C, message=reason, lease_token=None)


def retry(s: Session, job_id: int, reason: str = "retried by admin") -> None:
    """Put a dead-lettered or cancelled job back in the queue, due now, attempts reset."""
    _transition(s, job_id, (F, C), Q, message=reason, run_after=clock.now(), attempts=0)


def requeue_stale(s: Session, older_than_s: float) -> list[int]:
    """Re-queue RUNNING jobs whose heartbeat is older than ``older_than_s``; returns their ids.

    Their old lease tokens are cleared, so a stale worker's late ``succeed`` is refused. Several
    processes may run this at once (one per service on a shared database): the rows are locked,
    and a row another process is handling is skipped.
    """
    cutoff = clock.now() - timedelta(seconds=older_than_s)
    return _requeue(s, Job.heartbeat_at < cutoff, "lease expired")


def requeue_process(s: Session, process: str) -> list[int]:
    """Re-queue at once the RUNNING jobs claimed by ``process`` (``host:pid``), a process known
    to have died (its parent saw it exit), instead of waiting for their leases to run out."""
    return _requeue(s, Job.worker.startswith(process + "/", autoescape=True),
                    f"{process} died")


def requeue_running(s: Session, why: str) -> list[int]:
    """Re-queue every RUNNING job: for a node that alone uses its database, at its start, when
    whoever held them can only be its own previous run (killed, or its power lost)."""
    return _requeue(s, true(), why)


def _requeue(s: Session, which: Any, why: str) -> list[int]:
    q = select(Job.id, Job.attempts, Job.max_attempts).where(Job.status == R, which)
    if s.get_bind().dialect.name == "postgresql":
        q = q.with_for_update(skip_locked=True)
    rows = list(s.execute(q))
    for job_id, attempts, max_attempts in rows:
        if attempts >= max_attempts:  # it keeps dying mid-run: dead-letter it
            _transition(s, job_id, R, F, message=f"{why} on the last attempt; failed",
                        lease_token=None, last_error="worker stopped during every attempt")
        else:
            _transition(s, job_id, R, Q, message=f"{why}; requeued", lease_token=None,
                        run_after=clock.now())
    return [r[0] for r in rows]
