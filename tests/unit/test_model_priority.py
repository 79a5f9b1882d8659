"""node.priority: the receiving beacon between processes, and the watcher that moves the
model's threads under SCHED_IDLE while the host receives and back after (Linux)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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
    before = time.monotonic()
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)
    assert before <= beacon.stamp() <= time.monotonic()  # the same clock in both processes
    beacon.close()


def test_a_beacon_that_cannot_be_written_never_stops_receiving(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A full disk under the store: the mark fails with an error, said once, and the C-STORE
    handler that called it goes on (a memory-mapped beacon got SIGBUS there)."""
    beacon = ReceivingBeacon(tmp_path / "b")

    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    beacon.mark(now=100.0)
    beacon.mark(now=200.0)
    assert beacon.age(now=201.0) == float("inf")
    assert caplog.text.count("could not mark the receiving beacon") == 1
    beacon.close()
    monkeypatch.undo()
    beacon.mark(now=300.0)  # closed: ignored too
    assert beacon.age(now=301.0) == float("inf")


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


def has_cap_sys_nice() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> 23 & 1)  # CAP_SYS_NICE is bit 23
    return False


@pytest.mark.skipif(not has_cap_sys_nice(), reason="needs CAP_SYS_NICE (CI runs as root)")
def test_can_leave_idle_with_cap_sys_nice() -> None:
    assert priority.can_leave_idle(10) is True


class Beacon:
    """A receiving beacon whose age the test sets."""

    def __init__(self) -> None:
        self.receiving = False
        self.closed = False

    def age(self) -> float:
        return 0.0 if self.receiving else float("inf")

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def model() -> Iterator[tuple[Any, set[int]]]:
    """A model thread at niceness 10 that has started torch's CPU threads, and their ids."""
    if not priority.can_leave_idle(10):
        pytest.skip("this process may not leave SCHED_IDLE (no CAP_SYS_NICE, RLIMIT_NICE < 10)")
    import torch

    from node.priority import ModelThread

    started: dict[str, ModelThread] = {}

    def make_model_thread() -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        started["thread"] = ModelThread(idle=False)

    t = threading.Thread(target=make_model_thread)
    t.start()
    t.join()
    thread = started["thread"]
    before = set(os.listdir("/proc/self/task"))
    threads = torch.get_num_threads()

    def use_torch() -> None:  # starts the library's CPU threads from the model's thread
        torch.set_num_threads(2)
        torch.ones(512, 512) @ torch.ones(512, 512)

    thread.run(use_torch)
    torch.set_num_threads(threads)
    library = {int(tid) for tid in set(os.listdir("/proc/self/task")) - before}
    assert library  # torch started at least one CPU thread from the model's thread
    try:
        yield thread, library
    finally:
        thread.close()


def policies(tids: set[int]) -> set[int]:
    return {os.sched_getscheduler(tid) for tid in tids}


def test_the_model_and_its_library_threads_yield_while_receiving_and_come_back_after(
        model: tuple[Any, set[int]]) -> None:
    """While the host receives the model's thread and the CPU threads torch started from it
    run under SCHED_IDLE and the Python threads do not; once it does not they are back under
    SCHED_OTHER, still at niceness 10, and so are library threads started while idle;
    closing while idle moves them back too."""
    import torch

    thread, library = model
    beacon = Beacon()
    changes: list[bool] = []
    watcher = ModelPriority(beacon, thread.native_id, 10, poll_s=0.01,  # type: ignore[arg-type]
                            on_change=changes.append)
    watcher.start()
    python_threads = {t.native_id for t in threading.enumerate()} - {thread.native_id}
    ours = {thread.native_id} | library
    try:
        assert policies(ours) == {os.SCHED_OTHER}  # not receiving
        beacon.receiving = True
        assert wait_for(lambda: watcher.idle)
        assert policies(ours) == {os.SCHED_IDLE}
        assert policies(python_threads) == {os.SCHED_OTHER}
        assert thread.run(lambda: os.sched_getscheduler(0)) == os.SCHED_IDLE
        # More CPU threads, started from the model's thread while it is idle: they inherit it.
        before = set(os.listdir("/proc/self/task"))
        threads = torch.get_num_threads()

        def more_threads() -> None:
            torch.set_num_threads(4)
            torch.ones(512, 512) @ torch.ones(512, 512)

        thread.run(more_threads)
        torch.set_num_threads(threads)
        started_idle = {int(t) for t in set(os.listdir("/proc/self/task")) - before}
        assert started_idle and policies(started_idle) == {os.SCHED_IDLE}
        beacon.receiving = False
        assert wait_for(lambda: not watcher.idle)
        assert policies(ours | started_idle) == {os.SCHED_OTHER}
        assert os.getpriority(os.PRIO_PROCESS, thread.native_id) == 10
        beacon.receiving = True
        assert wait_for(lambda: watcher.idle)
        watcher.close()  # while idle
        assert policies(ours) == {os.SCHED_OTHER}
        assert beacon.closed
        assert changes == [True, False, True, False]
    finally:
        watcher.close()


