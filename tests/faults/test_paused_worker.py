"""A worker process frozen (SIGSTOP) mid-job for longer than its lease: another worker process
reclaims the job and publishes; when the frozen one is continued, its late publish is refused.

This needs two worker processes running at once, so it runs on PostgreSQL with ``serve --role``
(DESIGN §4: SQLite serves one process, and a single process frozen whole has no other worker
left to reclaim its job). The frozen worker stops itself with SIGSTOP at the crash point
``worker.after_model`` (``AIDNODE_CRASH_AT=worker.after_model:SIGSTOP``): the model has run and
its result files are written, nothing is published. A freeze is a whole-process stop, every
thread at once, as a stalled VM or a swap storm would cause; the test continues it with SIGCONT.
"""

from __future__ import annotations

import signal
from contextlib import ExitStack
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import select

from inference.prediction import Prediction
from node.config import Config, load_config
from node.metrics import Metrics
from node.standin import StandInPACS
from node.worker import Analyzer, Built
from storage import catalog, jobs
from storage.db import Database
from storage.errors import JobStateError
from storage.files import FileStore
from storage.models import Instance, Job, JobKind, JobStatus, Result, ResultObject, Study
from tests.acceptance.test_serve import wait_for_echo
from tests.conftest import FrozenClock, node_config_text
from tests.faults.nodes import NodeState, node_state, process_state, send_until_gone, serve_role
from tests.integration.test_pipeline import write_study
from tests.peers import _tail, free_port, wait_for

LEASE_S = 6.0  # heartbeats every 2 s
TIMEOUT_S = 240.0



def analyze_job(node: NodeState) -> tuple[JobStatus, str, list[str]]:
    """The one ANALYZE job: its status, its worker and who claimed it, in order."""
    with node.db.read() as s:
        job = s.execute(select(Job).where(Job.kind == JobKind.ANALYZE)).scalar_one_or_none()
        if job is None:
            return JobStatus.QUEUED, "", []
        return job.status, str(job.worker), [
            e.message or "" for e in job.events if e.to_status == JobStatus.RUNNING]


@pytest.mark.integration
@pytest.mark.slow
def test_frozen_worker_past_its_lease_cannot_publish(
        tmp_path: Path, pg_url: str, untrained_model: Path,
        standin: tuple[StandInPACS, int]) -> None:
    pacs, pacs_port = standin
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(node_config_text(
        port, database={"url": pg_url},
        storage={"root": str(tmp_path / "shared-store"), "min_free_mb": 0},
        rules=[{"name": "chest", "model": str(untrained_model), "destinations": ["pacs"],
                "match": {"modality": ["DX", "CR", "OT"]}}],
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                       "port": pacs_port, "backoff_base_s": 0.2, "backoff_max_s": 0.5}],
        inference={"workers": 1, "models_dir": "models", "lease_s": LEASE_S}),
        encoding="utf-8")
    cfg = load_config(config, environ={})
    files = write_study(tmp_path / "study", seed=21, n=2)
    logs = tmp_path / "logs"
    logs.mkdir()
    with node_state(tmp_path) as node, ExitStack() as stack:
        # Receiver, assembler and sender in one process, no analysis there.
        main = stack.enter_context(serve_role(config, "all", logs / "main.log",
                                              {"AIDNODE_INFERENCE__WORKERS": "0"}))
        wait_for_echo(cfg.node.host, port, main, logs / "main.log")
        frozen = stack.enter_context(serve_role(
            config, "worker", logs / "frozen.log",
            {"AIDNODE_CRASH_AT": "worker.after_model:SIGSTOP"}))
        acked, lost = send_until_gone(cfg, files)
        assert not lost and len(acked) == 2

        # The first worker ran the model, wrote its objects, and froze before publishing.
        wait_for(lambda: process_state(frozen.pid) == "T", TIMEOUT_S,
                 what="the worker to freeze after the model ran")
        status, worker, claims = analyze_job(node)
        assert (status, len(claims)) == (JobStatus.RUNNING, 1)
        assert f":{frozen.pid}/" in worker

        # A second worker: once the lease has run out the job is re-queued, and it takes it.
        second = stack.enter_context(serve_role(config, "worker", logs / "second.log"))

        def delivered() -> bool:
            assert main.poll() is None, _tail(logs / "main.log")
            return node.jobs(JobKind.DELIVER) == [(JobStatus.SUCCEEDED, 1)]

        wait_for(delivered, TIMEOUT_S, what="the second worker's result to be delivered")
        assert process_state(frozen.pid) == "T"  # frozen all along
        status, worker, claims = analyze_job(node)
        assert status == JobStatus.SUCCEEDED and len(claims) == 2
        assert f":{frozen.pid}/" in claims[0] and f":{frozen.pid}/" not in claims[1]
        assert f":{frozen.pid}/" not in worker
        assert any("lease expired" in m for m in node.job_messages(JobKind.ANALYZE))

        # Continued: its publish is refused by the lease token, and it throws its files away.
        frozen.send_signal(signal.SIGCONT)
        wait_for(lambda: "lost its lease" in (logs / "frozen.log").read_text(errors="replace"),
                 60, what="the continued worker to report its lost lease")
        frozen_log = (logs / "frozen.log").read_text(errors="replace")
        assert "unexpected error" not in frozen_log, frozen_log[-3000:]
        for proc in (frozen, second, main):
            proc.send_signal(signal.SIGTERM)
        for proc, name in ((frozen, "frozen"), (second, "second"), (main, "main")):
            assert proc.wait(timeout=60) == 0, _tail(logs / f"{name}.log")

        assert analyze_job(node)[0] == JobStatus.SUCCEEDED
        assert node.results() == 1
        objects = node.result_objects()
        assert len(objects) == 3
        received = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                    for p in pacs.received]
        assert sorted(received) == sorted(objects)  # each result object once
        assert node.deliveries_per_object() == [1, 1, 1]
        node.assert_consistent()  # the refused worker's files are gone


