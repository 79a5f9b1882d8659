"""Study assembly (DESIGN §2 step 3): find stable studies and queue their analysis.

A study is stable when nothing has arrived for ``stable_after_s`` (the longest per-modality
override of its series applies). The first matching rule enqueues one ANALYZE job for the series
it selects, keyed by (study, input instance set, model version): a re-sent identical study queues
nothing, a study that grew is analysed again.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from node import models
from node.config import Config
from node.rules import RuleVerdict, SeriesInfo, StudyInfo, first_match
from storage import clock, jobs
from storage.db import Database
from storage.models import Instance, JobKind, Result, Series, Study, StudyState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    study_uid: str
    rule: str | None
    job_id: int | None
    reason: str
    verdicts: tuple[RuleVerdict, ...] = ()


def study_info(s: Session, study: Study) -> StudyInfo:
    rows = s.execute(select(Series).where(Series.study_id == study.id)
                     .order_by(Series.id)).scalars()
    return StudyInfo(
        uid=study.study_instance_uid, study_description=study.study_description,
        calling_ae=study.calling_ae, called_ae=study.called_ae,
        series=tuple(SeriesInfo(uid=r.series_instance_uid, modality=r.modality,
                                body_part=r.body_part, series_description=r.series_description,
                                sop_class_uid=r.sop_class_uid, image_type=r.image_type,
                                instances=r.instance_count) for r in rows))


def input_set(s: Session, study_id: int, series_uids: tuple[str, ...]) -> list[str]:
    """The SOP Instance UIDs of the selected series, sorted."""
    q = (select(Instance.sop_instance_uid).join(Series, Instance.series_id == Series.id)
         .where(Instance.study_id == study_id, Series.series_instance_uid.in_(series_uids)))
    return sorted(s.execute(q).scalars())


def input_hash(sop_uids: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(sop_uids)).encode()).hexdigest()


def decide(s: Session, cfg: Config, study: Study) -> Decision:
    """Match the rules against a stable study and enqueue its ANALYZE job (in ``s``)."""
    rule, verdicts = first_match(cfg.rules, study_info(s, study))
    uid = study.study_instance_uid
    if rule is None:
        study.state = StudyState.STABLE
        return Decision(uid, None, None, "no rule matches", tuple(verdicts))
    series = verdicts[-1].series
    sops = input_set(s, study.id, series)
    digest = input_hash(sops)
    try:
        ref = models.resolve(cfg, rule.model)
        name, version = ref.name, ref.version
    except models.ModelNotFoundError:
        # The worker reports the missing model on the job; key by the rule's model name.
        name, version = rule.model, "unresolved"
    study.rule = rule.name
    done = s.execute(select(Result.id).where(
        Result.study_id == study.id, Result.input_hash == digest, Result.model_name == name,
        Result.model_version == version)).first()
    if done is not None:
        study.state = StudyState.ANALYSED
        return Decision(uid, rule.name, None, "already analysed with this input and model",
                        tuple(verdicts))
    job = jobs.enqueue(
        s, JobKind.ANALYZE, study_id=study.id,
        payload={"rule": rule.name, "model": rule.model, "series": list(series),
                 "input_hash": digest, "instances": len(sops)},
        max_attempts=3, dedupe_key=f"analyze:{uid}:{digest}:{name}:{version}")
    study.state = StudyState.QUEUED if job is not None else study.state
    if job is None:
        return Decision(uid, rule.name, None, "an identical analysis is already queued",
                        tuple(verdicts))
    return Decision(uid, rule.name, job.id, f"queued ANALYZE job {job.id}", tuple(verdicts))


def stable_studies(s: Session, cfg: Config) -> list[Study]:
    """RECEIVING studies whose quiet time has passed (per-modality waits applied)."""
    a = cfg.assembly
    shortest = min([a.stable_after_s, *a.modality_stable_after_s.values()])
    now = clock.now()
    candidates = s.execute(select(Study).where(
        Study.state == StudyState.RECEIVING,
        Study.last_received_at <= now - timedelta(seconds=shortest))
        .order_by(Study.last_received_at)).scalars().all()
    out = []
    for study in candidates:
        mods = set(s.execute(select(Series.modality).where(Series.study_id == study.id))
                   .scalars()) - {None}
        wait = a.stable_after({m for m in mods if m})
        if study.last_received_at <= now - timedelta(seconds=wait):
            out.append(study)
    return out


def run_once(db: Database, cfg: Config) -> list[Decision]:
    """One pass of the assembler: decide every stable study, each in its own transaction."""
    with db.read() as s:
        seen = [(st.id, st.last_received_at) for st in stable_studies(s, cfg)]
    decisions = []
    for study_id, last in seen:
        with db.write() as s:
            study = s.get(Study, study_id, with_for_update=True)  # vs. a receiver
            if (study is None or study.state != StudyState.RECEIVING
                    or study.last_received_at != last):
                continue  # purged, decided, or an instance arrived since the read
            d = decide(s, cfg, study)
        log.info("study %s stable: %s%s", d.study_uid, d.reason,
                 f" (rule {d.rule})" if d.rule else "")
        decisions.append(d)
    return decisions
