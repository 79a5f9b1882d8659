"""The job state machine: allowed transitions, refused ones, leases, retries, claiming, dedupe."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from storage import jobs
from storage.db import Database
from storage.errors import JobStateError
from storage.jobs import TRANSITIONS, Claimed, RetryPolicy
from storage.models import Job, JobEvent, JobKind, JobStatus
from tests.conftest import FrozenClock

Q, R, S, F, C = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED, JobStatus.FAILED,
                 JobStatus.CANCELLED)
ANALYZE, DELIVER = JobKind.ANALYZE, JobKind.DELIVER

ALLOWED = {(Q, R), (R, S), (R, Q), (R, F), (Q, C), (R, C), (F, Q), (C, Q)}
FORBIDDEN = sorted(((a, b) for a in JobStatus for b in JobStatus if (a, b) not in ALLOWED),
                   key=lambda p: (list(JobStatus).index(p[0]), list(JobStatus).index(p[1])))


@pytest.fixture
def db(any_db: Database) -> Database:
    """Every test here runs on SQLite and on PostgreSQL."""
    return any_db


# -- helpers ------------------------------------------------------------------------------


def try_enqueue(db: Database, kind: JobKind = ANALYZE, **kw: Any) -> int | None:
    """Enqueue in its own transaction; the new job's id, or None when deduplicated."""
    with db.write() as s:
        job = jobs.enqueue(s, kind, **kw)
        return None if job is None else job.id


def enqueue(db: Database, kind: JobKind = ANALYZE, **kw: Any) -> int:
    job_id = try_enqueue(db, kind, **kw)
    assert job_id is not None
    return job_id


def claim(db: Database, kind: JobKind = ANALYZE, worker: str = "w1",
          **kw: Any) -> Claimed | None:
    with db.write() as s:
        return jobs.claim(s, kind, worker, **kw)


def row(db: Database, job_id: int) -> dict[str, Any]:
    with db.read() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return {c.key: getattr(job, c.key) for c in Job.__mapper__.column_attrs}


def events(db: Database, job_id: int) -> list[tuple[str | None, str, str | None]]:
    with db.read() as s:
        evs = s.execute(select(JobEvent).where(JobEvent.job_id == job_id)
                        .order_by(JobEvent.id)).scalars()
        return [(e.from_status, e.to_status, e.message) for e in evs]


def last_event(db: Database, job_id: int) -> tuple[str | None, str]:
    frm, to, _ = events(db, job_id)[-1]
    return frm, to


def put_in(db: Database, status: JobStatus) -> tuple[int, str]:
    """A job in ``status`` and the lease token its (last) worker held ("" if never claimed)."""
    job_id = enqueue(db)
    if status is Q:
        return job_id, ""
    if status is C:
        with db.write() as s:
            jobs.cancel(s, job_id)
        return job_id, ""
    c = claim(db)
    assert c is not None and c.id == job_id
    with db.write() as s:
        if status is S:
            jobs.succeed(s, job_id, c.token)
        elif status is F:
            assert jobs.fail(s, job_id, c.token, "boom", retryable=False) is F
    assert row(db, job_id)["status"] is status
    return job_id, c.token


# -- the table ----------------------------------------------------------------------------


def test_transition_table_is_the_documented_one() -> None:
    assert set(TRANSITIONS) == ALLOWED
    assert len(FORBIDDEN) == 25 - 8


# -- allowed transitions, each through its public function ---------------------------------


def test_enqueue_creates_a_queued_job_with_an_event(db: Database,
                                                    frozen_clock: FrozenClock) -> None:
    job_id = enqueue(db, DELIVER, destination="pacs", payload={"result": 3}, max_attempts=7)
    job = row(db, job_id)
    assert (job["status"], job["kind"], job["destination"]) == (Q, DELIVER, "pacs")
    assert job["payload"] == {"result": 3}
    assert (job["attempts"], job["max_attempts"]) == (0, 7)
    assert job["run_after"] == frozen_clock.now
    assert job["lease_token"] is None
    assert events(db, job_id) == [(None, "QUEUED", "enqueued")]


