"""Receiving while the model runs, and memory over a long run, with the demo model loaded.

    python bench/soak.py [--rounds 2] [--batches 10] [--layouts child,threads] [--json]
    python bench/soak.py --paired 12 [--burst 150] --layouts child --skip-long

``aidnode serve`` runs as a subprocess with one worker on the CPU and the demo model (or an
untrained package of the same architecture when var/models/demo is not built). Its rule analyses
CT series whose description is ``ANALYSE``; other CT series are only stored.

1. **Receiving while analysing.** Each round sends 300 CT instances (512x512) over one
   association (dcmtk ``storescu``, TCP_NODELAY=1) three times: once with the worker idle, once
   while the worker analyses a 600-slice series queued just before (the send starts when its job
   is RUNNING; the round says whether the job was still running when the send ended), and then
   a third time once the analysis is over. Target: the rate while analysing is no more than 10%
   below the mean of the two idle rates (this VM's speed drifts within minutes; the mean of a
   send before and one after cancels a steady drift). Each round starts a node for each
   layout of ``LAYOUTS`` (in turn, the order rotating), waits for its worker's warm-up, and
   measures: ``aidnode serve`` as installed (its worker in a child process), the same with
   ``inference.separate_process = false`` (the worker in threads of the receiver's process),
   and with ``--layouts`` others: ``split`` (a ``--role receiver`` plus a ``--role worker``
   process), ``child-nice19`` (the child's worker at niceness 19), ``child-idle`` (the
   child's model under SCHED_IDLE always: ``inference.scheduling = "idle"``),
   ``child-normal`` (the child's model at niceness 10 only: ``"normal"``; the default,
   ``"adaptive"``, puts it under SCHED_IDLE while the host receives).

   With ``--paired N`` the comparison is made in short bursts instead, so that the drift
   cancels: one node per layout, its worker analysing one long series throughout, and N pairs
   of bursts (``--burst`` instances each, an association each), one while the worker analyses
   and one while its process is frozen (SIGSTOP, as idle as a worker gets; SIGCONT after), the
   order alternating from pair to pair. The drop is the median of the pairs' drops.
2. **Memory over a long run.** ``--batches`` x 300 CT instances (3000 by default), each batch a
   new study that is analysed (so the model is loaded and runs throughout), over one
   association per batch. VmRSS of ``aidnode serve`` and its worker's child process together
   is read after every batch; target: under 1.5 GB, and flat (the last batch within 10% of the
   first).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager, nullcontext
from pathlib import Path
from typing import Any

# bench/ is on the path already when a script runs; common.py then puts the repository first,
# so that the ``inference`` package wins over bench/inference.py.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))

from common import (
    RSSSampler,
    RunQueueWait,
    aidnode_serve,
    another_process,
    children,
    fmt,
    idle_threads,
    machine,
    median,
    print_machine,
    rss_kib,
    task_stats,
    wait_until,
)
from e2e import model_package

from tests.dicomgen import ct_series, write_all
from tests.peers import storescu

ANALYSE = "ANALYSE"
SEND_TIMEOUT_S = 600.0


def _series(folder: Path, n: int, size: int, description: str, seed: int) -> list[Path]:
    datasets = ct_series(n, rows=size, cols=size, seed=seed)
    for ds in datasets:
        ds.SeriesDescription = description
    return write_all(datasets, folder)


def _send(node: Any, files: list[Path]) -> float:
    started = time.perf_counter()
    done = storescu(node.host, node.port, files, called_aet=node.ae_title, timeout=SEND_TIMEOUT_S,
                    extra_args=["-x="])
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"storescu exited {done.returncode}: {done.stderr[-500:]}")
    return seconds


def _job_states(node: Any) -> list[str]:
    return [r[0] for r in node.query("SELECT status FROM jobs WHERE kind = 'ANALYZE' ORDER BY id")]


#: layout -> (what it is, ``--role`` of the first process, [inference] settings)
LAYOUTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "child": (("aidnode serve: the worker in a child process (the default; its model under "
               "SCHED_IDLE while the host receives: scheduling = adaptive)"), "all", {}),
    "child-normal": (("aidnode serve, the worker in a child process, its model at niceness 10 "
                      "only (scheduling = normal)"), "all", {"scheduling": "normal"}),
    "child-idle": (("aidnode serve, the worker in a child process, its model under "
                    "SCHED_IDLE (scheduling = idle)"), "all", {"scheduling": "idle"}),
    "threads": ("aidnode serve, separate_process = false: the worker in threads", "all",
                {"separate_process": False}),
    "split": ("a --role receiver and a --role worker process", "receiver", {}),
    "child-nice19": ("aidnode serve, the worker in a child process at niceness 19", "all",
                     {"nice": 19, "scheduling": "normal"}),
}


def while_analysing(tmp: Path, model: Path, rounds: int,
                    layouts: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Each round measures every layout once, in an order that rotates from round to round (this
    VM's speed drifts over minutes), each on a node of its own started for it and warmed up."""
    out: dict[str, list[dict[str, Any]]] = {layout: [] for layout in layouts}
    for rnd in range(1, rounds + 1):
        shift = (rnd - 1) % len(layouts)
        for layout in layouts[shift:] + layouts[:shift]:
            out[layout].append(_one_round(tmp / f"round-{rnd}-{layout}", model, rnd, layout))
    return out


