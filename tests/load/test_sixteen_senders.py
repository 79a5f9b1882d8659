"""Sixteen dcmtk ``storescu`` processes at once against ``aidnode serve``: everything sent is
acknowledged, stored and recorded; memory stays bounded; the admin CLI keeps answering.

Each sender has its own study of 200 small CT images (64 x 64), 3200 instances in all, sent
with ``TCP_NODELAY=1`` (tests/peers.py). Analysis is off (no rules, no workers): this measures
the receiver. The node's RSS (``/proc/PID/status`` VmRSS) is sampled every 0.5 s, and
``aidnode status --json`` runs every second during the load; its latency is recorded, never
asserted. The figures are printed and written to ``load_figures.json`` in the test's tmp dir.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Generic, TypeVar

import pytest
from sqlalchemy import func, select

from node.config import load_config
from storage.db import Database
from storage.files import FileStore
from storage.models import Instance
from tests.acceptance.test_serve import serve, stop
from tests.conftest import NODE_AE, node_config_text
from tests.dicomgen import ct_series, write_all
from tests.peers import free_port, storescu

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SENDERS = 16
PER_SENDER = 200
SAMPLE_S = 0.5
CLI_PAUSE_S = 1.0  # between two runs of `aidnode status --json`
RSS_CEILING = 1 << 30  # 1 GiB
GROWTH_LIMIT = 1.5  # the last third's peak RSS over the first third's
SUCCESS_LINE = "Received Store Response (Success)"
T = TypeVar("T")


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class Sampler(threading.Thread, Generic[T]):
    """Calls ``probe`` every ``interval`` s until stopped; keeps what it returns."""

    def __init__(self, probe: Callable[[], T], interval: float) -> None:
        super().__init__(daemon=True)
        self.probe, self.interval = probe, interval
        self.values: list[T] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.values.append(self.probe())
            self.done.wait(self.interval)

    def finish(self) -> list[T]:
        self.done.set()
        self.join()
        return self.values


def status_cli(config: Path) -> tuple[float, int, str]:
    """Run ``aidnode status --json``: (seconds, exit status, problem or "")."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIDNODE_")}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", "from node.cli import main; main()", "-c", str(config),
         "status", "--json"], capture_output=True, text=True, timeout=120, env=env,
        check=False)
    seconds = time.monotonic() - started
    try:
        json.loads(done.stdout)["queues"]
    except (ValueError, KeyError, TypeError) as exc:
        return seconds, done.returncode, f"{exc}: {done.stdout[-500:]}{done.stderr[-500:]}"
    return seconds, done.returncode, ""


def test_sixteen_storescu_at_once(tmp_path: Path) -> None:
    folder = tmp_path / "node"
    folder.mkdir()
    config = folder / "config.toml"
    config.write_text(node_config_text(
        free_port(), node={"max_associations": SENDERS + 4}, rules=[],
        inference={"workers": 0, "models_dir": "models"}),
        encoding="utf-8")
    cfg = load_config(config, environ={})
    sets = [write_all(ct_series(PER_SENDER, rows=64, cols=64, seed=i, series_number=i + 1),
                      tmp_path / "send" / f"s{i:02d}") for i in range(SENDERS)]
    total = sum(len(s) for s in sets)

    with serve(folder) as proc:
        pid = proc.pid
        rss = Sampler(lambda: rss_bytes(pid), SAMPLE_S)
        cli = Sampler(lambda: status_cli(config), CLI_PAUSE_S)
        rss.start()
        cli.start()
        started = time.monotonic()
        try:
            with ThreadPoolExecutor(SENDERS) as pool:
                runs = list(pool.map(
                    lambda i: storescu(cfg.node.host, cfg.node.port, [sets[i][0].parent],
                                       aet=f"LOAD{i:02d}", called_aet=NODE_AE, timeout=900),
                    range(SENDERS)))
            seconds = time.monotonic() - started
        finally:  # the samplers stop even when a sender fails
            calls = cli.finish()
            samples = [v for v in rss.finish() if v is not None]
        stop(proc, folder)

    acknowledged = [(r.stdout + r.stderr).count(SUCCESS_LINE) for r in runs]
    db = Database(cfg.database.url)
    try:
        with db.read() as s:
            rows = s.execute(select(func.count()).select_from(Instance)).scalar_one()
    finally:
        db.dispose()
    stored = list(FileStore(cfg.storage.root).files("instances"))
    third = max(1, len(samples) // 3)
    latencies = [latency for latency, _, _ in calls]
    figures = {
        "senders": SENDERS, "instances": total, "seconds": round(seconds, 2),
        "images_per_s": round(total / seconds, 1),
        "peak_rss_mib": round(max(samples) / 2**20, 1),
        "first_third_peak_rss_mib": round(max(samples[:third]) / 2**20, 1),
        "last_third_peak_rss_mib": round(max(samples[-third:]) / 2**20, 1),
        "rss_samples": len(samples),
        "cli_runs": len(latencies), "cli_max_latency_s": round(max(latencies), 2),
        "cli_median_latency_s": round(sorted(latencies)[len(latencies) // 2], 2),
    }
    (tmp_path / "load_figures.json").write_text(json.dumps(figures, indent=2))
    print(f"\nload figures ({tmp_path / 'load_figures.json'}): {json.dumps(figures)}")

    assert [r.returncode for r in runs] == [0] * SENDERS, [r.stderr[-500:] for r in runs]
    assert acknowledged == [PER_SENDER] * SENDERS
    assert sum(acknowledged) == rows == len(stored) == total
    assert len(samples) >= 6, "too few RSS samples to judge growth"
    assert max(samples) < RSS_CEILING
    assert max(samples[-third:]) <= GROWTH_LIMIT * max(samples[:third])
    assert calls and all(rc == 0 and not problem for _, rc, problem in calls), calls
