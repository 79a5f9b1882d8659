"""Start-up recovery of jobs left RUNNING: at once for a node alone on its database, only
after their lease for a process that may share it."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import load_config
from node.service import Role, Service, open_storage
from storage import jobs
from storage.errors import JobStateError
from storage.models import Job, JobKind, JobStatus
from tests.conftest import FrozenClock, node_config_text


def service(tmp_path: Path, role: Role) -> Service:
    path = tmp_path / "config.toml"
    path.write_text(node_config_text(11112, inference={"lease_s": 3600}), encoding="utf-8")
    cfg = load_config(path, environ={})
    db, store = open_storage(cfg)
    db.upgrade()
    return Service(cfg, db, store, role=role)


def left_running(svc: Service, n: int) -> tuple[list[int], list[str]]:
    """``n`` jobs claimed by a process that is gone, and one still queued: their ids, and the
    lease tokens the gone process held."""
    with svc.db.write() as s:
        ids = [j.id for i in range(n + 1)
               if (j := jobs.enqueue(s, JobKind.ANALYZE, dedupe_key=f"k{i}")) is not None]
    tokens = []
    with svc.db.write() as s:
        for _ in range(n):
            claimed = jobs.claim(s, JobKind.ANALYZE, "host:999/worker-0")
            assert claimed is not None
            tokens.append(claimed.token)
    return ids, tokens


def statuses(svc: Service, ids: list[int]) -> list[JobStatus]:
    with svc.db.read() as s:
        return [s.get(Job, i).status for i in ids]  # type: ignore[union-attr]


def test_a_node_alone_on_sqlite_requeues_its_running_jobs_at_start(
        tmp_path: Path, frozen_clock: FrozenClock) -> None:
    svc = service(tmp_path, Role.ALL)
    assert not svc.shared
    ids, tokens = left_running(svc, 2)
    frozen_clock.advance(1)  # far inside the hour's lease
    svc.recover()
    assert statuses(svc, ids) == [JobStatus.QUEUED] * 3
    # The previous run's lease is void: a late publish is refused.
    with svc.db.write() as s, pytest.raises(JobStateError):
        jobs.succeed(s, ids[0], tokens[0])
    svc.db.dispose()


@pytest.mark.parametrize("role", [Role.RECEIVER, Role.WORKER, Role.SENDER])
def test_a_process_sharing_the_database_waits_for_the_lease(
        tmp_path: Path, frozen_clock: FrozenClock, role: Role) -> None:
    svc = service(tmp_path, role)
    assert svc.shared
    ids, _ = left_running(svc, 2)
    frozen_clock.advance(1)
    svc.recover()  # another process may be running them
    assert statuses(svc, ids) == [JobStatus.RUNNING, JobStatus.RUNNING, JobStatus.QUEUED]
    frozen_clock.advance(3600)
    svc.recover()
    assert statuses(svc, ids) == [JobStatus.QUEUED] * 3
    svc.db.dispose()
