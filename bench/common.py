"""Shared helpers for the benchmarks: machine facts, medians, receivers as subprocesses, RSS.

Every receiver runs on loopback on a free port and is stopped (SIGTERM, then SIGKILL) when its
context exits. Peers that are not ours get ``TCP_NODELAY=1`` in their environment (see
shared/BASELINES.md: Debian's dcmtk and Orthanc stall at ~20 images/s without it).
"""

from __future__ import annotations

import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.conftest import node_config_text
from tests.peers import (
    LOOPBACK,
    _stop,
    free_port,
    wait_for_port,
)

NODE_AE = "AIDNODE"


def machine() -> dict[str, Any]:
    """nproc, CPU model, RAM and the software versions that matter to the figures."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gib = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gib = int(line.split()[1]) / 2**20
                break
    except OSError:
        pass
    import pydicom
    import pynetdicom

    return {"nproc": os.cpu_count(), "cpu": cpu, "ram_gib": round(ram_gib, 1),
            "python": platform.python_version(), "pydicom": pydicom.__version__,
            "pynetdicom": pynetdicom.__version__, "kernel": platform.release()}


def print_machine(info: dict[str, Any]) -> None:
    print(f"machine: {info['nproc']} CPU(s), {info['cpu']}, {info['ram_gib']} GiB RAM, "
          f"Linux {info['kernel']}, Python {info['python']}, pydicom {info['pydicom']}, "
          f"pynetdicom {info['pynetdicom']}")


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# -- RSS ---------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds ``pid`` has used, all its threads; None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int, tree: bool = False) -> int | None:
    """VmRSS of ``pid`` in KiB, or None when it is gone; with ``tree``, the sum over it and
    its descendants (``aidnode serve`` and its worker's child process)."""
    try:
        own = next(int(line.split()[1])
                   for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                   if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None
    if tree:
        own += sum(rss_kib(child, tree=True) or 0 for child in children(pid))
    return own


def children(pid: int) -> list[int]:
    """The pids of ``pid``'s child processes (Linux)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def task_stats(pid: int) -> list[list[str]]:
    """For each thread of ``pid``, the fields of its /proc stat from the third on (state,
    ppid, ...; ``proc_pid_stat(5)``'s field n is index n - 3)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # ended meanwhile
        out.append(stat[stat.rindex(")") + 2:].split())  # after "pid (comm) "
    return out


def idle_threads(pid: int) -> int:
    """How many of ``pid``'s threads are under SCHED_IDLE now."""
    return sum(fields[38] == "5" for fields in task_stats(pid))  # 41 policy; 5 SCHED_IDLE


def _schedstats(pid: int) -> dict[int, tuple[int, int]]:
    """tid -> (CPU time, time waited on a run queue) in ns, for each thread of ``pid``."""
    out: dict[int, tuple[int, int]] = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            cpu, wait, _slices = (task / "schedstat").read_text().split()
            out[int(task.name)] = (int(cpu), int(wait))
        except (OSError, ValueError):
            continue
    return out


@dataclass
class RunQueueWait:
    """How long the threads of ``pid`` waited for a CPU (on a run queue, while runnable) and
    ran, summed over the threads alive at any time within the ``with`` block (Linux
    schedstat). Threads that start and end inside (an association's) are followed by a
    sampling thread every ``interval_s``, so their last ``interval_s`` may be missed."""

    pid: int
    interval_s: float = 0.02
    waited_s: float = 0.0
    cpu_s: float = 0.0
    _first: dict[int, tuple[int, int]] = field(default_factory=dict)
    _last: dict[int, tuple[int, int]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _sample(self) -> None:
        self._last.update(_schedstats(self.pid))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> Self:
        self._first = _schedstats(self.pid)
        self._last = dict(self._first)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        cpu = wait = 0
        for tid, (c, w) in self._last.items():
            c0, w0 = self._first.get(tid, (0, 0))  # a thread started inside: from zero
            cpu, wait = cpu + c - c0, wait + w - w0
        self.cpu_s, self.waited_s = cpu / 1e9, wait / 1e9


@dataclass
class RSSSampler:
    """Samples a process's (or process tree's) VmRSS every ``interval_s`` in a thread;
    ``peak_kib`` is the maximum."""

    pid: int
    interval_s: float = 0.05
    tree: bool = False  # the sum over the process and its descendants
    peak_kib: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            value = rss_kib(self.pid, self.tree)
            if value is None:
                return
            self.peak_kib = max(self.peak_kib, value)
            self.samples += 1
            self._stop.wait(self.interval_s)

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


# -- aidnode serve as a subprocess -------------------------------------------------------------


@dataclass
class AidnodeProcess:
    host: str
    port: int
    proc: subprocess.Popen[bytes]
    folder: Path
    log_path: Path
    ae_title: str = NODE_AE

    @property
    def db_path(self) -> Path:
        return self.folder / "var" / "aidnode.db"

    def instance_count(self) -> int:
        """Rows in the instances table (read-only; WAL lets us read while it writes)."""
        with sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10) as conn:
            return int(conn.execute("SELECT count(*) FROM instances").fetchone()[0])

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10) as conn:
            return list(conn.execute(sql, params).fetchall())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def aidnode_serve(folder: Path, *, rules: list[dict[str, object]] | None = None,
                  destinations: list[dict[str, object]] | None = None,
                  env: dict[str, str] | None = None, role: str = "all",
                  code: Path = ROOT, **sections: dict[str, object]) -> Iterator[AidnodeProcess]:
    """``aidnode serve`` in a subprocess with a temp config in ``folder``; stopped on exit.

    ``code`` is the checkout it runs from: this one, or another (say a ``git worktree`` of an
    earlier commit) to compare two versions in one run.

    Durability is always on (the file store fsyncs, SQLite runs ``synchronous=FULL``). By default
    no rule matches anything (so no job is ever queued), there are no workers and no metrics.
    """
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    sections.setdefault("inference", {"workers": 0, "models_dir": "models"})
    cfg = folder / "config.toml"
    cfg.write_text(node_config_text(
        port, rules=[] if rules is None else rules, destinations=destinations,
        **{"node": {"dimse_timeout_s": 60, "network_timeout_s": 60}, **sections}),
        encoding="utf-8")
    log_path = folder / "aidnode.log"
    run_env = dict(os.environ, **(env or {}))
    run_env.pop("AIDNODE_CONFIG", None)
    run_env["PYTHONPATH"] = str(code)  # its packages before the installed (editable) ones
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from node.cli import main; main()", "-c", str(cfg), "serve",
             "--role", role],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=code,
            env=run_env)
    node = AidnodeProcess(LOOPBACK, port, proc, folder, log_path)
    try:
        try:
            wait_for_port(LOOPBACK, port, timeout=120, proc=proc)
        except Exception as exc:
            raise RuntimeError(f"aidnode serve did not start: {exc}\n{node.log()[-3000:]}") from exc
        yield node
    finally:
        _stop(proc)