def test_claim_queued_to_running_sets_a_lease(db: Database, frozen_clock: FrozenClock) -> None:
    job_id = enqueue(db, payload={"series": ["1.2.3"]})
    c = claim(db, worker="worker-7")
    assert c is not None
    assert (c.id, c.kind, c.attempts, c.payload) == (job_id, ANALYZE, 1, {"series": ["1.2.3"]})
    job = row(db, job_id)
    assert job["status"] is R
    assert job["lease_token"] == c.token and len(c.token) == 36
    assert job["heartbeat_at"] == frozen_clock.now
    assert job["worker"] == "worker-7"
    assert job["attempts"] == 1
    assert last_event(db, job_id) == ("QUEUED", "RUNNING")


def test_each_claim_gets_a_new_lease_token(db: Database, frozen_clock: FrozenClock) -> None:
    job_id = enqueue(db)
    first = claim(db)
    assert first is not None
    with db.write() as s:
        assert jobs.fail(s, job_id, first.token, "x", retryable=True,
                         policy=RetryPolicy(base_s=1, jitter=False)) is Q
    frozen_clock.advance(1)
    second = claim(db)
    assert second is not None and second.id == job_id
    assert second.token != first.token
    assert second.attempts == 2


def test_succeed_running_to_succeeded_clears_the_lease(db: Database,
                                                       frozen_clock: FrozenClock) -> None:
    job_id = enqueue(db)
    c = claim(db)
    assert c is not None
    with db.write() as s:
        jobs.succeed(s, job_id, c.token, "3 objects")
    job = row(db, job_id)
    assert job["status"] is S
    assert job["lease_token"] is None
    assert events(db, job_id)[-1] == ("RUNNING", "SUCCEEDED", "3 objects")


def test_fail_retryable_running_to_queued_clears_the_lease(db: Database,
                                                           frozen_clock: FrozenClock) -> None:
    job_id = enqueue(db)
    c = claim(db)
    assert c is not None
    with db.write() as s:
        assert jobs.fail(s, job_id, c.token, "association refused", retryable=True) is Q
    job = row(db, job_id)
    assert job["status"] is Q
    assert job["lease_token"] is None
    assert job["last_error"] == "association refused"
    assert job["run_after"] > frozen_clock.now
    assert last_event(db, job_id) == ("RUNNING", "QUEUED")


def test_requeue_stale_running_to_queued_clears_the_lease(db: Database,
                                                          frozen_clock: FrozenClock) -> None:
    job_id = enqueue(db)
    assert claim(db) is not None
    frozen_clock.advance(301)
    with db.write() as s:
        assert jobs.requeue_stale(s, older_than_s=300) == [job_id]
    job = row(db, job_id)
    assert job["status"] is Q
    assert job["lease_token"] is None
    assert job["run_after"] == frozen_clock.now  # due again at once
    assert last_event(db, job_id) == ("RUNNING", "QUEUED")


def test_requeue_process_takes_back_only_that_processs_jobs(db: Database,
                                                           frozen_clock: FrozenClock) -> None:
    """A dead worker process's jobs go back at once; another process's (host:12 is not
    host:1, and '%' in a name is no wildcard) stay with it, however old their heartbeat."""
    mine = [enqueue(db, dedupe_key=f"m{i}") for i in range(2)]
    others = [enqueue(db, dedupe_key=f"o{i}") for i in range(2)]
    assert claim(db, worker="host:1/worker-0") is not None
    assert claim(db, worker="host:1/worker-1") is not None
    assert claim(db, worker="host:12/worker-0") is not None
    assert claim(db, worker="host:1%/worker-0") is not None
    frozen_clock.advance(3600)
    with db.write() as s:
        assert sorted(jobs.requeue_process(s, "host:1")) == mine
    assert [row(db, j)["status"] for j in mine + others] == [Q, Q, R, R]
    assert row(db, mine[0])["lease_token"] is None
    assert last_event(db, mine[0]) == ("RUNNING", "QUEUED")
    with db.read() as s:
        assert s.get(JobEvent, max(e.id for e in s.execute(select(JobEvent)).scalars()
                                   if e.job_id == mine[1])).message == "host:1 died; requeued"


