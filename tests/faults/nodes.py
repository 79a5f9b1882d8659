"""Helpers for the fault tests: a node folder, what its database and store hold, a sender that
records what was acknowledged before the node died."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from sqlalchemy import func, select

from node.config import Config, load_config
from node.errors import AssociationError
from node.scu import Peer, send_files
from storage.db import Database
from storage.files import FileStore
from storage.models import Delivery, Instance, Job, JobKind, JobStatus, Result, ResultObject
from tests.conftest import NODE_AE, node_config_text
from tests.peers import free_port

NEVER_STABLE = {"AIDNODE_ASSEMBLY__STABLE_AFTER_S": "3600"}  # keep the assembler out of the way


def node_folder(parent: Path, name: str = "node", **config: Any) -> Path:
    """A folder with a ``config.toml`` for a node on a free port (``node_config_text`` args)."""
    folder = parent / name
    folder.mkdir()
    (folder / "config.toml").write_text(node_config_text(free_port(), **config),
                                        encoding="utf-8")
    return folder


def analysing_config(model: Path, pacs_port: int, **extra: Any) -> dict[str, Any]:
    """Config arguments for a node that analyses DX/CR/OT with ``model`` and delivers to a PACS
    on ``pacs_port`` with short retry delays."""
    # The worker in a thread of `serve`, so a crash point in it kills the whole node; a test
    # of the worker's child process asks for one.
    inference = {"workers": 1, "models_dir": "models", "separate_process": False,
                 **extra.pop("inference", {})}
    return dict(
        rules=[{"name": "chest", "model": str(model), "destinations": ["pacs"],
                "match": {"modality": ["DX", "CR", "OT"]}}],
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                       "port": pacs_port, "backoff_base_s": 0.2, "backoff_max_s": 0.5,
                       "max_attempts": 50, "breaker_cooldown_s": 0.5}],
        inference=inference, **extra)


@dataclass
class NodeState:
    """The database and file store of a node folder, read from outside the node."""

    config: Config
    db: Database
    store: FileStore

    def instances(self) -> dict[str, str]:
        """SOP Instance UID -> stored path."""
        with self.db.read() as s:
            return {u: p for u, p in s.execute(select(Instance.sop_instance_uid, Instance.path))}

    def result_objects(self) -> dict[str, str]:
        """SOP Instance UID of each result object -> stored path."""
        with self.db.read() as s:
            return {u: p for u, p in s.execute(select(ResultObject.sop_instance_uid,
                                                      ResultObject.path))}

    def jobs(self, kind: JobKind) -> list[tuple[JobStatus, int]]:
        """(status, attempts) of every job of ``kind``, oldest first."""
        with self.db.read() as s:
            return [(j.status, j.attempts) for j in s.execute(
                select(Job).where(Job.kind == kind).order_by(Job.id)).scalars()]

    def job_messages(self, kind: JobKind) -> list[str]:
        with self.db.read() as s:
            jobs = s.execute(select(Job).where(Job.kind == kind)).scalars().all()
            return [e.message or "" for j in jobs for e in j.events]

    def count(self, model: Any) -> int:
        with self.db.read() as s:
            return int(s.execute(select(func.count()).select_from(model)).scalar_one())

    def deliveries_per_object(self) -> list[int]:
        with self.db.read() as s:
            return list(s.execute(select(func.count(Delivery.id))
                                  .select_from(ResultObject)
                                  .outerjoin(Delivery, Delivery.object_id == ResultObject.id)
                                  .group_by(ResultObject.id)).scalars())

    def parts(self) -> list[Path]:
        return sorted(self.store.tmp.glob("*.part"))

    def assert_consistent(self) -> None:
        """Every instance and result file has its row and every row its file; no partial
        files; and this after a crash only once the restarted node recovered."""
        assert sorted(self.store.files("instances")) == sorted(self.instances().values())
        assert sorted(self.store.files("results")) == sorted(self.result_objects().values())
        assert self.parts() == []

    def results(self) -> int:
        return self.count(Result)


@contextmanager
def node_state(folder: Path) -> Iterator[NodeState]:
    cfg = load_config(folder / "config.toml", environ={})
    db = Database(cfg.database.url)
    try:
        yield NodeState(cfg, db, FileStore(cfg.storage.root))
    finally:
        db.dispose()


def send_until_gone(cfg: Config, files: list[Path]) -> tuple[set[str], bool]:
    """C-STORE ``files`` in one association to the node of ``cfg``.

    Returns the SOP Instance UIDs answered Success and whether the association was lost (the
    node died) before every file was answered.
    """
    uid_of = {f: str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    acked: set[str] = set()

    def on_sent(path: Path, status: int) -> None:
        if status == 0:
            acked.add(uid_of[path])

    try:
        send_files(Peer(NODE_AE, cfg.node.host, cfg.node.port), files, "MODALITY",
                   on_sent=on_sent, timeout_s=30)
    except (AssociationError, RuntimeError):  # RuntimeError: pynetdicom saw the abort first
        return acked, True
    return acked, False


@contextmanager
def serve_role(config: Path, role: str, log: Path,
               env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """``aidnode -c CONFIG serve --role ROLE`` with its output in ``log``; killed on the way
    out if the test left it running (a frozen one is continued first, so it can die)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("AIDNODE_")}
    environ.update(env or {})
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from node.cli import main; main()", "-c", str(config),
             "serve", "--role", role],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=environ)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.send_signal(signal.SIGCONT)
        proc.wait(timeout=30)


def stat_fields(pid: int) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command name (state, ppid, ...); [] when
    the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return stat.rsplit(")", 1)[1].split()  # the command name in () may hold spaces


def process_state(pid: int) -> str:
    """The state letter of ``/proc/PID/stat``: R, S, D, T (stopped), Z, ... ("" when gone)."""
    fields = stat_fields(pid)
    return fields[0] if fields else ""
