"""Shorter reactor polls while an association is streaming instances to us.

pynetdicom runs two threads per association, and both poll: the association's reactor sleeps
1 ms before every look at its DIMSE queue, and the DUL sleeps 1 ms (its ``_run_loop_delay``)
whenever a pass found nothing to do. One received instance waits on those polls several times
(the DUL noticing the next command, the reactor noticing the complete message, the DUL noticing
the response to send): with a pynetdicom SCP that stores nothing, 300 CT instances went at
300 images/s with 1 ms polls and at 430 with 0.5 ms ones (a variant of ``bench/nullscp.py``; its
``--paced`` run in ``bench/ingest.py`` measures this module: 302 -> 434 images/s).

``install()`` gives pynetdicom's ``association`` and ``dul`` modules a ``time`` whose
``sleep(0.001)`` is shorter while the calling thread's association has had a C-STORE within
the last ``BUSY_WINDOW_S``; idle associations keep the 1 ms polls and so their idle cost. While
the association's handler runs, its DUL thread does not poll at all: it waits for the handler's
end (``storing``), so that the response goes out as soon as it is ready and the handler keeps
the interpreter. The shorter delay grows with the number of streaming associations, because
under the GIL many fast pollers would take the interpreter from the handlers doing the work:
from four at once on, every association polls at pynetdicom's own 1 ms. Every other sleep
passes through unchanged.

This reaches into pynetdicom's modules; ``install()`` does nothing unless the version is one
this was measured with (tests/unit/test_pacing.py checks that the reactors still poll with
``time.sleep(0.001)``), and ``node.adaptive_polling = false`` turns it off.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pynetdicom
from pynetdicom import association as _association
from pynetdicom import dul as _dul

log = logging.getLogger(__name__)

#: The delay pynetdicom's reactors poll with (a literal in its association reactor).
REACTOR_DELAY_S = 0.001
#: The delay while one association streams; n streaming associations poll at n times this.
BUSY_DELAY_S = 0.00025
#: How long after its last C-STORE an association counts as streaming.
BUSY_WINDOW_S = 0.05
#: pynetdicom versions whose reactors were read and measured with this module.
TESTED_VERSIONS = ("3.0.",)


@dataclass
class _State:
    last_store: float = 0.0  # monotonic time a C-STORE last started or ended
    in_handler: bool = False
    handler_done: threading.Event = field(default_factory=threading.Event)


_states: weakref.WeakKeyDictionary[Any, _State] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


@contextmanager
def storing(assoc: Any) -> Iterator[None]:
    """Around the SCP's C-STORE handler: ``assoc`` streams, and its handler is running.

    While the handler runs the DUL has nothing to send, so it waits for the handler's end (or
    1 ms) instead of polling, and leaves the interpreter to the handler.
    """
    try:
        with _lock:
            st = _states.get(assoc)
            if st is None:
                st = _states[assoc] = _State()
            st.last_store, st.in_handler = time.monotonic(), True
    except TypeError:  # cannot be weakly referenced, so not a pynetdicom Association: not paced
        yield
        return
    try:
        yield
    finally:
        st.last_store, st.in_handler = time.monotonic(), False
        st.handler_done.set()


def poll_delay(assoc: Any, now: float | None = None) -> float:
    """The delay ``assoc``'s reactor threads poll with now (outside its handler)."""
    now = time.monotonic() if now is None else now
    with _lock:
        st = _states.get(assoc)
        if st is None or now - st.last_store > BUSY_WINDOW_S:
            return REACTOR_DELAY_S
        busy = sum(1 for s in _states.values() if now - s.last_store <= BUSY_WINDOW_S)
    return min(REACTOR_DELAY_S, BUSY_DELAY_S * busy)


def _reactor_sleep() -> None:
    thread = threading.current_thread()
    assoc = getattr(thread, "assoc", None)  # the DUL's thread; None: the association's own
    key = thread if assoc is None else assoc
    st = _states.get(key)
    if st is None or (not st.in_handler
                      and time.monotonic() - st.last_store > BUSY_WINDOW_S):
        time.sleep(REACTOR_DELAY_S)  # idle, or not an association we serve: pynetdicom's poll
        return
    if assoc is not None:
        st.handler_done.clear()  # before the check: a handler ending after it sets it again
        if st.in_handler:
            st.handler_done.wait(REACTOR_DELAY_S)
            return
    time.sleep(poll_delay(key))


class _PacedTime:
    """Stands in for the ``time`` module inside pynetdicom's association and DUL modules."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        if seconds == REACTOR_DELAY_S:
            _reactor_sleep()
        else:
            time.sleep(seconds)


def installed() -> bool:
    return isinstance(_association.time, _PacedTime) and isinstance(_dul.time, _PacedTime)


def install() -> bool:
    """Pace pynetdicom's reactors as above; returns whether pacing is on."""
    if installed():
        return True
    if not pynetdicom.__version__.startswith(TESTED_VERSIONS):
        log.warning("pynetdicom %s is not a version adaptive polling was measured with; "
                    "its reactors keep their 1 ms polls", pynetdicom.__version__)
        return False
    paced = _PacedTime()
    _association.time = paced  # type: ignore[assignment]
    _dul.time = paced  # type: ignore[assignment]
    return True


def uninstall() -> None:
    """Give pynetdicom back its own ``time`` (for tests)."""
    _association.time = time
    _dul.time = time
