"""Where a received instance's time goes: the C-STORE handler's steps, and CPU per thread.

    python bench/receiver_profile.py [--instances 300] [--associations 1] [--json]

Runs the node in this process (``Service``, durable store, no workers, no metrics), wraps the
handler's steps with wall-clock timers, and sends N CT instances (512x512, ~513 KiB) with dcmtk
``storescu`` over one or more associations. Prints milliseconds per instance for each step, the
rest of the wall time (pynetdicom receiving and answering, outside the handler), and the CPU
seconds of every thread of this process per instance (``/proc/self/task/*/stat``, sampled
every 20 ms so that threads which end before the run does are counted). The timers
cost a little: the receiving rate with them in is printed too, to compare with bench/ingest.py.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

# bench/ is on the path already when a script runs; common.py then puts the repository first,
# so that the ``inference`` package wins over bench/inference.py.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))

import pynetdicom.events as pynetdicom_events
from common import NODE_AE, machine, print_machine
from ingest import _send

from node import scp
from node.config import load_config
from node.service import Service, open_storage
from storage import catalog, catalog_sqlite, db, files
from tests.conftest import node_config_text
from tests.dicomgen import ct_series, write_all
from tests.peers import LOOPBACK, free_port, wait_for_port

TICK = os.sysconf("SC_CLK_TCK")


HANDLER = "the C-STORE handler, in all"
CHECKER = "the checker thread, beside the file: checks, decoding, hash"
TRANSACTION = "  - transactions: the write turn, begin, statements, commit with its WAL fsync"
TRANSACTION_SQLITE = ("  - the same in plain sqlite3 (the common case: new instances of known series, "
                      "storage.catalog_sqlite)")
#: Steps timed on their own, not only inside another: the handler, and the checker thread's part.
ROOTS = (HANDLER, CHECKER)


class Timers:
    """Seconds per named step, summed over calls made inside the C-STORE handler or the checker
    thread's part of it (the assembler's and the audit's database writes elsewhere in the
    process are not counted).
    ``names`` keeps the order the steps were wrapped in, for the report."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: dict[str, int] = collections.defaultdict(int)
        self.names: list[str] = []
        self._local = threading.local()

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        inside = getattr(self._local, "inside", False)
        if not inside and name not in ROOTS:
            yield
            return
        self._local.inside = True
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started
            self.calls[name] += 1
            self._local.inside = inside

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        original, timers = getattr(owner, attr), self
        self.names.append(name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            with timers.timed(name):
                return original(*args, **kwargs)

        setattr(owner, attr, timed)

    def wrap_context(self, owner: Any, attr: str, name: str) -> None:
        """Time a context manager from entering it to leaving it."""
        original, timers = getattr(owner, attr), self
        self.names.append(name)

        @contextmanager
        def timed(*args: Any, **kwargs: Any) -> Iterator[Any]:
            with timers.timed(name), original(*args, **kwargs) as value:
                yield value

        setattr(owner, attr, timed)

    def wrap_property(self, owner: Any, attr: str, name: str) -> None:
        getter, timers = getattr(owner, attr).fget, self
        self.names.append(name)

        def timed(obj: Any) -> Any:
            with timers.timed(name):
                return getter(obj)

        setattr(owner, attr, property(timed))


class _TimedHashlib:
    """``hashlib`` for node.scp, with sha256 timed."""

    def __init__(self, timers: Timers, name: str) -> None:
        self._timers, self._name = timers, name
        timers.names.append(name)

    def sha256(self, data: bytes) -> Any:
        with self._timers.timed(self._name):
            return hashlib.sha256(data)


def instrument(timers: Timers) -> None:
    timers.wrap(scp, "handle_store", HANDLER)
    timers.wrap(scp, "_write", "- the file: free space, file meta, file store")
    timers.wrap(files.FileStore, "check_space", "  - checks: free space")
    timers.wrap(scp.filemeta, "header", "  - file meta encoding")
    timers.wrap(files.FileStore, "write", "  - file store: write, rename, fsyncs")
    timers.wrap(files.os, "fsync", "    - of which the fsyncs of the file and its folder")
    timers.wrap(futures.Future, "result", "- waiting for the checker thread after the file")
    timers.wrap(catalog.GroupRecorder, "record",
                "- database: the row committed (waiting for another association's group or the "
                "write turn, then the transaction)")
    timers.wrap_context(db.Database, "write_connection", TRANSACTION)
    timers.wrap(catalog, "record_instances", "    - of which the statements")
    timers.wrap_context(db.Database, "sqlite_write", TRANSACTION_SQLITE)
    timers.wrap(catalog_sqlite, "record_new", "    - of which the statements (plain sqlite3)")
    timers.wrap(scp, "_checked", CHECKER)
    timers.wrap_property(pynetdicom_events.Event, "dataset", "- data set decoding (lazy)")
    timers.wrap(scp, "check_complete", "- checks: complete data set")
    timers.wrap(scp, "check_dataset", "- checks: header")
    scp.hashlib = _TimedHashlib(timers, "- SHA-256 of the data set")  # type: ignore[assignment]


def thread_cpu() -> dict[str, float]:
    """CPU seconds of each live thread of this process, keyed "tid name" (Python's name)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        name = names.get(int(tid), stat[stat.index("(") + 1:stat.rindex(")")])
        out[f"{tid} {name}"] = (int(fields[11]) + int(fields[12])) / TICK
    return out


class CPUSampler:
    """Samples ``thread_cpu()`` every 20 ms and keeps each thread's last figure, so threads
    that end before the run does (an association's) are still counted."""

    def __init__(self) -> None:
        self.before = thread_cpu()
        self.last: dict[str, float] = dict(self.before)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.last.update(thread_cpu())

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.last.update(thread_cpu())

    def used(self) -> dict[str, float]:
        """CPU seconds each thread used while sampling."""
        return {t: cpu - self.before.get(t, 0.0) for t, cpu in self.last.items()
                if cpu - self.before.get(t, 0.0) > 0 and "cpu-sampler" not in t}


@contextmanager
def node_in_process(folder: Path, adaptive_polling: bool = True) -> Iterator[int]:
    """A ``Service`` in this process on a free loopback port, its files in ``folder``."""
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "config.toml"
    config.write_text(node_config_text(
        port, rules=[], node={"dimse_timeout_s": 60, "network_timeout_s": 60,
                              "adaptive_polling": adaptive_polling},
        inference={"workers": 0, "models_dir": "models"}), encoding="utf-8")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        cfg = load_config(config, environ={})
        db, store = open_storage(cfg)
        db.upgrade()
        service = Service(cfg, db, store)
        service.start(LOOPBACK, port)
        try:
            wait_for_port(LOOPBACK, port, timeout=60)
            yield port
        finally:
            service.stop(grace_s=10)
    finally:
        os.chdir(cwd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--associations", type=int, default=1)
    parser.add_argument("--no-adaptive-polling", action="store_true",
                        help="pynetdicom's own 1 ms reactor polls (node.adaptive_polling off)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.instances < 1 or args.associations < 1:
        parser.error("--instances and --associations must be positive")
    timers = Timers()
    instrument(timers)
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp_s:
        tmp = Path(tmp_s)
        sent = write_all(ct_series(args.instances, rows=512, cols=512), tmp / "series")
        with node_in_process(tmp / "node", not args.no_adaptive_polling) as port:
            timers.seconds.clear()
            with CPUSampler() as cpu:
                seconds, rcs = _send(LOOPBACK, port, NODE_AE, [sent[i::args.associations]
                                                               for i in range(args.associations)])
    if any(rcs):
        print(f"storescu failed: exit codes {rcs}", file=sys.stderr)
        return 1
    n = args.instances
    per = {name: 1000 * secs / n for name, secs in timers.seconds.items()}
    wall = 1000 * seconds / n
    threads = {t: 1000 * used / n for t, used in cpu.used().items()}
    print_machine(machine())
    print(f"{n} CT instances 512x512 over {args.associations} association(s): "
          f"{n / seconds:.1f} images/s with the timers in, {wall:.2f} ms wall per instance, "
          f"adaptive polling {'off' if args.no_adaptive_polling else 'on'}")
    print()
    print("| per instance | ms |")
    print("|---|---|")
    handler = per.pop(HANDLER, 0.0)
    print(f"| outside the handler (pynetdicom receiving and answering; storescu) | "
          f"{wall - handler:.2f} |" if args.associations == 1 else
          f"| (several associations overlap: wall per instance {wall:.2f}) | - |")
    print(f"| {HANDLER} | {handler:.2f} |")
    for name in timers.names[1:]:
        print(f"| {name} | {per.get(name, 0.0):.2f} |")
    transactions = timers.calls.get(TRANSACTION, 0) + timers.calls.get(TRANSACTION_SQLITE, 0)
    print()
    print(f"{transactions} receiver transactions for {n} instances "
          f"({n / max(transactions, 1):.2f} instances per transaction)")
    print()
    print("| thread | CPU ms per instance |")
    print("|---|---|")
    for name, ms in sorted(threads.items(), key=lambda kv: -kv[1]):
        if ms >= 0.01:
            print(f"| {name} | {ms:.2f} |")
    print(f"| all threads | {sum(threads.values()):.2f} |")
    if args.json:
        print(json.dumps({"instances": n, "associations": args.associations,
                          "images_per_s": n / seconds, "wall_ms": wall, "handler_ms": handler,
                          "steps_ms": per, "thread_cpu_ms": threads,
                          "transactions": transactions}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
