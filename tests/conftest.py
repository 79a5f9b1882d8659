"""Shared fixtures: a migrated database (SQLite, or both SQLite and PostgreSQL), a file store,
a controllable clock and a running node."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import storage.clock
from storage.db import Database
from storage.files import FileStore

START = datetime(2025, 1, 6, 9, 0, 0)  # naive UTC, like everything the database stores


@pytest.fixture(autouse=True)
def _unfreeze_gc() -> Iterator[None]:
    """A worker that loads a model freezes the heap (``gc.freeze``), for the process's life;
    in the test process that would keep every later test's garbage from being collected."""
    yield
    if gc.get_freeze_count():
        gc.unfreeze()


@dataclass
class FrozenClock:
    """A clock that moves only when told: ``storage.clock.now`` returns ``.now``."""

    now: datetime = field(default=START)

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> FrozenClock:
    clock = FrozenClock()
    monkeypatch.setattr(storage.clock, "now", lambda: clock.now)
    return clock


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    """A SQLite database in tmp_path with every migration applied."""
    database = Database(f"sqlite:///{tmp_path / 'var' / 'aidnode.db'}")
    database.upgrade()
    yield database
    database.dispose()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[object]:
    """One throwaway PostgreSQL cluster for the session (tests/pg.py); skipped without the
    server binaries, except under CI=true, where CI installs them and their absence fails."""
    from tests import pg

    if pg.pg_binaries() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL server binaries missing: .ci/run installs postgresql")
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    with pg.pg_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def pg_template(pg_cluster: Any) -> str:
    """A migrated database that each PostgreSQL test copies (CREATE DATABASE ... TEMPLATE)."""
    url = pg_cluster.create_database("aidnode_template")
    template = Database(url)
    template.upgrade()
    template.dispose()
    return "aidnode_template"


@pytest.fixture
def pg_url(pg_cluster: Any, pg_template: str) -> Iterator[str]:
    """The URL of a fresh, migrated PostgreSQL database, dropped after the test."""
    url = pg_cluster.create_database(template=pg_template)
    yield url
    pg_cluster.drop_database(url.rsplit("/", 1)[1])


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A migrated database of each kind: the storage and job tests run against both."""
    if request.param == "sqlite":
        database = Database(f"sqlite:///{tmp_path / 'var' / 'aidnode.db'}")
        database.upgrade()
    else:
        database = Database(request.getfixturevalue("pg_url"))
    yield database
    database.dispose()


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "store")


# -- a running node on loopback (integration tests) -------------------------------------------

from collections.abc import Callable  # this section was appended to the file

NODE_AE = "AIDNODE"
TEST_MODEL = "test-model"  # not installed: jobs are keyed with version "unresolved", no training


def toml_value(value: object) -> str:
    """A TOML literal for the plain values these tests put in a config."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML literal for {value!r}")


def node_config_text(port: int, *, peers: list[dict[str, object]] | None = None,
                     rules: list[dict[str, object]] | None = None,
                     destinations: list[dict[str, object]] | None = None,
                     **sections: dict[str, object]) -> str:
    """A complete test config: loopback, no model, no metrics, short assembly waits.

    ``sections`` update the named tables (``node={"max_associations": 2}``); ``peers`` and
    ``rules`` replace the defaults (any calling AE from 127.0.0.1; CT/CR to ``TEST_MODEL``).
    """
    tables: dict[str, dict[str, object]] = {
        "node": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": port, "acse_timeout_s": 10,
                 "dimse_timeout_s": 20, "network_timeout_s": 20},
        "storage": {"root": "store", "min_free_mb": 0},
        "database": {"url": "sqlite:///var/aidnode.db"},
        "assembly": {"stable_after_s": 0.5, "check_interval_s": 0.1},
        "inference": {"workers": 0, "models_dir": "models"},
        "metrics": {"enabled": False},
        "logging": {"level": "INFO"},
    }
    for name, values in sections.items():
        tables.setdefault(name, {}).update(values)
    peers = [{"ae_title": "*", "host": "127.0.0.1"}] if peers is None else peers
    rules = [{"name": "ct-cr", "model": TEST_MODEL,
              "match": {"modality": ["CT", "CR"]}}] if rules is None else rules
    lines: list[str] = []
    for name, values in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
        lines.append("")
    for table, entries in (("peers", peers), ("rules", rules),
                           ("destinations", destinations or [])):
        for entry in entries:
            lines.append(f"[[{table}]]")
            lines += [f"{k} = {toml_value(v)}" for k, v in entry.items()]
            lines.append("")
    return "\n".join(lines)