@contextmanager
def _warm_node(folder: Path, model: Path, layout: str) -> Iterator[tuple[Any, int]]:
    """A node of ``layout`` whose rule analyses the ``ANALYSE`` series, once its worker has
    warmed up (loaded the model, built a throwaway result: not during a measured send); yields
    it and the pid of the process its worker runs in."""
    rule = [{"name": "ct", "model": str(model),
             "match": {"modality": ["CT"], "series_description": ANALYSE}}]
    _what, role, settings = LAYOUTS[layout]
    with aidnode_serve(folder, rules=rule, role=role,
                       inference={"workers": 1, "models_dir": "models", **settings},
                       assembly={"stable_after_s": 0.5, "check_interval_s": 0.1}) as node, \
            (another_process(node, "worker") if layout == "split" else nullcontext()) as other:
        if not wait_until(lambda: any("warmed up" in f.read_text(errors="replace")
                                      for f in node.folder.glob("*.log")), 120, 0.1):
            raise SystemExit(f"{layout}: the worker did not warm up")
        workers = [other.pid] if other is not None else [
            pid for pid in children(node.proc.pid)
            if b"node.workerproc" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        yield node, (workers[0] if workers else node.proc.pid)  # threads: the node itself


def _start_analysis(node: Any, heavy: list[Path]) -> None:
    _send(node, heavy)
    if not wait_until(lambda: "RUNNING" in _job_states(node), 120, 0.05):
        raise SystemExit("the analysis job never started")


def _one_round(tmp: Path, model: Path, rnd: int, layout: str) -> dict[str, Any]:
    idle_files = _series(tmp / "idle", 300, 512, "STORE ONLY", seed=10 + rnd)
    busy_files = _series(tmp / "busy", 300, 512, "STORE ONLY", seed=20 + rnd)
    after_files = _series(tmp / "after", 300, 512, "STORE ONLY", seed=40 + rnd)
    heavy = _series(tmp / "heavy", 600, 256, ANALYSE, seed=30 + rnd)
    with _warm_node(tmp / "node", model, layout) as (node, _worker):
        idle_s = _send(node, idle_files)
        _start_analysis(node, heavy)
        busy_s = _send(node, busy_files)
        still_running = "RUNNING" in _job_states(node)
        wait_until(lambda: "RUNNING" not in _job_states(node)
                   and "QUEUED" not in _job_states(node), 900, 0.5)
        after_s = _send(node, after_files)  # idle again: this VM's speed drifts within minutes
    r = {"round": rnd, "layout": layout, "idle_before_images_per_s": 300 / idle_s,
         "idle_after_images_per_s": 300 / after_s, "analysing_images_per_s": 300 / busy_s,
         "analysis_overlapped": still_running}
    r["idle_images_per_s"] = (r["idle_before_images_per_s"] + r["idle_after_images_per_s"]) / 2
    r["drop_percent"] = 100 * (1 - r["analysing_images_per_s"] / r["idle_images_per_s"])
    print(f"  round {rnd}, {layout}: idle {r['idle_before_images_per_s']:.1f} before and "
          f"{r['idle_after_images_per_s']:.1f} after, while analysing "
          f"{r['analysing_images_per_s']:.1f} images/s ({r['drop_percent']:.0f}% lower than "
          f"the mean of the idle two; "
          f"analysis {'overlapped the whole send' if still_running else 'ENDED EARLY'})",
          flush=True)
    return r


def _all_stopped(pid: int) -> bool:
    return all(fields[0] in "tT" for fields in task_stats(pid))  # field 3, the state


def _freeze(pid: int, db_path: Path) -> None:
    """SIGSTOP ``pid`` at a moment it holds no SQLite write lock: frozen holding one (its
    heartbeat's transaction), it would make the receiver's commits wait and then refuse."""
    for _ in range(200):
        os.kill(pid, signal.SIGSTOP)
        # The signal is delivered asynchronously: check the lock only once every thread has
        # stopped, or one could take the lock just after the check.
        if not wait_until(lambda: _all_stopped(pid), 5, 0.001):
            raise SystemExit(f"process {pid} did not stop on SIGSTOP")
        try:
            with closing(sqlite3.connect(db_path, timeout=0.2, isolation_level=None)) as conn:
                conn.execute("BEGIN IMMEDIATE")  # the write lock is free: take it and let go
                conn.execute("ROLLBACK")
            return
        except sqlite3.OperationalError:
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.05)
    raise SystemExit(f"process {pid} kept holding the database's write lock")


