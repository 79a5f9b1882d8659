"""node.pacing: pynetdicom's reactors are woken by what they wait for, within their timeouts."""

from __future__ import annotations

import gc
import inspect
import os
import queue
import socket
import threading
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pynetdicom
import pytest
from pynetdicom import association as pn_association
from pynetdicom import dimse as pn_dimse
from pynetdicom import dul as pn_dul

from node import pacing
from tests.conftest import RunningNode
from tests.dicomgen import ct_series, write_all
from tests.peers import storescu


class FakeTime:
    """``time`` for node.pacing: records sleeps instead of sleeping; the clock is real."""

    def __init__(self) -> None:
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture
def fake_time(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(pacing, "time", fake)
    return fake


@pytest.fixture(autouse=True)
def no_states(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees only the associations it marks."""
    monkeypatch.setattr(pacing, "_states", type(pacing._states)())


@pytest.fixture
def restore_pacing() -> Iterator[None]:
    was = pacing.installed()
    yield
    if was:
        pacing.install()
    else:
        pacing.uninstall()


def run_in_thread(fn: Callable[[], None], *, dul_of: Any = None) -> None:
    """Run ``fn`` on a thread that looks like ``dul_of``'s DUL thread (it has ``.assoc``), or,
    without ``dul_of``, on a plain thread."""
    thread = threading.Thread(target=fn)
    if dul_of is not None:
        thread.assoc = dul_of  # type: ignore[attr-defined]
    thread.start()
    thread.join(10)
    assert not thread.is_alive()


def test_pynetdicom_reactors_still_poll_as_this_module_expects() -> None:
    """A pynetdicom upgrade that changes how its reactors wait must be looked at again."""
    assert "time.sleep(0.001)" in inspect.getsource(pn_association.Association._run_reactor)
    assert "time.sleep(self._run_loop_delay)" in inspect.getsource(
        pn_dul.DULServiceProvider.run_reactor)
    assert "self._run_loop_delay = 0.001" in inspect.getsource(pn_dul.DULServiceProvider.__init__)
    assert pacing.REACTOR_DELAY_S == 0.001
    assert "assoc" in dict(inspect.getmembers(pn_dul.DULServiceProvider))  # how a DUL finds it
    # The queues whose puts wake the waits.
    assert "self.dimse.get_msg(block=False)" in inspect.getsource(
        pn_association.Association._run_reactor)
    assert "self.msg_queue.put(" in inspect.getsource(
        pn_dimse.DIMSEServiceProvider.receive_primitive)
    assert "self.to_provider_queue.put(primitive)" in inspect.getsource(
        pn_dul.DULServiceProvider.send_pdu)
    assert "self.to_user_queue" in inspect.getsource(pn_dul.DULServiceProvider.receive_pdu)
    # How a requestor pauses its reactor for a request (pacing._guard_requests).
    for request in ("release", "send_c_store", "send_c_echo"):
        source = inspect.getsource(getattr(pn_association.Association, request))
        assert "self._reactor_checkpoint.clear()" in source
        assert "while not self._is_paused:" in source


@pytest.fixture
def long_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Timeouts no test waits out: a wait that ends was woken."""
    monkeypatch.setattr(pacing, "REACTOR_WAIT_S", 30.0)
    monkeypatch.setattr(pacing, "SOCKET_WAIT_S", 30.0)


class FakeAssociation(threading.Thread):
    """Stands in for a pynetdicom Association: its own reactor thread, which polls with
    ``time.sleep(0.001)`` until killed, with the queues pacing wraps and its DUL's socket."""

    def __init__(self, sock: socket.socket | None = None) -> None:
        super().__init__(daemon=True)
        self._kill = False
        self.is_acceptor = True
        self._reactor_checkpoint = threading.Event()
        self._reactor_checkpoint.set()  # as pynetdicom's: set unless a request is in flight
        msg_queue: queue.Queue[Any] = queue.Queue()
        self.dimse = types.SimpleNamespace(msg_queue=msg_queue,
                                           get_msg=lambda block=False: msg_queue.get(block))
        self.dul = types.SimpleNamespace(to_user_queue=queue.Queue(),
                                         to_provider_queue=queue.Queue(),
                                         socket=types.SimpleNamespace(socket=sock))
        self.passes = 0
        self._passed = threading.Condition()

    def run(self) -> None:
        while not self._kill:
            pacing._PacedTime.sleep(0.001)
            with self._passed:
                self.passes += 1
                self._passed.notify_all()

    def passed(self, n: int, timeout: float) -> bool:
        """Whether the reactor has ended ``n`` waits within ``timeout`` seconds."""
        with self._passed:
            return self._passed.wait_for(lambda: self.passes >= n, timeout)

    def stop(self) -> None:
        self._kill = True
        self.dimse.msg_queue.put(None)
        self.join(10)
        assert not self.is_alive()


class DULWaiter:
    """One ``pacing._PacedTime.sleep(0.001)`` on a thread like ``assoc``'s DUL; ``done`` is
    set when it returns."""

    def __init__(self, assoc: FakeAssociation) -> None:
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.assoc = assoc  # type: ignore[attr-defined]
        self.thread.start()

    def _run(self) -> None:
        pacing._PacedTime.sleep(0.001)
        self.done.set()

    def join(self) -> None:
        self.thread.join(10)
        assert not self.thread.is_alive()


def test_the_reactor_is_woken_by_a_message_or_a_request(long_waits: None) -> None:
    a = FakeAssociation()
    a.start()
    try:
        assert a.passed(1, 10)  # the first pass wraps the queues and looks at once
        assert not a.passed(2, 0.05)  # nothing queued: it waits
        a.dimse.msg_queue.put((1, "C-STORE-RQ"))
        assert a.passed(2, 10)
        assert not a.passed(3, 0.05)
        a.dul.to_user_queue.put_nowait("A-RELEASE-RQ")  # put_nowait goes through put
        assert a.passed(3, 10)
    finally:
        a.stop()


def test_while_a_handler_runs_the_dul_waits_for_the_response(long_waits: None) -> None:
    a = FakeAssociation()
    with pacing.storing(a):
        dul = DULWaiter(a)
        assert not dul.done.wait(0.05)  # no response yet: it does not look
    assert not dul.done.wait(0.05)  # the handler returned; pynetdicom queues the response next
    a.dul.to_provider_queue.put("C-STORE-RSP")
    assert dul.done.wait(10)
    dul.join()
    assert not pacing._states[a].awaiting_response


def test_outside_a_handler_the_dul_waits_for_its_socket(long_waits: None) -> None:
    ours, peer = socket.socketpair()
    try:
        a = FakeAssociation(ours)
        dul = DULWaiter(a)
        assert not dul.done.wait(0.05)
        peer.sendall(b"\x04")  # the next PDU arrives
        assert dul.done.wait(10)
        dul.join()
        assert ours.recv(16) == b"\x04"  # what the DUL's own look would read
        a.dul.to_provider_queue.put("A-RELEASE-RP")  # already queued: no wait at all
        DULWaiter(a).join()
        a.dul.to_provider_queue.get()
        dul = DULWaiter(a)
        assert not dul.done.wait(0.05)
        a.dul.to_provider_queue.put("P-DATA")  # queued while it waits: the pipe wakes it
        assert dul.done.wait(10)
        dul.join()
    finally:
        ours.close()
        peer.close()


def test_the_wake_up_pipe_is_closed_with_its_association(long_waits: None) -> None:
    ours, peer = socket.socketpair()
    try:
        a = FakeAssociation(ours)
        peer.sendall(b"\x04")
        waiter = DULWaiter(a)
        waiter.join()
        r, w = pacing._states[a].wake_r, pacing._states[a].wake_w
        assert r is not None and w is not None
        fds = (r, w)
        os.fstat(r)  # open while the association lives
        del a, waiter
        gc.collect()
        for fd in fds:
            with pytest.raises(OSError):
                os.fstat(fd)
    finally:
        ours.close()
        peer.close()


def test_a_stopping_association_and_other_threads_keep_the_one_millisecond_poll(
        fake_time: FakeTime) -> None:
    a = FakeAssociation()
    a._kill = True  # kill(): its reactor thread waits for the DUL to stop
    a.run = lambda: pacing._PacedTime.sleep(0.001)  # type: ignore[method-assign]
    a.start()
    a.join(10)
    run_in_thread(lambda: pacing._PacedTime.sleep(0.001))  # no association at all
    assert fake_time.slept == [pacing.REACTOR_DELAY_S] * 2
    assert a not in pacing._states


def test_associations_this_process_requests_keep_the_one_millisecond_poll(
        fake_time: FakeTime) -> None:
    """The sender's associations: their reactor and DUL poll as pynetdicom's do."""
    a = FakeAssociation(socket.socket())
    a.is_acceptor = False
    a.run = lambda: pacing._PacedTime.sleep(0.001)  # type: ignore[method-assign]
    a.start()
    a.join(10)
    run_in_thread(lambda: pacing._PacedTime.sleep(0.001), dul_of=a)
    assert fake_time.slept == [pacing.REACTOR_DELAY_S] * 2
    assert pacing._states[a].message is None and pacing._states[a].wake_r is None
    a.dul.socket.socket.close()


def test_a_requestors_reactor_is_kept_off_the_responses_to_its_requests() -> None:
    """While a request is in flight (the checkpoint cleared), the reactor's own look at the
    queue finds nothing; the requesting thread gets the response; once the request is over
    the reactor sees what comes (pynetdicom's race, seen as "Received unexpected C-STORE
    service message" and an aborted association)."""
    a = FakeAssociation()
    a.is_acceptor = False
    looked: list[Any] = []

    def reactor_pass() -> None:
        pacing._PacedTime.sleep(0.001)  # the first pass guards the queue
        a._reactor_checkpoint.clear()  # send_c_store() on another thread, meanwhile
        a.dimse.msg_queue.put((1, "C-STORE-RSP"))
        looked.append(a.dimse.get_msg(block=False))  # the reactor's look: not its message
        a._reactor_checkpoint.set()

    a.run = reactor_pass  # type: ignore[method-assign]
    a.start()
    a.join(10)
    assert looked == [(None, None)]
    assert a.dimse.get_msg(block=True) == (1, "C-STORE-RSP")  # the requesting thread's
    a.dimse.msg_queue.put((1, "N-EVENT-REPORT-RQ"))
    run_in_thread(lambda: looked.append(a.dimse.get_msg(block=False)))  # another thread
    assert looked[1] == (1, "N-EVENT-REPORT-RQ")


def test_an_association_that_cannot_be_weakly_referenced_is_served_unpaced() -> None:
    """What a handler gets is normally a pynetdicom Association; anything else (the fuzz tests
    pass a namespace) is stored all the same, just not paced."""
    other = types.SimpleNamespace()
    ran = False
    with pacing.storing(other):
        ran = True
    assert ran
    assert len(pacing._states) == 0


def test_other_sleeps_pass_through(fake_time: FakeTime) -> None:
    a = FakeAssociation()
    with pacing.storing(a):
        pass
    run_in_thread(lambda: pacing._PacedTime.sleep(0.0001), dul_of=a)
    run_in_thread(lambda: pacing._PacedTime.sleep(0.1), dul_of=a)
    run_in_thread(lambda: pacing._PacedTime.sleep(0.001))  # no association at all
    assert fake_time.slept == [0.0001, 0.1, pacing.REACTOR_DELAY_S]
    assert pacing._PacedTime().monotonic is time.monotonic  # the rest of ``time`` is there


def test_install_replaces_time_in_both_reactor_modules_and_uninstall_restores(
        restore_pacing: None) -> None:
    pacing.uninstall()
    assert pn_association.time is time and pn_dul.time is time
    assert pacing.install()
    assert pacing.installed()
    assert isinstance(pn_association.time, pacing._PacedTime)
    assert isinstance(pn_dul.time, pacing._PacedTime)
    pacing.uninstall()
    assert not pacing.installed()


def test_an_untested_pynetdicom_keeps_its_own_polls(
        monkeypatch: pytest.MonkeyPatch, restore_pacing: None,
        caplog: pytest.LogCaptureFixture) -> None:
    pacing.uninstall()
    monkeypatch.setattr(pynetdicom, "__version__", "4.0.0")
    assert not pacing.install()
    assert pn_association.time is time and pn_dul.time is time
    assert "not a version adaptive polling was measured with" in caplog.text


@pytest.mark.integration
@pytest.mark.parametrize("adaptive", [True, False])
def test_receiving_with_and_without_pacing(
        node_service: Callable[..., RunningNode], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        restore_pacing: None, adaptive: bool) -> None:
    """Real associations: every instance is stored either way, the switch decides whether the
    reactors are paced, and with pacing the real DUL thread waited for the responses."""
    waits: list[float] = []

    class CountingEvent(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            waits.append(timeout or 0.0)
            return super().wait(timeout)

    @dataclass
    class CountingState(pacing._State):
        response_queued: threading.Event = field(default_factory=CountingEvent)

    monkeypatch.setattr(pacing, "_State", CountingState)
    node = node_service(node={"adaptive_polling": adaptive}, rules=[])
    assert pacing.installed() is adaptive
    files = write_all(ct_series(20, rows=64, cols=64), tmp_path / "series")
    done = storescu(node.host, node.port, files, called_aet=node.ae_title)
    assert done.returncode == 0, done.stderr
    assert node.instance_count() == 20
    if adaptive:
        assert waits and all(t == pacing.REACTOR_WAIT_S for t in waits)
    else:
        assert waits == []
