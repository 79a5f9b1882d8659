"""The database: SQLite pragmas, schema checks, lock timeouts, read and write sessions."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import Connection, func, insert, select, text
from sqlalchemy.exc import IntegrityError

from storage.db import Database
from storage.errors import DatabaseUnavailableError, SchemaOutOfDateError
from storage.models import Instance, Study

T0 = datetime(2025, 1, 6, 9, 0, 0)


def study(uid: str = "1.2.3.4") -> Study:
    return Study(study_instance_uid=uid, first_received_at=T0, last_received_at=T0)


def count_studies(db: Database) -> int:
    with db.read() as s:
        return s.execute(select(func.count()).select_from(Study)).scalar_one()


@pytest.fixture
def db(any_db: Database) -> Database:
    """The tests that take ``db`` run on SQLite and on PostgreSQL."""
    return any_db


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Database, Database]]:
    """Two Database objects (two processes, in effect) on one migrated file, 200 ms timeout."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    first, second = Database(url, busy_timeout_ms=200), Database(url, busy_timeout_ms=200)
    first.upgrade()
    yield first, second
    first.dispose()
    second.dispose()


@pytest.mark.parametrize("session", ["read", "write"])
def test_sqlite_pragmas_are_in_effect(tmp_path: Path, session: str) -> None:
    db = Database(f"sqlite:///{tmp_path / 'a.db'}", busy_timeout_ms=1234)
    try:
        with getattr(db, session)() as s:
            def pragma(name: str) -> object:
                return s.execute(text(f"PRAGMA {name}")).scalar()

            assert pragma("journal_mode") == "wal"
            assert pragma("synchronous") == 2  # FULL
            assert pragma("foreign_keys") == 1
            assert pragma("busy_timeout") == 1234
    finally:
        db.dispose()


def test_foreign_keys_are_enforced(db: Database) -> None:
    with pytest.raises(IntegrityError), db.write() as s:
        s.add(Instance(study_id=999, series_id=999, sop_instance_uid="1.2.3.4.5",
                       sop_class_uid="1.2.840.10008.5.1.4.1.1.7", transfer_syntax_uid="1.2",
                       path="instances/aa/bb/x.dcm", size=1, sha256="0" * 64,
                       received_at=T0))


def test_database_creates_the_folder_of_its_file(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'var' / 'lib' / 'aidnode.db'}")
    try:
        db.upgrade()
    finally:
        db.dispose()
    assert (tmp_path / "var" / "lib" / "aidnode.db").is_file()


def test_check_schema_refuses_a_fresh_database_naming_the_command(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'fresh.db'}")
    try:
        assert db.current_revision() is None
        with pytest.raises(SchemaOutOfDateError, match="aidnode db upgrade"):
            db.check_schema()
        assert db.upgrade() == db.head_revision()
        db.check_schema()
        assert db.current_revision() == db.head_revision()
        assert db.upgrade() == db.head_revision()  # a second upgrade is a no-op
        db.check_schema()
    finally:
        db.dispose()


def test_check_schema_refuses_an_older_revision(db: Database) -> None:
    with db.write() as s:
        s.execute(text("UPDATE alembic_version SET version_num = '0000'"))
    with pytest.raises(SchemaOutOfDateError, match=r"at 0000.*aidnode db upgrade"):
        db.check_schema()


def test_second_writer_times_out_on_a_held_write_lock(pair: tuple[Database, Database]) -> None:
    first, second = pair
    with first.write() as holder:
        holder.add(study())
        holder.flush()
        started = time.monotonic()
        with (pytest.raises(DatabaseUnavailableError, match="database unavailable.*locked"),
              second.write() as s):
            s.add(study("9.9.9"))
        waited = time.monotonic() - started
    assert waited >= 0.15  # it waited for the busy timeout rather than failing at once
    assert waited < 10
    assert count_studies(first) == 1  # the holder's commit went through, the loser's did not
    with second.write() as s:  # once the lock is free the second writer gets it
        s.add(study("9.9.9"))
    assert count_studies(second) == 2