def test_requeue_process_fails_a_job_on_its_last_attempt(db: Database,
                                                         frozen_clock: FrozenClock) -> None:
    job_id = enqueue(db, max_attempts=1)
    assert claim(db, worker="host:7/worker-0") is not None
    with db.write() as s:
        assert jobs.requeue_process(s, "host:7") == [job_id]
    assert row(db, job_id)["status"] is F


def test_fail_permanent_running_to_failed(db: Database, frozen_clock: FrozenClock) -> None:
    job_id = enqueue(db)
    c = claim(db)
    assert c is not None
    with db.write() as s:
        assert jobs.fail(s, job_id, c.token, "bad model package", retryable=False) is F
    job = row(db, job_id)
    assert job["status"] is F
    assert job["lease_token"] is None
    assert job["last_error"] == "bad model package"
    assert last_event(db, job_id) == ("RUNNING", "FAILED")


def test_cancel_queued_to_cancelled(db: Database, frozen_clock: FrozenClock) -> None:
    job_id = enqueue(db)
    with db.write() as s:
        jobs.cancel(s, job_id, "operator said so")
    assert row(db, job_id)["status"] is C
    assert events(db, job_id)[-1] == ("QUEUED", "CANCELLED", "operator said so")
    assert claim(db) is None  # a cancelled job is never claimed


def test_cancel_running_to_cancelled_clears_the_lease(db: Database,
                                                      frozen_clock: FrozenClock) -> None:
    job_id = enqueue(db)
    assert claim(db) is not None
    with db.write() as s:
        jobs.cancel(s, job_id)
    job = row(db, job_id)
    assert job["status"] is C
    assert job["lease_token"] is None
    assert last_event(db, job_id) == ("RUNNING", "CANCELLED")


@pytest.mark.parametrize("status", [F, C])
def test_retry_puts_a_dead_or_cancelled_job_back_in_the_queue(
        db: Database, frozen_clock: FrozenClock, status: JobStatus) -> None:
    job_id, _ = put_in(db, status)
    frozen_clock.advance(3600)
    with db.write() as s:
        jobs.retry(s, job_id)
    job = row(db, job_id)
    assert job["status"] is Q
    assert job["attempts"] == 0
    assert job["run_after"] == frozen_clock.now
    assert events(db, job_id)[-1] == (status.value, "QUEUED", "retried by admin")
    again = claim(db)
    assert again is not None and again.id == job_id


# -- forbidden transitions ----------------------------------------------------------------


def _operations_to(target: JobStatus, job_id: int, token: str
                   ) -> list[Callable[[Any], object]]:
    """Every public operation that could move a job to ``target`` (claim aside)."""
    token = token or "00000000-0000-0000-0000-000000000000"
    policy = RetryPolicy(max_attempts=99)
    ops: dict[JobStatus, list[Callable[[Any], object]]] = {
        Q: [lambda s: jobs.fail(s, job_id, token, "x", retryable=True, policy=policy),
            lambda s: jobs.retry(s, job_id)],
        S: [lambda s: jobs.succeed(s, job_id, token)],
        F: [lambda s: jobs.fail(s, job_id, token, "x", retryable=False)],
        C: [lambda s: jobs.cancel(s, job_id)],
        R: [],
    }
    return ops[target]


@pytest.mark.parametrize(("frm", "to"), FORBIDDEN, ids=[f"{a}->{b}" for a, b in FORBIDDEN])
def test_forbidden_transition_is_refused_and_changes_nothing(
        db: Database, frozen_clock: FrozenClock, frm: JobStatus, to: JobStatus) -> None:
    job_id, token = put_in(db, frm)
    frozen_clock.advance(10_000)  # anything written now would show a different timestamp
    before, before_events = row(db, job_id), events(db, job_id)

    for op in _operations_to(to, job_id, token):
        # the session commits after the refusal: a refused op must not have written anything
        with db.write() as s, pytest.raises(JobStateError):
            op(s)
    with db.write() as s:
        if to is R:
            assert jobs.claim(s, ANALYZE, "w2") is None
        if to is Q:
            assert jobs.requeue_stale(s, older_than_s=0) == []

    assert row(db, job_id) == before
    assert events(db, job_id) == before_events


