"""Crash points for fault-injection tests: die (or freeze) at a named place, on purpose.

FOR TESTS ONLY. ``AIDNODE_CRASH_AT`` is read once, when this module is first imported; when it
is unset (always, in production) ``crash_point(name)`` does nothing and costs one dict lookup.
When it names a crash point, the process kills itself there with SIGKILL: no ``finally``, no
atexit, no flush, as with ``kill -9`` or a power cut that spares the disk.

    AIDNODE_CRASH_AT=NAME            SIGKILL at the first pass through NAME
    AIDNODE_CRASH_AT=NAME@N          ... at the N-th pass (1-based; earlier passes go on)
    AIDNODE_CRASH_AT=NAME:SIGSTOP    freeze instead (the whole process, every thread), to be
                                     resumed from outside with SIGCONT; works with @N too

``aidnode serve`` passes the variable to its worker's child process (``node.workerproc``) the
first time only: a child killed at a worker point is followed by one that runs on.

The points (``POINTS``) and where they sit:

- ``store.after_write``: the temporary file is written, not yet fsynced (``storage.files``).
- ``store.after_fsync``: the temporary file is fsynced, not yet renamed (``storage.files``).
- ``store.after_rename``: the file is in place and its folder fsynced; no row yet.
- ``scp.after_commit``: the instance row is committed; the C-STORE response is not sent.
- ``worker.after_model``: the model ran and the result files are written; nothing is published.
- ``sender.after_ack``: the PACS acknowledged an object; the delivery is not recorded yet.
"""

from __future__ import annotations

import os
import signal
import threading

ENV = "AIDNODE_CRASH_AT"
POINTS = ("store.after_write", "store.after_fsync", "store.after_rename", "scp.after_commit",
          "worker.after_model", "sender.after_ack")


def _parse(spec: str) -> dict[str, tuple[int, signal.Signals]]:
    """``NAME[@N][:SIGSTOP]`` -> {NAME: (N, signal)}; empty when unset."""
    spec = spec.strip()
    if not spec:
        return {}
    sig = signal.SIGKILL
    if ":" in spec:
        spec, _, sig_name = spec.partition(":")
        if sig_name not in ("SIGKILL", "SIGSTOP"):
            raise ValueError(f"{ENV}: signal must be SIGKILL or SIGSTOP, not {sig_name!r}")
        sig = signal.Signals[sig_name]
    name, _, nth = spec.partition("@")
    if name not in POINTS:
        raise ValueError(f"{ENV}: {name!r} is not one of {', '.join(POINTS)}")
    if nth and not (nth.isdigit() and int(nth) >= 1):
        raise ValueError(f"{ENV}: the pass number after @ must be a positive integer")
    return {name: (int(nth or 1), sig)}


_ARMED = _parse(os.environ.get(ENV, ""))
_passes: dict[str, int] = {}
_lock = threading.Lock()


def crash_point(name: str) -> None:
    """Kill (or freeze) this process here when ``AIDNODE_CRASH_AT`` names ``name``."""
    armed = _ARMED.get(name)
    if armed is None:
        return
    nth, sig = armed
    with _lock:
        _passes[name] = seen = _passes.get(name, 0) + 1
    if seen == nth:
        os.kill(os.getpid(), sig)
