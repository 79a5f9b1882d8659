"""The worker's child process supervisor (``node.workerproc.WorkerProcess``) on its own: a child
that cannot start is started again with growing delays, and each death is counted."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from node import workerproc
from node.config import Config
from node.metrics import Metrics
from storage.db import Database


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
