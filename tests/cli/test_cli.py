"""The admin CLI end to end: exit codes, one-line errors, ``--json`` output, and repairs.

Commands run in-process through ``node.cli.main`` (the entry point that owns the exit codes and
the one-line error messages) against a SQLite database and a file store under ``tmp_path``.
Peers are ``node.standin.StandInPACS`` on loopback, on ports the OS picked.
"""

from __future__ import annotations

import hashlib
import io
import json
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset
from sqlalchemy import func, select
from typer.testing import CliRunner

from node import cli
from node.config import Config, load_config
from node.metrics import Metrics
from node.sender import Sender
from node.service import open_storage
from node.standin import StandInPACS
from storage import audit, catalog, clock, jobs, registry
from storage.db import Database
from storage.files import FileStore
from storage.models import (
    Delivery,
    Job,
    JobKind,
    JobStatus,
    Result,
    ResultObject,
    Study,
)
from tests.conftest import FrozenClock
from tests.dicomgen import ct_series, write_all

pytestmark = pytest.mark.integration

DEST = "pacs"
PACS_AE = "STANDIN_PACS"

#: pynetdicom 3.0 leaks the socket of a refused connection (AssociationSocket.connect calls
#: shutdown() on an unconnected socket, which raises, so close() never runs); the ResourceWarning
#: surfaces as an unraisable-exception warning. Only the tests that connect to a closed port
#: tolerate exactly that.
PYNETDICOM_REFUSED_SOCKET_LEAK = pytest.mark.filterwarnings(
    r"ignore:Exception ignored in. <socket\.socket:pytest.PytestUnraisableExceptionWarning")


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@dataclass
class Node:
    """A configured node on disk and a way to run ``aidnode -c <its config> ...``."""

    path: Path
    config: Config
    db: Database
    store: FileStore
    pacs_port: int
    run: Callable[..., Run]


def config_text(*, port: int, pacs_port: int, db_url: str = "sqlite:///var/aidnode.db") -> str:
    return f"""
[node]
ae_title = "AIDNODE"
host = "127.0.0.1"
port = {port}

[storage]
root = "store"
min_free_mb = 0

[database]
url = "{db_url}"

[inference]
models_dir = "models"

[metrics]
enabled = false

[[rules]]
name = "cr-only"
model = "test-model"

[rules.match]
modality = ["CR"]

[[rules]]
name = "ct-chest"
model = "test-model"
destinations = ["{DEST}"]

[rules.match]
modality = ["CT"]
body_part = "CHEST"

[[destinations]]
name = "{DEST}"
ae_title = "{PACS_AE}"
host = "127.0.0.1"
port = {pacs_port}
max_attempts = 1
backoff_base_s = 0.1
breaker_failures = 100
"""


@pytest.fixture
def aidnode(capsys: pytest.CaptureFixture[str]) -> Callable[..., Run]:
    """Run ``aidnode ARGS`` through ``main()`` and return its exit code, stdout and stderr."""

    def run(*args: str) -> Run:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            cli.main(list(args))
        got = capsys.readouterr()
        code = exc.value.code
        return Run(code if isinstance(code, int) else 1, got.out, got.err)

    return run


@pytest.fixture
def node(tmp_path: Path, aidnode: Callable[..., Run]) -> Iterator[Node]:
    path = tmp_path / "config.toml"
    pacs_port = free_port()  # nothing listens here until a test starts the stand-in PACS
    path.write_text(config_text(port=free_port(), pacs_port=pacs_port))
    r = aidnode("-c", str(path), "db", "upgrade")
    assert r.code == 0, r.err
    assert "database at revision" in r.out
    cfg = load_config(path, environ={})
    db, store = open_storage(cfg)
    yield Node(path, cfg, db, store, pacs_port,
               lambda *args: aidnode("-c", str(path), *args))
    db.dispose()


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[StandInPACS]:
    p = StandInPACS(tmp_path / "pacs")
    p.start()
    yield p
    p.stop()


