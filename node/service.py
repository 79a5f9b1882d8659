"""The long-running service: receiver, assembler, workers, senders, metrics.

One ``aidnode serve`` runs every part (``--role all``, the default; its analysis workers in a
child process, ``node.workerproc``, unless ``inference.separate_process`` is false), or one role
of several processes that share a PostgreSQL database and a file store: ``receiver`` (the SCP,
the assembler and retention), ``worker`` (analysis) or ``sender`` (delivery). Every process
registers itself in ``service_nodes`` and renews a heartbeat there; every process re-queues
stale leases.

Start-up: check the schema, remove partial writes, re-queue jobs whose lease went stale, make
sure the models the rules name are installed (building the demo if needed), start everything,
then tell systemd READY=1. The main loop feeds the systemd watchdog only while every loop is
alive. SIGTERM stops accepting associations, lets in-flight C-STOREs finish, lets the current
jobs finish, and exits 0.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from node import assembly, models
from node.config import Config
from node.metrics import Metrics
from node.scp import Receiver, start
from node.sender import Sender
from node.worker import Analyzer
from node.workerproc import Link, Signal, Wake, WorkerProcess, child_env
from storage import clock, jobs, registry, retention
from storage.db import Database
from storage.files import FileStore
from storage.models import Job, JobKind, JobStatus

log = logging.getLogger(__name__)
PURGE_INTERVAL_S = 3600.0  # retention runs at start-up and then hourly
#: On a store shared with other processes, a file with no row is removed only when this old: a
#: receiver elsewhere may be between its rename and its commit.
SHARED_ORPHAN_AGE_S = 600.0
GIL_SWITCH_S = 0.0005  # bench/soak.py: receiving while analysing, 49.6 -> 70.2 images/s


class Role(StrEnum):
    """What one ``aidnode serve`` process runs."""

    ALL = "all"
    RECEIVER = "receiver"  # the SCP, the assembler, retention
    WORKER = "worker"  # ANALYZE jobs
    SENDER = "sender"  # DELIVER jobs

    def runs(self, part: Role) -> bool:
        return self in (Role.ALL, part)


def aidnode_version() -> str:
    try:
        return version("aidnode")
    except PackageNotFoundError:
        return "unknown"


def sd_notify(message: str) -> bool:
    """Send a message to systemd (READY=1, WATCHDOG=1, STOPPING=1) if it is listening."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        s.sendall(message.encode())
    return True


def open_storage(cfg: Config) -> tuple[Database, FileStore]:
    db = Database(cfg.database.url, cfg.database.busy_timeout_ms)
    store = FileStore(cfg.storage.root, min_free_bytes=cfg.storage.min_free_mb * 2**20)
    return db, store


