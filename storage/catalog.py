"""The catalogue of received instances: studies, series and instances rows.

``record_instance`` runs inside the caller's write transaction, after the file is durable. A study
that receives a new instance goes back to RECEIVING (it grew), so the assembler looks at it again.

Several receivers may share one PostgreSQL database: a study or series row is created with
``INSERT ... ON CONFLICT DO NOTHING`` and then locked ``FOR UPDATE`` before its counters change,
so two associations adding to the same study serialise on that row instead of losing an update
or failing on the unique key. (On SQLite the writer's BEGIN IMMEDIATE already serialises them.)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
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


def _locked(s: Session, model: Any, column: Any, value: str) -> Any:
    return s.execute(select(model).where(column == value).with_for_update()
                     .execution_options(populate_existing=True)).scalar_one_or_none()


def _study(s: Session, m: InstanceMeta) -> Study:
    now = clock.now()
    study = _locked(s, Study, Study.study_instance_uid, m.study_uid)
    if study is None:
        _insert_ignore(s, Study, "study_instance_uid", {
            "study_instance_uid": m.study_uid, "study_description": m.study_description,
            "state": StudyState.RECEIVING, "instance_count": 0, "first_received_at": now,
            "last_received_at": now})
        study = _locked(s, Study, Study.study_instance_uid, m.study_uid)
    assert study is not None
    study.calling_ae, study.called_ae, study.calling_host = m.calling_ae, m.called_ae, \
        m.calling_host
    study.last_received_at = now
    study.state = StudyState.RECEIVING
    study.instance_count = (study.instance_count or 0) + 1
    s.flush()
    return study


def _series(s: Session, study: Study, m: InstanceMeta) -> Series:
    series = _locked(s, Series, Series.series_instance_uid, m.series_uid)
    if series is None:
        _insert_ignore(s, Series, "series_instance_uid", {
            "study_id": study.id, "series_instance_uid": m.series_uid, "modality": m.modality,
            "body_part": m.body_part, "series_description": m.series_description,
            "sop_class_uid": m.sop_class_uid, "image_type": m.image_type, "instance_count": 0})
        series = _locked(s, Series, Series.series_instance_uid, m.series_uid)
    assert series is not None
    series.instance_count = (series.instance_count or 0) + 1
    s.flush()
    return series


def record_instance(s: Session, m: InstanceMeta, stored: StoredFile,
                    replace: bool = False) -> tuple[Recorded, str | None]:
    """Insert the rows for a durable file.

    Returns what happened and, when a file is no longer referenced (a duplicate that was not
    kept, or the file a replacement displaced), its relative path for the caller to remove
    after the commit.
    """
    existing = find_instance(s, m.sop_instance_uid)
    if existing is not None:
        if existing.sha256 == m.sha256:
            return Recorded.DUPLICATE_SAME, stored.path
        if not replace:
            return Recorded.DUPLICATE_DIFFERENT, stored.path
        old = existing.path
        existing.path, existing.size, existing.sha256 = stored.path, stored.size, m.sha256
        existing.transfer_syntax_uid = m.transfer_syntax_uid
        existing.received_at = clock.now()
        study = s.get(Study, existing.study_id)
        if study is not None:
            study.state, study.last_received_at = StudyState.RECEIVING, clock.now()
        return Recorded.REPLACED, old
    study = _study(s, m)
    series = _series(s, study, m)
    s.add(Instance(study_id=study.id, series_id=series.id, sop_instance_uid=m.sop_instance_uid,
                   sop_class_uid=m.sop_class_uid, transfer_syntax_uid=m.transfer_syntax_uid,
                   path=stored.path, size=stored.size, sha256=m.sha256,
                   received_at=clock.now(), association_id=m.association_id))
    s.flush()
    return Recorded.NEW, None


def known_paths(s: Session) -> set[str]:
    """Every file path the database references (instances and result objects)."""
    from storage.models import ResultObject

    paths = set(s.execute(select(Instance.path)).scalars())
    paths.update(s.execute(select(ResultObject.path)).scalars())
    return paths
