"""Several receiver processes on one port (``node.reuse_port``): the kernel spreads the
associations over them, each instance is stored once, and one stopping leaves the port served.
A process without ``reuse_port`` cannot join the port by mistake."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pytest
from sqlalchemy import func, select

from node.config import load_config
from storage.db import Database
from storage.files import FileStore
from storage.models import Instance, ServiceNode
from tests.acceptance.test_serve import wait_for_echo
from tests.conftest import NODE_AE, node_config_text
from tests.dicomgen import cr_image, write_all
from tests.faults.nodes import serve_role as serve
from tests.peers import _tail, free_port, storescu, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ASSOCIATIONS = 16  # all 16 landing on one of two processes: 2 in 65536
PER_ASSOCIATION = 4
RELEASED = re.compile(r"association \S+ from \S+ released: (\d+) stored, 0 failed")


def stored_per_association(log: Path) -> list[int]:
    return [int(n) for n in RELEASED.findall(log.read_text(errors="replace"))]


def send_concurrently(port: int, batches: list[list[Path]]) -> list[str]:
    """One storescu association per batch, all at once; each one's output."""
    def one(files: list[Path]) -> str:
        done = storescu("127.0.0.1", port, [str(f) for f in files], called_aet=NODE_AE)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout + done.stderr

    with ThreadPoolExecutor(len(batches)) as pool:
        return list(pool.map(one, batches))


def test_two_receivers_share_the_port_and_store_each_instance_once(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(node_config_text(port, node={"reuse_port": True}), encoding="utf-8")
    cfg = load_config(config, environ={})
    subprocess.run([sys.executable, "-c", "from node.cli import main; main()", "-c", str(config),
                    "db", "upgrade"], check=True, capture_output=True)
    files = write_all([cr_image(rows=32, cols=32, seed=i, study_uid=f"1.2.826.0.1.3680043.9.8.{i}")
                       for i in range(ASSOCIATIONS * PER_ASSOCIATION + 8)], tmp_path / "send")
    first, late = files[:ASSOCIATIONS * PER_ASSOCIATION], files[ASSOCIATIONS * PER_ASSOCIATION:]
    db = Database(cfg.database.url)
    logs = [tmp_path / "receiver-a.log", tmp_path / "receiver-b.log"]
    try:
        with ExitStack() as stack:
            procs = [stack.enter_context(serve(config, "receiver", log)) for log in logs]
            for proc, log in zip(procs, logs, strict=True):
                wait_for(lambda log=log: f"listening on 127.0.0.1:{port}" in log.read_text(
                    errors="replace"), 60, what=f"{log.name} to listen")
            wait_for_echo(cfg.node.host, port, procs[0], logs[0])

            # A process without reuse_port cannot take the port: it fails instead of joining.
            lone = subprocess.run(
                [sys.executable, "-c", "from node.cli import main; main()", "-c", str(config),
                 "serve", "--role", "receiver"], check=False, capture_output=True, text=True,
                timeout=120,
                env={**{k: v for k, v in os.environ.items() if not k.startswith("AIDNODE_")},
                     "AIDNODE_NODE__REUSE_PORT": "false"})
            assert lone.returncode != 0
            assert "Address already in use" in lone.stdout + lone.stderr, lone.stderr[-2000:]

            outputs = send_concurrently(port, [first[i::ASSOCIATIONS]
                                               for i in range(ASSOCIATIONS)])
            assert sum(o.count("Received Store Response (Success)") for o in outputs) == len(first)
            wait_for(lambda: sum(sum(stored_per_association(log)) for log in logs) == len(first),
                     60, what="both receivers to log their associations")
            per_process = [stored_per_association(log) for log in logs]
            assert all(per_process), f"one process took every association: {per_process}"

            # One receiver stops; the other still serves the port.
            procs[0].send_signal(signal.SIGTERM)
            assert procs[0].wait(timeout=60) == 0, _tail(logs[0])
            outputs = send_concurrently(port, [late[i::4] for i in range(4)])
            assert sum(o.count("Received Store Response (Success)") for o in outputs) == len(late)
            assert procs[1].poll() is None
            with db.read() as s:
                roles = list(s.execute(select(ServiceNode.role, ServiceNode.pid)))
            assert roles == [("receiver", procs[1].pid)]
        with db.read() as s:
            uids = list(s.execute(select(Instance.sop_instance_uid)).scalars())
            assert s.execute(select(func.count(func.distinct(Instance.sop_instance_uid)))
                             ).scalar_one() == len(uids)
        assert sorted(uids) == sorted(str(f.stem) for f in files)
        store = FileStore(cfg.storage.root)
        assert len(list(store.files())) == len(files)
        # The service laid out the 256 shard folders per kind when it started.
        assert len(list((store.root / "instances").iterdir())) == 256
    finally:
        db.dispose()
