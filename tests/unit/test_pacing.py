"""node.pacing: pynetdicom's reactors poll faster while an association streams, not otherwise."""

from __future__ import annotations

import inspect
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
from pynetdicom import dul as pn_dul

from node import pacing
from tests.conftest import RunningNode
from tests.dicomgen import ct_series, write_all
from tests.peers import storescu


class Assoc:
    """Stands in for a pynetdicom Association (weakly referenced, like the real one)."""


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


def test_idle_and_unknown_associations_keep_the_one_millisecond_poll() -> None:
    a = Assoc()
    assert pacing.poll_delay(a) == pacing.REACTOR_DELAY_S
    with pacing.storing(a):
        pass
    assert pacing.poll_delay(a) == pacing.BUSY_DELAY_S
    later = time.monotonic() + pacing.BUSY_WINDOW_S + 0.01
    assert pacing.poll_delay(a, now=later) == pacing.REACTOR_DELAY_S


def test_the_busy_delay_grows_with_the_streaming_associations() -> None:
    streaming = [Assoc() for _ in range(6)]
    for n, a in enumerate(streaming, 1):
        with pacing.storing(a):
            pass
        expected = min(pacing.REACTOR_DELAY_S, pacing.BUSY_DELAY_S * n)
        assert pacing.poll_delay(streaming[0]) == pytest.approx(expected)
    assert pacing.poll_delay(streaming[0]) == pacing.REACTOR_DELAY_S  # 6 at once: pynetdicom's


def test_a_streaming_associations_threads_sleep_the_busy_delay(fake_time: FakeTime) -> None:
    a = Assoc()
    with pacing.storing(a):
        pass
    run_in_thread(lambda: pacing._PacedTime.sleep(0.001), dul_of=a)  # its DUL
    assert fake_time.slept == [pacing.BUSY_DELAY_S]


def test_the_association_thread_itself_is_found_by_identity(fake_time: FakeTime) -> None:
    """The Association is its own reactor thread (no ``.assoc``): the thread is looked up."""
    association = threading.Thread(target=lambda: pacing._PacedTime.sleep(0.001))
    with pacing.storing(association):
        pass
    association.start()
    association.join(10)
    assert fake_time.slept == [pacing.BUSY_DELAY_S]


def test_while_the_handler_runs_the_dul_waits_for_its_end(fake_time: FakeTime) -> None:
    a = Assoc()
    returned = threading.Event()

    def dul_poll() -> None:
        pacing._PacedTime.sleep(0.001)
        returned.set()

    with pacing.storing(a):
        thread = threading.Thread(target=dul_poll)
        thread.assoc = a  # type: ignore[attr-defined]
        thread.start()
        # It waits on the handler's end (at most 1 ms a time): no sleep was asked for.
        assert returned.wait(5)
        assert fake_time.slept == []
    thread.join(5)
    # The handler ended: the DUL polls the busy delay again until the next one.
    run_in_thread(lambda: pacing._PacedTime.sleep(0.001), dul_of=a)
    assert fake_time.slept == [pacing.BUSY_DELAY_S]


def test_a_handler_ending_wakes_a_waiting_dul() -> None:
    a = Assoc()
    with pacing.storing(a):
        pass
    st = pacing._states[a]
    st.in_handler = True
    woke = threading.Event()

    def dul_poll() -> None:
        st.handler_done.clear()
        st.handler_done.wait(30)  # what _reactor_sleep does, with a long timeout to tell
        woke.set()

    thread = threading.Thread(target=dul_poll)
    thread.start()
    assert not woke.wait(0.05)
    with pacing.storing(a):
        pass
    assert woke.wait(5)
    thread.join(5)


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
    a = Assoc()
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
    reactors are paced, and with pacing the real DUL thread waited on the handler's end."""
    waits: list[float] = []

    class CountingEvent(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            waits.append(timeout or 0.0)
            return super().wait(timeout)

    @dataclass
    class CountingState(pacing._State):
        handler_done: threading.Event = field(default_factory=CountingEvent)

    monkeypatch.setattr(pacing, "_State", CountingState)
    node = node_service(node={"adaptive_polling": adaptive}, rules=[])
    assert pacing.installed() is adaptive
    files = write_all(ct_series(20, rows=64, cols=64), tmp_path / "series")
    done = storescu(node.host, node.port, files, called_aet=node.ae_title)
    assert done.returncode == 0, done.stderr
    assert node.instance_count() == 20
    if adaptive:
        assert waits and all(t == pacing.REACTOR_DELAY_S for t in waits)
    else:
        assert waits == []