def log_training(done: int, total: int, loss: float) -> None:
    """Training progress for the log: ten lines for a whole run (the first `serve` trains the
    demo model for minutes, and whoever watches the journal should see it move)."""
    if done == total or done % max(1, total // 10) == 0:
        log.info("training the demo model: step %d of %d (%d%%), loss %.3f",
                 done, total, 100 * done // max(1, total), loss)


def ensure_models(cfg: Config, progress: Callable[[int, int, float], None] | None = None,
                  in_process: bool = True) -> None:
    """Build the demo model when a rule names it and it is not installed yet; ``progress``
    (default: ``log_training``) gets each training step.

    ``in_process=False`` (the service) trains in a process of its own, logging as the service
    does: the training's memory (2 GB of RSS kept by ``serve`` after a first start, measured)
    and torch leave with it instead of staying in the receiving process until it restarts.
    """
    if not any(r.model == models.DEMO for r in cfg.rules):
        return
    try:
        models.resolve(cfg, models.DEMO)
        return
    except models.ModelNotFoundError:
        pass
    log.info("demo model not installed: training it now (a few minutes on CPU)")
    directory = models.model_dir(cfg, models.DEMO)
    if in_process:
        _train_demo(directory, cfg.inference.demo_steps, progress)
        return
    # A plain subprocess: multiprocessing's spawn would also leave its resource tracker
    # process running beside the service (13 MB, measured).
    entry = "from node.service import _train_demo_process; _train_demo_process()"
    run = subprocess.run([sys.executable, "-c", entry, str(directory),
                          str(cfg.inference.demo_steps), cfg.logging.level, cfg.logging.format],
                         env=child_env(), check=False)
    if run.returncode != 0:
        raise RuntimeError(f"training the demo model failed (exit code {run.returncode}); "
                           "its log lines are above")


def _train_demo(directory: Path, steps: int,
                progress: Callable[[int, int, float], None] | None = None) -> None:
    from inference.train import build_demo_package

    report = build_demo_package(directory, steps=steps, seed=0, progress=progress or log_training)
    log.info("demo model ready: %s", report)


def _train_demo_process() -> None:
    """The training process's entry point (``ensure_models(in_process=False)``); its arguments:
    the package's folder, the steps, the log level and format."""
    from node import logging as node_logging

    directory, steps, level, fmt = sys.argv[1:5]
    node_logging.setup(level, fmt)
    _train_demo(Path(directory), int(steps))


def leave(code: int) -> None:
    """End a ``serve`` process after the service's own clean stop (its rows, files and
    connections are closed), without the interpreter's teardown: with the model's native
    libraries loaded moments before, that teardown sometimes aborted in C++ ("terminate called
    without an active exception", SIGABRT: 3 of 12 runs of a worker child stopped during its
    warm-up), which the parent, or systemd, would report as a crash."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


@dataclass
class Service:
    config: Config
    db: Database
    store: FileStore
    metrics: Metrics = field(default_factory=Metrics)
    stopping: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    analyzers: list[Analyzer] = field(default_factory=list)
    server: Any = None
    receiver: Receiver | None = None
    metrics_port: int | None = None
    role: Role = Role.ALL
    name: str = field(default_factory=registry.process_name)  # host:pid
    wakes: dict[str, threading.Event] = field(default_factory=dict)
    #: Set by SIGTERM/SIGINT, or in a worker's child process when its parent's end closes.
    stop_requested: threading.Event = field(default_factory=threading.Event)
    #: In a worker's child process: the link to ``aidnode serve``, its parent.
    parent: Link | None = None
    #: In ``aidnode serve`` with ``inference.separate_process``: its worker's child process.
    worker_process: WorkerProcess | None = None
    _switch_interval: float | None = None
    _next_purge: float = 0.0

    @property
    def shared(self) -> bool:
        """True when other processes may share the database and the store: PostgreSQL, or
        one role of several processes on one machine's SQLite."""
        return not self.db.is_sqlite or self.role is not Role.ALL

    def recover(self) -> None:
        """Start-up recovery: schema, partial files, orphans, jobs a stopped run left RUNNING."""
        self.db.check_schema()
        self.store.ensure_layout()
        n = self.store.clean_tmp(shared=self.shared)
        if n:
            log.warning("removed %d partial file(s) left by a crash", n)
        self.remove_orphans(min_age_s=SHARED_ORPHAN_AGE_S if self.shared else 0.0)
        with self.db.write() as s:
            if self.shared:  # another process may hold a job: only expired leases are freed
                ids = jobs.requeue_stale(s, self.config.inference.lease_s)
            else:  # this node alone: a RUNNING job was its previous run's, stopped mid-job
                ids = jobs.requeue_running(s, "the node restarted")
        if ids:
            log.warning("re-queued %d job(s) whose worker stopped: %s", len(ids), ids)

    def remove_orphans(self, min_age_s: float = 0.0,
                       kinds: tuple[str, ...] = ("instances", "results")) -> int:
        """Files written durably whose row never committed (a crash in between); with
        ``min_age_s``, only those at least that old (the store is shared)."""
        from storage.catalog import known_paths

        cutoff = time.time() - min_age_s
        candidates = [p for kind in kinds for p in self.store.files(kind)]
        with self.db.read() as s:  # listed first: a file written after this is never a candidate
            known = known_paths(s)
        orphans = [p for p in candidates if p not in known
                   and (min_age_s <= 0 or _mtime(self.store.path(p)) < cutoff)]
        for p in orphans:
            self.store.remove(p)
        if orphans:
            log.warning("removed %d orphan file(s) never recorded (crash before commit)",
                        len(orphans))
        return len(orphans)

    def _loop(self, name: str, step: Callable[[], bool], idle_s: float,
              wake: threading.Event | None = None,
              then: Signal | None = None) -> None:
        """Run ``step`` until stopped; idle for ``idle_s`` when it found nothing to do, or
        until ``wake`` is set (work for it was just queued in this process). A busy step sets
        ``then``, the next stage's wake-up."""
        wake = wake or self._wake(name)  # stop() sets every wake-up
        while not self.stopping.is_set():
            try:
                busy = step()
            except Exception:
                log.exception("%s: iteration failed", name)
                busy = False
            if busy and then is not None:
                then.set()
            if not busy:
                wake.wait(idle_s)
                wake.clear()

    def _assemble(self) -> bool:
        """Decide the stable studies; True when one was queued for analysis."""
        return any(d.job_id is not None for d in assembly.run_once(self.db, self.config))

    def _heartbeat(self) -> bool:
        """Renew this process's registry row (its own loop: a long purge must not stall it)."""
        with self.db.write() as s:
            if not registry.heartbeat(s, self.name):  # removed as stale while we were paused
                registry.register(s, self.name, self.role.value, aidnode_version())
        return False

    def _housekeeping(self) -> bool:
        with self.db.write() as s:
            jobs.requeue_stale(s, self.config.inference.lease_s)
        self.update_gauges()
        if self.role.runs(Role.RECEIVER) and time.monotonic() >= self._next_purge:
            self._next_purge = time.monotonic() + PURGE_INTERVAL_S
            rep = retention.purge(self.db, self.store, self.config.storage.retention_days)
            if rep.studies:
                log.info("retention: purged %d studies (%d files) older than %d days",
                         rep.studies, rep.files, self.config.storage.retention_days)
        return False

    def update_gauges(self) -> None:
        now = clock.now()
        with self.db.read() as s:
            for kind in JobKind:
                n, oldest = s.execute(select(func.count(), func.min(Job.created_at)).where(
                    Job.kind == kind, Job.status == JobStatus.QUEUED)).one()
                self.metrics.queue_depth.labels(kind.value).set(n)
                age = (now - oldest).total_seconds() if oldest else 0
                self.metrics.queue_oldest_seconds.labels(kind.value).set(age)
        self.metrics.disk_free_bytes.set(self.store.free_bytes())

    def start(self, host: str | None = None, port: int | None = None) -> None:
        if self.parent is None:
            self.recover()
        else:  # a worker's child process: its parent recovered the store before starting it
            self.db.check_schema()
        if self.role.runs(Role.WORKER):
            ensure_models(self.config, in_process=False)
        with self.db.write() as s:
            registry.register(s, self.name, self.role.value, aidnode_version())
        log.info("role %s, registered as %s", self.role.value, self.name)
        try:
            self._start_registered(host, port)
        except BaseException:  # e.g. the port is taken: leave no listener and no registry row
            if self.server is not None:
                self.server.shutdown()
                self.server = None
            if self.receiver is not None:
                self.receiver.close()
            self.metrics.close()
            try:
                with self.db.write() as s:
                    registry.deregister(s, self.name)
            except Exception:
                log.warning("could not remove %s from the registry", self.name, exc_info=True)
            raise

    def _start_registered(self, host: str | None, port: int | None) -> None:
        # A stage that queued work wakes the next at once instead of letting it find the work
        # at its next poll: an event in this process, a message to or from the worker's child
        # process (other processes still poll).
        analyze_ready, deliver_ready = self._wake("analyze"), self._wake("deliver")
        then_analyze: Signal = analyze_ready
        then_deliver: Signal = deliver_ready
        extra: list[tuple[str, Callable[[], None]]] = []
        if (self.role is Role.ALL and self.config.inference.workers
                and self.config.inference.separate_process):
            self.worker_process = then_analyze = WorkerProcess(
                self.config, self.db, self.metrics, deliver_ready.set, self.stopping,
                on_death=self._after_worker_death, stop_requested=self.stop_requested)
            extra.append(("worker-process", self.worker_process.run))
        if self.parent is not None:  # its reader is not a loop: stop() does not wait for it
            then_deliver = Wake(self.parent, "d")
            threading.Thread(target=self._follow_parent, name="parent-link", daemon=True).start()
        if self.config.metrics.enabled:
            self.metrics_port = self.metrics.serve(self.config.metrics.host,
                                                   self.config.metrics.port)
            log.info("metrics on http://%s:%d/metrics", self.config.metrics.host,
                     self.metrics_port)
            if self.parent is not None:
                self.parent.send(f"m {self.metrics_port}")
        loops: list[tuple[str, Callable[[], bool], float, threading.Event | None,
                          Signal | None]] = [
            ("heartbeat", self._heartbeat, registry.HEARTBEAT_S, None, None),
            ("housekeeping", self._housekeeping, 5.0, None, None)]
        if self.role.runs(Role.RECEIVER):
            rx = self.receiver = Receiver(self.config, self.db, self.store, self.metrics)
            self.server = start(rx, host, port)
            loops.append(("assembler", self._assemble, self.config.assembly.check_interval_s,
                          None, then_analyze))
        if self.role.runs(Role.WORKER) and self.worker_process is None:
            if self.role is Role.ALL and self.config.inference.workers:
                # The receiver and the model share one interpreter: hand the GIL over every
                # 0.5 ms instead of 5 ms, so a C-STORE waits less behind the model's Python.
                self._switch_interval = sys.getswitchinterval()
                sys.setswitchinterval(GIL_SWITCH_S)
            for i in range(self.config.inference.workers):
                a = Analyzer(self.config, self.db, self.store, self.metrics,
                             name=f"{self.name}/worker-{i}", tune_thread=True,
                             idle_cpu=not self.role.runs(Role.RECEIVER),
                             stopping=self.stopping)
                self.analyzers.append(a)
                loops.append((f"worker-{i}", a.run_once, 0.5, analyze_ready, then_deliver))
        if self.role.runs(Role.SENDER) and self.config.destinations:
            snd = Sender(self.config, self.db, self.store, self.metrics,
                         name=f"{self.name}/sender")
            loops.append(("sender", snd.run_once, 0.5, deliver_ready, None))
        for name, step, idle, wake, then in loops:
            t = threading.Thread(target=self._loop, args=(name, step, idle, wake, then),
                                 name=name, daemon=True)
            t.start()
            self.threads.append(t)
        for name, target in extra:
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self.threads.append(t)
        sd_notify("READY=1")

    def _after_worker_death(self) -> None:
        """The worker's child process died: remove the result files it wrote and never
        recorded (only workers write results; the child is gone and the next not started)."""
        self.remove_orphans(min_age_s=SHARED_ORPHAN_AGE_S if self.shared else 0.0,
                            kinds=("results",))

    def _follow_parent(self) -> None:
        """In a worker's child process: wake-ups from the parent; stop when its end closes."""
        assert self.parent is not None
        while (messages := self.parent.messages()) is not None:
            if "a" in messages:
                self._wake("analyze").set()
        if not self.stopping.is_set():
            log.warning("the parent process closed its link; stopping")
            self.stop_requested.set()

    def _wake(self, stage: str) -> threading.Event:
        return self.wakes.setdefault(stage, threading.Event())

    def alive(self) -> bool:
        return all(t.is_alive() for t in self.threads)

    def stop(self, grace_s: float = 30) -> None:
        """Stop accepting, let in-flight associations and jobs finish (up to ``grace_s``)."""
        sd_notify("STOPPING=1")
        log.info("stopping: no new associations; waiting for in-flight work" if self.server
                 else "stopping: waiting for the jobs in hand")
        if self.server is not None:
            socketserver.BaseServer.shutdown(self.server)  # stop the accept loop
            self.server.server_close()  # close the listening socket: no new associations
            deadline = time.monotonic() + grace_s
            # Only associations in progress: a connection that never sent an A-ASSOCIATE-RQ
            # (a port probe) would otherwise hold the stop until the ACSE timeout.
            while (any(a.is_established for a in self.server.active_associations)
                   and time.monotonic() < deadline):
                time.sleep(0.05)
        self.stopping.set()
        for ev in self.wakes.values():
            ev.set()
        if self.worker_process is not None:  # it finishes its job first, like a thread would
            self.worker_process.stop(grace_s)
        for t in self.threads:
            t.join(timeout=max(0.1, grace_s))
        for a in self.analyzers:
            a.close()
        if self.receiver is not None:
            self.receiver.close()
        try:
            with self.db.write() as s:
                registry.deregister(s, self.name)
        except Exception:  # the row goes stale instead; nothing is lost
            log.warning("could not remove %s from the registry", self.name, exc_info=True)
        self.metrics.close()
        self.db.dispose()
        if self.parent is not None:
            self.parent.close()
        if self._switch_interval is not None:
            sys.setswitchinterval(self._switch_interval)
        log.info("stopped")

    def run_forever(self) -> int:
        """``aidnode serve``: run until SIGTERM/SIGINT; returns the exit code."""
        stop = self.stop_requested
        for sig in (signal.SIGTERM, signal.SIGINT) if self.parent is None else (signal.SIGTERM,):
            signal.signal(sig, lambda *_: stop.set())
        self.start()
        watchdog_s = int(os.environ.get("WATCHDOG_USEC", "0")) / 1e6
        tick = min(1.0, watchdog_s / 3) if watchdog_s else 1.0
        rc = 0
        while not stop.wait(tick):
            if self.alive():
                sd_notify("WATCHDOG=1")
            elif self.parent is not None:  # a worker's child process: its parent restarts it
                log.error("a service loop died; exiting so that the parent starts a new worker")
                rc = 1
                break
            else:
                log.error("a service loop died; withholding the watchdog ping")
        self.stop()
        return rc


def _mtime(path: os.PathLike[str] | str) -> float:
    try:
        return os.stat(path).st_mtime
    except FileNotFoundError:
        return time.time()  # gone already: not an orphan to remove
