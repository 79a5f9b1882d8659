"""The analysis worker in a child process of ``aidnode serve`` (``inference.separate_process``).

Why a process of its own: receiving and the model in one interpreter share its GIL, and every
C-STORE then waits behind the model's Python between tensor operations (``bench/contention.py``:
receiving 19.8% slower beside the model's loop in a thread, 3.2% beside the same loop in a
process). A crash in the model's native code, or the kernel's OOM killer, also takes only the
child: the receiver goes on answering the scanners.

The parent (``WorkerProcess``) starts ``python -m node.workerproc`` with the configuration on
its stdin and one end of a socket pair, restarts it when it dies (first re-queuing the jobs it
held, so they do not wait for their leases to run out) and stops it with SIGTERM. The child is
an ``aidnode serve --role worker`` that also dies with its parent (``PR_SET_PDEATHSIG``). Over
the socket pair, one line per message:

    parent -> child   ``a``          an ANALYZE job was queued (wake up now, not at the next poll)
    child  -> parent  ``d``          DELIVER jobs were queued
    child  -> parent  ``m PORT``     the child's metrics are on 127.0.0.1:PORT

When the parent's end closes, the child stops as on SIGTERM.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from node.config import Config, MetricsConfig
from node.metrics import Metrics, scrape
from storage import audit, faults, jobs, registry
from storage.db import Database

log = logging.getLogger(__name__)
RESTART_DELAY_S = (1.0, 60.0)  # first delay after a crash, and the cap it doubles up to
HEALTHY_AFTER_S = 60.0  # a child that ran this long starts the delays over
#: What the child must not inherit: systemd would take its messages for the main process's.
NOT_INHERITED = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")
PR_SET_PDEATHSIG = 1


class Link:
    """One end of the socket pair: send a message, or read them until the other end closes."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, message: str) -> None:
        """Best effort: a lost wake-up only means the next poll finds the work."""
        try:
            self.sock.send((message + "\n").encode(), socket.MSG_DONTWAIT)
        except OSError:
            pass

    def messages(self) -> list[str] | None:
        """The next complete messages; None once the other end has closed."""
        data = b""
        while not data.endswith(b"\n"):
            try:
                chunk = self.sock.recv(4096)
            except OSError:
                return None
            if not chunk:
                return None
            data += chunk
        return [line for line in data.decode().split("\n") if line]

    def close(self) -> None:
        """Close it; a thread blocked reading it returns (``messages()`` gives None)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class Signal(Protocol):
    """What ``Service._loop`` sets when a stage queued work for the next: a
    ``threading.Event`` in this process, or a ``Wake`` or ``WorkerProcess`` in another."""

    def set(self) -> None: ...


class Wake:
    """A message to the other process that a stage queued work for a stage there."""

    def __init__(self, link: Link, message: str) -> None:
        self.link, self.message = link, message

    def set(self) -> None:
        self.link.send(self.message)


class WorkerProcess:
    """The parent's side: start, supervise, restart and stop the worker's child process."""

    def __init__(self, config: Config, db: Database, metrics: Metrics,
                 on_deliver: Callable[[], None], stopping: threading.Event,
                 on_death: Callable[[], object] = lambda: None,
                 stop_requested: threading.Event | None = None) -> None:
        self.config = config.model_copy(update={"metrics": MetricsConfig(
            enabled=config.metrics.enabled, host="127.0.0.1", port=0)})
        self.db, self.metrics = db, metrics
        self.on_deliver, self.stopping, self.on_death = on_deliver, stopping, on_death
        #: Set when the parent was told to stop: a child that exits then was stopped too (a
        #: signal sent to the whole process group or cgroup), it did not die.
        self.stop_requested = stop_requested or stopping
        self.proc: subprocess.Popen[bytes] | None = None
        self.link: Link | None = None
        self.metrics_port: int | None = None
        self.starts = 0
        self._lock = threading.Lock()
        metrics.add_source(self._child_metrics)

    def set(self) -> None:
        """An ANALYZE job was queued: wake the child's worker."""
        link = self.link
        if link is not None:
            link.send("a")

    def run(self) -> None:
        """The supervising thread: keep a child running until ``stopping`` is set."""
        delay = RESTART_DELAY_S[0]
        while not self.stopping.is_set():
            started = time.monotonic()
            died: tuple[int, int] | None = None  # (pid, exit status) of a child that died
            try:
                proc, link = self._spawn()
            except OSError:
                log.exception("could not start the worker process")
            else:
                self._follow(link)  # returns when the child's end closes: it exited
                rc = proc.wait()
                link.close()
                with self._lock:
                    self.link, self.metrics_port = None, None
                if self.stopping.is_set() or self.stop_requested.is_set():
                    log.info("worker process %d exited (%s)", proc.pid, _exit_text(rc))
                    self.stopping.wait()
                    return
                died = (proc.pid, rc)
            if time.monotonic() - started >= HEALTHY_AFTER_S:
                delay = RESTART_DELAY_S[0]
            if died is not None:
                self._after_death(*died, restart_in_s=delay)
            log.warning("starting the worker process again in %.0f s", delay)
            self.stopping.wait(delay)
            delay = min(RESTART_DELAY_S[1], delay * 2)

    def _spawn(self) -> tuple[subprocess.Popen[bytes], Link]:
        # Called from the supervising thread: the kernel's PR_SET_PDEATHSIG follows the thread
        # that forked, and this one ends only when the service stops (or dies).
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = child_env()
        if self.starts:  # a test's crash point arms only the first child, so the next runs on
            env.pop(faults.ENV, None)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "node.workerproc", str(theirs.fileno()), str(os.getpid())],
                stdin=subprocess.PIPE, pass_fds=(theirs.fileno(),), env=env)
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        assert proc.stdin is not None
        try:
            proc.stdin.write(self.config.model_dump_json().encode())
            proc.stdin.close()
        except OSError:  # it died at once; its exit is handled like any other
            pass
        self.starts += 1
        link = Link(mine)
        with self._lock:
            self.proc, self.link = proc, link
            if self.stopping.is_set():  # stop() ran, or runs next and sees this child
                proc.terminate()
        log.info("worker process %d started", proc.pid)
        return proc, link

    def _follow(self, link: Link) -> None:
        while (messages := link.messages()) is not None:
            for m in messages:
                if m == "d":
                    self.on_deliver()
                elif m.startswith("m "):
                    self.metrics_port = int(m[2:])

    def _after_death(self, pid: int, rc: int, restart_in_s: float) -> None:
        """The child exited on its own: free its jobs and its registry row at once, and record
        the death where ``aidnode status`` and ``aidnode audit list`` show it."""
        name = registry.process_name(pid=pid)
        self.metrics.worker_restarts.inc()
        try:
            with self.db.write() as s:
                ids = jobs.requeue_process(s, name)
                registry.deregister(s, name)
                audit.record(s, audit.AuditKind.WORKER_PROCESS_DIED,
                             process=registry.process_name(), pid=pid, exit=_exit_text(rc),
                             requeued=ids, restart_in_s=restart_in_s)
        except Exception:  # their leases will run out instead
            log.exception("could not re-queue the jobs of worker process %d", pid)
            ids = []
        log.error("worker process %d died (%s); re-queued its job(s) %s", pid, _exit_text(rc),
                  ids or "none")
        try:
            self.on_death()
        except Exception:  # the next start's recovery removes them instead
            log.exception("could not clean up after worker process %d", pid)

    def _child_metrics(self) -> str | None:
        port = self.metrics_port
        return scrape(port) if port else None

    def stop(self, grace_s: float) -> None:
        """SIGTERM the child (it finishes its job, up to ``grace_s``), then SIGKILL it. Called
        once ``stopping`` is set, so a child started concurrently is terminated by its spawner."""
        with self._lock:
            proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s + 5)
        except subprocess.TimeoutExpired:
            log.error("worker process %d did not stop in %.0f s; killing it", proc.pid, grace_s)
            proc.kill()
            proc.wait()


def child_env() -> dict[str, str]:
    """The environment for a Python child of the service: this one, without what systemd gave
    the main process alone, and with the folder this ``node`` package was imported from first
    on its path, so the child runs the same code."""
    env = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def _exit_text(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit code {rc}"


def _die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux), so a ``kill -9`` of
    ``aidnode serve`` leaves no worker behind to race the restarted node's recovery."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before the line above took effect
        os._exit(1)


def main(argv: list[str]) -> int:
    fd, parent = int(argv[0]), int(argv[1])
    _die_with_parent(parent)
    from node import logging as node_logging
    from node.service import Role, Service, open_storage

    config = Config.model_validate_json(sys.stdin.buffer.read())
    node_logging.setup(config.logging.level, config.logging.format)
    link = Link(socket.socket(fileno=fd))
    # Ctrl-C reaches the whole process group: the parent stops this process with SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    db, store = open_storage(config)
    service = Service(config, db, store, role=Role.WORKER, parent=link)
    return service.run_forever()


if __name__ == "__main__":
    from node.service import leave

    leave(main(sys.argv[1:]))
