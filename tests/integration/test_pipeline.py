"""The whole chain: C-STORE in -> stable -> ANALYZE -> SR + SC -> DELIVER to a real PACS.

Orthanc plays the PACS; dcmtk storescp with --refuse plays a failing one; a port with no
listener plays one that is down. The model is an untrained package whose thresholds make every
finding present, so every result object kind is produced without training.
"""

from __future__ import annotations

import logging
import re
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import highdicom as hd
import pytest
from pydicom import dcmread
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from inference.synthetic import phantom_study
from node import assembly
from node.scu import Peer, send_files
from node.standin import StandInPACS
from storage.models import Delivery, Job, JobKind, JobStatus, Result, ResultObject
from tests.conftest import RunningNode
from tests.peers import free_port, orthanc, wait_for

pytestmark = pytest.mark.integration
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def write_study(folder: Path, seed: int, n: int = 2) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, ds in enumerate(phantom_study(seed=seed, n_images=n, nodule=True, size=256)):
        f = folder / f"{i:03d}.dcm"
        ds.save_as(f, enforce_file_format=True)
        out.append(f)
    return out


def send(node: RunningNode, files: list[Path]) -> None:
    results = send_files(Peer(node.ae_title, node.host, node.port), files, "MODALITY")
    assert [s for _, s in results] == [0] * len(files)


def start_node(node_service: Callable[..., RunningNode], model: Path, dest: dict[str, Any],
               **extra: Any) -> RunningNode:
    return node_service(
        rules=[{"name": "chest", "model": str(model), "destinations": ["pacs"],
                "match": {"modality": ["DX", "CR", "OT"]}}],
        destinations=[{"name": "pacs", "host": "127.0.0.1", "backoff_base_s": 0.2,
                       "backoff_max_s": 1.0, "max_attempts": 30,
                       "breaker_failures": 3, "breaker_cooldown_s": 1.0, **dest}],
        # The worker in a thread, where a test's patches reach it (tests/acceptance/
        # test_worker_process.py runs it as a child process).
        inference={"workers": 1, "models_dir": "models", "separate_process": False}, **extra)


def count(node: RunningNode, model: Any, *where: Any) -> int:
    with node.db.read() as s:
        return int(s.execute(select(func.count()).select_from(model).where(*where)).scalar_one())


def dciodvfy_errors(path: Path) -> list[str]:
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def test_results_arrive_in_orthanc_and_validate(node_service: Callable[..., RunningNode],
                                                untrained_model: Path, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="node.worker")
    with orthanc(tmp_path / "orthanc") as pacs:
        node = start_node(node_service, untrained_model,
                          {"ae_title": pacs.aet, "port": pacs.dicom_port})
        files = write_study(tmp_path / "study", seed=1)
        study_uid = dcmread(files[0]).StudyInstanceUID
        # The scanner sends the study to the PACS and to aidnode (or the PACS routes it).
        assert [st for _, st in send_files(Peer(pacs.aet, "127.0.0.1", pacs.dicom_port),
                                           files, "MODALITY")] == [0, 0]
        send(node, files)
        # 2 images in, then 1 SR and 1 SC per present finding (2 labels) come back.
        wait_for(lambda: len(pacs.instances_in_study(study_uid)) >= 5, 120,
                 what="SR and SC in Orthanc")
        got: dict[str, Path] = {}
        for oid in pacs.instances_in_study(study_uid):
            url = f"http://127.0.0.1:{pacs.http_port}/instances/{oid}/file"
            with urllib.request.urlopen(url, timeout=10) as r:
                p = tmp_path / f"{oid}.dcm"
                p.write_bytes(r.read())
            got[oid] = p
        by_modality: dict[str, list[Path]] = {}
        for p in got.values():
            by_modality.setdefault(str(dcmread(p, stop_before_pixels=True).Modality), []).append(p)
        assert len(by_modality.get("SR", [])) == 1
        sc = [p for p in got.values()
              if dcmread(p, stop_before_pixels=True).SOPClassUID == SECONDARY_CAPTURE]
        assert len(sc) == 2  # one heatmap per present finding
        for p in [*by_modality["SR"], *sc]:
            assert dciodvfy_errors(p) == [], p
        sr = hd.sr.srread(by_modality["SR"][0])
        assert sr.StudyInstanceUID == study_uid
        assert sr.content[0].ContentTemplateSequence[0].TemplateIdentifier == "1500"
        report = hd.sr.MeasurementReport.from_sequence(sr.content)
        assert len(report.get_image_measurement_groups()) == 2  # nodule, effusion
        assert "not for diagnostic use" in str(sr).lower()
    # The job's outcome line says where its time went, step by step.
    outcome = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ANALYZE job")]
    assert len(outcome) == 1, outcome
    steps = re.search(r"succeeded: .* in [0-9.]+s \((.*)\)$", outcome[0])
    assert steps is not None, outcome[0]
    assert [part.split()[0] for part in steps.group(1).split(", ")] == [
        "read", "load", "model", "build", "store", "publish"]