def paired_bursts(tmp: Path, model: Path, layout: str, pairs: int,
                  burst: int) -> dict[str, Any]:
    """Receiving with the worker analysing and with it paused, in short bursts that alternate,
    so that this VM's drift (minutes) cancels within each pair (seconds).

    One node; the worker analyses one long series all along, and before each idle burst its
    process is frozen (SIGSTOP: it takes no CPU, as an idle worker) and thawed (SIGCONT)
    after. Each pair is an analysing and an idle burst of ``burst`` instances, over an
    association each, in an order that alternates from pair to pair. Only layouts whose worker
    is a process of its own can be frozen without freezing the receiver.
    """
    if layout == "threads":
        raise SystemExit("--paired: the threads layout's worker cannot be paused on its own")
    files = [_series(tmp / f"burst-{i}", burst, 512, "STORE ONLY", seed=200 + i)
             for i in range(2 * pairs)]
    # About 20 ms per slice on one core here: it outlasts the analysing bursts (pairs x burst
    # instances at 100-150 images/s), which the report checks.
    heavy = _series(tmp / "heavy", max(600, pairs * burst), 256, ANALYSE, seed=300)
    rates: list[tuple[float, float]] = []  # (analysing, idle) images/s per pair
    idle_after: list[int] = []  # the worker's SCHED_IDLE threads as each analysing burst ended
    waits: list[tuple[float, float]] = []  # the receiver's run-queue wait, ms per instance
    with _warm_node(tmp / "node", model, layout) as (node, worker_pid):
        _start_analysis(node, heavy)
        try:
            for i in range(pairs):
                busy_first = i % 2 == 0
                measured, waited = {}, {}
                for busy in (busy_first, not busy_first):
                    if not busy:
                        _freeze(worker_pid, node.db_path)
                    try:
                        with RunQueueWait(node.proc.pid) as rq:
                            measured[busy] = burst / _send(node, files[2 * i + int(busy)])
                        waited[busy] = 1000 * rq.waited_s / burst
                        if busy:
                            idle_after.append(idle_threads(worker_pid))
                    finally:
                        if not busy:
                            os.kill(worker_pid, signal.SIGCONT)
                rates.append((measured[True], measured[False]))
                waits.append((waited[True], waited[False]))
                print(f"  pair {i + 1}: analysing {measured[True]:.1f}, paused "
                      f"{measured[False]:.1f} images/s; the receiver's threads waited for a "
                      f"CPU {waited[True]:.2f} and {waited[False]:.2f} ms per instance "
                      f"({idle_after[-1]} of the worker's threads under SCHED_IDLE as the "
                      "analysing burst ended)", flush=True)
            still_running = "RUNNING" in _job_states(node)
        finally:
            os.kill(worker_pid, signal.SIGCONT)
    drops = [100 * (1 - busy / idle) for busy, idle in rates]
    busy_all = sum(b for b, _ in rates) / len(rates)
    idle_all = sum(i for _, i in rates) / len(rates)
    return {"layout": layout, "pairs": len(rates), "burst": burst, "rates": rates,
            "drop_percent_median": median(drops), "drops": drops,
            "analysing_images_per_s_mean": busy_all, "idle_images_per_s_mean": idle_all,
            "drop_percent_of_means": 100 * (1 - busy_all / idle_all),
            "analysis_overlapped": still_running, "idle_threads_after_analysing": idle_after,
            "receiver_wait_ms_per_instance": waits,
            "receiver_wait_ms_median": (median([w for w, _ in waits]),
                                        median([w for _, w in waits]))}