def _bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def store_study(node: Node, datasets: list[Dataset]) -> str:
    """Record instances as the receiver would: a durable file, then its catalogue rows."""
    for ds in datasets:
        data = _bytes(ds)
        stored = node.store.write(data)
        meta = catalog.InstanceMeta(
            study_uid=str(ds.StudyInstanceUID), series_uid=str(ds.SeriesInstanceUID),
            sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            sha256=hashlib.sha256(data).hexdigest(), modality=str(ds.Modality),
            body_part=str(ds.get("BodyPartExamined", "")) or None,
            study_description=str(ds.get("StudyDescription", "")) or None,
            series_description=str(ds.get("SeriesDescription", "")) or None,
            image_type="\\".join(ds.ImageType), calling_ae="MODALITY", called_ae="AIDNODE",
            calling_host="127.0.0.1")
        with node.db.write() as s:
            recorded, _ = catalog.record_instance(s, meta, stored)
        assert recorded == catalog.Recorded.NEW
    return str(datasets[0].StudyInstanceUID)


def study_id(node: Node, uid: str) -> int:
    with node.db.read() as s:
        return s.execute(select(Study.id).where(Study.study_instance_uid == uid)).scalar_one()


def dead_letter(node: Node, kind: JobKind, sid: int, **kw: Any) -> int:
    """An enqueued job that was claimed and failed for good: a dead letter."""
    with node.db.write() as s:
        job = jobs.enqueue(s, kind, study_id=sid, max_attempts=1, **kw)
        assert job is not None
        job_id = job.id
    with node.db.write() as s:
        claimed = jobs.claim(s, kind, "test-worker")
        assert claimed is not None and claimed.id == job_id
        jobs.fail(s, job_id, claimed.token, "boom", retryable=False)
    return job_id


def job_row(node: Node, job_id: int) -> Job:
    with node.db.read() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def assert_one_line_error(r: Run, code: int, *needles: str) -> None:
    assert r.code == code, (r.out, r.err)
    assert "Traceback" not in r.err + r.out
    line = r.err.strip()
    assert line.startswith("error: ") and "\n" not in line, r.err
    for n in needles:
        assert n in line, r.err


# -- status, studies, rules -------------------------------------------------------------------


def test_status_json_shows_queues_and_address(node: Node) -> None:
    uid = store_study(node, ct_series(2))
    with node.db.write() as s:
        jobs.enqueue(s, JobKind.ANALYZE, study_id=study_id(node, uid))
    r = node.run("status", "--json")
    assert r.code == 0, r.err
    data = r.json()
    assert data["listening"] == f"AIDNODE@127.0.0.1:{node.config.node.port}"
    assert data["studies"] == 1
    assert data["queues"]["ANALYZE"]["queued"] == 1
    assert data["queues"]["DELIVER"] == {"queued": 0, "running": 0, "dead": 0,
                                         "oldest_age_s": None}
    human = node.run("status")
    assert human.code == 0 and "ANALYZE" in human.out and "DELIVER" in human.out


def test_status_reports_a_worker_process_that_keeps_dying(node: Node) -> None:
    with node.db.write() as s:
        registry.register(s, "nodehost:4242", "all", "test")
        registry.register(s, "otherhost:7", "all", "test")
        for _ in range(3):
            audit.record(s, audit.AuditKind.WORKER_PROCESS_DIED, process="nodehost:4242",
                         pid=4243, exit="exit code 1", requeued=[], restart_in_s=4.0)
        audit.record(s, audit.AuditKind.WORKER_PROCESS_DIED, process="gone:1", pid=2,
                     exit="killed by SIGKILL", requeued=[], restart_in_s=1.0)
    r = node.run("status", "--json")
    assert r.code == 0, r.err
    (deaths,) = r.json()["worker_process_deaths"]  # "gone:1" is not registered: not shown
    assert (deaths["process"], deaths["deaths"], deaths["last_exit"], deaths["running"]) == (
        "nodehost:4242", 3, "exit code 1", False)
    human = node.run("status")
    assert "worker process of nodehost:4242: died 3 time(s) in the last hour" in human.out
    assert "NONE RUNNING NOW" in human.out
    with node.db.write() as s:  # its restart registers
        registry.register(s, "nodehost:4250", "worker", "test")
    assert node.run("status", "--json").json()["worker_process_deaths"][0]["running"] is True
    assert "has registered on its host since" in node.run("status").out


