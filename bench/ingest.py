"""Ingest throughput: 300 CT instances (512x512, ~0.5 MB, uncompressed) over one association.

    python bench/ingest.py [--rounds 3] [--instances 300] [--concurrency 8] [--json]
                           [--receivers dcmtk,orthanc,aidnode,aidnode-1ms,pynetdicom,...]
                           [--base DIR]

dcmtk ``storescu`` (TCP_NODELAY=1 in its environment) sends one folder over one association to, in
turn: dcmtk ``storescp``, Orthanc (Debian package, throwaway config), ``aidnode serve`` (a
subprocess with a temp config: durable writes, no rule matches, no workers, no metrics), the same
with ``node.adaptive_polling`` off, pynetdicom's own ``storescp`` app, and a pynetdicom SCP that
keeps nothing (``bench/nullscp.py``: the ceiling of the network library aidnode is built on), also
with its reactors paced by ``node.pacing`` (``--paced``). Peers run with TCP_NODELAY=1 in their
environment. Each receiver is started fresh for its run and stopped after it; the order rotates
every round. The receiving side is counted (files, Orthanc /statistics, aidnode instance rows): a
run where not all arrived is reported as incomplete and not timed. Then N concurrent storescu
processes (the instances split between them) send to aidnode, as one process and as two ``--role
receiver`` processes sharing the port (``node.reuse_port``): aggregate images/s against one
association. aidnode's VmRSS is sampled every 50 ms during each of its runs and read again after
it, and its CPU per instance read from /proc before and after. ``--base DIR`` runs ``aidnode
serve`` from another checkout too (a ``git worktree`` of an earlier commit), one and N
associations in every round, so two versions are compared in one run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# bench/ is on the path already when a script runs; common.py then puts the repository first,
# so that the ``inference`` package wins over bench/inference.py.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))

from common import (
    RSSSampler,
    aidnode_serve,
    another_process,
    count_files,
    cpu_seconds,
    fmt,
    machine,
    median,
    print_machine,
    pynetdicom_storescp,
    rss_kib,
    wait_until,
)

from tests.dicomgen import ct_series, write_all
from tests.peers import LOOPBACK, _stop, dcmtk_storescp, free_port, orthanc, storescu, wait_for_port

RECEIVERS = ("dcmtk", "orthanc", "aidnode", "aidnode-1ms", "pynetdicom", "pynetdicom-null",
             "pynetdicom-null-paced")
LABELS = {
    "dcmtk": "dcmtk storescp (TCP_NODELAY=1, no fsync)",
    "orthanc": "Orthanc (TCP_NODELAY=1, fsync + SQLite)",
    "aidnode": "aidnode serve (fsync + SQLite FULL)",
    "aidnode-1ms": "aidnode serve, node.adaptive_polling off (pynetdicom's 1 ms polls)",
    "pynetdicom": "pynetdicom storescp app",
    "pynetdicom-null": "pynetdicom SCP that stores nothing (bench/nullscp.py)",
    "pynetdicom-null-paced": "the same, its reactors paced by node.pacing",
    "aidnode-x": "aidnode, {n} associations (aggregate)",
    "aidnode-base": "aidnode serve from --base (the version compared against)",
    "aidnode-base-x": "aidnode from --base, {n} associations (aggregate)",
    "aidnode-2rx": "aidnode, 2 receiver processes on one port (node.reuse_port), {n} associations "
                   "(aggregate)",
}
AGGREGATES = ("aidnode-x", "aidnode-2rx", "aidnode-base-x")
#: Another checkout of aidnode (``--base``), measured beside this one in the same rounds.
BASE: dict[str, Path] = {}
SEND_TIMEOUT_S = 180.0
ARRIVE_TIMEOUT_S = 10.0


@dataclass
class Run:
    receiver: str
    round: int
    seconds: float | None  # None: not all arrived, not timed
    arrived: int
    expected: int
    sender_rc: list[int]
    peak_rss_mib: float | None = None
    after_rss_mib: float | None = None
    #: The receiving process's CPU (user + system, all threads) per instance; steadier than
    #: the wall time on a VM whose host takes some of its CPU.
    cpu_ms: float | None = None

    @property
    def images_per_s(self) -> float | None:
        return self.expected / self.seconds if self.seconds else None


@dataclass
class Target:
    name: str
    wanted: str
    measured: str
    met: bool | None


@dataclass
class Report:
    machine: dict[str, Any]
    instances: int
    rounds: int
    concurrency: int
    runs: list[Run] = field(default_factory=list)
    medians: dict[str, float | None] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    note: str = ("peers (dcmtk storescu/storescp, Orthanc, pynetdicom storescp) ran with "
                 "TCP_NODELAY=1 in their environment; aidnode sets TCP_NODELAY itself")


# -- receivers: each yields (host, port, called AE, count-what-arrived, pid or None) -------------

Receiver = tuple[str, int, str, Callable[[], int], int | None]


@contextmanager
def run_dcmtk(tmp: Path) -> Iterator[Receiver]:
    out = tmp / "out"
    with dcmtk_storescp(out, aet="DCMTK") as peer:
        yield peer.host, peer.port, peer.aet, lambda: count_files(out), None


@contextmanager
def run_orthanc(tmp: Path) -> Iterator[Receiver]:
    with orthanc(tmp / "orthanc") as peer:
        yield (peer.host, peer.dicom_port, peer.aet,
               lambda: int(peer.rest("/statistics")["CountInstances"]), None)


@contextmanager
def run_aidnode(tmp: Path) -> Iterator[Receiver]:
    with aidnode_serve(tmp / "aidnode") as node:
        yield node.host, node.port, node.ae_title, node.instance_count, node.proc.pid


@contextmanager
def run_aidnode_base(tmp: Path) -> Iterator[Receiver]:
    with aidnode_serve(tmp / "aidnode", code=BASE["code"]) as node:
        yield node.host, node.port, node.ae_title, node.instance_count, node.proc.pid


@contextmanager
def run_aidnode_1ms(tmp: Path) -> Iterator[Receiver]:
    with aidnode_serve(tmp / "aidnode", node={"dimse_timeout_s": 60, "network_timeout_s": 60,
                                              "adaptive_polling": False}) as node:
        yield node.host, node.port, node.ae_title, node.instance_count, node.proc.pid


@contextmanager
def run_aidnode_two(tmp: Path) -> Iterator[Receiver]:
    """Two ``serve --role receiver`` processes sharing the port (SO_REUSEPORT), one SQLite."""
    with aidnode_serve(tmp / "aidnode", role="receiver",
                       node={"dimse_timeout_s": 60, "network_timeout_s": 60,
                             "reuse_port": True}) as node, \
            another_process(node, "receiver"):
        yield node.host, node.port, node.ae_title, node.instance_count, None


@contextmanager
def run_pynetdicom(tmp: Path) -> Iterator[Receiver]:
    out = tmp / "out"
    with pynetdicom_storescp(out) as peer:
        yield peer.host, peer.port, peer.aet, lambda: count_files(out), None


@contextmanager
def run_null(tmp: Path, *extra: str) -> Iterator[Receiver]:
    counter = tmp / "count"
    counter.touch()
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("nullscp.py")),
                             str(port), str(counter), *extra], stdin=subprocess.DEVNULL)
    try:
        wait_for_port(LOOPBACK, port, timeout=60, proc=proc)
        yield LOOPBACK, port, "NULLSCP", lambda: counter.stat().st_size, None
    finally:
        _stop(proc)


STARTERS: dict[str, Callable[[Path], AbstractContextManager[Receiver]]] = {
    "dcmtk": run_dcmtk, "orthanc": run_orthanc, "aidnode": run_aidnode,
    "pynetdicom": run_pynetdicom, "pynetdicom-null": run_null, "aidnode-2rx": run_aidnode_two,
    "aidnode-1ms": run_aidnode_1ms, "aidnode-base": run_aidnode_base,
    "pynetdicom-null-paced": lambda tmp: run_null(tmp, "--paced"),
}


def _send(host: str, port: int, aet: str, batches: list[list[Path]]) -> tuple[float, list[int]]:
    """Send each batch over its own association, all at once; wall time around the storescu runs."""
    def one(files: list[Path]) -> int:
        done = storescu(host, port, files, called_aet=aet, timeout=SEND_TIMEOUT_S,
                        extra_args=["-x="])  # the default proposal; skips the file scan
        if done.returncode != 0:
            print(f"  storescu exited {done.returncode}: {done.stderr[-500:]}", file=sys.stderr)
        return done.returncode

    started = time.perf_counter()
    if len(batches) == 1:
        rcs = [one(batches[0])]
    else:
        with ThreadPoolExecutor(len(batches)) as pool:
            rcs = list(pool.map(one, batches))
    return time.perf_counter() - started, rcs


def measure(name: str, rnd: int, files: list[Path], n_assoc: int = 1) -> Run:
    with (tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp,
          STARTERS[name](Path(tmp)) as (host, port, aet, count, pid)):
        batches = [files[i::n_assoc] for i in range(n_assoc)]
        sampler = RSSSampler(pid) if pid else None
        cpu_before = cpu_seconds(pid) if pid else None
        if sampler:
            with sampler:
                seconds, rcs = _send(host, port, aet, batches)
        else:
            seconds, rcs = _send(host, port, aet, batches)
        complete = wait_until(lambda: count() >= len(files), ARRIVE_TIMEOUT_S, 0.1)
        arrived = count()
        after = rss_kib(pid) if pid else None
        cpu_after = cpu_seconds(pid) if pid else None
    label = f"{name}-x" if name in ("aidnode", "aidnode-base") and n_assoc > 1 else name
    run = Run(label, rnd, seconds if complete and arrived == len(files) else None, arrived,
              len(files), rcs,
              peak_rss_mib=round(sampler.peak_kib / 1024, 1) if sampler else None,
              after_rss_mib=round(after / 1024, 1) if after else None,
              cpu_ms=round(1000 * (cpu_after - cpu_before) / len(files), 2)
              if cpu_before is not None and cpu_after is not None else None)
    state = (f"{run.images_per_s:.1f} images/s ({seconds:.2f} s)" if run.seconds
             else f"INCOMPLETE: {arrived}/{len(files)} arrived, not timed")
    rss = f", peak RSS {run.peak_rss_mib} MiB" if run.peak_rss_mib else ""
    rss += f", {run.cpu_ms} ms CPU per instance" if run.cpu_ms else ""
    print(f"  round {rnd} {label:<10} x{n_assoc}: {state}{rss}", flush=True)
    return run


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def summarise(report: Report) -> None:
    for name in (*RECEIVERS, "aidnode-base", *AGGREGATES):
        rates = [r.images_per_s for r in report.runs if r.receiver == name and r.images_per_s]
        report.medians[name] = median([x for x in rates if x is not None])
    m = report.medians
    vs_orthanc = _ratio(m.get("aidnode"), m.get("orthanc"))
    vs_pynet = _ratio(m.get("aidnode"), m.get("pynetdicom"))
    scale = _ratio(m.get("aidnode-x"), m.get("aidnode"))
    scale_two = _ratio(m.get("aidnode-2rx"), m.get("aidnode"))
    peaks = [r.peak_rss_mib for r in report.runs if r.peak_rss_mib]

    def cpu(name: str) -> float | None:
        return median([r.cpu_ms for r in report.runs if r.receiver == name and r.cpu_ms])

    report.targets = [
        Target("aidnode / Orthanc, one association", ">= 1.2", fmt(vs_orthanc, 2),
               None if vs_orthanc is None else vs_orthanc >= 1.2),
        Target("aidnode / pynetdicom storescp, one association", ">= 1.0", fmt(vs_pynet, 2),
               None if vs_pynet is None else vs_pynet >= 1.0),
        Target(f"aidnode {report.concurrency} associations / one (aggregate)", ">= 1.5",
               fmt(scale, 2), None if scale is None else scale >= 1.5),
        Target(f"aidnode 2 receiver processes, {report.concurrency} associations / one "
               "association", ">= 1.5", fmt(scale_two, 2),
               None if scale_two is None else scale_two >= 1.5),
        Target("pynetdicom storing nothing / Orthanc (the ceiling under aidnode)", "reported",
               fmt(_ratio(m.get("pynetdicom-null"), m.get("orthanc")), 2), None),
        Target("the same with node.pacing / Orthanc", "reported",
               fmt(_ratio(m.get("pynetdicom-null-paced"), m.get("orthanc")), 2), None),
        Target("aidnode / aidnode with pynetdicom's 1 ms polls (node.adaptive_polling)",
               "reported", fmt(_ratio(m.get("aidnode"), m.get("aidnode-1ms")), 2), None),
        Target("aidnode / aidnode from --base, one association", "reported",
               fmt(_ratio(m.get("aidnode"), m.get("aidnode-base")), 2), None),
        Target(f"aidnode / aidnode from --base, {report.concurrency} associations", "reported",
               fmt(_ratio(m.get("aidnode-x"), m.get("aidnode-base-x")), 2), None),
        Target("aidnode's CPU per instance / --base's, one association", "reported",
               fmt(_ratio(cpu("aidnode"), cpu("aidnode-base")), 2), None),
        Target(f"aidnode's CPU per instance / --base's, {report.concurrency} associations",
               "reported", fmt(_ratio(cpu("aidnode-x"), cpu("aidnode-base-x")), 2), None),
        Target("aidnode peak RSS over the ingest (MiB)", "reported",
               fmt(max(peaks) if peaks else None), None),
    ]


def print_report(report: Report) -> None:
    print()
    print_machine(report.machine)
    print(f"{report.instances} CT instances 512x512 (uncompressed), dcmtk storescu sender; "
          f"median of {report.rounds} round(s). {report.note}.")
    print()
    print("| receiver | images/s (median) | runs timed | incomplete runs | peak RSS MiB | "
          "receiver CPU ms per instance (median) |")
    print("|---|---|---|---|---|---|")
    for name in (*RECEIVERS, "aidnode-base", *AGGREGATES):
        runs = [r for r in report.runs if r.receiver == name]
        if not runs:
            continue
        peaks = [r.peak_rss_mib for r in runs if r.peak_rss_mib]
        label = LABELS[name].format(n=report.concurrency)
        print(f"| {label} | {fmt(report.medians.get(name))} | "
              f"{sum(1 for r in runs if r.seconds)} | {sum(1 for r in runs if not r.seconds)} | "
              f"{fmt(max(peaks)) if peaks else '-'} | "
              f"{fmt(median([r.cpu_ms for r in runs if r.cpu_ms]), 2)} |")
    print()
    print("| target | wanted | measured | met |")
    print("|---|---|---|---|")
    for t in report.targets:
        met = "n/a" if t.met is None else ("yes" if t.met else "NO")
        print(f"| {t.name} | {t.wanted} | {t.measured} | {met} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8,
                        help="associations for the aggregate run against aidnode (0: skip)")
    parser.add_argument("--receivers", default=",".join(RECEIVERS))
    parser.add_argument("--base", type=Path, metavar="DIR",
                        help="another aidnode checkout (e.g. `git worktree add DIR COMMIT`) to "
                             "measure beside this one, one and N associations, in every round")
    parser.add_argument("--json", action="store_true", help="print the report as JSON at the end")
    args = parser.parse_args(argv)
    receivers = [r.strip() for r in args.receivers.split(",") if r.strip()]
    unknown = set(receivers) - set(RECEIVERS)
    if unknown or args.rounds < 1 or args.instances < 1:
        parser.error(f"unknown receivers {sorted(unknown)}" if unknown
                     else "--rounds and --instances must be positive")
    if args.base is not None:
        if not (args.base / "node" / "cli.py").is_file():
            parser.error(f"--base {args.base}: not an aidnode checkout (no node/cli.py)")
        BASE["code"] = args.base.resolve()
        receivers.append("aidnode-base")
    report = Report(machine(), args.instances, args.rounds, args.concurrency)
    with tempfile.TemporaryDirectory(prefix="bench-series-") as series_dir:
        print(f"writing {args.instances} CT instances 512x512 ...", flush=True)
        files = write_all(ct_series(args.instances, rows=512, cols=512), series_dir)
        size = sum(f.stat().st_size for f in files) / len(files)
        print(f"  {size / 1024:.0f} KiB each", flush=True)
        for rnd in range(1, args.rounds + 1):
            shift = (rnd - 1) % len(receivers)
            for name in receivers[shift:] + receivers[:shift]:  # alternate the order
                report.runs.append(measure(name, rnd, files))
            if args.concurrency > 1 and "aidnode" in receivers:
                report.runs.append(measure("aidnode", rnd, files, args.concurrency))
                report.runs.append(measure("aidnode-2rx", rnd, files, args.concurrency))
            if args.concurrency > 1 and args.base is not None:
                report.runs.append(measure("aidnode-base", rnd, files, args.concurrency))
    summarise(report)
    print_report(report)
    if args.json:
        data = asdict(report)
        for run, raw in zip(report.runs, data["runs"], strict=True):
            raw["images_per_s"] = run.images_per_s
        print(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
