"""The model yields to receiving while this host receives (``inference.scheduling =
"adaptive"``, Linux).

A receiver marks a small file under the storage root, one per host, at most every
``MARK_EVERY_S`` while C-STOREs arrive (``ReceivingBeacon``). A worker in a process of its own
watches that file (``ModelPriority``): while the host has received in the last ``HOLD_S``, the
model's thread and the CPU threads its library started run under ``SCHED_IDLE``, so a
receiving thread that wakes takes a core at once; otherwise they run at the worker's niceness,
so that another busy process on the host cannot stop the analyses (as it can under
``scheduling = "idle"``). Leaving ``SCHED_IDLE`` needs ``RLIMIT_NICE`` to allow the worker's
niceness (systemd: ``LimitNICE=+10``) or ``CAP_SYS_NICE``; ``can_leave_idle`` checks it once,
and without it the model stays at its niceness (``"normal"``)."""

from __future__ import annotations

import logging
import mmap
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

#: How long after this host's last C-STORE the model keeps yielding: a scanner's pauses between
#: instances and series are shorter, so the model does not flap between the two classes.
HOLD_S = 2.0
#: How often the worker looks at the beacon (one 8-byte read).
POLL_S = 0.02
#: How often a receiver writes the beacon at most.
MARK_EVERY_S = 0.1
_STAMP = struct.Struct("<d")


def beacon_path(root: Path) -> Path:
    """The beacon of this host under the storage root (hosts may share the root)."""
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"
    return Path(root) / f".receiving-{host}"


class ReceivingBeacon:
    """A shared 8-byte record of when this host last received a C-STORE (``CLOCK_MONOTONIC``,
    the same clock in every process of the host)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            if os.fstat(fd).st_size < _STAMP.size:
                os.ftruncate(fd, _STAMP.size)
            self._map = mmap.mmap(fd, _STAMP.size)
        finally:
            os.close(fd)
        self._marked = 0.0

    def mark(self, now: float | None = None) -> None:
        """This host is receiving (written at most every ``MARK_EVERY_S``)."""
        now = time.monotonic() if now is None else now
        if now - self._marked >= MARK_EVERY_S:
            self._marked = now
            _STAMP.pack_into(self._map, 0, now)

    def age(self, now: float | None = None) -> float:
        """Seconds since this host last received; infinite if never (or a stamp from an
        earlier boot that lies in the future)."""
        now = time.monotonic() if now is None else now
        (stamp,) = _STAMP.unpack_from(self._map, 0)
        if stamp <= 0.0 or stamp > now:
            return float("inf")
        return now - stamp

    def close(self) -> None:
        self._map.close()


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


def model_threads(model_tid: int) -> set[int]:
    """The model's thread and the process's threads that Python did not start (the CPU
    threads of the model's library, started from the model's thread)."""
    others = {t.native_id for t in threading.enumerate()} - {model_tid}
    try:
        tasks = {int(name) for name in os.listdir("/proc/self/task")}
    except OSError:
        tasks = set()
    return {model_tid} | (tasks - others)


def set_policy(tids: set[int], idle: bool) -> None:
    policy = os.SCHED_IDLE if idle else os.SCHED_OTHER
    for tid in tids:
        try:
            os.sched_setscheduler(tid, policy, os.sched_param(0))
        except ProcessLookupError:  # the thread ended meanwhile
            continue


class ModelPriority:
    """A thread (at the worker's niceness) that puts the model's threads under SCHED_IDLE
    while ``beacon`` says the host receives, and back at their niceness once it has not for
    ``hold_s``. ``idle`` says which class they are in now."""

    def __init__(self, beacon: ReceivingBeacon, model_tid: int, hold_s: float | None = None,
                 poll_s: float | None = None, on_change: Callable[[bool], None] | None = None
                 ) -> None:
        self.beacon, self.model_tid = beacon, model_tid
        self.hold_s = HOLD_S if hold_s is None else hold_s
        self.poll_s = POLL_S if poll_s is None else poll_s
        self.on_change = on_change
        self.idle = False
        self.switches = 0
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="model-priority",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._closed.wait(self.poll_s):
            receiving = self.beacon.age() <= self.hold_s
            if receiving == self.idle:
                continue
            try:
                set_policy(model_threads(self.model_tid), receiving)
            except OSError as exc:  # refused (it was allowed at the start): stop switching
                log.warning("could not move the model %s SCHED_IDLE: %s; it stays where it "
                            "is", "under" if receiving else "out of", exc)
                return
            self.idle = receiving
            self.switches += 1
            log.debug("the model %s", "yields to receiving (SCHED_IDLE)" if receiving
                      else "runs at its niceness again")
            if self.on_change is not None:
                self.on_change(receiving)

