"""Why receiving slows while the model runs in the same process: the same receiver, the same
model loop, in a thread of the receiver's process or in a process of its own.

    python bench/contention.py [--rounds 6] [--json]

An aidnode receiver (``Service``, no workers) runs in this script's process. Each round sends
300 CT instances (512x512) over one association with dcmtk ``storescu`` while one of these runs
beside it, the order fixed within a round:

- ``nothing``: the receiver alone.
- ``model in a thread``: the demo architecture's forward pass (untrained, batch 8, 128 px, the
  worker's settings: one CPU thread, niceness 10) in a loop, in a thread of this process, as
  ``aidnode serve --role all`` runs its worker.
- ``model in a process``: the same loop in a child process (as ``--role worker`` runs it).
- ``matrix products in a thread``: ``torch.mm`` on 768x768 matrices in a loop in a thread (one
  CPU thread, niceness 10): CPU work that holds no GIL, for comparison.

The receiving rate of each, as the median over the rounds, and its drop against ``nothing``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# bench/ is on the path already when a script runs; common.py then puts the repository first.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))

from common import LOOPBACK, NODE_AE, fmt, machine, median, print_machine
from receiver_profile import node_in_process

from tests.dicomgen import ct_series, write_all
from tests.peers import storescu

NICE = 10  # inference.nice's default
BATCH = 8  # inference.batch_size's default

def _model_loop(stop: threading.Event, ready: Callable[[], None]) -> None:
    """The demo architecture's forward pass over one batch, again and again, with the worker's
    settings (one CPU thread, niceness 10), until ``stop`` is set; ``ready`` once it runs."""
    import torch

    from inference.model import FusedModel, ModelConfig

    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
    torch.set_num_threads(1)
    model = FusedModel(ModelConfig(num_labels=2)).eval()
    model.vision.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    hidden, pad = model.encode_text(["CT chest, cough"])
    x = torch.rand(BATCH, 1, 128, 128).contiguous(memory_format=torch.channels_last)
    ready()
    with torch.inference_mode():
        while not stop.is_set():
            model(x, hidden, pad)


def _matmul_loop(stop: threading.Event, ready: Callable[[], None]) -> None:
    import torch

    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
    torch.set_num_threads(1)
    a, b = torch.rand(768, 768), torch.rand(768, 768)
    ready()
    while not stop.is_set():
        torch.mm(a, b)


@contextmanager
def in_thread(loop: Callable[[threading.Event, Callable[[], None]], None]) -> Iterator[None]:
    stop, ready = threading.Event(), threading.Event()
    t = threading.Thread(target=loop, args=(stop, ready.set), daemon=True)
    t.start()
    if not ready.wait(300):
        raise SystemExit("the background loop did not start")
    try:
        yield
    finally:
        stop.set()
        t.join()


@contextmanager
def in_process() -> Iterator[None]:
    proc = subprocess.Popen([sys.executable, __file__, "--model-loop"], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit("the model process did not start")
        yield
    finally:
        proc.terminate()
        proc.wait(30)


@contextmanager
def nothing() -> Iterator[None]:
    yield


BESIDE: dict[str, Callable[[], Any]] = {
    "nothing": nothing,
    "model in a thread": lambda: in_thread(_model_loop),
    "model in a process": in_process,
    "matrix products in a thread": lambda: in_thread(_matmul_loop),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--model-loop", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.model_loop:  # the child of "model in a process": runs until terminated
        _model_loop(threading.Event(), lambda: print("ready", flush=True))
        return 0
    rates: dict[str, list[float]] = {name: [] for name in BESIDE}
    with tempfile.TemporaryDirectory(prefix="bench-contention-") as tmp_s:
        tmp = Path(tmp_s)
        files = write_all(ct_series(300, rows=512, cols=512), tmp / "series")
        with node_in_process(tmp / "node") as port:
            for rnd in range(1, args.rounds + 1):
                for name, beside in BESIDE.items():
                    with beside():
                        time.sleep(0.5)  # the loop is running
                        started = time.perf_counter()
                        done = storescu(LOOPBACK, port, files, called_aet=NODE_AE, timeout=600,
                                        extra_args=["-x="])
                        seconds = time.perf_counter() - started
                    if done.returncode != 0:
                        raise SystemExit(f"storescu exited {done.returncode}: "
                                         f"{done.stderr[-500:]}")
                    rates[name].append(300 / seconds)
                    print(f"  round {rnd}, {name}: {300 / seconds:.1f} images/s", flush=True)
    alone = median(rates["nothing"])
    report = {"machine": machine(), "rounds": args.rounds, "images_per_s": rates,
              "median": {name: median(v) for name, v in rates.items()}}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print()
    print_machine(report["machine"])
    print(f"300 CT instances 512x512 per send, one association; medians of {args.rounds} rounds")
    print()
    print("| beside the receiver | images/s (median) | drop |")
    print("|---|---|---|")
    for name, values in rates.items():
        m = median(values)
        drop = 100 * (1 - m / alone) if m and alone else None
        print(f"| {name} | {fmt(m)} | {'-' if name == 'nothing' else fmt(drop) + '%'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
