"""``aidnode serve`` as a subprocess: SIGTERM drains and exits 0; ``kill -9`` loses nothing that
was acknowledged, and the restarted node recovers to a consistent store and analyses the study once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import func, select

from node.config import Config, load_config
from storage.db import Database
from storage.files import FileStore
from storage.models import Instance, Job, JobKind, JobStatus, Study, StudyState
from tests.conftest import NODE_AE, node_config_text
from tests.dicomgen import ct_series, write_all
from tests.peers import _tail, free_port, storescu, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SUCCESS_LINE = "Received Store Response (Success)"
NEVER_STABLE = {"AIDNODE_ASSEMBLY__STABLE_AFTER_S": "3600"}  # keep the assembler out of the way


@pytest.fixture
def node_dir(tmp_path: Path) -> Path:
    """A folder with a config for a node on a free port; the database and store live beside it."""
    folder = tmp_path / "node"
    folder.mkdir()
    (folder / "config.toml").write_text(node_config_text(free_port()), encoding="utf-8")
    return folder


@contextmanager
def serve(folder: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``aidnode -c config.toml serve``; yields once the DICOM port accepts.

    Leaves the process to the test (SIGTERM, SIGKILL) and kills it on the way out if it is
    still running.
    """
    cfg = load_config(folder / "config.toml", environ={})
    environ = {k: v for k, v in os.environ.items() if not k.startswith("AIDNODE_")}
    environ.update(env or {})
    log = folder / f"serve-{len(list(folder.glob('serve-*.log')))}.log"  # one per run
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from node.cli import main; main()",
             "-c", str(folder / "config.toml"), "serve"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=environ)
    try:
        wait_for_echo(cfg.node.host, cfg.node.port, proc, log)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def wait_for_echo(host: str, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Wait until the node logs that it listens, then check that it answers C-ECHO.

    Not a bare TCP probe: pynetdicom keeps a connection that never sends A-ASSOCIATE-RQ until
    the ACSE timeout, and ``Service.stop`` waits for it.
    """

    def listening() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"aidnode serve exited with {proc.returncode}:\n{_tail(log)}")
        return f"listening on {host}:{port}" in log.read_text(errors="replace")

    wait_for(listening, 60, what="aidnode serve to listen")
    ae = AE(ae_title="PROBE")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    try:
        assoc = ae.associate(host, port, ae_title=NODE_AE)
        assert assoc.is_established, _tail(log)
        status = assoc.send_c_echo()
        assoc.release()
        assert status.Status == 0
    finally:
        ae.shutdown()


def last_log(folder: Path) -> Path:
    return folder / f"serve-{len(list(folder.glob('serve-*.log'))) - 1}.log"


def stop(proc: subprocess.Popen[bytes], folder: Path) -> None:
    """SIGTERM, and the exit status must be 0."""
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"no exit after SIGTERM:\n{_tail(last_log(folder))}") from None
    assert rc == 0, _tail(last_log(folder))


@contextmanager
def storage(folder: Path) -> Iterator[tuple[Config, Database, FileStore]]:
    cfg = load_config(folder / "config.toml", environ={})
    db = Database(cfg.database.url)
    try:
        yield cfg, db, FileStore(cfg.storage.root)
    finally:
        db.dispose()


def stored(db: Database) -> dict[str, str]:
    with db.read() as s:
        return {u: p for u, p in s.execute(select(Instance.sop_instance_uid, Instance.path))}


def assert_store_consistent(db: Database, store: FileStore) -> None:
    paths = stored(db)
    assert sorted(store.files("instances")) == sorted(paths.values())
    assert list(store.tmp.glob("*.part")) == []


def send(folder: Path, files: list[Path] | Path, port: int) -> int:
    """storescu ``files`` to the node; how many were answered Success."""
    done = storescu("127.0.0.1", port, files if isinstance(files, list) else [files],
                    called_aet=NODE_AE)
    return (done.stdout + done.stderr).count(SUCCESS_LINE)


def test_sigterm_exits_0_and_keeps_every_acknowledged_instance(node_dir: Path,
                                                               tmp_path: Path) -> None:
    series = ct_series(30, rows=32, cols=32)
    write_all(series, tmp_path / "send")
    port = load_config(node_dir / "config.toml", environ={}).node.port

    with serve(node_dir) as proc:
        assert send(node_dir, tmp_path / "send", port) == 30
        stop(proc, node_dir)

    with storage(node_dir) as (_, db, store):
        assert set(stored(db)) == {ds.SOPInstanceUID for ds in series}
        assert_store_consistent(db, store)


def test_kill_9_mid_study_loses_nothing_acknowledged(node_dir: Path, tmp_path: Path) -> None:
    series = ct_series(60, rows=64, cols=64)
    files = write_all(series, tmp_path / "send")
    uid_of = {f: ds.SOPInstanceUID for f, ds in zip(files, series, strict=True)}
    study_uid = series[0].StudyInstanceUID
    port = load_config(node_dir / "config.toml", environ={}).node.port
    acknowledged: set[str] = set()

    def sender() -> None:  # one association per file, so the kill lands mid-study
        for f in files:
            if send(node_dir, [f], port) != 1:
                return  # the node is gone
            acknowledged.add(uid_of[f])

    with storage(node_dir) as (_, db, store):
        with serve(node_dir, NEVER_STABLE) as proc:
            thread = threading.Thread(target=sender, name="storescu-sender")
            thread.start()
            try:
                # wait on what is asserted: a row is committed just before its Success is sent
                wait_for(lambda: len(acknowledged) >= 10, 60, what="10 instances acknowledged")
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
                thread.join(timeout=120)
            assert proc.returncode == -signal.SIGKILL
        assert 10 <= len(acknowledged) < 60, "the kill did not land in the middle of the study"
        assert acknowledged <= set(stored(db)), "an acknowledged instance was lost"
        for rel in stored(db).values():
            assert (store.root / rel).is_file()

        # Restarted: recovery leaves a consistent store before the first association.
        with serve(node_dir, NEVER_STABLE) as proc:
            assert_store_consistent(db, store)
            assert acknowledged <= set(stored(db))
            assert send(node_dir, tmp_path / "send", port) == 60  # the rest; duplicates are fine
            assert set(stored(db)) == set(uid_of.values())
            assert_store_consistent(db, store)
            stop(proc, node_dir)

        # With the normal quiet time the study becomes stable and is analysed once.
        with serve(node_dir) as proc:
            def queued() -> bool:
                with db.read() as s:
                    state = s.execute(select(Study.state).where(
                        Study.study_instance_uid == study_uid)).scalar_one()
                return state == StudyState.QUEUED

            wait_for(queued, 30, what="the study to be queued for analysis")
            with db.read() as s:
                jobs = s.execute(select(Job).where(Job.kind == JobKind.ANALYZE)).scalars().all()
                count = s.execute(select(Study.instance_count)).scalar_one()
                rows = s.execute(select(func.count()).select_from(Instance)).scalar_one()
            assert [(j.status, j.payload["instances"]) for j in jobs] == [(JobStatus.QUEUED, 60)]
            assert count == rows == 60
            stop(proc, node_dir)
