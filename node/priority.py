"""The model yields to receiving while this host receives (``inference.scheduling =
"adaptive"``, Linux), and the thread the model runs in (``ModelThread``, ``model_thread``).

A receiver marks a small file under the storage root, one per host, at most every
``MARK_EVERY_S`` while C-STOREs arrive and when it accepts an association
(``ReceivingBeacon``). A worker in a process of its own
watches that file (``ModelPriority``): while the host has received in the last ``HOLD_S``, the
model's thread and the CPU threads its library started run under ``SCHED_IDLE``, so a
receiving thread that wakes takes a core at once; otherwise they run at the worker's niceness,
so that another busy process on the host cannot stop the analyses (as it can under
``scheduling = "idle"``). Leaving ``SCHED_IDLE`` needs ``RLIMIT_NICE`` to allow the worker's
niceness (systemd: ``LimitNICE=+10``) or ``CAP_SYS_NICE``; ``can_leave_idle`` checks it once,
and without it the model stays at its niceness (``"normal"``)."""

from __future__ import annotations

import logging
import os
import queue
import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from node.config import InferenceConfig

log = logging.getLogger(__name__)

#: How long after this host's last C-STORE the model keeps yielding: a scanner's pauses between
#: instances and series are shorter, so the model does not flap between the two classes.
HOLD_S = 2.0
#: How often the worker looks at the beacon (one 8-byte read).
POLL_S = 0.02
#: How often a receiver writes the beacon at most.
MARK_EVERY_S = 0.1
_STAMP = struct.Struct("<d")
T = TypeVar("T")


def beacon_path(root: Path) -> Path:
    """The beacon of this host under the storage root (hosts may share the root)."""
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"
    return Path(root) / f".receiving-{host}"


