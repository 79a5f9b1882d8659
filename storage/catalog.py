"""The catalogue of received instances: studies, series and instances rows.

``record_instance`` runs inside the caller's write transaction, after the file is durable. A study
that receives a new instance goes back to RECEIVING (it grew), so the assembler looks at it again.

Several receivers may share one PostgreSQL database: a study or series row is created with
``INSERT ... ON CONFLICT DO NOTHING``, and its counters are bumped with ``UPDATE ... SET n = n + 1
RETURNING id``, which takes the row lock and reads the id in one statement; so two associations
adding to the same study serialise on that row instead of losing an update or failing on the
unique key. (On SQLite the writer's BEGIN IMMEDIATE already serialises them.) Core statements,
not ORM objects, built once: this runs once per received instance.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Connection, Table, bindparam, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from storage import clock
from storage.files import StoredFile
from storage.models import Instance, Series, Study, StudyState

if TYPE_CHECKING:
    from storage.db import Database

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstanceMeta:
    """The header attributes aidnode keeps for routing; no names or patient IDs."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    sha256: str  # of the dataset bytes, file meta excluded: equal data, equal hash
    modality: str | None = None
    body_part: str | None = None
    study_description: str | None = None
    series_description: str | None = None
    image_type: str | None = None
    calling_ae: str | None = None
    called_ae: str | None = None
    calling_host: str | None = None
    association_id: str | None = None


class Recorded(enum.Enum):
    NEW = "new"
    DUPLICATE_SAME = "duplicate-same"  # same UID, same bytes: the stored copy is kept
    DUPLICATE_DIFFERENT = "duplicate-different"  # same UID, other bytes: policy decides
    REPLACED = "replaced"  # duplicate_policy = "replace": the new file took its place


def find_instance(s: Session, sop_instance_uid: str) -> Instance | None:
    return s.execute(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid)
                     ).scalar_one_or_none()


# The statements are built once, with bind parameters, and run on the session's connection:
# building them per call and going through the ORM cost more CPU than the SQL did.
_studies, _series, _instances = (cast(Table, m.__table__) for m in (Study, Series, Instance))

_FIND = (select(_instances.c.id, _instances.c.sha256, _instances.c.path, _instances.c.study_id)
         .where(_instances.c.sop_instance_uid == bindparam("b_sop")))
_BUMP_STUDY = (
    update(_studies).where(_studies.c.study_instance_uid == bindparam("b_study"))
    .values(instance_count=_studies.c.instance_count + 1, last_received_at=bindparam("b_now"),
            state=StudyState.RECEIVING, calling_ae=bindparam("b_calling_ae"),
            called_ae=bindparam("b_called_ae"), calling_host=bindparam("b_calling_host"))
    .returning(_studies.c.id))
_BUMP_SERIES = (
    update(_series).where(_series.c.series_instance_uid == bindparam("b_series"))
    .values(instance_count=_series.c.instance_count + 1).returning(_series.c.id))
_INSERT_INSTANCE = insert(_instances)
_REPLACE_INSTANCE = update(_instances).where(_instances.c.id == bindparam("b_id"))
_REGROW_STUDY = (update(_studies).where(_studies.c.id == bindparam("b_id"))
                 .values(state=StudyState.RECEIVING, last_received_at=bindparam("b_now")))
#: INSERT unless a row with the same unique key exists (it may be another receiver's).
_INSERT_IGNORE = {
    (name, table.name): dialect.insert(table).on_conflict_do_nothing(index_elements=[key])
    for name, dialect in (("postgresql", postgresql), ("sqlite", sqlite))
    for table, key in ((_studies, "study_instance_uid"), (_series, "series_instance_uid"))}


def _insert_ignore(conn: Connection, table: Table, values: dict[str, Any]) -> None:
    conn.execute(_INSERT_IGNORE[conn.dialect.name, table.name], values)


def _bump_study(conn: Connection, m: InstanceMeta, now: datetime) -> int | None:
    """Count one more instance in the study (back to RECEIVING: it grew); its id, or None when
    it does not exist yet. The UPDATE locks the row until the commit."""
    return conn.execute(_BUMP_STUDY, {
        "b_study": m.study_uid, "b_now": now, "b_calling_ae": m.calling_ae,
        "b_called_ae": m.called_ae, "b_calling_host": m.calling_host}).scalar_one_or_none()


