"""The registry of running service processes: who runs which role where, and is it alive.

Each ``aidnode serve`` registers one row named ``host:pid`` (that name also prefixes the worker
names it writes on the jobs it claims, so "jobs in hand" is a count of RUNNING jobs with that
prefix), renews its heartbeat from the housekeeping loop and removes its row when it stops. A row
whose heartbeat is older than ``STALE_AFTER_S`` is shown as stale; its jobs are re-queued by the
lease check like any other stopped worker's.

Heartbeats and lease checks compare times written by different hosts: keep their clocks in step
(NTP), as any cluster must; a skew near ``inference.lease_s`` re-queues live jobs.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from storage import clock
from storage.audit import AuditKind
from storage.models import AuditEvent, Job, JobStatus, ServiceNode

HEARTBEAT_S = 5.0  # how often a running process renews its row
STALE_AFTER_S = 30.0  # six missed heartbeats
FORGET_AFTER = timedelta(days=1)  # stale rows are dropped after this
DEATHS_WINDOW = timedelta(hours=1)  # worker-process deaths that `aidnode status` reports


def process_name(host: str | None = None, pid: int | None = None) -> str:
    """``host:pid``, the name this process registers under."""
    return f"{host or socket.gethostname()}:{pid if pid is not None else os.getpid()}"


@dataclass(frozen=True)
class NodeView:
    name: str
    host: str
    pid: int
    role: str
    version: str
    started_at: datetime
    heartbeat_at: datetime
    jobs_in_hand: int
    stale: bool

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "host": self.host, "pid": self.pid, "role": self.role,
                "version": self.version, "started_at": self.started_at.isoformat(),
                "heartbeat_at": self.heartbeat_at.isoformat(),
                "jobs_in_hand": self.jobs_in_hand, "stale": self.stale}


def register(s: Session, name: str, role: str, version: str) -> None:
    """Insert (or take over, after a restart with the same pid) this process's row."""
    now = clock.now()
    host, _, pid = name.rpartition(":")
    s.execute(delete(ServiceNode).where(ServiceNode.name == name))
    s.add(ServiceNode(name=name, host=host, pid=int(pid), role=role, version=version,
                      started_at=now, heartbeat_at=now))
    s.execute(delete(ServiceNode).where(ServiceNode.heartbeat_at < now - FORGET_AFTER))


def heartbeat(s: Session, name: str) -> bool:
    """Renew this process's heartbeat; False when its row is gone (re-register then)."""
    res = s.execute(update(ServiceNode).where(ServiceNode.name == name)
                    .values(heartbeat_at=clock.now()))
    return res.rowcount == 1  # type: ignore[attr-defined]


def deregister(s: Session, name: str) -> None:
    """Remove this process's row (a clean stop)."""
    s.execute(delete(ServiceNode).where(ServiceNode.name == name))


def nodes(s: Session) -> list[NodeView]:
    """Every registered process with its jobs in hand, oldest first."""
    now = clock.now()
    rows = s.execute(select(ServiceNode).order_by(ServiceNode.started_at, ServiceNode.id)
                     ).scalars().all()
    running = list(s.execute(select(Job.worker, func.count()).where(
        Job.status == JobStatus.RUNNING).group_by(Job.worker)))
    out = []
    for r in rows:
        prefix = r.name + "/"
        in_hand = sum(n for worker, n in running if worker and worker.startswith(prefix))
        out.append(NodeView(name=r.name, host=r.host, pid=r.pid, role=r.role,
                            version=r.version, started_at=r.started_at,
                            heartbeat_at=r.heartbeat_at, jobs_in_hand=in_hand,
                            stale=(now - r.heartbeat_at).total_seconds() > STALE_AFTER_S))
    return out


def live(s: Session) -> list[NodeView]:
    """The registered processes whose heartbeat is recent."""
    return [n for n in nodes(s) if not n.stale]


@dataclass(frozen=True)
class WorkerDeaths:
    """The worker child processes of one live ``aidnode serve`` that died recently."""

    process: str  # the supervising process, host:pid
    count: int  # deaths within the window
    last_at: datetime
    last_exit: str
    #: A worker process on that host registered after the last death (its restart, as far as
    #: the registry can tell: a child's row does not name its parent).
    running: bool

    def as_dict(self) -> dict[str, object]:
        return {"process": self.process, "deaths": self.count, "window_s":
                DEATHS_WINDOW.total_seconds(), "last_at": self.last_at.isoformat(),
                "last_exit": self.last_exit, "running": self.running}


def worker_deaths(s: Session) -> list[WorkerDeaths]:
    """Per live process, its worker children's deaths in the last ``DEATHS_WINDOW`` (the
    ``worker-process-died`` audit events its supervisor records)."""
    events = s.execute(select(AuditEvent).where(
        AuditEvent.kind == AuditKind.WORKER_PROCESS_DIED.value,
        AuditEvent.at >= clock.now() - DEATHS_WINDOW).order_by(AuditEvent.at, AuditEvent.id)
    ).scalars().all()
    alive = live(s)
    names = {n.name for n in alive}
    by_process: dict[str, list[AuditEvent]] = {}
    for e in events:
        by_process.setdefault(str(e.detail.get("process")), []).append(e)
    out = []
    for name, evs in by_process.items():
        if name not in names:
            continue  # its supervisor stopped since: nothing to restart any more
        last, host = evs[-1], name.rpartition(":")[0]
        out.append(WorkerDeaths(
            process=name, count=len(evs), last_at=last.at,
            last_exit=str(last.detail.get("exit", "?")),
            running=any(n.role == "worker" and n.host == host and n.started_at >= last.at
                        for n in alive)))
    return out