@pytest.mark.parametrize(("frm", "to"), FORBIDDEN, ids=[f"{a}->{b}" for a, b in FORBIDDEN])
def test_transition_guard_refuses_pairs_outside_the_table(
        db: Database, frozen_clock: FrozenClock, frm: JobStatus, to: JobStatus) -> None:
    job_id, _ = put_in(db, frm)
    with db.write() as s, pytest.raises(JobStateError, match="not allowed"):
        jobs._transition(s, job_id, frm, to)
    assert row(db, job_id)["status"] is frm


def test_transition_of_a_missing_job_is_refused(db: Database, frozen_clock: FrozenClock) -> None:
    with db.write() as s:
        with pytest.raises(JobStateError, match="does not exist"):
            jobs.cancel(s, 4242)
        with pytest.raises(JobStateError, match="does not exist"):
            jobs.fail(s, 4242, "t", "x", retryable=True)


# -- leases -------------------------------------------------------------------------------


def test_stale_workers_late_succeed_is_refused_after_requeue(
        db: Database, frozen_clock: FrozenClock) -> None:
    job_id = enqueue(db)
    stale = claim(db, worker="slow")
    assert stale is not None
    frozen_clock.advance(120)
    with db.write() as s:
        assert jobs.requeue_stale(s, older_than_s=60) == [job_id]

    with db.write() as s, pytest.raises(JobStateError):
        jobs.succeed(s, job_id, stale.token)
    assert row(db, job_id)["status"] is Q

    fresh = claim(db, worker="fast")
    assert fresh is not None and fresh.id == job_id
    n_events = len(events(db, job_id))
    with db.write() as s:  # RUNNING again, but under another lease: the token decides
        with pytest.raises(JobStateError, match="lease"):
            jobs.succeed(s, job_id, stale.token)
        with pytest.raises(JobStateError, match="lease"):
            jobs.fail(s, job_id, stale.token, "late", retryable=False)
    job = row(db, job_id)
    assert (job["status"], job["lease_token"], job["worker"]) == (R, fresh.token, "fast")
    assert len(events(db, job_id)) == n_events

    with db.write() as s:
        jobs.succeed(s, job_id, fresh.token)
    assert row(db, job_id)["status"] is S


def test_heartbeat_renews_the_lease_and_keeps_the_job(db: Database,
                                                      frozen_clock: FrozenClock) -> None:
    job_id = enqueue(db)
    c = claim(db)
    assert c is not None
    frozen_clock.advance(50)
    with db.write() as s:
        assert jobs.heartbeat(s, job_id, c.token) is True
    assert row(db, job_id)["heartbeat_at"] == frozen_clock.now
    frozen_clock.advance(50)  # 100 s since the claim, 50 since the heartbeat
    with db.write() as s:
        assert jobs.requeue_stale(s, older_than_s=60) == []
    assert row(db, job_id)["status"] is R


def test_heartbeat_returns_false_after_the_lease_is_lost(db: Database,
                                                         frozen_clock: FrozenClock) -> None:
    job_id = enqueue(db)
    c = claim(db)
    assert c is not None
    frozen_clock.advance(120)
    with db.write() as s:
        jobs.requeue_stale(s, older_than_s=60)
    with db.write() as s:
        assert jobs.heartbeat(s, job_id, c.token) is False
    other = claim(db, worker="w2")
    assert other is not None
    heartbeat_before = row(db, job_id)["heartbeat_at"]
    frozen_clock.advance(5)
    with db.write() as s:
        assert jobs.heartbeat(s, job_id, c.token) is False
        assert jobs.heartbeat(s, job_id, other.token) is True
    assert row(db, job_id)["heartbeat_at"] == heartbeat_before + timedelta(seconds=5)


def test_requeue_stale_leaves_queued_and_fresh_jobs_alone(db: Database,
                                                          frozen_clock: FrozenClock) -> None:
    old = enqueue(db)
    assert claim(db) is not None
    frozen_clock.advance(100)
    fresh = enqueue(db)
    waiting = enqueue(db)
    c = claim(db)
    assert c is not None and c.id == fresh
    frozen_clock.advance(30)
    with db.write() as s:
        assert jobs.requeue_stale(s, older_than_s=60) == [old]
    assert (row(db, fresh)["status"], row(db, waiting)["status"]) == (R, Q)