def _study_id(conn: Connection, m: InstanceMeta, now: datetime) -> int:
    study_id = _bump_study(conn, m, now)
    if study_id is None:
        _insert_ignore(conn, _studies, {
            "study_instance_uid": m.study_uid, "study_description": m.study_description,
            "state": StudyState.RECEIVING, "instance_count": 0, "first_received_at": now,
            "last_received_at": now})
        study_id = _bump_study(conn, m, now)
    assert study_id is not None
    return study_id


def _series_id(conn: Connection, study_id: int, m: InstanceMeta) -> int:
    bump = {"b_series": m.series_uid}
    series_id = conn.execute(_BUMP_SERIES, bump).scalar_one_or_none()
    if series_id is None:
        _insert_ignore(conn, _series, {
            "study_id": study_id, "series_instance_uid": m.series_uid, "modality": m.modality,
            "body_part": m.body_part, "series_description": m.series_description,
            "sop_class_uid": m.sop_class_uid, "image_type": m.image_type, "instance_count": 0})
        series_id = conn.execute(_BUMP_SERIES, bump).scalar_one_or_none()
    assert series_id is not None
    return series_id


def record_instance(s: Session | Connection, m: InstanceMeta, stored: StoredFile,
                    replace: bool = False) -> tuple[Recorded, str | None]:
    """Insert the rows for a durable file.

    Returns what happened and, when a file is no longer referenced (a duplicate that was not
    kept, or the file a replacement displaced), its relative path for the caller to remove
    after the commit.
    """
    conn = s.connection() if isinstance(s, Session) else s
    existing = conn.execute(_FIND, {"b_sop": m.sop_instance_uid}).first()
    now = clock.now()
    if existing is not None:
        if existing.sha256 == m.sha256:
            return Recorded.DUPLICATE_SAME, stored.path
        if not replace:
            return Recorded.DUPLICATE_DIFFERENT, stored.path
        conn.execute(_REPLACE_INSTANCE, {
            "b_id": existing.id, "path": stored.path, "size": stored.size, "sha256": m.sha256,
            "transfer_syntax_uid": m.transfer_syntax_uid, "received_at": now})
        conn.execute(_REGROW_STUDY, {"b_id": existing.study_id, "b_now": now})
        return Recorded.REPLACED, existing.path
    study_id = _study_id(conn, m, now)
    series_id = _series_id(conn, study_id, m)
    conn.execute(_INSERT_INSTANCE, {
        "study_id": study_id, "series_id": series_id, "sop_instance_uid": m.sop_instance_uid,
        "sop_class_uid": m.sop_class_uid, "transfer_syntax_uid": m.transfer_syntax_uid,
        "path": stored.path, "size": stored.size, "sha256": m.sha256, "received_at": now,
        "association_id": m.association_id})
    return Recorded.NEW, None


def is_recorded(s: Session, path: str) -> bool:
    """Whether a row (an instance or a result object) names the file at ``path``."""
    from storage.models import ResultObject

    return any(s.execute(select(column).where(column == path).limit(1)).first() is not None
               for column in (Instance.path, ResultObject.path))


def keep_after_failure(db: Database, exc: BaseException, paths: Iterable[str]) -> bool:
    """After ``exc`` ended the transaction that was to record ``paths``: whether the new files
    must stay instead of being removed.

    A COMMIT can fail after the server has committed (a PostgreSQL connection lost while the
    server answered; ``DatabaseUnavailableError.maybe_committed``). Rows then name the files,
    and removing them loses what they hold: an instance whose re-send is taken for a duplicate
    of its row, results that can never be delivered. When the database cannot say, the files
    stay too; a file that no row names is removed at the next start.
    """
    if not getattr(exc, "maybe_committed", False):
        return False
    paths = list(paths)
    try:
        with db.read() as s:
            recorded = any(is_recorded(s, p) for p in paths)
    except Exception:  # noqa: BLE001 - cannot tell: keep the files
        log.warning("the COMMIT for %s failed and the database cannot say whether it took "
                    "effect; the files are kept", ", ".join(paths))
        return True
    if recorded:
        log.warning("the COMMIT for %s failed after it took effect; the files are kept",
                    ", ".join(paths))
    return recorded


def known_paths(s: Session) -> set[str]:
    """Every file path the database references (instances and result objects)."""
    from storage.models import ResultObject

    paths = set(s.execute(select(Instance.path)).scalars())
    paths.update(s.execute(select(ResultObject.path)).scalars())
    return paths