def long_run(tmp: Path, model: Path, batches: int) -> dict[str, Any]:
    rule = [{"name": "ct", "model": str(model), "match": {"modality": ["CT"]}}]
    after: list[float] = []
    with aidnode_serve(tmp / "node-b", rules=rule,
                       inference={"workers": 1, "models_dir": "models"},
                       assembly={"stable_after_s": 0.5, "check_interval_s": 0.1}) as node, \
            RSSSampler(node.proc.pid, interval_s=0.5, tree=True) as sampler:
        started = time.perf_counter()
        for b in range(batches):
            folder = tmp / f"long-{b}"
            files = _series(folder, 300, 512, "LONG RUN", seed=100 + b)
            _send(node, files)
            for f in files:
                f.unlink()
            folder.rmdir()
            wait_until(lambda n=b + 1: "QUEUED" not in _job_states(node)
                       and "RUNNING" not in _job_states(node)
                       and len(_job_states(node)) == n, 900, 0.5)
            kib = rss_kib(node.proc.pid, tree=True) or 0
            own = rss_kib(node.proc.pid) or 0
            after.append(kib / 1024)
            print(f"  batch {b + 1}/{batches}: {300 * (b + 1)} instances, RSS {kib / 1024:.0f} MiB"
                  f" ({own / 1024:.0f} MiB the receiver's process)", flush=True)
        seconds = time.perf_counter() - started
        stored = node.instance_count()
        results = node.query("SELECT count(*) FROM results")[0][0]
    return {"instances": stored, "studies_analysed": results, "seconds": seconds,
            "rss_after_batch_mib": [round(x, 1) for x in after],
            "peak_rss_mib": round(sampler.peak_kib / 1024, 1),
            "growth_percent": 100 * (after[-1] / after[0] - 1) if after else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--skip-long", action="store_true")
    ap.add_argument("--layouts", default="child,threads",
                    help=f"comma-separated, of: {', '.join(LAYOUTS)} (default: child,threads)")
    ap.add_argument("--paired", type=int, default=0, metavar="PAIRS",
                    help="instead of the rounds: PAIRS pairs of short bursts, analysing and "
                         "with the worker paused, alternating, on one node per layout")
    ap.add_argument("--burst", type=int, default=150, help="instances per burst (--paired)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    report: dict[str, Any] = {"machine": machine()}
    with tempfile.TemporaryDirectory(prefix="aidnode-soak-") as tmpdir:
        tmp = Path(tmpdir)
        model, note = model_package(tmp)
        report["model"] = note
        print(f"model: {note}")
        print("receiving while analysing:")
        layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
        unknown = [x for x in layouts if x not in LAYOUTS]
        if unknown or not layouts:
            ap.error(f"--layouts: unknown {', '.join(unknown) or '(none given)'}; "
                     f"choose from {', '.join(LAYOUTS)}")
        if args.paired:
            report["paired"] = {layout: paired_bursts(tmp / f"paired-{layout}", model, layout,
                                                      args.paired, args.burst)
                                for layout in layouts}
        else:
            report["while_analysing"] = while_analysing(tmp, model, args.rounds, layouts)
        if not args.skip_long:
            print("long run:")
            report["long_run"] = long_run(tmp, model, args.batches)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print()
    print_machine(report["machine"])
    print("\n| measure | value | target | met |\n|---|---|---|---|")
    for key, r in report.get("paired", {}).items():
        met = "yes" if r["drop_percent_median"] <= 10 else "NO"
        print(f"| {LAYOUTS[key][0]}: {r['pairs']} pairs of {r['burst']}-instance bursts, "
              f"analysing / worker paused (images/s, means) | "
              f"{fmt(r['analysing_images_per_s_mean'])} / {fmt(r['idle_images_per_s_mean'])} "
              f"| | |")
        each = ", ".join(f"{d:.0f}" for d in r["drops"])
        print(f"| {LAYOUTS[key][0]}: drop, median of the pairs' ({each}); of the means: "
              f"{fmt(r['drop_percent_of_means'])}% | {fmt(r['drop_percent_median'])}% | <= 10% "
              f"| {met}{'' if r['analysis_overlapped'] else ' (the analysis ENDED EARLY)'} |")
        busy_wait, idle_wait = r["receiver_wait_ms_median"]
        print(f"| {LAYOUTS[key][0]}: the receiver's threads waited for a CPU, analysing / "
              f"worker paused (ms per instance, medians of the pairs) | {busy_wait:.2f} / "
              f"{idle_wait:.2f} | | |")
    for key, rows in report.get("while_analysing", {}).items():
        if not rows:  # --rounds 0: the long run only
            continue
        layout = LAYOUTS[key][0]
        idle = median([r["idle_images_per_s"] for r in rows])
        busy = median([r["analysing_images_per_s"] for r in rows])
        drop = median([r["drop_percent"] for r in rows])  # each round's, against its own idle
        met = "yes" if drop is not None and drop <= 10 else "NO"
        print(f"| {layout}: receiving, worker idle (images/s, median of {len(rows)}; mean of "
              f"before and after) | {fmt(idle)} | | |")
        print(f"| {layout}: receiving while the worker analyses on the CPU | {fmt(busy)} | | |")
        each = ", ".join(f"{r['drop_percent']:.0f}" for r in rows)
        print(f"| {layout}: drop, median of the rounds' ({each}) | {fmt(drop)}% | <= 10% "
              f"| {met} |")
    if "long_run" in report:
        lr = report["long_run"]
        print(f"| instances stored / studies analysed in the long run | {lr['instances']} / "
              f"{lr['studies_analysed']} | | |")
        print(f"| peak RSS of aidnode serve and its worker process with the model (MiB) | {lr['peak_rss_mib']} | < 1536 | "
              f"{'yes' if lr['peak_rss_mib'] < 1536 else 'NO'} |")
        print(f"| RSS after the first / last batch (MiB) | {lr['rss_after_batch_mib'][0]} / "
              f"{lr['rss_after_batch_mib'][-1]} | flat (<= 10% growth) | "
              f"{'yes' if lr['growth_percent'] <= 10 else 'NO'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
