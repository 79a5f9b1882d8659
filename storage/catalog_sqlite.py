"""The receiver's common case on SQLite, in plain ``sqlite3``: new instances of studies and
series that have rows already.

That is every instance of a study but the first of each series. ``catalog.record_instances``
does the same through SQLAlchemy Core, which cost more of the interpreter than SQLite took
(``Database.sqlite_write``); anything else (an instance whose UID has a row, a study or series
without one) raises ``NotCommon`` and, once the transaction is rolled back, goes the general way.
The rows are the ones ``record_instances`` writes, column for column
(``tests/unit/test_catalog_sqlite.py`` compares them): studies bumped once each, then series,
in UID order, then the instances in one ``executemany``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy.exc import IntegrityError

from storage.files import StoredFile
from storage.models import StudyState

if TYPE_CHECKING:
    from storage.catalog import InstanceMeta

#: How SQLAlchemy's SQLite dialect stores a DateTime (its default storage format).
DATETIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"
#: SQLAlchemy's non-native Enum stores the member's name.
RECEIVING = StudyState.RECEIVING.name

_BUMP_STUDY = ("UPDATE studies SET instance_count = instance_count + ?, last_received_at = ?, "
               "state = ?, calling_ae = ?, called_ae = ?, calling_host = ? "
               "WHERE study_instance_uid = ? RETURNING id")
_BUMP_SERIES = ("UPDATE series SET instance_count = instance_count + ? "
                "WHERE series_instance_uid = ? RETURNING id")
_INSERT = ("INSERT INTO instances (study_id, series_id, sop_instance_uid, sop_class_uid, "
           "transfer_syntax_uid, path, size, sha256, received_at, association_id) "
           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


class NotCommon(Exception):
    """The group is not the common case; roll its transaction back and record it the general
    way."""


def record_new(conn: sqlite3.Connection, items: Sequence[tuple[InstanceMeta, StoredFile]],
               now: datetime) -> None:
    """Record ``items`` in the caller's transaction; NotCommon (part of it written: roll back)
    unless every UID is new, once, and every study and series has a row. A unique key that
    another row holds raises SQLAlchemy's IntegrityError, as ``record_instances`` would."""
    uids = [m.sop_instance_uid for m, _ in items]
    if len(set(uids)) != len(uids):
        raise NotCommon("an instance twice in the group")
    marks = ", ".join("?" * len(uids))
    if conn.execute(f"SELECT 1 FROM instances WHERE sop_instance_uid IN ({marks}) LIMIT 1",
                    uids).fetchone() is not None:
        raise NotCommon("an instance recorded before")
    when = now.strftime(DATETIME_FORMAT)
    studies: dict[str, list[InstanceMeta]] = {}
    series: dict[str, list[InstanceMeta]] = {}
    for m, _ in items:
        studies.setdefault(m.study_uid, []).append(m)
        series.setdefault(m.series_uid, []).append(m)
    study_ids: dict[str, int] = {}
    for uid in sorted(studies):
        last = studies[uid][-1]  # the last names the association's AEs and host
        row = conn.execute(_BUMP_STUDY, (len(studies[uid]), when, RECEIVING, last.calling_ae,
                                         last.called_ae, last.calling_host, uid)).fetchone()
        if row is None:
            raise NotCommon("a new study")
        study_ids[uid] = row[0]
    series_ids: dict[str, int] = {}
    for uid in sorted(series):
        row = conn.execute(_BUMP_SERIES, (len(series[uid]), uid)).fetchone()
        if row is None:
            raise NotCommon("a new series")
        series_ids[uid] = row[0]
    try:
        conn.executemany(_INSERT, [
            (study_ids[m.study_uid], series_ids[m.series_uid], m.sop_instance_uid,
             m.sop_class_uid, m.transfer_syntax_uid, stored.path, stored.size, m.sha256, when,
             m.association_id) for m, stored in items])
    except sqlite3.IntegrityError as exc:  # a unique key (a path) another row holds
        raise IntegrityError(_INSERT, None, exc) from exc


__all__ = ["NotCommon", "record_new"]