def test_delivery_retries_through_refusal_and_outage(node_service: Callable[..., RunningNode],
                                                     untrained_model: Path,
                                                     tmp_path: Path) -> None:
    port = free_port()
    node = start_node(node_service, untrained_model, {"ae_title": "PACS", "port": port})
    send(node, write_study(tmp_path / "study", seed=2))
    deliver = (Job.kind == JobKind.DELIVER)

    def attempts() -> int:
        with node.db.read() as s:
            return int(s.execute(select(func.max(Job.attempts)).where(deliver)).scalar() or 0)

    # Nothing listening: retried with growing delays.
    wait_for(lambda: attempts() >= 4, 60, what="four failed delivery attempts")
    with node.db.read() as s:
        job = s.execute(select(Job).where(deliver)).scalar_one()
        delays = [float(e.message.split("retry in ")[1].split("s")[0])
                  for e in job.events if e.message and e.message.startswith("retry in")]
    assert job.status in (JobStatus.QUEUED, JobStatus.RUNNING)
    # base 0.2 s doubling, jitter in [0.5, 1]: attempt 1 waits <= 0.2 s, attempt 3 >= 0.4 s.
    assert len(delays) >= 3 and delays[2] > delays[0]
    # A PACS that refuses associations: more failed attempts, nothing recorded as sent.
    seen = attempts()
    with _failing_storescp(tmp_path, port, "--refuse"):
        wait_for(lambda: attempts() >= seen + 2, 60, what="attempts against a refusing PACS")
    # A PACS that aborts after receiving a C-STORE-RQ, before answering: not acknowledged.
    seen = attempts()
    with _failing_storescp(tmp_path, port, "--abort-after"):
        wait_for(lambda: attempts() >= seen + 2, 60, what="attempts against an aborting PACS")
    assert count(node, Delivery) == 0
    # The PACS is back: everything arrives, once.
    pacs = StandInPACS(tmp_path / "pacs", ae_title="PACS")
    pacs.start(port=port)
    try:
        wait_for(lambda: count(node, Job, deliver, Job.status == JobStatus.SUCCEEDED) == 1, 60,
                 what="the delivery to succeed")
        n_objects = count(node, ResultObject)
        assert len(pacs.received) == n_objects == count(node, Delivery)
        uids = [dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in pacs.received]
        assert len(set(uids)) == len(uids)
    finally:
        pacs.stop()


