"""pynetdicom's reactors woken by what they wait for, instead of polling every millisecond.

pynetdicom runs two threads per association, and both poll: the association's reactor sleeps
1 ms before every look at its DIMSE queue, and the DUL sleeps 1 ms (its ``_run_loop_delay``)
whenever a pass found nothing to do. One received instance waits on those polls several times
(the DUL noticing the next command, the reactor noticing the complete message, the DUL noticing
the response to send), and with many associations the polls themselves cost: eight streaming
associations are sixteen threads each taking the interpreter a thousand times a second.

``install()`` gives pynetdicom's ``association`` and ``dul`` modules a ``time`` whose
``sleep(0.001)``, in the threads of an association this process accepted, waits for the event
the thread is waiting for, with a timeout (associations it requests keep pynetdicom's poll, and
their reactor is kept off the responses to their own requests: ``_guard_requests``):

- the association's reactor waits until something is put on its DIMSE message queue or on its
  DUL's queue to the user (a complete message, a release or abort request), at most
  ``REACTOR_WAIT_S``;
- while a C-STORE handler runs (``storing``) and until its response is queued for sending, the
  association's DUL waits for that response, at most ``REACTOR_WAIT_S``;
- otherwise the DUL waits until its socket has data or something is queued for sending to
  the peer (a put on that queue writes to a pipe the DUL selects on beside its socket), at
  most ``REACTOR_WAIT_S``.

The waits are woken by ``put`` on those queues, wrapped for each association the first time its
threads wait; nothing is missed for longer than a timeout, so a wake-up this does not see (a
pynetdicom that puts elsewhere) costs latency, never a hang. Every other sleep passes through
unchanged.

This reaches into pynetdicom's modules; ``install()`` does nothing unless the version is one
this was measured with (tests/unit/test_pacing.py checks that the reactors still poll with
``time.sleep(0.001)`` and still use these queues), and ``node.adaptive_polling = false`` turns
it off.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pynetdicom
from pynetdicom import association as _association
from pynetdicom import dul as _dul

log = logging.getLogger(__name__)

#: The delay pynetdicom's reactors poll with (a literal in its association reactor).
REACTOR_DELAY_S = 0.001
#: The longest a reactor waits for a wake-up before it looks anyway.
REACTOR_WAIT_S = 0.01
#: The longest the DUL waits for its socket (or a wake-up) outside a handler.
SOCKET_WAIT_S = REACTOR_WAIT_S
#: pynetdicom versions whose reactors were read and measured with this module.
TESTED_VERSIONS = ("3.0.",)


@dataclass
class _State:
    """One association's wake-ups."""

    #: A C-STORE handler started and its response is not queued yet.
    awaiting_response: bool = False
    response_queued: threading.Event = field(default_factory=threading.Event)
    #: Set by a put on the reactor's queues; None until they are wrapped.
    message: threading.Event | None = None
    sends_wrapped: bool = False
    #: A pipe the DUL selects on beside its socket while ``selecting``; a put on the queue
    #: to the peer writes to it. None until the DUL first waits (or if no pipe could be made).
    wake_r: int | None = None
    wake_w: int | None = None
    selecting: bool = False
    #: A requestor's reactor kept off its requests' responses (``_guard_requests``).
    requests_guarded: bool = False


_states: weakref.WeakKeyDictionary[Any, _State] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def _state(assoc: Any) -> _State:
    """``assoc``'s state, made on first use; TypeError if it cannot be weakly referenced."""
    with _lock:
        st = _states.get(assoc)
        if st is None:
            st = _states[assoc] = _State()
        return st