def test_cancel_of_a_running_job_makes_the_workers_succeed_fail(
        db: Database, frozen_clock: FrozenClock) -> None:
    job_id = enqueue(db)
    c = claim(db)
    assert c is not None
    with db.write() as s:
        jobs.cancel(s, job_id)
    with db.write() as s:
        assert jobs.heartbeat(s, job_id, c.token) is False
        with pytest.raises(JobStateError):
            jobs.succeed(s, job_id, c.token)
        with pytest.raises(JobStateError):
            jobs.fail(s, job_id, c.token, "x", retryable=True)
    assert row(db, job_id)["status"] is C
    assert [to for _, to, _ in events(db, job_id)] == ["QUEUED", "RUNNING", "CANCELLED"]


# -- retries and backoff ------------------------------------------------------------------


def test_retryable_failure_backs_off_within_the_policy(db: Database,
                                                       frozen_clock: FrozenClock) -> None:
    policy = RetryPolicy(max_attempts=3, base_s=10, max_s=100)
    job_id = enqueue(db, max_attempts=3)
    expected_delay = policy.delay(1, random.Random(1234))
    c = claim(db)
    assert c is not None
    with db.write() as s:
        assert jobs.fail(s, job_id, c.token, "refused", retryable=True, policy=policy,
                         rng=random.Random(1234)) is Q
    delay = (row(db, job_id)["run_after"] - frozen_clock.now).total_seconds()
    assert 5 <= delay <= 10  # attempt 1: uniform(0.5, 1) x 10 s
    assert delay == pytest.approx(expected_delay, abs=1e-3)

    rng = random.Random(99)
    frozen_clock.advance(delay)
    c = claim(db)
    assert c is not None and c.attempts == 2
    with db.write() as s:
        assert jobs.fail(s, job_id, c.token, "refused", retryable=True, policy=policy,
                         rng=rng) is Q
    delay = (row(db, job_id)["run_after"] - frozen_clock.now).total_seconds()
    assert 10 <= delay <= 20  # attempt 2: uniform(0.5, 1) x 20 s

    frozen_clock.advance(delay)
    c = claim(db)
    assert c is not None and c.attempts == 3
    with db.write() as s:  # attempts exhausted: dead-lettered
        assert jobs.fail(s, job_id, c.token, "refused", retryable=True, policy=policy,
                         rng=rng) is F
    job = row(db, job_id)
    assert (job["status"], job["attempts"], job["lease_token"]) == (F, 3, None)
    assert "3 attempts" in (events(db, job_id)[-1][2] or "")
    frozen_clock.advance(10_000)
    assert claim(db) is None


def test_job_max_attempts_is_the_default_policy(db: Database, frozen_clock: FrozenClock) -> None:
    job_id = enqueue(db, max_attempts=1)
    c = claim(db)
    assert c is not None
    with db.write() as s:
        assert jobs.fail(s, job_id, c.token, "x", retryable=True) is F


def test_non_retryable_failure_dead_letters_at_once(db: Database,
                                                    frozen_clock: FrozenClock) -> None:
    job_id = enqueue(db, max_attempts=10)
    c = claim(db)
    assert c is not None
    with db.write() as s:
        assert jobs.fail(s, job_id, c.token, "no such model", retryable=False) is F
    job = row(db, job_id)
    assert (job["status"], job["attempts"]) == (F, 1)
    assert "permanent" in (events(db, job_id)[-1][2] or "")


@pytest.mark.parametrize("seed", range(5))
def test_retry_policy_delay_bounds(seed: int) -> None:
    policy = RetryPolicy(base_s=5, max_s=900)
    rng = random.Random(seed)
    for attempt in range(1, 15):
        raw = min(900.0, 5 * 2 ** (attempt - 1))
        assert raw / 2 <= policy.delay(attempt, rng) <= raw
    assert RetryPolicy(base_s=5, max_s=900, jitter=False).delay(20) == 900
    assert RetryPolicy(base_s=5, jitter=False).delay(3) == 20
    a, b = policy.delay(4, random.Random(seed)), policy.delay(4, random.Random(seed))
    assert a == b  # seeded: reproducible