@dataclass
class RunningNode:
    """A Service started in this process on a free loopback port."""

    config: Any
    db: Database
    store: FileStore
    service: Any
    host: str
    port: int
    ae_title: str = NODE_AE

    def instance_count(self) -> int:
        from sqlalchemy import func, select

        from storage.models import Instance

        with self.db.read() as s:
            return int(s.execute(select(func.count()).select_from(Instance)).scalar_one())

    def instance_paths(self) -> dict[str, str]:
        """SOP Instance UID -> stored path (relative to the store root)."""
        from sqlalchemy import select

        from storage.models import Instance

        with self.db.read() as s:
            return {uid: path for uid, path in s.execute(select(Instance.sop_instance_uid, Instance.path))}

    def files(self) -> list[str]:
        return list(self.store.files("instances"))


@pytest.fixture
def node_service(tmp_path: Path) -> Iterator[Callable[..., RunningNode]]:
    """Start an in-process node (``Service``) from a temp config; stopped at teardown.

    Call it with the keyword arguments of ``node_config_text`` (``peers=``, ``rules=``,
    ``storage={...}``, ...). It has no inference workers and its rules name a model that is not
    installed, so nothing is trained and ANALYZE jobs stay QUEUED.
    """
    from node.config import load_config
    from node.service import Service, open_storage
    from tests.peers import free_port

    started: list[Any] = []

    def start(**overrides: Any) -> RunningNode:
        folder = tmp_path / f"node{len(started)}"
        folder.mkdir()
        port = free_port()
        path = folder / "config.toml"
        path.write_text(node_config_text(port, **overrides), encoding="utf-8")
        cfg = load_config(path, environ={})
        database, files = open_storage(cfg)
        database.upgrade()
        service = Service(cfg, database, files)
        started.append(service)
        service.start(cfg.node.host, port)
        return RunningNode(cfg, database, files, service, cfg.node.host, port)

    yield start
    for service in reversed(started):
        service.stop(grace_s=5)


@pytest.fixture
def standin(tmp_path: Path) -> Iterator[tuple[Any, int]]:
    """A stand-in PACS (``node.standin``) that keeps every C-STORE it receives, duplicates
    included, as AE title PACS on a free port: (the PACS, its port)."""
    from node.standin import StandInPACS

    pacs = StandInPACS(tmp_path / "pacs", ae_title="PACS")
    port = pacs.start()
    yield pacs, port
    pacs.stop()


@pytest.fixture(scope="session")
def untrained_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid model package with untrained weights and thresholds of 0.01, so every finding
    is "present" and the whole SR + SC chain runs, without minutes of training."""
    from dataclasses import replace

    import torch

    from inference.context import DEFAULT_FIELDS
    from inference.model import FusedModel, ModelConfig
    from inference.package import save_package
    from inference.pixels import Windowing
    from inference.train import DEMO_LABELS

    torch.manual_seed(0)
    labels = [replace(lab, threshold=0.01) for lab in DEMO_LABELS]
    folder = tmp_path_factory.mktemp("model") / "untrained"
    save_package(folder, FusedModel(ModelConfig(num_labels=len(labels))), name="test-untrained",
                 version="0.0.1", description="untrained, for pipeline tests", labels=labels,
                 windowing=Windowing(), text_fields=DEFAULT_FIELDS)
    return folder