def test_a_command_on_an_unmigrated_database_names_the_fix(tmp_path: Path,
                                                          aidnode: Callable[..., Run]) -> None:
    path = tmp_path / "fresh.toml"
    path.write_text(config_text(port=free_port(), pacs_port=free_port()))
    assert_one_line_error(aidnode("-c", str(path), "status"), 1, "aidnode db upgrade")


def test_studies_list_and_show(node: Node) -> None:
    series = ct_series(3)
    uid = store_study(node, series)
    r = node.run("studies", "list", "--json")
    assert r.code == 0, r.err
    [row] = r.json()
    assert row["study_uid"] == uid and row["instances"] == 3 and row["from"] == "MODALITY"

    r = node.run("studies", "show", uid, "--json")
    assert r.code == 0, r.err
    data = r.json()
    assert data["study_uid"] == uid and data["instances"] == 3
    assert data["series"] == [{"series_uid": str(series[0].SeriesInstanceUID),
                               "modality": "CT", "description": "Synthetic CT series 1",
                               "instances": 3}]
    assert data["jobs"] == [] and data["results"] == []

    human = node.run("studies", "list")
    assert human.code == 0
    first_column = "".join(line.split("│")[1].strip() for line in human.out.splitlines()
                           if line.startswith("│"))
    assert first_column == uid  # folded over lines when narrow, never cut short


def test_studies_show_of_an_unknown_study_is_one_line(node: Node) -> None:
    r = node.run("studies", "show", "NOPE")
    assert_one_line_error(r, 1)
    assert r.err.strip() == "error: no study NOPE"


def test_rules_explain_names_the_rule_that_fires_and_why(node: Node) -> None:
    uid = store_study(node, ct_series(3))
    r = node.run("rules", "explain", uid, "--json")
    assert r.code == 0, r.err
    data = r.json()
    assert data["fires"] == "ct-chest"
    by_rule = {v["rule"]: v for v in data["rules"]}
    assert not by_rule["cr-only"]["matched"]
    assert any("Modality 'CT' not in ['CR']" in why for why in by_rule["cr-only"]["reasons"])
    assert by_rule["ct-chest"]["matched"]
    assert by_rule["ct-chest"]["reasons"][0] == "selects 1 series, 3 instances"
    human = node.run("rules", "explain", uid)
    assert "rule that fires: ct-chest" in human.out
    assert "Modality 'CT' not in ['CR']" in human.out  # brackets are data, not markup


# -- jobs ---------------------------------------------------------------------------------------


def test_jobs_list_show_retry_and_cancel(node: Node) -> None:
    sid = study_id(node, store_study(node, ct_series(1)))
    job_id = dead_letter(node, JobKind.ANALYZE, sid)

    r = node.run("jobs", "list", "--json")
    assert r.code == 0, r.err
    assert [(j["id"], j["status"], j["attempts"]) for j in r.json()] == [(job_id, "FAILED", 1)]
    assert node.run("jobs", "list", "--status", "queued", "--json").json() == []
    assert [j["id"] for j in node.run("jobs", "list", "--status", "failed",
                                      "--kind", "analyze", "--json").json()] == [job_id]

    r = node.run("jobs", "show", str(job_id), "--json")
    assert r.code == 0, r.err
    shown = r.json()
    assert shown["error"] == "boom"
    assert [(e["from"], e["to"]) for e in shown["events"]] == [
        (None, "QUEUED"), ("QUEUED", "RUNNING"), ("RUNNING", "FAILED")]

    r = node.run("jobs", "retry", str(job_id))
    assert r.code == 0, r.err
    job = job_row(node, job_id)
    assert (job.status, job.attempts) == (JobStatus.QUEUED, 0)
    assert job.run_after <= clock.now()

    r = node.run("jobs", "cancel", str(job_id))
    assert_one_line_error(r, 2, "--yes")
    assert job_row(node, job_id).status == JobStatus.QUEUED

    r = node.run("jobs", "cancel", str(job_id), "--yes")
    assert r.code == 0, r.err
    assert job_row(node, job_id).status == JobStatus.CANCELLED