def test_a_reader_is_not_blocked_by_a_writer(pair: tuple[Database, Database]) -> None:
    first, second = pair
    with first.write() as s:
        s.add(study("1.1"))
    with first.write() as holder:
        holder.add(study("2.2"))
        holder.flush()
        with second.read() as r:  # WAL: reads go on during a write, and see only committed rows
            uids = r.execute(select(Study.study_instance_uid)).scalars().all()
        assert uids == ["1.1"]
    assert count_studies(second) == 2


def test_read_session_sees_committed_data(db: Database) -> None:
    with db.write() as s:
        s.add(study("1.2.3"))
    with db.read() as s:
        got = s.execute(select(Study)).scalar_one()
    assert got.study_instance_uid == "1.2.3"  # still readable after the session ended


def test_read_session_does_not_persist_changes(db: Database) -> None:
    with db.read() as s:
        s.add(study("5.5"))
        s.flush()
    assert count_studies(db) == 0


def test_write_session_rolls_back_on_error(db: Database) -> None:
    with pytest.raises(RuntimeError, match="halfway"), db.write() as s:
        s.add(study("7.7"))
        s.flush()
        raise RuntimeError("halfway")
    assert count_studies(db) == 0


def insert_study(conn: Connection, uid: str) -> None:
    conn.execute(insert(Study).values(study_instance_uid=uid, first_received_at=T0,
                                      last_received_at=T0))


def test_write_connection_commits_on_success_and_rolls_back_on_error(db: Database) -> None:
    with db.write_connection() as conn:
        insert_study(conn, "8.1")
    with pytest.raises(RuntimeError, match="halfway"), db.write_connection() as conn:
        insert_study(conn, "8.2")
        raise RuntimeError("halfway")
    with db.read() as s:
        assert s.execute(select(Study.study_instance_uid)).scalars().all() == ["8.1"]


def test_write_connection_on_a_held_write_lock_is_database_unavailable(
        pair: tuple[Database, Database]) -> None:
    """As ``write()``: it fails at BEGIN after the busy timeout, and nothing it did stays."""
    first, second = pair
    with first.write() as holder:
        holder.add(study())
        holder.flush()
        with (pytest.raises(DatabaseUnavailableError, match="database unavailable.*locked")
              as info, second.write_connection() as conn):
            insert_study(conn, "9.9.9")
        assert info.value.maybe_committed is False
    assert count_studies(first) == 1
    with second.write_connection() as conn:  # once the lock is free the second writer gets it
        insert_study(conn, "9.9.9")
    assert count_studies(second) == 2


def test_write_connection_waits_for_this_processes_write_turn(
        pair: tuple[Database, Database]) -> None:
    """On SQLite, a writer of this process queues on the process's write turn (held here by
    another thread's ``write()``) before it meets SQLite's own lock."""
    first, _ = pair
    holding, done = threading.Event(), threading.Event()

    def hold() -> None:
        with first.write() as s:
            s.add(study("6.1"))
            holding.set()
            done.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(10)
        with (pytest.raises(DatabaseUnavailableError, match="no write turn within 200 ms"),
              first.write_connection() as conn):
            insert_study(conn, "6.2")
    finally:
        done.set()
        holder.join(10)
    assert count_studies(first) == 1


def test_postgresql_row_lock_held_past_the_timeout_is_database_unavailable(
        pg_url: str) -> None:
    """Two processes on one PostgreSQL database: a row locked longer than busy_timeout_ms
    fails the second writer the way a locked SQLite does, so the receiver answers 0xA700."""
    first, second = Database(pg_url, busy_timeout_ms=200), Database(pg_url, busy_timeout_ms=200)
    try:
        with first.write() as s:
            s.add(study("3.3"))
        with first.write() as holder:
            holder.execute(text("SELECT id FROM studies FOR UPDATE"))
            with (pytest.raises(DatabaseUnavailableError, match="lock timeout"),
                  second.write() as s):
                s.execute(text("UPDATE studies SET instance_count = 5"))
        with second.write() as s:  # the lock is gone: the second writer goes through
            s.execute(text("UPDATE studies SET instance_count = 5"))
        with first.read() as s:
            assert s.execute(select(Study.instance_count)).scalar_one() == 5
    finally:
        first.dispose()
        second.dispose()


def test_the_migrations_build_exactly_the_models(db: Database) -> None:
    """Alembic's autogenerate finds nothing to add, drop or retype after every migration."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from storage.models import Base

    with db.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(ctx, Base.metadata) == []