def _failing_storescp(tmp_path: Path, port: int, mode: str) -> Any:
    """dcmtk storescp with ``--refuse`` or ``--abort-after`` on a fixed ``port``."""
    from contextlib import contextmanager

    from tests.peers import dcmtk_binary, wait_for_port

    @contextmanager
    def run() -> Any:
        (tmp_path / "failing").mkdir(exist_ok=True)
        proc = subprocess.Popen([dcmtk_binary("storescp"), mode, "-aet", "PACS", str(port)],
                                cwd=tmp_path / "failing",
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_port("127.0.0.1", port, proc=proc)
            yield proc
        finally:
            proc.terminate()
            proc.wait(10)

    return run()


def test_resend_is_idempotent_and_growth_supersedes(node_service: Callable[..., RunningNode],
                                                    untrained_model: Path,
                                                    tmp_path: Path) -> None:
    pacs = StandInPACS(tmp_path / "pacs", ae_title="PACS")
    port = pacs.start()
    try:
        node = start_node(node_service, untrained_model, {"ae_title": "PACS", "port": port})
        files = write_study(tmp_path / "study", seed=3, n=3)
        send(node, files[:2])
        done = (Job.kind == JobKind.DELIVER, Job.status == JobStatus.SUCCEEDED)
        wait_for(lambda: count(node, Job, *done) == 1, 120, what="the first results")
        first = len(pacs.received)
        # The same two instances again: acknowledged, and nothing to decide or analyse.
        send(node, files[:2])
        assert assembly.run_once(node.db, node.config) == []
        assert count(node, Result) == 1
        # The study grows: analysed again, and the new SR names the old one.
        send(node, files[2:])
        wait_for(lambda: count(node, Job, *done) == 2, 120, what="the superseding results")
        assert count(node, Result) == 2
        srs = [dcmread(p) for p in pacs.received if dcmread(p, stop_before_pixels=True)
               .Modality == "SR"]
        assert len(srs) == 2 and first >= 1
        old, new = srs
        ref = new.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0] \
            .ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        assert ref == old.SOPInstanceUID
        with node.db.read() as s:
            r1, r2 = s.execute(select(Result).order_by(Result.id)).scalars()
            assert r1.superseded_by == r2.id and r2.superseded_by is None
    finally:
        pacs.stop()


def test_results_whose_commit_fails_after_taking_effect_are_still_delivered(
        node_service: Callable[..., RunningNode], untrained_model: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The transaction that records the results commits, then raises (a PostgreSQL connection
    lost while the server answered): the result files stay, and the deliveries send them."""
    commit = Session.commit
    lost: list[int] = []

    def commit_then_lose(self: Session) -> None:
        # The worker's transaction: it holds the new Result (its ResultObjects, flushed and
        # unreferenced, may have left the session's weak identity map).
        results = not lost and any(isinstance(o, Result)
                                   for o in [*self.new, *self.identity_map.values()])
        commit(self)
        if results:
            lost.append(1)
            raise OperationalError("COMMIT", None,
                                   Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(Session, "commit", commit_then_lose)
    caplog.set_level(logging.INFO, logger="node.worker")
    pacs = StandInPACS(tmp_path / "pacs", ae_title="PACS")
    port = pacs.start()
    try:
        node = start_node(node_service, untrained_model, {"ae_title": "PACS", "port": port})
        send(node, write_study(tmp_path / "study", seed=4))
        done = (Job.kind == JobKind.DELIVER, Job.status == JobStatus.SUCCEEDED)
        wait_for(lambda: count(node, Job, *done) == 1, 120, what="the delivery")
        assert lost == [1]
        assert "failed after it took effect; the files are kept" in caplog.text
        # The job's outcome line says what happened, not that a lease was lost.
        wait_for(lambda: "ANALYZE job" in caplog.text, 10, what="the job's outcome line")
        assert "succeeded (its COMMIT reported a failure after taking effect)" in caplog.text
        assert "lost its lease" not in caplog.text
        with node.db.read() as s:
            paths = list(s.execute(select(ResultObject.path)).scalars())
        assert paths and all(node.store.path(p).is_file() for p in paths)
        assert len(pacs.received) == len(paths) == count(node, Delivery)
    finally:
        pacs.stop()