def _wake_on_put(q: queue.Queue[Any], wake: Callable[[], None]) -> None:
    """Call ``wake()`` after every put on ``q`` (``put_nowait`` goes through ``put``)."""
    put = q.put

    def put_and_wake(item: Any, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        wake()

    q.put = put_and_wake  # type: ignore[method-assign]


def _wrap_sends(assoc: Any, st: _State) -> None:
    """A put on the DUL's queue to the peer ends the wait for a response."""
    with _lock:
        if st.sends_wrapped:
            return
        st.sends_wrapped = True
    q = getattr(getattr(assoc, "dul", None), "to_provider_queue", None)
    if not isinstance(q, queue.Queue):
        return

    def queued() -> None:
        st.awaiting_response = False
        st.response_queued.set()
        if st.selecting and st.wake_w is not None:
            try:
                os.write(st.wake_w, b"\0")
            except OSError:  # full (it is woken already) or closed (the association ended)
                pass

    _wake_on_put(q, queued)


@contextmanager
def storing(assoc: Any) -> Iterator[None]:
    """Around the SCP's C-STORE handler: until the response is queued, ``assoc``'s DUL has
    nothing to do but wait for it, and it leaves the interpreter to the handler."""
    try:
        st = _state(assoc)
    except TypeError:  # cannot be weakly referenced, so not a pynetdicom Association: not paced
        yield
        return
    _wrap_sends(assoc, st)
    st.awaiting_response = True
    yield


def _reactor_wait(assoc: Any) -> None:
    """The association's own reactor: until a message or request is queued for it."""
    st = _state(assoc)
    if st.message is None:
        message = threading.Event()
        for q in (assoc.dimse.msg_queue, assoc.dul.to_user_queue):
            _wake_on_put(q, message.set)
        st.message = message
        return  # look at once: something may have been put before the queues were wrapped
    st.message.wait(REACTOR_WAIT_S)
    st.message.clear()  # before the reactor looks: a put after this sets it again


def _wake_pipe(assoc: Any, st: _State) -> int | None:
    """The read end of ``assoc``'s wake-up pipe, made on first use and closed when the
    association is collected; None when none can be made (the DUL then waits 1 ms at most)."""
    if st.wake_r is None:
        try:
            st.wake_r, st.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            log.debug("no wake-up pipe for an association's DUL: %s", exc)
            return None
        weakref.finalize(assoc, _close, st.wake_r, st.wake_w)
        _wrap_sends(assoc, st)
    return st.wake_r


def _close(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _dul_wait(assoc: Any) -> None:
    """The association's DUL: for the response while a handler runs, else for data on its
    socket or something queued for sending."""
    st = _state(assoc)
    st.response_queued.clear()  # before the check: a response queued after it sets it
    if st.awaiting_response:
        st.response_queued.wait(REACTOR_WAIT_S)
        return
    dul = assoc.dul
    sock = getattr(getattr(dul, "socket", None), "socket", None)
    wake = _wake_pipe(assoc, st)
    if sock is None:
        time.sleep(REACTOR_DELAY_S)
        return
    st.selecting = True  # before the look: a put after it writes to the pipe
    try:
        if not dul.to_provider_queue.empty():
            return
        if wake is None:
            select.select([sock], [], [], REACTOR_DELAY_S)
            return
        ready, _, _ = select.select([sock, wake], [], [], SOCKET_WAIT_S)
        if wake in ready:
            try:
                os.read(wake, 512)
            except OSError:
                pass
    except (OSError, ValueError):  # closed meanwhile: the DUL's own look reports it
        time.sleep(REACTOR_DELAY_S)
    finally:
        st.selecting = False


def _reactor_sleep() -> None:
    thread = threading.current_thread()
    dul_of = getattr(thread, "assoc", None)  # the DUL's thread has its association
    try:
        if dul_of is not None:
            if getattr(dul_of, "is_acceptor", False):
                _dul_wait(dul_of)
                return
        elif (getattr(thread, "dimse", None) is not None and getattr(thread, "dul", None)
              is not None and not getattr(thread, "_kill", True)):
            if getattr(thread, "is_acceptor", False):
                _reactor_wait(thread)  # an Association is its own reactor thread
                return
            _guard_requests(thread)
    except TypeError:  # not weakly referenceable: not a pynetdicom association
        pass
    # Anything else keeps pynetdicom's poll: a DUL being stopped, and the associations this
    # process requests (the sender's), whose reactor a woken wait would make race their
    # requests more often (``_guard_requests``).
    time.sleep(REACTOR_DELAY_S)


def _guard_requests(assoc: Any) -> None:
    """Keep ``assoc``'s reactor off the responses to its own requests.

    A requestor pauses its reactor for each request (``send_c_store``, ``release``, ...) by
    clearing ``_reactor_checkpoint`` and goes on once the reactor's ``_is_paused`` is true.
    That flag can still be true from the request before, while the reactor, let through by
    the checkpoint set at the end of that request, is about to look at its message queue: it
    then takes the new request's response ("Received unexpected C-STORE service message"),
    and the request times out and aborts the association. With this module's waits that was
    seen in 8 of 36 runs of 100 C-STOREs to dcmtk's storescp (and in 2 of 24 with pacing as it
    was before, 0 of 30 without). So the reactor's own non-blocking look at the queue finds
    nothing while the checkpoint is cleared: a request is in flight, its response is its own.
    """
    st = _state(assoc)
    with _lock:
        if st.requests_guarded:
            return
        st.requests_guarded = True
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    if not isinstance(checkpoint, threading.Event):
        return
    get_msg = assoc.dimse.get_msg

    def get_msg_unless_requesting(block: bool = False) -> Any:
        if not block and threading.current_thread() is assoc and not checkpoint.is_set():
            return None, None
        return get_msg(block)

    assoc.dimse.get_msg = get_msg_unless_requesting


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