class ReceivingBeacon:
    """A shared 8-byte record of when this host last received (``CLOCK_MONOTONIC``, the same
    clock in every process of the host), read and written with ``pread``/``pwrite`` through
    the page cache, which the processes of a host share. Not a memory map: a store on a full
    disk would turn a write into the map into SIGBUS, where ``pwrite`` fails with an error
    that is ignored here (receiving goes on; the workers do not yield)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            if os.fstat(self._fd).st_size < _STAMP.size:  # its page now, not at the first mark
                os.pwrite(self._fd, _STAMP.pack(0.0), 0)
        except OSError:
            os.close(self._fd)
            raise
        self._marked = 0.0
        self._failed = False

    def mark(self, now: float | None = None) -> None:
        """This host is receiving (written at most every ``MARK_EVERY_S``); never raises."""
        now = time.monotonic() if now is None else now
        if now - self._marked < MARK_EVERY_S or self._fd < 0:  # too soon, or closed
            return
        self._marked = now
        try:
            os.pwrite(self._fd, _STAMP.pack(now), 0)
        except OSError as exc:  # a full disk, a closed beacon: receiving goes on regardless
            if not self._failed:
                self._failed = True
                log.warning("could not mark the receiving beacon %s: %s (the model of a "
                            "worker process on this host does not yield while this fails)",
                            self.path, exc)

    def stamp(self) -> float:
        """The last mark (``CLOCK_MONOTONIC``), 0.0 if none or unreadable."""
        try:
            data = os.pread(self._fd, _STAMP.size, 0)
        except OSError:
            return 0.0
        return float(_STAMP.unpack(data)[0]) if len(data) == _STAMP.size else 0.0

    def age(self, now: float | None = None) -> float:
        """Seconds since this host last received; infinite if never (or a stamp from an
        earlier boot that lies in the future)."""
        now = time.monotonic() if now is None else now
        stamp = self.stamp()
        if stamp <= 0.0 or stamp > now:
            return float("inf")
        return now - stamp

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def can_leave_idle(nice: int) -> bool:
    """Whether a thread at niceness ``nice`` may go back from SCHED_IDLE to SCHED_OTHER here
    (Linux asks for CAP_SYS_NICE or an RLIMIT_NICE of at least ``20 - nice``). Tried in a
    throwaway thread, which ends whatever the answer."""
    answer: list[bool] = []

    def probe() -> None:
        tid = threading.get_native_id()
        try:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
        except (AttributeError, OSError):
            answer.append(False)
        else:
            answer.append(True)

    t = threading.Thread(target=probe, name="sched-probe", daemon=True)
    t.start()
    t.join()
    return bool(answer and answer[0])


def _tasks() -> set[int] | None:
    try:
        return {int(name) for name in os.listdir("/proc/self/task")}
    except OSError:
        return None


def _python_threads() -> set[int]:
    return {t.native_id for t in threading.enumerate() if t.native_id is not None}


def model_threads(model_tid: int, nice: int, python_tids: set[int] | None = None) -> set[int]:
    """The threads to move under SCHED_IDLE: the model's thread, and the process's threads
    that Python did not start (the CPU threads of the model's library) that run under
    SCHED_OTHER at the worker's niceness or above, as those started from the model's thread
    do. Threads at a lower niceness (numpy's BLAS threads, started at import from the main
    thread at 0) are left alone: the kernel would refuse to move them back without
    CAP_SYS_NICE; so are threads under another policy (set by someone else)."""
    tasks = _tasks()  # before the Python threads: one started in between is known to be one
    python = _python_threads() if python_tids is None else python_tids
    chosen = {model_tid}
    for tid in (tasks or set()) - python - {model_tid}:
        try:
            if (os.sched_getscheduler(tid) == os.SCHED_OTHER
                    and os.getpriority(os.PRIO_PROCESS, tid) >= nice):
                chosen.add(tid)
        except OSError:  # ended meanwhile
            continue
    return chosen


class ModelPriority:
    """A thread (at the worker's niceness) that puts the model's threads (``model_threads``)
    under SCHED_IDLE while ``beacon`` says the host receives, and back under SCHED_OTHER (at
    their niceness) once it has not for ``hold_s``, and when it stops (``close``). ``idle``
    says which class it last put them in. Going back it moves the threads it moved and every
    thread of the process under SCHED_IDLE at the worker's niceness or above (those started
    from the model's thread meanwhile inherited the class); one the kernel refuses to move
    back is tried again at each look until it goes."""

    def __init__(self, beacon: ReceivingBeacon, model_tid: int, nice: int,
                 hold_s: float | None = None, poll_s: float | None = None,
                 on_change: Callable[[bool], None] | None = None) -> None:
        self.beacon, self.model_tid, self.nice = beacon, model_tid, nice
        self.hold_s = HOLD_S if hold_s is None else hold_s
        self.poll_s = POLL_S if poll_s is None else poll_s
        self.on_change = on_change
        self.idle = False
        self.switches = 0
        self._moved: set[int] = set()  # put under SCHED_IDLE by us, not yet moved back
        self._warned: set[str] = set()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="model-priority",
                                        daemon=True)

    def start(self) -> None:
        if _tasks() is None:
            self._warn("no /proc/self/task: only the model's own thread yields, not the CPU "
                       "threads of its library")
        self._thread.start()

    def close(self) -> None:
        """Stop watching: the watcher moves the model's threads back under SCHED_OTHER and
        closes the beacon as it ends (waited for up to 5 s here)."""
        self._closed.set()
        if not self._thread.is_alive() and self._thread.ident is None:  # never started
            self._finish()
        elif self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _warn(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning("%s", message)

    def _watch(self) -> None:
        try:
            while not self._closed.wait(self.poll_s):
                receiving = self.beacon.age() <= self.hold_s
                if receiving != self.idle or (not receiving and self._moved):
                    self._switch(receiving)
        finally:
            self._finish()

    def _finish(self) -> None:
        if self.idle or self._moved:
            self._switch(False)
        self.beacon.close()

    def _switch(self, idle: bool) -> None:
        if any(t.native_id is None for t in threading.enumerate()):
            return  # a thread is starting and cannot be told from a library's yet: next look
        alive: set[int] | None = None
        if idle:
            tids = model_threads(self.model_tid, self.nice)
            policy = os.SCHED_IDLE
        else:
            alive = _tasks()
            tids = self._moved | {tid for tid in (alive or set()) if _idle_at(tid, self.nice)}
            if alive is not None:
                tids &= alive  # an id that ended may have been reused by another process
            policy = os.SCHED_OTHER
        for tid in tids:
            try:
                os.sched_setscheduler(tid, policy, os.sched_param(0))
            except ProcessLookupError:  # the thread ended meanwhile
                self._moved.discard(tid)
                continue
            except OSError as exc:  # refused: go on with the others, say it once, try again
                self._warn(f"could not move thread {tid} of the model "
                           f"{'under' if idle else 'out of'} SCHED_IDLE: {exc}")
                continue
            if idle:
                self._moved.add(tid)
            else:
                self._moved.discard(tid)
        if not idle and alive is not None:
            self._moved &= alive
        if idle != self.idle:
            self.idle = idle
            self.switches += 1
            log.debug("the model %s", "yields to receiving (SCHED_IDLE)" if idle
                      else "runs at its niceness again")
            if self.on_change is not None:
                self.on_change(idle)


def _idle_at(tid: int, nice: int) -> bool:
    try:
        return (os.sched_getscheduler(tid) == os.SCHED_IDLE
                and os.getpriority(os.PRIO_PROCESS, tid) >= nice)
    except OSError:
        return False


class StopRequested(Exception):
    """The service is stopping: work that need not finish (the warm-up) is left."""


class ModelThread:
    """The thread the model runs in, one call at a time. With ``idle`` it runs under
    SCHED_IDLE (Linux) from the start: it gets CPU time that nothing else wants, and a thread
    that wakes (a receiver's, a sender's) takes the core from it at once. The CPU threads a
    library starts from it inherit its class; ``node.priority.ModelPriority`` may move them
    all later (``scheduling = "adaptive"``).

    A daemon thread, as the worker's loop is: a process told to stop does not wait past its
    grace for a job in progress (it is re-queued, at a lone node's next start or when its
    lease runs out, and analysed again)."""

    def __init__(self, idle: bool = True) -> None:
        self._calls: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...],
                                             Future[Any]] | None] = queue.SimpleQueue()
        self._closed = False
        self._idle = idle
        self._thread = threading.Thread(target=self._serve, name="model", daemon=True)
        self._thread.start()  # from the worker's thread: its niceness is inherited

    @property
    def native_id(self) -> int:
        return int(self._thread.native_id or 0)

    def run(self, fn: Callable[..., T], *args: Any,
            stopping: threading.Event | None = None) -> T:
        """``fn(*args)`` in the model's thread; with ``stopping``, give up waiting for it (raise
        ``StopRequested``, the call goes on unobserved) once that is set."""
        if self._closed:  # a job that outlived the stop's grace: finish it here
            return fn(*args)
        done: Future[T] = Future()
        self._calls.put((fn, args, done))
        while stopping is not None:
            try:
                return done.result(timeout=0.1)
            except TimeoutError:
                if stopping.is_set():
                    raise StopRequested() from None
        return done.result()

    def close(self) -> None:
        """The thread ends after the call in progress, if any."""
        self._closed = True
        self._calls.put(None)

    def _serve(self) -> None:
        if self._idle:
            try:
                os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE,
                                      os.sched_param(0))
            except (AttributeError, OSError) as exc:  # not Linux: niceness only
                log.warning("could not run the model under SCHED_IDLE (niceness only): %s",
                            exc)
        while (call := self._calls.get()) is not None:
            fn, args, done = call
            try:
                done.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller
                done.set_exception(exc)


def model_thread(cfg: InferenceConfig, root: Path, on_idle: Callable[[bool], None]
                 ) -> tuple[ModelThread | None, ModelPriority | None]:
    """For a worker in a process of its own: the thread its model runs in, and the watcher
    that moves it while the host receives, as ``cfg.scheduling`` says; ``(None, None)`` for
    "normal" (the model runs in the worker's own thread), and for "adaptive" where it cannot
    work (not Linux, leaving SCHED_IDLE not allowed, no beacon), with a warning. ``on_idle``
    is told the model's class (True: SCHED_IDLE) at the start and at each change. Call it
    from the worker's thread once its niceness is set: the model's thread inherits it."""
    if cfg.scheduling == "idle":
        on_idle(True)
        return ModelThread(idle=True), None
    if cfg.scheduling != "adaptive":
        return None, None
    nice = cfg.nice
    if not hasattr(os, "SCHED_IDLE"):
        log.warning('scheduling = "adaptive" needs Linux\'s SCHED_IDLE; the model runs at '
                    "its niceness only")
        return None, None
    if not can_leave_idle(nice):
        log.warning('scheduling = "adaptive": this process may not move a thread back out of '
                    "SCHED_IDLE (that needs CAP_SYS_NICE or RLIMIT_NICE >= %d, systemd: "
                    'LimitNICE=+%d), so the model runs at niceness %d only, as with "normal"',
                    20 - nice, nice, nice)
        return None, None
    try:
        beacon = ReceivingBeacon(beacon_path(root))
    except OSError as exc:
        log.warning('scheduling = "adaptive": no receiving beacon to watch (%s), so the model '
                    "runs at niceness %d only", exc, nice)
        return None, None
    thread = ModelThread(idle=False)
    on_idle(False)
    watcher = ModelPriority(beacon, thread.native_id, nice, on_change=on_idle)
    watcher.start()
    return thread, watcher