def test_retry_resets_attempts_so_the_job_gets_a_full_budget(
        db: Database, frozen_clock: FrozenClock) -> None:
    policy = RetryPolicy(max_attempts=2, base_s=1, jitter=False)
    job_id = enqueue(db, max_attempts=2)
    for _ in range(2):
        c = claim(db)
        assert c is not None
        with db.write() as s:
            status = jobs.fail(s, job_id, c.token, "x", retryable=True, policy=policy)
        frozen_clock.advance(60)
    assert status is F
    with db.write() as s:
        jobs.retry(s, job_id)
    assert row(db, job_id)["attempts"] == 0
    c = claim(db)
    assert c is not None and c.attempts == 1
    with db.write() as s:  # attempt 1 of a fresh budget: retried, not dead-lettered
        assert jobs.fail(s, job_id, c.token, "x", retryable=True, policy=policy) is Q


# -- claiming -----------------------------------------------------------------------------


def test_claim_honours_run_after(db: Database, frozen_clock: FrozenClock) -> None:
    job_id = enqueue(db, run_after=frozen_clock.now + timedelta(seconds=30))
    assert claim(db) is None
    frozen_clock.advance(29)
    assert claim(db) is None
    frozen_clock.advance(1)
    c = claim(db)
    assert c is not None and c.id == job_id


def test_claim_after_a_retryable_failure_waits_for_the_backoff(
        db: Database, frozen_clock: FrozenClock) -> None:
    job_id = enqueue(db)
    c = claim(db)
    assert c is not None
    with db.write() as s:
        jobs.fail(s, job_id, c.token, "x", retryable=True,
                  policy=RetryPolicy(base_s=40, jitter=False))
    frozen_clock.advance(39)
    assert claim(db) is None
    frozen_clock.advance(1)
    assert claim(db) is not None


def test_claim_takes_the_oldest_due_job_first(db: Database, frozen_clock: FrozenClock) -> None:
    later = enqueue(db, run_after=frozen_clock.now + timedelta(seconds=5))
    first = enqueue(db)
    second = enqueue(db)
    frozen_clock.advance(10)
    got = [c.id for c in iter(lambda: claim(db), None)]
    assert got == [first, second, later]


def test_claim_takes_only_its_kind(db: Database, frozen_clock: FrozenClock) -> None:
    deliver = enqueue(db, DELIVER, destination="pacs")
    assert claim(db, ANALYZE) is None
    c = claim(db, DELIVER)
    assert c is not None and (c.id, c.destination) == (deliver, "pacs")


def test_claim_skips_excluded_destinations(db: Database, frozen_clock: FrozenClock) -> None:
    to_a = enqueue(db, DELIVER, destination="a")
    to_b = enqueue(db, DELIVER, destination="b")
    to_c = enqueue(db, DELIVER, destination="c")
    c = claim(db, DELIVER, exclude_destinations=("a", "c"))
    assert c is not None and (c.id, c.destination) == (to_b, "b")
    assert claim(db, DELIVER, exclude_destinations=("a", "c")) is None
    assert (row(db, to_a)["status"], row(db, to_c)["status"]) == (Q, Q)
    c = claim(db, DELIVER)
    assert c is not None and c.id == to_a


def test_claim_with_exclusions_still_takes_jobs_without_a_destination(
        db: Database, frozen_clock: FrozenClock) -> None:
    job_id = enqueue(db, ANALYZE)
    c = claim(db, ANALYZE, exclude_destinations=("pacs",))
    assert c is not None and c.id == job_id


def test_claim_on_an_empty_queue_returns_none(db: Database, frozen_clock: FrozenClock) -> None:
    assert claim(db) is None


# -- dedupe -------------------------------------------------------------------------------


def test_dedupe_key_while_live_or_succeeded_enqueues_nothing(
        db: Database, frozen_clock: FrozenClock) -> None:
    key = "analyze:1.2.3:inputs:demo-1"
    job_id = enqueue(db, dedupe_key=key)
    assert job_id is not None
    assert try_enqueue(db, dedupe_key=key) is None  # queued
    c = claim(db)
    assert c is not None
    assert try_enqueue(db, dedupe_key=key) is None  # running
    with db.write() as s:
        jobs.succeed(s, job_id, c.token)
    assert try_enqueue(db, dedupe_key=key) is None  # succeeded
    assert try_enqueue(db, dedupe_key="another") is not None
    with db.read() as s:
        assert len(s.execute(select(Job.id).where(Job.dedupe_key == key)).all()) == 1