def test_jobs_retry_of_a_job_that_is_not_dead_fails(node: Node) -> None:
    with node.db.write() as s:
        job = jobs.enqueue(s, JobKind.ANALYZE)
        assert job is not None
    assert_one_line_error(node.run("jobs", "retry", str(job.id)), 1, f"job {job.id}")
    assert_one_line_error(node.run("jobs", "show", "999"), 1, "no job 999")


def test_jobs_list_with_a_bogus_status_is_a_usage_error(node: Node) -> None:
    assert_one_line_error(node.run("jobs", "list", "--status", "BOGUS"), 2, "--status", "BOGUS",
                          "FAILED")


# -- config ---------------------------------------------------------------------------------


def test_config_check_masks_the_database_password(tmp_path: Path,
                                                  aidnode: Callable[..., Run]) -> None:
    path = tmp_path / "pg.toml"
    path.write_text(config_text(port=free_port(), pacs_port=free_port(),
                                db_url="postgresql+psycopg://u:secret@h/db"))
    r = aidnode("-c", str(path), "config", "check", "--json")
    assert r.code == 0, r.err
    assert r.json()["database"]["url"] == "postgresql+psycopg://u:***@h/db"
    assert "secret" not in r.out + r.err
    human = aidnode("-c", str(path), "config", "check")
    assert human.code == 0 and "configuration OK" in human.out
    assert "secret" not in human.out + human.err


@pytest.mark.parametrize("url", ["postgresql://u:se@cret@h/db", "postgresql://u:p%40ss@h:5/d"])
def test_config_check_masks_awkward_passwords(url: str) -> None:
    masked = cli.mask_password(url)
    assert masked.startswith("postgresql://u:***@h")
    assert "cret" not in masked and "ss" not in masked.split("@")[0]


def test_a_bad_config_is_exit_2_naming_the_key(tmp_path: Path,
                                                aidnode: Callable[..., Run]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[node]\nport = 70000\n")
    r = aidnode("-c", str(path), "config", "check")
    assert r.code == 2
    assert "node.port" in r.err and "Traceback" not in r.err


# -- echo and send ------------------------------------------------------------------------------


def test_echo_of_a_malformed_address_is_one_line(node: Node) -> None:
    assert_one_line_error(node.run("echo", "BAD-ADDRESS"), 1, "AET@HOST:PORT")


@PYNETDICOM_REFUSED_SOCKET_LEAK
def test_echo_of_a_peer_that_is_down_is_one_line(node: Node) -> None:
    assert_one_line_error(node.run("echo", f"{PACS_AE}@127.0.0.1:{node.pacs_port}"), 1,
                          "association")


def test_echo_a_running_pacs(node: Node, pacs: StandInPACS) -> None:
    port = pacs._server.server_address[1]
    r = node.run("echo", f"{PACS_AE}@127.0.0.1:{port}", "--json")
    assert r.code == 0, r.err
    assert r.json()["status"] == 0


def test_send_a_folder_to_a_pacs(node: Node, pacs: StandInPACS, tmp_path: Path) -> None:
    datasets = ct_series(4)
    write_all(datasets, tmp_path / "study")
    port = pacs._server.server_address[1]
    r = node.run("send", str(tmp_path / "study"), "--to", f"{PACS_AE}@127.0.0.1:{port}",
                 "--json")
    assert r.code == 0, r.err
    assert r.json() == {"sent": 4, "failed": []}
    got = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in pacs.received}
    assert got == {str(ds.SOPInstanceUID) for ds in datasets}


