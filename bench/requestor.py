"""The sender's side: C-STOREs on associations this process requests, with node.pacing on and off.

    python bench/requestor.py [--runs 8] [--instances 100] [--json]

aidnode's sender requests associations from the process whose reactors ``node.pacing`` paces.
Each run starts dcmtk ``storescp`` (TCP_NODELAY=1) on a free loopback port and sends
``--instances`` small CT instances (64x64) on one pynetdicom association, as ``node.scu`` does
(TCP_NODELAY set), in a fresh Python process with pacing installed or not, alternating.
Prints, per setting, how many runs failed (a C-STORE without a response: pynetdicom's requestor
race, "Received unexpected C-STORE service message", then an abort) and the median rate of the
runs that completed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))

from common import ROOT, fmt, machine, median, print_machine

#: One run, in a process of its own (pacing is process-wide): prints the rate or FAILED.
RUN = textwrap.dedent("""
    import subprocess, sys, tempfile, time
    from pynetdicom import AE
    from node import pacing
    from node.scp import set_nodelay
    from tests.dicomgen import ct_series
    from tests.peers import LOOPBACK, free_port, wait_for_port

    paced, n = sys.argv[1] == "on", int(sys.argv[2])
    pacing.install() if paced else pacing.uninstall()
    datasets = ct_series(n, rows=64, cols=64)
    with tempfile.TemporaryDirectory() as out:
        port = free_port()
        peer = subprocess.Popen(["/usr/bin/storescp", "-od", out, str(port)],
                                env={"TCP_NODELAY": "1"})
        try:
            wait_for_port(LOOPBACK, port, timeout=10)
            ae = AE(ae_title="BENCHSCU")
            ae.dimse_timeout = 5
            ae.add_requested_context(datasets[0].SOPClassUID,
                                     datasets[0].file_meta.TransferSyntaxUID)
            assoc = ae.associate(LOOPBACK, port, ae_title="STORESCP")
            assert assoc.is_established
            set_nodelay(assoc.dul.socket.socket)
            started = time.perf_counter()
            for i, ds in enumerate(datasets):
                rsp = assoc.send_c_store(ds)
                if "Status" not in rsp:
                    print(f"FAILED at instance {i + 1}: no response, association aborted")
                    raise SystemExit(0)
            rate = n / (time.perf_counter() - started)
            assoc.release()
            print(f"{rate:.1f}")
        finally:
            peer.terminate()
            peer.wait()
""")


def one_run(setting: str, instances: int) -> float | None:
    """C-STOREs per second, or None when the run failed."""
    done = subprocess.run([sys.executable, "-c", RUN, setting, str(instances)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    last = (done.stdout.strip().splitlines() or [""])[-1]
    if done.returncode != 0:
        raise RuntimeError(f"run failed to start: {done.stderr[-2000:]}")
    return None if last.startswith("FAILED") else float(last)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.instances < 1:
        parser.error("--runs and --instances must be positive")
    results: dict[str, list[float | None]] = {"on": [], "off": []}
    for r in range(args.runs):
        for setting, rates in results.items():
            rates.append(one_run(setting, args.instances))
            print(f"run {r + 1}, pacing {setting}: {rates[-1]}", file=sys.stderr)
    print_machine(machine())
    print(f"{args.instances} C-STOREs (64x64 CT) on one requested association to dcmtk "
          f"storescp, {args.runs} runs per setting, alternating")
    print()
    print("| node.pacing in the sending process | runs failed | C-STOREs/s (median of the rest) |")
    print("|---|---|---|")
    for setting, rates in results.items():
        ok = [r for r in rates if r is not None]
        print(f"| {setting} | {len(rates) - len(ok)} of {len(rates)} | {fmt(median(ok))} |")
    if args.json:
        print(json.dumps({"machine": machine(), "instances": args.instances,
                          "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