@pytest.mark.parametrize("status", [F, C])
def test_dedupe_key_after_failure_or_cancel_enqueues_a_new_job(
        db: Database, frozen_clock: FrozenClock, status: JobStatus) -> None:
    with db.write() as s:
        job = jobs.enqueue(s, ANALYZE, dedupe_key="k")
        assert job is not None
        old = job.id
    if status is C:
        with db.write() as s:
            jobs.cancel(s, old)
    else:
        c = claim(db)
        assert c is not None
        with db.write() as s:
            jobs.fail(s, old, c.token, "x", retryable=False)
    new = try_enqueue(db, dedupe_key="k")
    assert new is not None and new != old
    assert row(db, new)["status"] is Q
    assert try_enqueue(db, dedupe_key="k") is None  # and now that one is live


def test_one_transaction_can_succeed_and_enqueue(db: Database, frozen_clock: FrozenClock) -> None:
    """The functions never commit: a failure later in the transaction undoes the transition."""
    job_id = enqueue(db)
    c = claim(db)
    assert c is not None
    with pytest.raises(RuntimeError), db.write() as s:
        jobs.succeed(s, job_id, c.token)
        jobs.enqueue(s, DELIVER, destination="pacs")
        raise RuntimeError("crash before commit")
    assert row(db, job_id)["status"] is R
    assert claim(db, DELIVER) is None
    with db.write() as s:
        jobs.succeed(s, job_id, c.token)
        jobs.enqueue(s, DELIVER, destination="pacs")
    assert row(db, job_id)["status"] is S
    assert claim(db, DELIVER) is not None


def test_claim_and_fail_in_one_transaction_count_the_attempt(
        db: Database, frozen_clock: FrozenClock) -> None:
    with db.write() as s:
        job = jobs.enqueue(s, ANALYZE, max_attempts=1)
        assert job is not None
        c = jobs.claim(s, ANALYZE, "w1")
        assert c is not None and c.attempts == 1
        assert jobs.fail(s, c.id, c.token, "x", retryable=True) is F


def test_requeue_stale_dead_letters_a_job_out_of_attempts(db, frozen_clock) -> None:  # type: ignore[no-untyped-def]
    """A job whose worker dies during every attempt is not retried forever."""
    from storage import jobs as J
    from storage.models import Job, JobKind, JobStatus

    with db.write() as s:
        job_id = J.enqueue(s, JobKind.ANALYZE, max_attempts=1).id
    with db.write() as s:
        J.claim(s, JobKind.ANALYZE, "w")
    frozen_clock.advance(1000)
    with db.write() as s:
        assert J.requeue_stale(s, older_than_s=10) == [job_id]
    with db.read() as s:
        job = s.get(Job, job_id)
        assert job.status == JobStatus.FAILED and job.lease_token is None


def test_concurrent_claimers_take_each_job_exactly_once(db: Database) -> None:
    """Six claimers, each on its own connection, drain 60 jobs at once: every job is claimed by
    exactly one of them (FOR UPDATE SKIP LOCKED on PostgreSQL, BEGIN IMMEDIATE on SQLite)."""
    import threading

    ids = {enqueue(db) for _ in range(60)}
    taken: dict[str, list[int]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def drain(name: str) -> None:
        mine = taken.setdefault(name, [])
        try:
            barrier.wait()
            while True:
                with db.write() as s:
                    c = jobs.claim(s, ANALYZE, name)
                    if c is None:
                        return
                    jobs.succeed(s, c.id, c.token)
                mine.append(c.id)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=drain, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    claimed = [j for mine in taken.values() for j in mine]
    assert sorted(claimed) == sorted(ids)  # all of them, none twice
    with db.read() as s:
        events = s.execute(select(JobEvent.job_id).where(JobEvent.to_status == R)).scalars()
        assert sorted(events) == sorted(ids)  # one claim event per job
