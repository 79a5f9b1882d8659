"""Copy a whole aidnode database into another, e.g. a SQLite node's onto PostgreSQL.

The target gets the schema by migration, must hold no rows, and receives every table in
foreign-key order inside one transaction, whose row counts are checked before it commits: either
everything arrives or nothing does. The source is read in one snapshot (REPEATABLE READ on
PostgreSQL). Ids are kept, so file paths, job history and
result links stay as they were; PostgreSQL's id sequences are moved past the copied ids. The
registry of running processes is not copied (those processes belong to the old database).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Column, Table, func, select, text, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from storage.db import Database
from storage.errors import StorageError
from storage.models import Base, ServiceNode

BATCH = 1000
SKIP = {ServiceNode.__tablename__}


class MigrationTargetError(StorageError):
    """The target database cannot take the copy (not empty, or unreachable)."""


@dataclass(frozen=True)
class TableCopy:
    table: str
    source_rows: int
    target_rows: int


def _tables() -> list[Table]:
    return [t for t in Base.metadata.sorted_tables if t.name not in SKIP]


def _self_refs(table: Table) -> list[Column[object]]:
    """Columns that point into their own table (results.superseded_by): set after the rows."""
    return [c for c in table.columns if any(fk.column.table is table for fk in c.foreign_keys)]


def _counts(s: Session) -> dict[str, int]:
    return {t.name: s.execute(select(func.count()).select_from(t)).scalar_one()
            for t in _tables()}


def count_rows(db: Database) -> dict[str, int]:
    with db.read() as s:
        return _counts(s)


def copy_database(source: Database, target: Database,
                  progress: Callable[[str, int, int], None] | None = None) -> list[TableCopy]:
    """Copy every row of ``source`` into the empty, migrated ``target``; returns per-table
    counts, checked equal. ``progress(table, done, total)`` is called after each batch."""
    source.check_schema()
    try:
        target.upgrade()
    except OperationalError as exc:
        raise MigrationTargetError(f"cannot reach the target database: {exc.orig}") from exc
    nonempty = {t: n for t, n in count_rows(target).items() if n}
    if nonempty:
        raise MigrationTargetError(
            "the target database already holds data (" +
            ", ".join(f"{t}: {n}" for t, n in nonempty.items()) +
            "); migrate into an empty database")
    with source.snapshot() as src, target.write() as dst:
        totals = _counts(src)
        for table in _tables():
            refs = _self_refs(table)
            pk = list(table.primary_key.columns)
            done = 0
            result = src.execute(select(table).order_by(*pk)).mappings()
            pending: list[dict[str, object]] = []
            while batch := result.fetchmany(BATCH):
                rows = [dict(r) for r in batch]
                for r in rows:
                    for c in refs:
                        if r[c.name] is not None:
                            pending.append({"pk": r[pk[0].name], c.name: r[c.name]})
                            r[c.name] = None
                dst.execute(table.insert(), rows)
                done += len(rows)
                if progress:
                    progress(table.name, done, totals[table.name])
            for p in pending:
                values = {k: v for k, v in p.items() if k != "pk"}
                dst.execute(update(table).where(pk[0] == p["pk"]).values(**values))
            if progress and done == 0:
                progress(table.name, 0, 0)
        if target.is_postgresql:
            for table in _tables():
                dst.execute(text(
                    f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), "
                    f"COALESCE(MAX(id), 1), MAX(id) IS NOT NULL) FROM {table.name}"))
        copied = _counts(dst)  # checked before the commit: a short copy leaves nothing
        report = [TableCopy(t, totals[t], copied[t]) for t in totals]
        short = [c for c in report if c.source_rows != c.target_rows]
        if short:
            raise MigrationTargetError("row counts differ after the copy: " + ", ".join(
                f"{c.table} {c.source_rows} -> {c.target_rows}" for c in short))
    return report
