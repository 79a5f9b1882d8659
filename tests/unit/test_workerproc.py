"""The worker's child process supervisor (``node.workerproc.WorkerProcess``) on its own: a child
that cannot start is started again with growing delays, and each death is counted and recorded
where ``aidnode status`` shows it."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy import select

from node import workerproc
from node.config import Config
from node.metrics import Metrics
from storage import clock, registry
from storage.db import Database
from storage.models import AuditEvent


class RecordingEvent(threading.Event):
    """``stopping``: records each delay the supervisor waits, and is set after ``n`` of them."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.delays = n, list[float]()

    def wait(self, timeout: float | None = None) -> bool:
        if timeout is None:
            return super().wait()
        self.delays.append(timeout)
        if len(self.delays) >= self.n:
            self.set()
        return self.is_set()


def test_a_child_that_cannot_start_is_started_again_with_doubling_delays(
        tmp_path: Path, db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workerproc, "RESTART_DELAY_S", (0.01, 0.04))
    monkeypatch.setattr(sys, "executable", "/bin/false")  # exits 1 at once, like a broken child
    cfg = Config.model_validate({"database": {"url": db.url},
                                 "storage": {"root": str(tmp_path / "store")}})
    metrics = Metrics()
    stopping = RecordingEvent(5)
    supervisor = workerproc.WorkerProcess(cfg, db, metrics, lambda: None, stopping)
    thread = threading.Thread(target=supervisor.run, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert stopping.delays == [0.01, 0.02, 0.04, 0.04, 0.04]  # doubled, then capped
    assert metrics.worker_restarts._value.get() == 5  # every death counted
    assert supervisor.starts == 5
    with db.read() as s:
        events = s.execute(select(AuditEvent).order_by(AuditEvent.id)).scalars().all()
        assert [e.kind for e in events] == ["worker-process-died"] * 5
        assert {e.detail["process"] for e in events} == {registry.process_name()}
        assert {e.detail["exit"] for e in events} == {"exit code 1"}
        assert [e.detail["restart_in_s"] for e in events] == stopping.delays
        assert registry.worker_deaths(s) == []  # its supervisor is not registered (stopped)
    # `aidnode status` reports them while the supervisor is registered, and tells whether a
    # worker process registered on its host after the last death.
    with db.write() as s:
        registry.register(s, registry.process_name(), "all", "test")
    with db.read() as s:
        (deaths,) = registry.worker_deaths(s)
    assert (deaths.process, deaths.count, deaths.last_exit, deaths.running) == (
        registry.process_name(), 5, "exit code 1", False)
    with db.write() as s:
        registry.register(s, registry.process_name(pid=2**22 + 1), "worker", "test")
    with db.read() as s:
        (deaths,) = registry.worker_deaths(s)
    assert deaths.running and deaths.last_at <= clock.now()
