"""``aidnode db migrate-to``: a SQLite node's whole history copied onto PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from node import cli
from node.config import load_config
from node.service import open_storage
from storage import audit, catalog, clock, jobs, registry
from storage.catalog import InstanceMeta
from storage.db import Database
from storage.files import StoredFile
from storage.migrate import _tables
from storage.models import JobKind, Result, ResultObject, Study

CONFIG = """
[node]
port = 11112

[storage]
root = "store"
min_free_mb = 0

[database]
url = "sqlite:///var/aidnode.db"

[metrics]
enabled = false
"""


@pytest.fixture
def aidnode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Callable[..., Any]:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG)

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            cli.main(["-c", str(path), *args])
        got = capsys.readouterr()
        return int(exc.value.code or 0), got.out, got.err

    assert run("db", "upgrade")[0] == 0
    return run


def populate(db: Database) -> None:
    """A small but complete history: studies, instances, jobs with events, two results of which
    one supersedes the other, result objects, a delivery and audit events."""
    for i in range(3):
        with db.write() as s:
            catalog.record_instance(s, InstanceMeta(
                study_uid="1.2.3", series_uid="1.2.3.1", sop_instance_uid=f"1.2.3.1.{i}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
                sha256=f"{i:064d}", modality="CR"), StoredFile(f"instances/x/{i}.dcm", 10))
    with db.write() as s:
        study = s.execute(select(Study)).scalar_one()
        job = jobs.enqueue(s, JobKind.ANALYZE, study_id=study.id, dedupe_key="k1")
        assert job is not None
    with db.write() as s:
        c = jobs.claim(s, JobKind.ANALYZE, "host:1/worker-0")
        assert c is not None
        jobs.succeed(s, c.id, c.token)
        old = Result(study_id=study.id, job_id=c.id, model_name="m", model_version="1",
                     input_hash="a", summary={"nodule": 0.9}, created_at=clock.now())
        new = Result(study_id=study.id, job_id=c.id, model_name="m", model_version="1",
                     input_hash="b", summary={"nodule": 0.2}, created_at=clock.now())
        s.add_all([old, new])
        s.flush()
        old.superseded_by = new.id  # points at a row with a higher id
        s.add(ResultObject(result_id=new.id, kind="SR", sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                           sop_instance_uid="2.25.1", path="results/a/b.dcm", label=None))
        jobs.enqueue(s, JobKind.DELIVER, study_id=study.id, destination="pacs")
        audit.record(s, audit.AuditKind.ADMIN, detail={"command": "test"})


def dump(db: Database) -> dict[str, list[dict[str, Any]]]:
    with db.read() as s:
        return {t.name: [dict(r) for r in s.execute(select(t).order_by(*t.primary_key.columns))
                         .mappings()] for t in _tables()}


def test_migrate_to_postgresql_copies_everything_and_the_node_goes_on(
        aidnode: Callable[..., Any], tmp_path: Path, pg_cluster: Any) -> None:
    cfg = load_config(tmp_path / "config.toml", environ={})
    sqlite_db, _ = open_storage(cfg)
    populate(sqlite_db)
    target_url = pg_cluster.create_database()  # empty: migrate-to creates the schema
    code, out, err = aidnode("db", "migrate-to", target_url, "--json")
    assert code == 0, err
    tables = {t["table"]: t["rows"] for t in json.loads(out)["tables"]}
    assert tables["instances"] == 3 and tables["job_events"] >= 4 and tables["results"] == 2

    pg = Database(target_url)
    try:
        before, after = dump(sqlite_db), dump(pg)
        assert after == before  # every row, every column, ids and links included
        with pg.write() as s:  # the node goes on: new rows get fresh ids, no key collision
            job = jobs.enqueue(s, JobKind.ANALYZE, study_id=1, dedupe_key="k2")
            assert job is not None and job.id > max(r["id"] for r in before["jobs"])
        with pg.write() as s:
            assert jobs.claim(s, JobKind.DELIVER, "host:2/sender") is not None  # still queued

        code, _, err = aidnode("db", "migrate-to", target_url)  # never over existing data
        assert code == 1
        assert "already holds data" in err
    finally:
        pg.dispose()
        sqlite_db.dispose()


def test_migrate_to_refuses_while_the_service_runs(aidnode: Callable[..., Any], tmp_path: Path,
                                                   pg_cluster: Any) -> None:
    cfg = load_config(tmp_path / "config.toml", environ={})
    db, _ = open_storage(cfg)
    with db.write() as s:
        registry.register(s, "scanner-gw:4242", "all", "0.1.0")
    db.dispose()
    target_url = pg_cluster.create_database()
    code, _, err = aidnode("db", "migrate-to", target_url)
    assert code == 2
    assert "stop the service" in err and "scanner-gw:4242" in err
    code, _, err = aidnode("db", "migrate-to", "mysql://nope")
    assert code == 2
    assert "postgresql+psycopg://" in err
