"""Routing rules (DESIGN §6): which stable study is analysed, on which series, by which model.

Rules are evaluated in order and the first match wins. Study-level criteria (StudyDescription,
calling and called AE) apply to the study; series-level criteria (Modality, BodyPartExamined,
SOPClassUID, SeriesDescription, ImageType) select the series to analyse; the instance-count limits
apply to the selected series together. ``explain`` returns the reasons for every rule, for
``aidnode rules explain``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from node.config import RuleConfig, RuleMatch


@dataclass(frozen=True)
class SeriesInfo:
    uid: str
    modality: str | None
    body_part: str | None
    series_description: str | None
    sop_class_uid: str | None
    image_type: str | None
    instances: int


@dataclass(frozen=True)
class StudyInfo:
    uid: str
    study_description: str | None
    calling_ae: str | None
    called_ae: str | None
    series: tuple[SeriesInfo, ...]


@dataclass(frozen=True)
class RuleVerdict:
    rule: str
    matched: bool
    reasons: tuple[str, ...]
    series: tuple[str, ...] = field(default_factory=tuple)  # selected series UIDs


def _regex(pattern: str | None, value: str | None) -> bool:
    return pattern is None or re.search(pattern, value or "", re.IGNORECASE) is not None


def _series_fails(m: RuleMatch, s: SeriesInfo) -> list[str]:
    why = []
    if m.modality and (s.modality or "") not in m.modality:
        why.append(f"Modality {s.modality!r} not in {m.modality}")
    if not _regex(m.body_part, s.body_part):
        why.append(f"BodyPartExamined {s.body_part!r} !~ /{m.body_part}/")
    if m.sop_class_uid and (s.sop_class_uid or "") not in m.sop_class_uid:
        why.append(f"SOPClassUID {s.sop_class_uid} not allowed")
    if not _regex(m.series_description, s.series_description):
        why.append(f"SeriesDescription {s.series_description!r} !~ /{m.series_description}/")
    if m.image_type and m.image_type.upper() not in (s.image_type or "").upper().split("\\"):
        why.append(f"ImageType {s.image_type!r} lacks {m.image_type!r}")
    return why


def evaluate(rule: RuleConfig, study: StudyInfo) -> RuleVerdict:
    """Whether ``rule`` matches ``study``, which series it selects, and why."""
    m = rule.match
    reasons: list[str] = []
    if not _regex(m.study_description, study.study_description):
        reasons.append(f"StudyDescription {study.study_description!r} "
                       f"!~ /{m.study_description}/")
    if m.calling_ae and study.calling_ae not in m.calling_ae:
        reasons.append(f"calling AE {study.calling_ae!r} not in {m.calling_ae}")
    if m.called_ae and study.called_ae not in m.called_ae:
        reasons.append(f"called AE {study.called_ae!r} not in {m.called_ae}")
    selected = []
    for s in study.series:
        fails = _series_fails(m, s)
        if fails:
            reasons.append(f"series {s.uid}: " + "; ".join(fails))
        else:
            selected.append(s)
    if not selected:
        reasons.append("no series matches")
    count = sum(s.instances for s in selected)
    if selected and count < m.min_instances:
        reasons.append(f"{count} instances selected, fewer than min_instances {m.min_instances}")
    if selected and m.max_instances is not None and count > m.max_instances:
        reasons.append(f"{count} instances selected, more than max_instances {m.max_instances}")
    study_level_ok = not any(not r.startswith("series ") for r in reasons)
    matched = bool(selected) and study_level_ok
    if matched:
        reasons.insert(0, f"selects {len(selected)} series, {count} instances")
    return RuleVerdict(rule=rule.name, matched=matched, reasons=tuple(reasons),
                       series=tuple(s.uid for s in selected) if matched else ())


def first_match(rules: list[RuleConfig], study: StudyInfo) -> tuple[RuleConfig | None,
                                                                     list[RuleVerdict]]:
    """The first matching rule (or None) and the verdicts up to and including it."""
    verdicts = []
    for rule in rules:
        v = evaluate(rule, study)
        verdicts.append(v)
        if v.matched:
            return rule, verdicts
    return None, verdicts
