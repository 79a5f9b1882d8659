"""End to end: last instance of a study acknowledged -> its SR and SC acknowledged by the PACS.

    python bench/e2e.py [--ct-slices 300] [--stable-after 2] [--json] [--skip-ct]

``aidnode serve`` runs as a subprocess (one worker, CPU, durable store) with a rule that selects
CR and CT and delivers to a stand-in PACS (``node.standin.StandInPACS``) run in this process. A
1-image CR study and an N-slice CT study (512x512; the model runs on every slice) are sent with
``node.scu.send_files``, each twice (the first CT job after start also grows the worker's
heap to hold a series). For each: total = time from the last C-STORE-RSP the sender got to the
last result object the PACS acknowledged (the one that completes the study's deliveries);
wait = the configured ``assembly.stable_after_s``; model = the ``seconds`` of the result summary
(the model's forward passes and heatmaps); overhead = total - wait - model, which holds the
assembler and worker/sender polling, reading the instances back, building SR/SC, storing them
and the association to the PACS. The model is the demo package when installed under
var/models/demo, else an untrained package of the same architecture (thresholds 0.01, so every
finding is present and one SC per finding is sent); the report says which.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# bench/ is on the path already when a script runs; common.py then puts the repository first,
# so that the ``inference`` package wins over bench/inference.py.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))

from common import ROOT, aidnode_serve, fmt, machine, print_machine, wait_until
from pynetdicom import evt

from node.scu import Peer, send_files
from node.standin import StandInPACS
from tests.dicomgen import cr_image, ct_series, write_all

DEMO_DIR = ROOT / "var" / "models" / "demo"
PACS_AE = "BENCHPACS"
STUDY_TIMEOUT_S = 600.0


@dataclass
class TimedPACS(StandInPACS):
    """The stand-in PACS, noting when it acknowledged each object and of which study."""

    acked: list[tuple[float, str, str]] = field(default_factory=list)  # (t, study, modality)

    def _store(self, event: evt.Event) -> int:
        status = super()._store(event)
        ds = event.dataset
        with self._lock:
            self.acked.append((time.perf_counter(), str(ds.StudyInstanceUID),
                               str(ds.get("Modality", ""))))
        return status


@dataclass
class StudyRun:
    study: str
    images: int
    total_s: float | None
    wait_s: float
    model_s: float | None
    overhead_s: float | None
    objects: int
    send_s: float
    note: str = ""
    #: The overhead split from aidnode's log: the worker's steps other than the model, the
    #: sender's delivery, and "between steps" (the rest: stability detection after the wait,
    #: wake-ups and claims between assembler, worker and sender).
    overhead_parts: dict[str, float] = field(default_factory=dict)


def model_package(tmp: Path) -> tuple[Path, str]:
    """The demo package if installed, else an untrained one (as tests/conftest.py builds)."""
    if (DEMO_DIR / "model.json").is_file():
        return DEMO_DIR, f"demo model ({DEMO_DIR})"
    from dataclasses import replace

    import torch

    from inference.context import DEFAULT_FIELDS
    from inference.model import FusedModel, ModelConfig
    from inference.package import save_package
    from inference.pixels import Windowing
    from inference.train import DEMO_LABELS

    torch.manual_seed(0)
    labels = [replace(lab, threshold=0.01) for lab in DEMO_LABELS]
    folder = tmp / "untrained"
    save_package(folder, FusedModel(ModelConfig(num_labels=len(labels))), name="bench-untrained",
                 version="0.0.1", description="untrained, for timing", labels=labels,
                 windowing=Windowing(), text_fields=DEFAULT_FIELDS)
    return folder, ("untrained package of the demo architecture (var/models/demo not installed; "
                    "thresholds 0.01: every finding present)")


ANALYZE_LINE = r"ANALYZE job {id} succeeded: .* in [0-9.]+s \((?P<steps>.*)\)$"
DELIVER_LINE = r"DELIVER job {id} to \S+ succeeded.* in (?P<secs>[0-9.]+)s$"


def overhead_parts(node: Any, study_uid: str, overhead: float) -> dict[str, float]:
    """Split the overhead using the outcome lines of this study's ANALYZE and DELIVER jobs."""
    jobs = node.query("SELECT j.id, j.kind FROM jobs j JOIN studies s ON s.id = j.study_id "
                      "WHERE s.study_instance_uid = ?", (study_uid,))
    log = node.log().splitlines()
    parts: dict[str, float] = {}
    for job_id, kind in jobs:
        pattern = re.compile((ANALYZE_LINE if kind == "ANALYZE" else DELIVER_LINE)
                             .format(id=job_id))
        match = next((m for m in map(pattern.search, log) if m), None)
        if match is None:
            continue
        if kind == "ANALYZE":
            for step in match["steps"].split(", "):
                name, secs = step.split()
                if name != "model":  # the model's own time is not overhead
                    parts[f"worker {name}"] = float(secs.rstrip("s"))
        else:
            parts["deliver"] = parts.get("deliver", 0.0) + float(match["secs"])
    if parts:
        parts["between steps"] = overhead - sum(parts.values())
    return {k: round(v, 3) for k, v in parts.items()}