def test_stale_publish_is_refused_by_its_lease_before_it_writes(
        db: Database, store: FileStore, frozen_clock: FrozenClock) -> None:
    """Regression: the stale worker's publish used to insert its result first, collide with
    the reclaiming worker's rows (same deterministic UIDs) and fail with an IntegrityError
    logged as an unexpected error; the lease is now checked first and refuses it."""
    stored = store.write(b"instance")
    with db.write() as s:
        catalog.record_instance(s, catalog.InstanceMeta(
            study_uid="1.2.3", series_uid="1.2.3.1", sop_instance_uid="1.2.3.1.1",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.7", transfer_syntax_uid="1.2.840.10008.1.2.1",
            sha256="0" * 64), stored)
        job_id = jobs.enqueue(s, JobKind.ANALYZE, study_id=1).id  # type: ignore[union-attr]
        stale = jobs.claim(s, JobKind.ANALYZE, "frozen")
    frozen_clock.advance(60)
    with db.write() as s:
        assert jobs.requeue_stale(s, older_than_s=30) == [job_id]
        fresh = jobs.claim(s, JobKind.ANALYZE, "second")
    assert stale is not None and fresh is not None
    with db.read() as s:
        study = s.get(Study, 1)
        instances = list(s.execute(select(Instance)).scalars())
    assert study is not None
    prediction = Prediction(model_name="m", model_version="1", synthetic_demo=False,
                            device="cpu", findings=(), analysed=(), context_text="",
                            context_fields=())
    sr = Dataset()
    sr.SOPClassUID, sr.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.3.9"
    worker = Analyzer(Config(), db, store, Metrics())

    def publish(job: jobs.Claimed) -> str:
        written = [(Built("SR", None, sr), store.write(b"result", kind="results"))]
        return worker._publish(job, study, prediction, None, written, instances)

    assert publish(fresh).startswith("succeeded")
    with pytest.raises(JobStateError, match="SUCCEEDED, not RUNNING"):
        publish(stale)
    with db.read() as s:
        assert s.execute(select(Job.status)).scalar_one() == JobStatus.SUCCEEDED
        assert len(s.execute(select(Result)).all()) == len(s.execute(select(ResultObject)).all()) == 1