@contextmanager
def another_process(node: AidnodeProcess, role: str) -> Iterator[subprocess.Popen[bytes]]:
    """One more ``aidnode serve --role ROLE`` on ``node``'s config (same machine, same SQLite
    and store), its output in ``ROLE-N.log`` beside it; a receiver is waited for until it
    listens. Stopped on exit."""
    n = len(list(node.folder.glob(f"{role}-*.log")))
    log_path = node.folder / f"{role}-{n}.log"
    env = {k: v for k, v in os.environ.items() if k != "AIDNODE_CONFIG"}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from node.cli import main; main()", "-c",
             str(node.folder / "config.toml"), "serve", "--role", role],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT, env=env)
    try:
        if role in ("receiver", "all"):
            listening = f"listening on {node.host}:{node.port}"
            if not wait_until(lambda: listening in log_path.read_text(errors="replace")
                              or proc.poll() is not None, 120):
                raise RuntimeError(f"{log_path.name}: no listener within 120 s")
            if proc.poll() is not None:
                raise RuntimeError(f"aidnode serve --role {role} exited with {proc.returncode}:"
                                   f"\n{log_path.read_text(errors='replace')[-3000:]}")
        yield proc
    finally:
        _stop(proc)


# -- pynetdicom's own storescp app -------------------------------------------------------------


@dataclass
class SimplePeer:
    aet: str
    host: str
    port: int
    proc: subprocess.Popen[bytes]


@contextmanager
def pynetdicom_storescp(out_dir: Path, *, aet: str = "PYSTORESCP") -> Iterator[SimplePeer]:
    """``python -m pynetdicom storescp`` writing files into ``out_dir`` (its defaults otherwise)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pynetdicom", "storescp", "-aet", aet, "-od", str(out_dir),
             "-ba", LOOPBACK, str(port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=dict(os.environ, TCP_NODELAY="1"))
        try:
            wait_for_port(LOOPBACK, port, timeout=60, proc=proc)
            yield SimplePeer(aet, LOOPBACK, port, proc)
        finally:
            _stop(proc)


def count_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate()`` until truthy or ``timeout`` s; returns whether it became truthy."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
