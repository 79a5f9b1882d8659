"""What open, idle associations cost `aidnode serve` in CPU, with node.adaptive_polling on and off.

    python bench/idle.py [--seconds 10] [--rounds 2] [--json]

For each setting, in alternating rounds: starts ``aidnode serve`` (no workers), opens 0, 1 and
then 8 associations from this process (pynetdicom), sends 5 small CT instances on each (so that
each has streamed), leaves them open and idle, and reads the serve process's CPU time (user +
system, all its threads, ``/proc/PID/stat``) over ``--seconds``. Prints the percentage of one
core, the median of the rounds. The associations stay well inside the node's network timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))

from common import NODE_AE, aidnode_serve, fmt, machine, median, print_machine
from pynetdicom import AE

from tests.dicomgen import ct_series

TICK = os.sysconf("SC_CLK_TCK")
COUNTS = (0, 1, 8)
SETTINGS = {"on": True, "off": False}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14 and 15)


def idle_cost(adaptive: bool, seconds: float, folder: Path) -> dict[int, float]:
    """Percent of a core used by ``aidnode serve`` with 0, 1 and 8 idle associations open."""
    datasets = ct_series(5, rows=64, cols=64)
    ae = AE(ae_title="BENCHIDLE")
    ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
    costs: dict[int, float] = {}
    node_cfg = {"dimse_timeout_s": 120, "network_timeout_s": 120,
                "adaptive_polling": adaptive, "max_associations": 16}
    with aidnode_serve(folder, node=node_cfg) as node:
        opened = []
        try:
            for n in COUNTS:
                while len(opened) < n:
                    assoc = ae.associate(node.host, node.port, ae_title=NODE_AE)
                    if not assoc.is_established:
                        raise RuntimeError("association refused")
                    for ds in datasets:
                        status = assoc.send_c_store(ds)
                        if status is None or status.Status != 0:
                            raise RuntimeError(f"C-STORE failed: {status}")
                    opened.append(assoc)
                time.sleep(0.5)  # past the end of the stream
                before, started = cpu_seconds(node.proc.pid), time.monotonic()
                time.sleep(seconds)
                used = cpu_seconds(node.proc.pid) - before
                costs[n] = 100 * used / (time.monotonic() - started)
        finally:
            for assoc in opened:
                assoc.release()
    return costs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.rounds < 1:
        parser.error("--seconds and --rounds must be positive")
    rounds: dict[str, list[dict[int, float]]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory(prefix="bench-idle-") as tmp:
        for r in range(args.rounds):
            for name, adaptive in SETTINGS.items():
                costs = idle_cost(adaptive, args.seconds, Path(tmp) / f"{name}-{r}")
                rounds[name].append(costs)
                print(f"round {r + 1}, adaptive polling {name}: " + ", ".join(
                    f"{n} idle: {c:.1f}%" for n, c in costs.items()), file=sys.stderr)
    print_machine(machine())
    print(f"`aidnode serve` CPU (% of one core) over {args.seconds:g} s with open idle "
          f"associations; median of {args.rounds} round(s)")
    print()
    print("| node.adaptive_polling | " + " | ".join(f"{n} idle" for n in COUNTS) + " |")
    print("|---|" + "---|" * len(COUNTS))
    medians = {name: {n: median([c[n] for c in rounds[name]]) for n in COUNTS}
               for name in SETTINGS}
    for name in SETTINGS:
        print(f"| {name} | " + " | ".join(fmt(medians[name][n]) + "%" for n in COUNTS) + " |")
    if args.json:
        print(json.dumps({"machine": machine(), "seconds": args.seconds, "rounds": rounds,
                          "medians": medians}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
