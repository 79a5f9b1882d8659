"""Scale-out on PostgreSQL: one receiver and three worker processes share one database and one
file store. 30 studies are each analysed exactly once, and a worker killed mid-job leaves its
job to be reclaimed by another when its lease runs out.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import pytest
from sqlalchemy import func, select

from node.config import load_config
from storage.db import Database
from storage.models import Job, JobEvent, JobKind, JobStatus, Result, ServiceNode
from tests.acceptance.test_serve import wait_for_echo
from tests.conftest import NODE_AE, node_config_text
from tests.dicomgen import cr_image, write_all
from tests.faults.nodes import serve_role as serve
from tests.peers import _tail, free_port, storescu, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STUDIES = 30
LEASE_S = 10.0  # long enough that a busy 2-core machine never lets a live lease lapse


def registered(db: Database) -> list[tuple[str, int]]:
    with db.read() as s:
        return list(s.execute(select(ServiceNode.role, ServiceNode.pid)))


def test_one_receiver_three_workers_analyse_each_study_once(
        tmp_path: Path, pg_url: str, untrained_model: Path) -> None:
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(node_config_text(
        port, database={"url": pg_url},
        storage={"root": str(tmp_path / "shared-store"), "min_free_mb": 0},
        rules=[{"name": "cr", "model": str(untrained_model), "match": {"modality": ["CR"]}}],
        inference={"workers": 1, "models_dir": "models", "lease_s": LEASE_S}),
        encoding="utf-8")
    cfg = load_config(config, environ={})
    files = write_all([cr_image(rows=64, cols=64, seed=i, study_uid=f"1.2.826.0.1.3680043.9.7.{i}")
                       for i in range(STUDIES)], tmp_path / "send")
    db = Database(pg_url)
    logs = tmp_path / "logs"
    logs.mkdir()
    try:
        with ExitStack() as stack:
            rx = stack.enter_context(serve(config, "receiver", logs / "receiver.log"))
            wait_for_echo(cfg.node.host, port, rx, logs / "receiver.log")
            # The first worker dies (SIGKILL) right after the model ran on its first job.
            doomed = stack.enter_context(serve(
                config, "worker", logs / "worker-0.log",
                {"AIDNODE_CRASH_AT": "worker.after_model"}))
            workers = [doomed] + [stack.enter_context(serve(config, "worker",
                                                             logs / f"worker-{i}.log"))
                                  for i in (1, 2)]
            wait_for(lambda: Counter(r for r, _ in registered(db)) ==
                     {"receiver": 1, "worker": 3}, 120, what="four processes registered")

            status = subprocess.run(
                [sys.executable, "-c", "from node.cli import main; main()", "-c", str(config),
                 "status", "--json"], capture_output=True, text=True, check=True,
                env={k: v for k, v in os.environ.items() if not k.startswith("AIDNODE_")})
            procs = json.loads(status.stdout)["processes"]
            assert sorted((p["role"], p["pid"]) for p in procs) == sorted(
                [("receiver", rx.pid)] + [("worker", w.pid) for w in workers])
            assert all(p["host"] and p["heartbeat_at"] and not p["stale"] for p in procs)

            done = storescu("127.0.0.1", port, [str(f) for f in files], called_aet=NODE_AE)
            assert (done.stdout + done.stderr).count("Received Store Response (Success)") \
                == STUDIES

            def all_analysed() -> bool:
                for i, w in enumerate(workers[1:], 1):
                    assert w.poll() is None, _tail(logs / f"worker-{i}.log")
                with db.read() as s:
                    return s.execute(select(func.count()).select_from(Job).where(
                        Job.kind == JobKind.ANALYZE, Job.status == JobStatus.SUCCEEDED)
                    ).scalar_one() == STUDIES

            wait_for(all_analysed, 300, what=f"{STUDIES} studies analysed")
            assert doomed.wait(timeout=10) == -signal.SIGKILL, _tail(logs / "worker-0.log")
            for p in [rx, *workers[1:]]:
                p.send_signal(signal.SIGTERM)
            for p in [rx, *workers[1:]]:
                assert p.wait(timeout=60) == 0

        with db.read() as s:
            per_study = Counter(s.execute(select(Result.study_id)).scalars())
            analyze = s.execute(select(Job).where(Job.kind == JobKind.ANALYZE)).scalars().all()
            claims = {j.id: [e.message for e in j.events if e.to_status == JobStatus.RUNNING]
                      for j in analyze}
            requeued = {e.job_id for e in s.execute(select(JobEvent).where(
                JobEvent.message.like("lease expired%"))).scalars()}
        assert len(per_study) == STUDIES and set(per_study.values()) == {1}  # once each
        assert all(j.status == JobStatus.SUCCEEDED for j in analyze)
        # The killed worker's job: its lease ran out, it was requeued and another took it.
        reclaimed = [j for j in analyze if j.attempts == 2]
        assert len(reclaimed) == 1
        assert requeued == {reclaimed[0].id}
        first, second = claims[reclaimed[0].id]
        assert f":{doomed.pid}/" in first and f":{doomed.pid}/" not in second
        assert all(len(c) == 1 for jid, c in claims.items() if jid != reclaimed[0].id)
        # Both surviving workers took jobs: the claims did not serialise on one process.
        finishers = {str(j.worker).split("/")[0] for j in analyze}
        assert {f.rsplit(":", 1)[1] for f in finishers} == {str(w.pid) for w in workers[1:]}
        # Stopped cleanly, the survivors left the registry; the killed worker's row stays.
        assert [pid for _, pid in registered(db)] == [doomed.pid]
    finally:
        db.dispose()


def test_serve_refuses_an_unknown_role(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(node_config_text(free_port()), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-c", "from node.cli import main; main()", "-c", str(config), "serve",
         "--role", "janitor"], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "receiver" in done.stderr
