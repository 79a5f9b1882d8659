"""node.priority: the receiving beacon between processes, and the watcher that moves the
model's threads under SCHED_IDLE while the host receives and back after (Linux)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from node import priority
from node.priority import ModelPriority, ReceivingBeacon

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="SCHED_IDLE and CLOCK_MONOTONIC across processes")


def wait_for(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return check()


def test_a_mark_made_in_another_process_is_seen_here(tmp_path: Path) -> None:
    path = priority.beacon_path(tmp_path)
    beacon = ReceivingBeacon(path)
    assert beacon.age() == float("inf")  # never marked
    code = ("import sys; from node.priority import ReceivingBeacon; "
            "ReceivingBeacon(sys.argv[1]).mark()")
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)
    assert 0 <= beacon.age() < 60
    beacon.close()


def test_marks_are_written_at_most_every_interval_and_a_stamp_from_the_future_is_stale(
        tmp_path: Path) -> None:
    beacon = ReceivingBeacon(tmp_path / "b")
    beacon.mark(now=100.0)
    beacon.mark(now=100.0 + priority.MARK_EVERY_S / 2)  # too soon: not written
    assert beacon.age(now=101.0) == pytest.approx(1.0)
    beacon.mark(now=101.0)
    assert beacon.age(now=101.5) == pytest.approx(0.5)
    # A stamp later than now (left by the previous boot, when the clock started again).
    assert beacon.age(now=50.0) == float("inf")
    beacon.close()


def test_can_leave_idle_answers_no_where_the_kernel_refuses(
        monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.sched_setscheduler

    def refusing(tid: int, policy: int, param: os.sched_param) -> None:
        if policy == os.SCHED_OTHER:
            raise PermissionError(1, "Operation not permitted")
        real(tid, policy, param)

    monkeypatch.setattr(os, "sched_setscheduler", refusing)
    assert priority.can_leave_idle(10) is False


@pytest.mark.skipif(os.geteuid() != 0, reason="needs CAP_SYS_NICE (the tests run as root in CI)")
def test_can_leave_idle_as_root() -> None:
    assert priority.can_leave_idle(10) is True


def test_the_model_and_its_library_threads_yield_while_receiving_and_come_back_after(
        tmp_path: Path) -> None:
    """The model's thread at niceness 10 starts torch's CPU threads; while the beacon is
    fresh all of them run under SCHED_IDLE and the Python threads do not; HOLD_S after the
    last mark they are back under SCHED_OTHER, still at niceness 10."""
    if not priority.can_leave_idle(10):
        pytest.skip("this process may not leave SCHED_IDLE (no CAP_SYS_NICE, RLIMIT_NICE < 10)")
    import torch

    from node.worker import ModelThread

    started: dict[str, object] = {}

    def make_model_thread() -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        started["thread"] = ModelThread(idle=False)

    t = threading.Thread(target=make_model_thread)
    t.start()
    t.join()
    model = started["thread"]
    assert isinstance(model, ModelThread)
    before = set(os.listdir("/proc/self/task"))
    threads = torch.get_num_threads()

    def use_torch() -> None:  # starts the library's CPU threads from the model's thread
        torch.set_num_threads(2)
        torch.ones(512, 512) @ torch.ones(512, 512)

    model.run(use_torch)
    torch.set_num_threads(threads)
    library = {int(tid) for tid in set(os.listdir("/proc/self/task")) - before}
    assert library  # torch started at least one CPU thread from the model's thread
    beacon = ReceivingBeacon(tmp_path / "b")
    changes: list[bool] = []
    watcher = ModelPriority(beacon, model.native_id, hold_s=0.3, poll_s=0.01,
                            on_change=changes.append)
    watcher.start()
    python_threads = {t.native_id for t in threading.enumerate()} - {model.native_id}

    def policies(tids: set[int]) -> set[int]:
        return {os.sched_getscheduler(tid) for tid in tids}

    try:
        time.sleep(0.1)
        assert policies({model.native_id} | library) == {os.SCHED_OTHER}  # not receiving
        beacon.mark()
        assert wait_for(lambda: watcher.idle)
        assert policies({model.native_id} | library) == {os.SCHED_IDLE}
        assert policies(python_threads) == {os.SCHED_OTHER}
        assert model.run(lambda: os.sched_getscheduler(0)) == os.SCHED_IDLE
        # No further mark: back at the niceness.
        assert wait_for(lambda: not watcher.idle)
        assert policies({model.native_id} | library) == {os.SCHED_OTHER}
        assert os.getpriority(os.PRIO_PROCESS, model.native_id) == 10
        assert changes == [True, False]
    finally:
        watcher.close()
        model.close()
        beacon.close()