def run_study(node: Any, pacs: TimedPACS, files: list[Path], study_uid: str, wait_s: float,
              name: str) -> StudyRun:
    last_ack = [0.0]

    def on_sent(_path: Path, _status: int) -> None:
        last_ack[0] = time.perf_counter()

    t0 = time.perf_counter()
    results = send_files(Peer(node.ae_title, node.host, node.port), files, "MODALITY",
                         on_sent=on_sent, timeout_s=120)
    send_s = time.perf_counter() - t0
    if any(s != 0 for _, s in results):
        return StudyRun(name, len(files), None, wait_s, None, None, 0, send_s,
                        "not every instance was stored")

    def delivered() -> bool:
        rows = node.query(
            "SELECT j.status FROM jobs j JOIN studies s ON s.id = j.study_id "
            "WHERE s.study_instance_uid = ? AND j.kind = 'DELIVER'", (study_uid,))
        return bool(rows) and all(r[0] == "SUCCEEDED" for r in rows)

    if not wait_until(delivered, STUDY_TIMEOUT_S, 0.05):
        return StudyRun(name, len(files), None, wait_s, None, None, 0, send_s,
                        f"results not delivered within {STUDY_TIMEOUT_S:.0f} s")
    with pacs._lock:
        acks = [t for t, uid, _ in pacs.acked if uid == study_uid]
    summary = node.query(
        "SELECT r.summary FROM results r JOIN studies s ON s.id = r.study_id "
        "WHERE s.study_instance_uid = ? ORDER BY r.id DESC LIMIT 1", (study_uid,))
    model_s = float(json.loads(summary[0][0])["seconds"]) if summary else None
    total = max(acks) - last_ack[0]
    overhead = total - wait_s - model_s if model_s is not None else None
    parts = overhead_parts(node, study_uid, overhead) if overhead is not None else {}
    run = StudyRun(name, len(files), total, wait_s, model_s, overhead, len(acks), send_s,
                   overhead_parts=parts)
    print(f"  {name}: total {total:.2f} s, wait {wait_s:.2f} s, model {fmt(model_s, 2)} s, "
          f"overhead {fmt(overhead, 2)} s, {len(acks)} objects", flush=True)
    if parts:
        print("    overhead: " + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items()),
              flush=True)
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct-slices", type=int, default=300)
    parser.add_argument("--stable-after", type=float, default=2.0,
                        help="assembly.stable_after_s for the run (seconds)")
    parser.add_argument("--check-interval", type=float, default=0.2,
                        help="assembly.check_interval_s for the run (seconds)")
    parser.add_argument("--skip-ct", action="store_true")
    parser.add_argument("--threads", action="store_true",
                        help="the worker in threads of the receiver's process "
                             "(inference.separate_process = false), not in a child process")
    parser.add_argument("--scheduling", choices=("adaptive", "idle", "normal"),
                        default="adaptive",
                        help="inference.scheduling: the child's model under SCHED_IDLE while "
                             "the host receives (the default), always, or at niceness only")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    info = machine()
    runs: list[StudyRun] = []
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp_s:
        tmp = Path(tmp_s)
        package, which = model_package(tmp)
        print(f"model: {which}; the worker in "
              f"{'threads of the receiving process' if args.threads else 'a child process'}"
              f", scheduling = {args.scheduling}", flush=True)
        pacs = TimedPACS(tmp / "pacs", ae_title=PACS_AE)
        pacs_port = pacs.start()
        # The stand-in PACS runs in this process: without this, a full collection over what
        # this script imported (0.13-0.20 s, seen with gc.callbacks) could land in a study's
        # delivery and be counted as aidnode's overhead.
        gc.collect()
        gc.freeze()
        try:
            with aidnode_serve(
                    tmp / "node",
                    rules=[{"name": "bench", "model": str(package), "destinations": ["pacs"],
                            "match": {"modality": ["CR", "CT"]}}],
                    destinations=[{"name": "pacs", "ae_title": PACS_AE, "host": "127.0.0.1",
                                   "port": pacs_port}],
                    inference={"workers": 1, "device": "cpu", "models_dir": "models",
                               "separate_process": not args.threads,
                               "scheduling": args.scheduling},
                    assembly={"stable_after_s": args.stable_after,
                              "check_interval_s": args.check_interval}) as node:
                # The worker loads the rule's model and builds a throwaway result when it
                # starts (inference.warm_up); a scanner's first study would arrive later.
                t0 = time.perf_counter()
                if not wait_until(lambda: "warmed up" in node.log()
                                  or "could not warm up" in node.log(), STUDY_TIMEOUT_S, 0.1):
                    raise SystemExit("the worker did not finish its warm-up")
                print(f"worker warm-up: {time.perf_counter() - t0:.2f} s after the port opened",
                      flush=True)
                for label in ("CR, 1 image (first job)", "CR, 1 image (second job)"):
                    cr = cr_image()
                    cr_files = write_all([cr], tmp / label.split("(")[1][:4])
                    runs.append(run_study(node, pacs, cr_files, str(cr.StudyInstanceUID),
                                          args.stable_after, label))
                # Two CT studies: the first after start also pays for the worker's heap
                # growing to hold a series (first-touch page faults); later ones reuse it.
                for n, which_job in enumerate(("first", "second") if not args.skip_ct else ()):
                    ct = ct_series(args.ct_slices, rows=512, cols=512, seed=n)
                    ct_files = write_all(ct, tmp / f"ct-{which_job}")
                    runs.append(run_study(node, pacs, ct_files, str(ct[0].StudyInstanceUID),
                                          args.stable_after,
                                          f"CT, {args.ct_slices} slices 512x512 "
                                          f"({which_job} CT job)"))
        finally:
            pacs.stop()
    print()
    print_machine(info)
    print(f"model: {which}; device: cpu; stand-in PACS in process; sender node.scu.send_files")
    print()
    print("| study | total s | stability wait s | model s | overhead s | objects | "
          "overhead < 1 s |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        met = "-" if r.overhead_s is None else ("yes" if r.overhead_s < 1.0 else "NO")
        print(f"| {r.study} | {fmt(r.total_s, 2)} | {r.wait_s:.2f} | {fmt(r.model_s, 2)} | "
              f"{fmt(r.overhead_s, 2)} | {r.objects} | {met}{' ' + r.note if r.note else ''} |")
    print()
    print("Where the overhead goes (from aidnode's job outcome lines; \"between steps\" is the "
          "rest: detecting stability after the wait and the hand-offs between assembler, worker "
          "and sender):")
    print()
    for r in runs:
        if r.overhead_parts:
            print(f"- {r.study}: " + ", ".join(f"{k} {v:.2f} s"
                                              for k, v in r.overhead_parts.items()))
    if args.json:
        print(json.dumps({"machine": info, "model": which, "runs": [asdict(r) for r in runs]},
                         indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
