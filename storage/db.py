"""The database engine and sessions.

SQLite (the default) runs in WAL mode with ``synchronous=FULL``, foreign keys on and a busy
timeout; writers open their transaction with ``BEGIN IMMEDIATE`` so two writers never deadlock on
a lock upgrade (the SQLAlchemy pysqlite recipe).

PostgreSQL (``postgresql+psycopg://user@host/db``) is used as it is, at READ COMMITTED: the code
that needs more locks rows itself (``FOR UPDATE`` on a study being recorded or decided, ``FOR
UPDATE SKIP LOCKED`` when claiming a job, an advisory lock around de-duplicated enqueues), so many
receivers, workers and senders on several machines can share one database.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import PoolProxiedConnection

from storage.errors import DatabaseUnavailableError, SchemaOutOfDateError

MIGRATIONS = Path(__file__).parent / "migrations"


def _sqlite_pragmas(busy_timeout_ms: int) -> Any:
    def on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # let SQLAlchemy's "begin" event emit BEGIN itself
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cur.close()

    return on_connect


def _unavailable(exc: OperationalError, committing: bool) -> DatabaseUnavailableError:
    """What the callers see of a failed statement, BEGIN or COMMIT (``committing``: the COMMIT
    was sent, so it may have taken effect)."""
    return DatabaseUnavailableError(f"database unavailable: {exc.orig}",
                                    maybe_committed=committing)


class Database:
    """One engine and its session factory; ``write()`` for writers, ``read()`` for readers."""

    def __init__(self, url: str, busy_timeout_ms: int = 5000) -> None:
        self.url = url
        self.busy_timeout_ms = busy_timeout_ms
        self.is_sqlite = url.startswith("sqlite")
        self._write_lock = threading.RLock() if self.is_sqlite else None
        self._raw: PoolProxiedConnection | None = None  # sqlite_write()'s connection
        self.is_postgresql = url.startswith("postgresql")
        kwargs: dict[str, Any] = {"future": True, "pool_size": 20, "max_overflow": 20}
        if self.is_sqlite:
            if ":memory:" not in url:
                Path(url.split("///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False,
                                      "timeout": busy_timeout_ms / 1000}
        else:
            kwargs["pool_pre_ping"] = True  # a restarted server's dead connections are replaced
            if self.is_postgresql:  # a row lock held longer than this fails like a busy SQLite
                kwargs["connect_args"] = {
                    "options": f"-c lock_timeout={int(busy_timeout_ms)}",
                    "application_name": "aidnode"}
        self.engine: Engine = create_engine(url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas(busy_timeout_ms))
            event.listen(self.engine, "begin", self._begin)
        # Two views of one pool: writers BEGIN IMMEDIATE, readers BEGIN DEFERRED.
        self._write_engine = self.engine.execution_options(aidnode_begin="IMMEDIATE")
        self._writers = sessionmaker(self._write_engine, expire_on_commit=False)
        self._readers = sessionmaker(self.engine.execution_options(aidnode_begin="DEFERRED"),
                                     expire_on_commit=False)
        # SQLite's read transaction is a snapshot already; PostgreSQL's needs REPEATABLE READ.
        self._snapshots = sessionmaker(
            self.engine.execution_options(isolation_level="REPEATABLE READ")
            if self.is_postgresql else self.engine.execution_options(aidnode_begin="DEFERRED"),
            expire_on_commit=False)

    @staticmethod
    def _begin(conn: Any) -> None:
        mode = conn.get_execution_options().get("aidnode_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A session whose transaction takes the write lock at once; committed on success.

        On SQLite, writers of this process also queue on a lock of their own first: SQLite's
        busy handler polls with sleeps of 1 to 100 ms, so eight associations contending for
        the database lock through it wait far longer than the transactions take. Other
        processes (the CLI) still meet SQLite's own lock and busy timeout.
        """
        with self._write_turn(), self._session(self._writers) as s:
            yield s

    @contextmanager
    def write_connection(self) -> Iterator[Connection]:
        """``write()`` without the ORM session: a Core connection in its write transaction,
        committed on success, with the same errors. For the receiver, whose rows are Core
        statements: the session's own bookkeeping took about 0.1 ms of the 0.7 ms that one
        instance's transaction takes on SQLite."""
        with self._write_turn():
            committing = False
            try:
                with self._write_engine.connect() as conn:
                    transaction = conn.begin()  # BEGIN now: a locked database fails here
                    try:
                        yield conn
                        committing = True
                        transaction.commit()
                    except BaseException:
                        if transaction.is_active:
                            transaction.rollback()
                        raise
            except OperationalError as exc:
                raise _unavailable(exc, committing) from exc

    @contextmanager
    def sqlite_write(self) -> Iterator[sqlite3.Connection]:
        """SQLite only: ``write_connection()`` as a plain ``sqlite3`` connection, for the
        receiver's rows (``storage.catalog_sqlite``).

        The same write turn, ``BEGIN IMMEDIATE``, commit on success, rollback on any exception
        and errors as ``write()``; the connection (from the engine's pool, with its pragmas) is
        kept for the next call. Going through SQLAlchemy cost about 0.4 ms of the interpreter
        per received instance, more than SQLite took.
        """
        if not self.is_sqlite:
            raise TypeError("Database.sqlite_write is for SQLite databases only.")
        with self._write_turn():
            if self._raw is None:
                self._raw = self.engine.raw_connection()
            conn = cast(sqlite3.Connection, self._raw.driver_connection)
            committing = False
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    committing = True
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as exc:
                raise DatabaseUnavailableError(f"database unavailable: {exc}",
                                               maybe_committed=committing) from exc

    @contextmanager
    def _write_turn(self) -> Iterator[None]:
        if self._write_lock is None:
            yield
            return
        if not self._write_lock.acquire(timeout=self.busy_timeout_ms / 1000):
            raise DatabaseUnavailableError(
                f"database unavailable: no write turn within {self.busy_timeout_ms} ms")
        try:
            yield
        finally:
            self._write_lock.release()

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reading; rolled back at the end."""
        with self._session(self._readers, commit=False) as s:
            yield s

    @contextmanager
    def snapshot(self) -> Iterator[Session]:
        """A read session that sees one consistent state of the whole database throughout."""
        with self._session(self._snapshots, commit=False) as s:
            yield s

    @contextmanager
    def _session(self, factory: sessionmaker[Session], commit: bool = True) -> Iterator[Session]:
        session = factory()
        committing = False
        try:
            session.connection()  # begin now, so a locked database fails here, not mid-work
            yield session
            if commit:
                committing = True
                session.commit()
            # a reader just closes: the transaction ends, loaded objects stay readable
        except OperationalError as exc:
            session.rollback()
            raise _unavailable(exc, committing) from exc
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def dispose(self) -> None:
        if self._raw is not None:
            try:
                with self._write_turn():  # not from under a transaction still running
                    if self._raw is not None:
                        self._raw.close()  # back to the pool, which the engine closes below
                        self._raw = None
            except DatabaseUnavailableError:
                pass  # a writer outlived the stop: its connection goes with the process
        self.engine.dispose()

    # -- schema ---------------------------------------------------------------------------

    def alembic_config(self) -> Any:
        from alembic.config import Config as AlembicConfig

        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        cfg.attributes["engine"] = self.engine
        return cfg

    def upgrade(self) -> str:
        """Apply every pending migration; returns the revision now current."""
        from alembic import command

        command.upgrade(self.alembic_config(), "head")
        return self.current_revision() or ""

    def current_revision(self) -> str | None:
        try:
            with self.engine.connect() as conn:
                return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except OperationalError:
            return None
        except Exception:  # noqa: BLE001 - a missing table reads differently per driver
            return None

    def head_revision(self) -> str:
        from alembic.script import ScriptDirectory

        head = ScriptDirectory.from_config(self.alembic_config()).get_current_head()
        assert head is not None
        return head

    def check_schema(self) -> None:
        """Raise SchemaOutOfDateError naming the command to run when migrations are pending."""
        current, head = self.current_revision(), self.head_revision()
        if current != head:
            raise SchemaOutOfDateError(
                f"database schema is at {current or 'nothing'}, this aidnode needs {head}: "
                "run `aidnode db upgrade`")
