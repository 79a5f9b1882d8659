"""The catalogue of received instances: studies, series and instances rows.

``record_instance`` runs inside the caller's write transaction, after the file is durable. A study
that receives a new instance goes back to RECEIVING (it grew), so the assembler looks at it again.

Several receivers may share one PostgreSQL database: a study or series row is created with
``INSERT ... ON CONFLICT DO NOTHING``, and its counters are bumped with ``UPDATE ... SET n = n + 1
RETURNING id``, which takes the row lock and reads the id in one statement; so two associations
adding to the same study serialise on that row instead of losing an update or failing on the
unique key. (On SQLite the writer's BEGIN IMMEDIATE already serialises them.) Core statements,
not ORM objects: this runs once per received instance.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from storage import clock
from storage.files import StoredFile
from storage.models import Instance, Series, Study, StudyState


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


def _insert_ignore(s: Session, model: Any, key: str, values: dict[str, Any]) -> None:
    """INSERT unless a row with the same unique ``key`` exists (it may be another receiver's)."""
    dialect = postgresql if s.get_bind().dialect.name == "postgresql" else sqlite
    s.execute(dialect.insert(model).values(**values).on_conflict_do_nothing(index_elements=[key]))


def _bump_study(s: Session, m: InstanceMeta, now: datetime) -> int | None:
    """Count one more instance in the study (back to RECEIVING: it grew); its id, or None when
    it does not exist yet. The UPDATE locks the row until the commit."""
    return s.execute(
        update(Study).where(Study.study_instance_uid == m.study_uid)
        .values(instance_count=Study.instance_count + 1, last_received_at=now,
                state=StudyState.RECEIVING, calling_ae=m.calling_ae, called_ae=m.called_ae,
                calling_host=m.calling_host)
        .returning(Study.id)).scalar_one_or_none()


def _study_id(s: Session, m: InstanceMeta) -> int:
    now = clock.now()
    study_id = _bump_study(s, m, now)
    if study_id is None:
        _insert_ignore(s, Study, "study_instance_uid", {
            "study_instance_uid": m.study_uid, "study_description": m.study_description,
            "state": StudyState.RECEIVING, "instance_count": 0, "first_received_at": now,
            "last_received_at": now})
        study_id = _bump_study(s, m, now)
    assert study_id is not None
    return study_id


def _bump_series(s: Session, m: InstanceMeta) -> int | None:
    return s.execute(
        update(Series).where(Series.series_instance_uid == m.series_uid)
        .values(instance_count=Series.instance_count + 1)
        .returning(Series.id)).scalar_one_or_none()


def _series_id(s: Session, study_id: int, m: InstanceMeta) -> int:
    series_id = _bump_series(s, m)
    if series_id is None:
        _insert_ignore(s, Series, "series_instance_uid", {
            "study_id": study_id, "series_instance_uid": m.series_uid, "modality": m.modality,
            "body_part": m.body_part, "series_description": m.series_description,
            "sop_class_uid": m.sop_class_uid, "image_type": m.image_type, "instance_count": 0})
        series_id = _bump_series(s, m)
    assert series_id is not None
    return series_id


def record_instance(s: Session, m: InstanceMeta, stored: StoredFile,
                    replace: bool = False) -> tuple[Recorded, str | None]:
    """Insert the rows for a durable file.

    Returns what happened and, when a file is no longer referenced (a duplicate that was not
    kept, or the file a replacement displaced), its relative path for the caller to remove
    after the commit.
    """
    existing = s.execute(select(Instance.id, Instance.sha256, Instance.path, Instance.study_id)
                         .where(Instance.sop_instance_uid == m.sop_instance_uid)).first()
    now = clock.now()
    if existing is not None:
        if existing.sha256 == m.sha256:
            return Recorded.DUPLICATE_SAME, stored.path
        if not replace:
            return Recorded.DUPLICATE_DIFFERENT, stored.path
        s.execute(update(Instance).where(Instance.id == existing.id).values(
            path=stored.path, size=stored.size, sha256=m.sha256,
            transfer_syntax_uid=m.transfer_syntax_uid, received_at=now))
        s.execute(update(Study).where(Study.id == existing.study_id).values(
            state=StudyState.RECEIVING, last_received_at=now))
        return Recorded.REPLACED, existing.path
    study_id = _study_id(s, m)
    series_id = _series_id(s, study_id, m)
    s.execute(insert(Instance).values(
        study_id=study_id, series_id=series_id, sop_instance_uid=m.sop_instance_uid,
        sop_class_uid=m.sop_class_uid, transfer_syntax_uid=m.transfer_syntax_uid,
        path=stored.path, size=stored.size, sha256=m.sha256, received_at=now,
        association_id=m.association_id))
    return Recorded.NEW, None


def known_paths(s: Session) -> set[str]:
    """Every file path the database references (instances and result objects)."""
    from storage.models import ResultObject

    paths = set(s.execute(select(Instance.path)).scalars())
    paths.update(s.execute(select(ResultObject.path)).scalars())
    return paths
