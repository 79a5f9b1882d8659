"""Where the worker computes: with ``inference.scheduling = "idle"`` and a process of its own
(``idle_cpu``), decoding, the model and building the results run in a thread under SCHED_IDLE,
with ``"adaptive"`` in a thread that is under SCHED_IDLE only while the host receives, while
the database work stays in the worker's own thread; otherwise everything runs in the worker's
thread at its niceness (Linux)."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from node import priority
from node import worker as worker_module
from node.config import Config
from node.metrics import Metrics
from node.priority import ModelThread
from node.worker import Analyzer
from storage import catalog, jobs
from storage.db import Database
from storage.files import FileStore
from storage.models import Job, JobKind, JobStatus
from tests.dicomgen import cr_image, write_all

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="SCHED_IDLE and per-thread niceness are Linux's")


def queue_cr_job(db: Database, store: FileStore, model: Path, folder: Path) -> None:
    """One stored CR instance and an ANALYZE job for its series with ``model``."""
    ds = cr_image(seed=3)
    (path,) = write_all([ds], folder)
    stored = store.write(path.read_bytes())
    with db.write() as s:
        catalog.record_instance(s, catalog.InstanceMeta(
            study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID,
            sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), sha256="0" * 64,
            modality="CR"), stored)
        jobs.enqueue(s, JobKind.ANALYZE, study_id=1,
                     payload={"model": str(model), "series": [ds.SeriesInstanceUID]})


def run_one_job(analyzer: Analyzer, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Run ``analyzer.run_once`` in a thread of its own (it renices the thread it runs in) and
    record, for each step, which thread ran it and under which policy."""
    seen: dict[str, tuple[int, int]] = {}

    def recording(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            seen[name] = (threading.get_native_id(), os.sched_getscheduler(0))
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(worker_module, "_read_all", recording("read", worker_module._read_all))
    monkeypatch.setattr(Analyzer, "_build", recording("build", Analyzer._build))
    monkeypatch.setattr(Analyzer, "predictor", recording("load", Analyzer.predictor))
    original_claim = jobs.claim
    monkeypatch.setattr(jobs, "claim", recording("claim", original_claim))
    out: dict[str, Any] = {}

    def work() -> None:
        out["worker_thread"] = threading.get_native_id()
        out["busy"] = analyzer.run_once()
        out["worker_policy"] = os.sched_getscheduler(0)
        out["worker_nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    t = threading.Thread(target=work)
    t.start()
    t.join(timeout=300)
    analyzer.close()
    assert not t.is_alive()
    out["seen"] = seen
    return out


def config(model: Path, scheduling: str) -> Config:
    return Config.model_validate({"inference": {
        "models_dir": str(model.parent), "device": "cpu", "warm_up": False,
        "scheduling": scheduling, "cpu_threads": 1}})


def test_the_model_runs_in_an_idle_thread_and_the_database_work_does_not(
        untrained_model: Path, db: Database, store: FileStore, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    queue_cr_job(db, store, untrained_model, tmp_path / "in")
    analyzer = Analyzer(config(untrained_model, "idle"), db, store, Metrics(),
                        tune_thread=True, idle_cpu=True)
    out = run_one_job(analyzer, monkeypatch)
    assert out["busy"] is True
    with db.read() as s:
        assert s.execute(select(Job.status)).scalar_one() == JobStatus.SUCCEEDED
    seen = out["seen"]
    # Claiming (a write transaction) in the worker's own thread, at its niceness, not idle.
    assert seen["claim"] == (out["worker_thread"], os.SCHED_OTHER)
    assert out["worker_policy"] == os.SCHED_OTHER and out["worker_nice"] == 10
    # Loading the model (so the CPU threads its library starts inherit the class), decoding
    # and building in another thread, under SCHED_IDLE.
    model_thread = seen["read"][0]
    assert model_thread != out["worker_thread"]
    assert seen["load"] == seen["read"] == seen["build"] == (model_thread, os.SCHED_IDLE)


@pytest.mark.parametrize(("scheduling", "idle_cpu"),
                         [("normal", True), ("idle", False), ("adaptive", False)])
def test_without_idle_scheduling_everything_runs_in_the_worker_thread(
        scheduling: str, idle_cpu: bool, untrained_model: Path, db: Database,
        store: FileStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``scheduling = "normal"``, or a worker in threads of a receiving process (where an idle
    thread holding the interpreter's lock would hold the receiver up)."""
    queue_cr_job(db, store, untrained_model, tmp_path / "in")
    analyzer = Analyzer(config(untrained_model, scheduling), db, store, Metrics(),
                        tune_thread=True, idle_cpu=idle_cpu)
    out = run_one_job(analyzer, monkeypatch)
    assert out["busy"] is True
    here = (out["worker_thread"], os.SCHED_OTHER)
    seen = out["seen"]
    assert seen["claim"] == seen["load"] == seen["read"] == seen["build"] == here


def test_the_idle_thread_hands_back_results_and_errors_and_ends_when_closed() -> None:
    idle = ModelThread(idle=True)
    assert idle.run(lambda a, b: (a + b, os.sched_getscheduler(0)), 2, 3) == (5, os.SCHED_IDLE)
    with pytest.raises(ZeroDivisionError):
        idle.run(lambda: 1 / 0)
    idle.close()
    idle._thread.join(timeout=10)
    assert not idle._thread.is_alive()
    assert idle.run(lambda: "inline") == "inline"  # after close: in the caller's thread


def test_a_stop_during_the_warm_up_does_not_wait_for_it(
        untrained_model: Path, db: Database, store: FileStore,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """On a busy machine the idle thread may take long over the warm-up; the service's stop
    must not wait for it (it used to, up to the stop's grace, and then the parent killed the
    child). A job in progress is still finished (see the worker-process acceptance tests)."""
    building, release = threading.Event(), threading.Event()

    def blocked_build(*args: Any) -> None:
        building.set()
        release.wait(60)

    monkeypatch.setattr(Analyzer, "_build", blocked_build)
    cfg = Config.model_validate({
        "inference": {"models_dir": str(untrained_model.parent), "device": "cpu",
                      "cpu_threads": 1, "scheduling": "idle"},
        "rules": [{"name": "r", "model": str(untrained_model), "match": {"modality": ["CR"]}}]})
    caplog.set_level(logging.INFO, logger="node.worker")
    analyzer = Analyzer(cfg, db, store, Metrics(), tune_thread=True, idle_cpu=True)
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.setdefault("busy", analyzer.run_once()))
    try:
        t.start()
        assert building.wait(120)  # the warm-up's last step, in the idle thread
        analyzer.stopping.set()
        t.join(timeout=5)  # the build it was waiting for is still blocked
        assert not t.is_alive()
        assert out["busy"] is False  # and it claimed nothing
        assert "the warm-up is left unfinished" in caplog.text
    finally:
        release.set()
        analyzer.close()


def adaptive_job(model: Path, db: Database, store: FileStore,
                 tmp_path: Path) -> tuple[Analyzer, Metrics]:
    """A queued CR job and an ``"adaptive"`` worker in a process of its own for it."""
    if not priority.can_leave_idle(10):
        pytest.skip("this process may not leave SCHED_IDLE (no CAP_SYS_NICE, RLIMIT_NICE < 10)")
    queue_cr_job(db, store, model, tmp_path / "in")
    metrics = Metrics()
    return Analyzer(config(model, "adaptive"), db, store, metrics, tune_thread=True,
                    idle_cpu=True), metrics


def test_adaptive_the_model_yields_while_the_host_receives(
        untrained_model: Path, db: Database, store: FileStore, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``scheduling = "adaptive"``: the model's own thread, under SCHED_IDLE while this host's
    receiving beacon is fresh (kept fresh here by a thread marking it, as a receiver does at
    each C-STORE), at the worker's niceness when it is not."""
    analyzer, metrics = adaptive_job(untrained_model, db, store, tmp_path)
    beacon = priority.ReceivingBeacon(priority.beacon_path(store.root))
    receiving = threading.Event()

    def receiver() -> None:
        while receiving.is_set():
            beacon.mark()
            time.sleep(0.02)

    marking = threading.Thread(target=receiver)
    receiving.set()
    marking.start()
    # The model is loaded once the watcher has moved its thread (it looks every 20 ms), so the
    # steps after it run under SCHED_IDLE.
    original_predictor = Analyzer.predictor

    def predictor_once_idle(self: Analyzer, ref: Any) -> Any:
        assert self._priority is not None
        deadline = time.monotonic() + 60
        while not self._priority.idle and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self._priority.idle, "the watcher never moved the model under SCHED_IDLE"
        return original_predictor(self, ref)

    monkeypatch.setattr(Analyzer, "predictor", predictor_once_idle)
    gauge: list[float] = []
    original_build = Analyzer._build

    def build_seeing_the_gauge(self: Analyzer, *args: Any) -> Any:
        gauge.append(metrics.model_idle.labels(self.name)._value.get())
        return original_build(self, *args)

    monkeypatch.setattr(Analyzer, "_build", build_seeing_the_gauge)
    try:
        out = run_one_job(analyzer, monkeypatch)
    finally:
        receiving.clear()
        marking.join()
    assert out["busy"] is True
    seen = out["seen"]
    assert seen["claim"] == (out["worker_thread"], os.SCHED_OTHER)
    model_thread = seen["read"][0]
    assert model_thread != out["worker_thread"]
    assert seen["read"] == seen["build"] == (model_thread, os.SCHED_IDLE)
    assert gauge == [1]
    assert metrics.model_idle.labels(analyzer.name)._value.get() == 0  # closed: moved back
    beacon.close()


def test_adaptive_the_model_runs_at_the_niceness_while_the_host_does_not_receive(
        untrained_model: Path, db: Database, store: FileStore, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    analyzer, metrics = adaptive_job(untrained_model, db, store, tmp_path)
    out = run_one_job(analyzer, monkeypatch)
    assert out["busy"] is True
    seen = out["seen"]
    model_thread = seen["read"][0]
    assert model_thread != out["worker_thread"]
    assert seen["load"] == seen["read"] == seen["build"] == (model_thread, os.SCHED_OTHER)
    assert metrics.model_idle.labels(analyzer.name)._value.get() == 0


def test_adaptive_where_the_model_may_not_leave_idle_runs_as_normal(
        untrained_model: Path, db: Database, store: FileStore, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Where the process may not move a thread back out of SCHED_IDLE (an unprivileged user
    without LimitNICE), "adaptive" must not leave the model stuck there: it runs as "normal",
    and says why."""
    monkeypatch.setattr(priority, "can_leave_idle", lambda nice: False)
    queue_cr_job(db, store, untrained_model, tmp_path / "in")
    analyzer = Analyzer(config(untrained_model, "adaptive"), db, store, Metrics(),
                        tune_thread=True, idle_cpu=True)
    caplog.set_level(logging.WARNING, logger="node.worker")
    out = run_one_job(analyzer, monkeypatch)
    here = (out["worker_thread"], os.SCHED_OTHER)
    seen = out["seen"]
    assert seen["claim"] == seen["load"] == seen["read"] == seen["build"] == here
    assert "LimitNICE=+10" in caplog.text
