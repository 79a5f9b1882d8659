"""Receiving while the model runs, and memory over a long run, with the demo model loaded.

    python bench/soak.py [--rounds 2] [--batches 10] [--layouts child,threads] [--json]

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
   process), ``child-nice19`` (the child's worker at niceness 19).
2. **Memory over a long run.** ``--batches`` x 300 CT instances (3000 by default), each batch a
   new study that is analysed (so the model is loaded and runs throughout), over one
   association per batch. VmRSS of ``aidnode serve`` and its worker's child process together
   is read after every batch; target: under 1.5 GB, and flat (the last batch within 10% of the
   first).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import nullcontext
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
    fmt,
    machine,
    median,
    print_machine,
    rss_kib,
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
    "child": ("aidnode serve: the worker in a child process (the default)", "all", {}),
    "threads": ("aidnode serve, separate_process = false: the worker in threads", "all",
                {"separate_process": False}),
    "split": ("a --role receiver and a --role worker process", "receiver", {}),
    "child-nice19": ("aidnode serve, the worker in a child process at niceness 19", "all",
                     {"nice": 19}),
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


def _one_round(tmp: Path, model: Path, rnd: int, layout: str) -> dict[str, Any]:
    rule = [{"name": "ct", "model": str(model),
             "match": {"modality": ["CT"], "series_description": ANALYSE}}]
    _what, role, settings = LAYOUTS[layout]
    split = layout == "split"
    idle_files = _series(tmp / "idle", 300, 512, "STORE ONLY", seed=10 + rnd)
    busy_files = _series(tmp / "busy", 300, 512, "STORE ONLY", seed=20 + rnd)
    after_files = _series(tmp / "after", 300, 512, "STORE ONLY", seed=40 + rnd)
    heavy = _series(tmp / "heavy", 600, 256, ANALYSE, seed=30 + rnd)
    with aidnode_serve(tmp / "node", rules=rule, role=role,
                       inference={"workers": 1, "models_dir": "models", **settings},
                       assembly={"stable_after_s": 0.5, "check_interval_s": 0.1}) as node, \
            (another_process(node, "worker") if split else nullcontext()):
        # The worker loads the model and builds a throwaway result when it starts: not during
        # the idle send.
        if not wait_until(lambda: any("warmed up" in f.read_text(errors="replace")
                                      for f in node.folder.glob("*.log")), 120, 0.1):
            raise SystemExit(f"{layout}: the worker did not warm up")
        idle_s = _send(node, idle_files)
        _send(node, heavy)
        if not wait_until(lambda: "RUNNING" in _job_states(node), 120, 0.05):
            raise SystemExit("the analysis job never started")
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
    for key, rows in report["while_analysing"].items():
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