def test_a_thread_the_kernel_refuses_to_move_back_is_tried_again(
        model: tuple[Any, set[int]], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The model's thread may not leave SCHED_IDLE for a while (say the kernel refuses): the
    watcher says so once, moves the others back, and keeps trying it until it goes."""
    thread, library = model
    beacon = Beacon()
    watcher = ModelPriority(beacon, thread.native_id, 10, poll_s=0.01)  # type: ignore[arg-type]
    real = os.sched_setscheduler
    refusing = threading.Event()
    refusing.set()
    refused: list[int] = []

    def sched_setscheduler(tid: int, policy: int, param: os.sched_param) -> None:
        if refusing.is_set() and tid == thread.native_id and policy == os.SCHED_OTHER:
            refused.append(tid)
            raise PermissionError(1, "Operation not permitted")
        real(tid, policy, param)

    monkeypatch.setattr(os, "sched_setscheduler", sched_setscheduler)
    watcher.start()
    try:
        beacon.receiving = True
        assert wait_for(lambda: watcher.idle)
        beacon.receiving = False
        assert wait_for(lambda: len(refused) >= 3)  # tried at each look
        assert policies(library) == {os.SCHED_OTHER}
        assert policies({thread.native_id}) == {os.SCHED_IDLE}
        refusing.clear()
        assert wait_for(lambda: policies({thread.native_id}) == {os.SCHED_OTHER})
        assert caplog.text.count("could not move thread") == 1
    finally:
        watcher.close()


def test_threads_below_the_niceness_or_under_another_policy_are_left_alone() -> None:
    """A native thread at niceness 0 (numpy's BLAS threads, started at import from the main
    thread) could not be moved back out of SCHED_IDLE with only RLIMIT_NICE; a thread under
    SCHED_BATCH was put there by someone else. Neither is chosen; one at the worker's niceness
    under SCHED_OTHER is. (Python threads stand in for native ones here.)"""
    ready = threading.Barrier(4, timeout=30)
    done = threading.Event()
    tids: dict[str, int] = {}

    def park(name: str, nice: int, policy: int) -> None:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, nice)
        if policy != os.SCHED_OTHER:
            os.sched_setscheduler(tid, policy, os.sched_param(0))
        tids[name] = tid
        ready.wait()
        done.wait()

    parked = [threading.Thread(target=park, args=args) for args in (
        ("blas", 0, os.SCHED_OTHER), ("library", 10, os.SCHED_OTHER),
        ("batch", 10, os.SCHED_BATCH))]
    for t in parked:
        t.start()
    ready.wait()
    try:
        model_tid = threading.get_native_id()
        python = {t.native_id for t in threading.enumerate()} - set(tids.values())
        chosen = priority.model_threads(model_tid, 10, python_tids=python)
        assert model_tid in chosen and tids["library"] in chosen
        assert tids["blas"] not in chosen and tids["batch"] not in chosen
    finally:
        done.set()
        for t in parked:
            t.join()