def test_send_reports_a_file_that_is_not_dicom(node: Node, pacs: StandInPACS,
                                               tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    write_all(ct_series(1), folder)
    (folder / "notes.txt").write_text("not DICOM")
    port = pacs._server.server_address[1]
    r = node.run("send", str(folder), "--to", f"{PACS_AE}@127.0.0.1:{port}", "--json")
    assert r.code == 1
    data = r.json()
    assert data["sent"] == 1
    assert data["failed"] == [{"file": str(folder / "notes.txt"), "status": -1}]
    assert len(pacs.received) == 1
    human = node.run("send", str(folder / "notes.txt"), "--to", f"{PACS_AE}@127.0.0.1:{port}")
    assert human.code == 1 and "notes.txt: not a DICOM file" in human.out


def test_send_of_a_missing_path_is_one_line(node: Node, tmp_path: Path) -> None:
    assert_one_line_error(node.run("send", str(tmp_path / "nope"), "--to", "A@127.0.0.1:1"), 1,
                          "no such file")


# -- purge and audit ------------------------------------------------------------------------


def test_purge_removes_old_studies_rows_and_files(node: Node,
                                                  frozen_clock: FrozenClock) -> None:
    old = store_study(node, ct_series(2))
    busy = store_study(node, ct_series(1))
    with node.db.write() as s:
        jobs.enqueue(s, JobKind.ANALYZE, study_id=study_id(node, busy))
    files = set(node.store.files("instances"))
    assert len(files) == 3
    frozen_clock.advance(3 * 86400)

    r = node.run("purge", "--older-than", "2")
    assert_one_line_error(r, 2, "--yes")
    assert len(node.run("studies", "list", "--json").json()) == 2

    r = node.run("purge", "--older-than", "2", "--dry-run", "--json")
    assert r.code == 0 and r.json() == {"studies": 1, "files": 2, "skipped_busy": 1}
    assert set(node.store.files("instances")) == files

    r = node.run("purge", "--older-than", "0", "--yes", "--json")
    assert r.code == 0, r.err
    assert r.json() == {"studies": 1, "files": 2, "skipped_busy": 1}
    assert [d["study_uid"] for d in node.run("studies", "list", "--json").json()] == [busy]
    assert_one_line_error(node.run("studies", "show", old), 1, f"no study {old}")
    assert len(list(node.store.files("instances"))) == 1


def test_audit_lists_the_admin_actions(node: Node) -> None:
    sid = study_id(node, store_study(node, ct_series(1)))
    job_id = dead_letter(node, JobKind.ANALYZE, sid)
    assert node.run("jobs", "retry", str(job_id)).code == 0
    assert node.run("purge", "--older-than", "30", "--yes").code == 0
    r = node.run("audit", "list", "--kind", "admin", "--json")
    assert r.code == 0, r.err
    actions = [(e["kind"], e["detail"]["action"]) for e in r.json()]
    assert actions == [("admin", "purge"), ("admin", "jobs retry")]  # newest first
    assert r.json()[1]["detail"]["job"] == job_id


# -- models -----------------------------------------------------------------------------------


def test_model_verify_of_a_missing_folder_lists_its_problems(node: Node,
                                                             tmp_path: Path) -> None:
    r = node.run("model", "verify", str(tmp_path / "no-model"), "--json")
    assert r.code == 1
    data = r.json()
    assert data["ok"] is False and data["problems"]
    human = node.run("model", "verify", str(tmp_path / "no-model"))
    assert human.code == 1 and "problem" in human.out


def test_model_list_is_empty_without_models(node: Node) -> None:
    r = node.run("model", "list", "--json")
    assert r.code == 0 and r.json() == []


# -- the dead-letter repair the issue asked for ---------------------------------------------------


def make_result(node: Node, sid: int, n: int = 2) -> tuple[int, set[str]]:
    """A result with ``n`` small DICOM objects stored under results/, as the worker leaves it."""
    uids = set()
    with node.db.write() as s:
        result = Result(study_id=sid, model_name="test-model", model_version="1",
                        input_hash="0" * 64, summary={"findings": []}, created_at=clock.now())
        s.add(result)
        s.flush()
        for ds in ct_series(n):  # new UIDs: stand-ins for the SR and SC objects
            stored = node.store.write(_bytes(ds), kind="results")
            s.add(ResultObject(result_id=result.id, kind="SC",
                               sop_class_uid=str(ds.SOPClassUID),
                               sop_instance_uid=str(ds.SOPInstanceUID), path=stored.path))
            uids.add(str(ds.SOPInstanceUID))
        result_id = result.id
    return result_id, uids


@PYNETDICOM_REFUSED_SOCKET_LEAK
@pytest.mark.parametrize("how", ["deliveries retry", "jobs retry"])
def test_retrying_a_dead_lettered_delivery_really_resends_it(node: Node, tmp_path: Path,
                                                             how: str) -> None:
    sid = study_id(node, store_study(node, ct_series(1)))
    result_id, uids = make_result(node, sid)
    with node.db.write() as s:
        job = jobs.enqueue(s, JobKind.DELIVER, study_id=sid, destination=DEST,
                           payload={"result_id": result_id},
                           max_attempts=node.config.destination(DEST).max_attempts)
        assert job is not None
        job_id = job.id
    sender = Sender(node.config, node.db, node.store, Metrics())

    # The PACS is down: the one allowed attempt fails and the delivery is dead-lettered.
    for _ in range(3):
        assert sender.run_once()
        if job_row(node, job_id).status == JobStatus.FAILED:
            break
    assert job_row(node, job_id).status == JobStatus.FAILED
    [dead] = node.run("deliveries", "list", "--dead", "--json").json()
    assert (dead["id"], dead["acknowledged"], dead["objects"]) == (job_id, 0, 2)
    assert not sender.run_once()  # nothing is due: a dead letter stays put

    # The PACS comes back on the configured port; the admin retries from the CLI.
    pacs = StandInPACS(tmp_path / "pacs-back")
    pacs.start(port=node.pacs_port)
    try:
        args = how.split() + ([] if how == "deliveries retry" else [str(job_id)])
        r = node.run(*args)
        assert r.code == 0, r.err
        job = job_row(node, job_id)
        assert (job.status, job.attempts) == (JobStatus.QUEUED, 0)

        assert sender.run_once()
    finally:
        pacs.stop()

    assert job_row(node, job_id).status == JobStatus.SUCCEEDED
    got = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in pacs.received}
    assert got == uids
    with node.db.read() as s:
        acked = s.execute(select(func.count()).select_from(Delivery).where(
            Delivery.destination == DEST, Delivery.job_id == job_id)).scalar()
    assert acked == 2
    [row] = node.run("deliveries", "list", "--json").json()
    assert (row["status"], row["acknowledged"], row["objects"]) == ("SUCCEEDED", 2, 2)
    admin = node.run("audit", "list", "--kind", "admin", "--json").json()
    assert admin[0]["detail"] == {"action": how, "job": job_id, "user": admin[0]["detail"]["user"]}


# -- the real entry point -----------------------------------------------------------------------


def test_typer_runner_and_main_agree(node: Node) -> None:
    """``CliRunner`` on the app (standalone mode) gives the same JSON as ``main``."""
    store_study(node, ct_series(1))
    result = CliRunner().invoke(cli.app, ["-c", str(node.path), "studies", "list", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == node.run("studies", "list", "--json").json()


def test_the_console_script_exit_codes(node: Node) -> None:
    import subprocess
    import sys

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", "from node.cli import main; main()",
                               "-c", str(node.path), *args],
                              capture_output=True, text=True, timeout=60, check=False)

    ok = run("jobs", "list", "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout) == []
    missing = run("studies", "show", "NOPE")
    assert missing.returncode == 1 and missing.stderr.strip() == "error: no study NOPE"
    usage = run("purge", "--older-than", "1")
    assert usage.returncode == 2 and usage.stderr.strip().count("\n") == 0
