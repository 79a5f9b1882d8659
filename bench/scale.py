"""Scale-out on PostgreSQL: jobs/s with 1, 2 and 4 worker processes, side by side.

    python bench/scale.py [--workers 1 2 4] [--jobs 2000] [--studies 40] [--json]

A throwaway PostgreSQL cluster (``tests/pg.py``; fsync on, as in production) holds the queue.
Two measurements, each run afresh for every worker count:

- **queue**: ``--jobs`` ANALYZE jobs that do nothing; N processes each loop claim -> succeed
  (``storage.jobs``, ``FOR UPDATE SKIP LOCKED``) until the queue is empty. jobs/s is what the
  queue itself sustains; "claimed twice" counts jobs that more than one process took (must be 0).
- **analysis**: ``--studies`` CR studies (one 256x256 image each) are received by an
  ``aidnode serve --role receiver`` and queued; then N ``aidnode serve --role worker`` processes
  (one worker thread each) analyse them with the demo model (or an untrained package of the same
  architecture). jobs/s counts the successes the database recorded in steady state: from the
  moment every process has finished its first job (its model is loaded) to the last success.
  On a 2-core machine this is CPU-bound: more processes than cores cannot go faster; the point
  is that they do not collide or serialise.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# bench/ is on the path already when a script runs; common.py then puts the repository first,
# so that the ``inference`` package wins over bench/inference.py.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))

from common import fmt, machine, print_machine, wait_until
from e2e import model_package
from sqlalchemy import func, select, text

from storage import jobs
from storage.db import Database
from storage.models import Job, JobEvent, JobKind, JobStatus
from tests.conftest import NODE_AE, node_config_text
from tests.dicomgen import cr_image, write_all
from tests.peers import free_port, storescu
from tests.pg import PgCluster, pg_cluster


def must(predicate: Any, timeout: float, what: str) -> None:
    if not wait_until(predicate, timeout, 0.2):
        raise SystemExit(f"timed out waiting for {what}")


def _drain(url: str, name: str, start: Any) -> None:
    """One queue worker process: claim and succeed until nothing is left."""
    db = Database(url)
    start.wait()
    while True:
        with db.write() as s:
            c = jobs.claim(s, JobKind.ANALYZE, name)
            if c is None:
                break
            jobs.succeed(s, c.id, c.token)
    db.dispose()


def queue_run(cluster: PgCluster, template: str, n_jobs: int, workers: int) -> dict[str, Any]:
    url = cluster.create_database(template=template)
    db = Database(url)
    with db.write() as s:
        for _ in range(n_jobs):
            jobs.enqueue(s, JobKind.ANALYZE)
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_drain, args=(url, f"bench:{i}/q", start)) for i in range(workers)]
    for p in procs:
        p.start()
    time.sleep(2.0)  # let every process import and connect before the clock starts
    t0 = time.perf_counter()
    start.set()
    for p in procs:
        p.join()
    seconds = time.perf_counter() - t0
    if any(p.exitcode != 0 for p in procs):
        raise SystemExit(f"a queue worker failed: exit codes {[p.exitcode for p in procs]}")
    with db.read() as s:
        claims = list(s.execute(select(JobEvent.job_id, func.count()).where(
            JobEvent.to_status == JobStatus.RUNNING).group_by(JobEvent.job_id)))
        done = s.execute(select(func.count()).select_from(Job).where(
            Job.status == JobStatus.SUCCEEDED)).scalar_one()
    db.dispose()
    return {"workers": workers, "jobs": done, "seconds": seconds,
            "jobs_per_s": done / seconds, "claimed_twice": sum(1 for _, n in claims if n > 1)}


def _serve(config: Path, role: str, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIDNODE_")}
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-c", "from node.cli import main; main()",
                                 "-c", str(config), "serve", "--role", role],
                                stdout=out, stderr=subprocess.STDOUT, env=env)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def analysis_run(cluster: PgCluster, template: str, tmp: Path, model: Path, studies: int,
                 workers: int) -> dict[str, Any]:
    url = cluster.create_database(template=template)
    port = free_port()
    config = tmp / f"config-{workers}.toml"
    config.write_text(node_config_text(
        port, database={"url": url}, storage={"root": str(tmp / f"store-{workers}"),
                                              "min_free_mb": 0},
        rules=[{"name": "cr", "model": str(model), "match": {"modality": ["CR"]}}],
        inference={"workers": 1, "models_dir": "models"}), encoding="utf-8")
    files = write_all([cr_image(seed=i, study_uid=f"1.2.826.0.1.3680043.9.8.{i}")
                       for i in range(studies)], tmp / f"send-{workers}")
    db = Database(url)

    def count(status: JobStatus) -> int:
        with db.read() as s:
            return int(s.execute(select(func.count()).select_from(Job).where(
                Job.kind == JobKind.ANALYZE, Job.status == status)).scalar_one())

    rx = _serve(config, "receiver", tmp / f"receiver-{workers}.log")
    try:
        must(lambda: "listening on" in (tmp / f"receiver-{workers}.log").read_text(), 60,
             "the receiver to listen")
        storescu("127.0.0.1", port, [str(f) for f in files], called_aet=NODE_AE)
        must(lambda: count(JobStatus.QUEUED) == studies, 120, "every study queued")
        ws = [_serve(config, "worker", tmp / f"worker-{workers}-{i}.log") for i in range(workers)]
        try:
            must(lambda: count(JobStatus.SUCCEEDED) == studies, 1800, "every study analysed")
        finally:
            _stop(ws)
    finally:
        _stop([rx])
    with db.read() as s:
        done = list(s.execute(select(JobEvent.at, Job.worker).join(Job, Job.id == JobEvent.job_id)
                              .where(JobEvent.to_status == JobStatus.SUCCEEDED,
                                     Job.kind == JobKind.ANALYZE).order_by(JobEvent.at)))
        attempts = s.execute(select(func.max(Job.attempts))).scalar_one()
    db.dispose()
    # Steady state: from the moment every process has finished one job (its model is loaded)
    # to the last success; the jobs finished in that window.
    firsts: dict[str, Any] = {}
    for at, worker in done:
        firsts.setdefault(worker, at)
    start = max(firsts.values())
    window = [at for at, _ in done if at > start]
    seconds = (done[-1][0] - start).total_seconds()
    per_process = sorted(sum(1 for _, w in done if w == name) for name in firsts)
    return {"workers": workers, "jobs": studies, "window_jobs": len(window), "seconds": seconds,
            "jobs_per_s": len(window) / seconds if seconds > 0 else None,
            "per_process": per_process, "max_attempts": attempts}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--jobs", type=int, default=2000, help="no-op jobs for the queue run")
    ap.add_argument("--studies", type=int, default=40, help="CR studies for the analysis run")
    ap.add_argument("--skip-analysis", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    info = machine()
    report: dict[str, Any] = {"machine": info, "queue": [], "analysis": []}
    with tempfile.TemporaryDirectory(prefix="aidnode-scale-") as tmpdir, \
            pg_cluster(fsync=True) as cluster:
        tmp = Path(tmpdir)
        template = Database(cluster.create_database("aidnode_template"))
        template.upgrade()
        with template.read() as s:
            report["postgresql"] = s.execute(text("SHOW server_version")).scalar_one()
        template.dispose()  # a template must have no open connections
        for n in args.workers:
            report["queue"].append(queue_run(cluster, "aidnode_template", args.jobs, n))
        if not args.skip_analysis:
            model, model_note = model_package(tmp)
            report["model"] = model_note
            for n in args.workers:
                report["analysis"].append(
                    analysis_run(cluster, "aidnode_template", tmp, model, args.studies, n))
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print_machine(info)
    print(f"PostgreSQL {report['postgresql']}, a throwaway cluster on loopback, fsync on")
    print(f"\nqueue: {args.jobs} no-op jobs, claim -> succeed, one transaction each")
    print(f"{'processes':>10} {'jobs/s':>8} {'seconds':>8} {'claimed twice':>14}")
    for r in report["queue"]:
        print(f"{r['workers']:>10} {fmt(r['jobs_per_s']):>8} {fmt(r['seconds'], 2):>8} "
              f"{r['claimed_twice']:>14}")
    if report["analysis"]:
        print(f"\nanalysis: {args.studies} CR studies, {report['model']}")
        print(f"{'processes':>10} {'jobs/s':>8} {'seconds':>8} {'jobs per process':>20} "
              f"{'max attempts':>13}")
        for r in report["analysis"]:
            print(f"{r['workers']:>10} {fmt(r['jobs_per_s'], 2):>8} {fmt(r['seconds'], 1):>8} "
                  f"{'/'.join(map(str, r['per_process'])):>20} {r['max_attempts']:>13}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
