"""``kill -9`` between analysis and delivery: after a restart the results are delivered, once,
and the model is not run again."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import func, select

from node.config import load_config
from node.scu import Peer, send_files
from node.standin import StandInPACS
from storage.db import Database
from storage.models import Job, JobKind, JobStatus, Result, ResultObject
from tests.acceptance.test_serve import serve
from tests.conftest import NODE_AE, node_config_text
from tests.integration.test_pipeline import write_study
from tests.peers import free_port, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_kill_between_analysis_and_delivery(tmp_path: Path, untrained_model: Path) -> None:
    folder = tmp_path / "node"
    folder.mkdir()
    pacs_port = free_port()
    (folder / "config.toml").write_text(node_config_text(
        free_port(),
        rules=[{"name": "chest", "model": str(untrained_model), "destinations": ["pacs"],
                "match": {"modality": ["DX", "CR", "OT"]}}],
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                       "port": pacs_port, "backoff_base_s": 0.2, "backoff_max_s": 0.5,
                       "max_attempts": 50, "breaker_cooldown_s": 0.5}],
        inference={"workers": 1, "models_dir": "models"}), encoding="utf-8")
    cfg = load_config(folder / "config.toml", environ={})
    db = Database(cfg.database.url)

    def jobs(kind: JobKind) -> list[tuple[JobStatus, int]]:
        with db.read() as s:
            return [(j.status, j.attempts) for j in
                    s.execute(select(Job).where(Job.kind == kind)).scalars()]

    with serve(folder) as proc:
        files = write_study(tmp_path / "study", seed=5)
        sent = send_files(Peer(NODE_AE, cfg.node.host, cfg.node.port), files, "MODALITY")
        assert [st for _, st in sent] == [0, 0]
        # Analysed, and the PACS is down: the delivery has failed at least once.
        wait_for(lambda: any(a >= 1 and st == JobStatus.QUEUED
                             for st, a in jobs(JobKind.DELIVER)), 120,
                 what="a failed delivery attempt")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert jobs(JobKind.ANALYZE) == [(JobStatus.SUCCEEDED, 1)]

    pacs = StandInPACS(tmp_path / "pacs", ae_title="PACS")
    pacs.start(port=pacs_port)
    try:
        with serve(folder):
            wait_for(lambda: [st for st, _ in jobs(JobKind.DELIVER)] == [JobStatus.SUCCEEDED],
                     120, what="the delivery after the restart")
    finally:
        pacs.stop()
    with db.read() as s:
        n_results = s.execute(select(func.count()).select_from(Result)).scalar_one()
        n_objects = s.execute(select(func.count()).select_from(ResultObject)).scalar_one()
    assert jobs(JobKind.ANALYZE) == [(JobStatus.SUCCEEDED, 1)]  # the model ran once
    assert n_results == 1
    uids = [dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in pacs.received]
    assert len(uids) == n_objects == len(set(uids))  # every object, once
    db.dispose()
