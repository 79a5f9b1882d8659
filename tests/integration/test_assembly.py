"""Study assembly: a received study becomes stable once and queues one ANALYZE job; re-sending it
queues nothing, growing it queues a new analysis, and a study no rule wants is only stored.

The network tests run a whole node on loopback; the timing rules (per-modality waits) and the
rule reasons are checked with the frozen clock and direct catalogue inserts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import CTImageStorage, generate_uid
from sqlalchemy import select

import node.assembly
from node.assembly import input_hash, run_once
from node.config import Config, load_config
from node.errors import ConfigError
from node.rules import SeriesInfo, StudyInfo, evaluate, first_match
from storage import catalog
from storage.db import Database
from storage.files import StoredFile
from storage.models import Job, JobKind, JobStatus, Study, StudyState
from tests.conftest import NODE_AE, TEST_MODEL, FrozenClock, RunningNode
from tests.dicomgen import ct_series, multi_series_study, write_all
from tests.peers import storescu, wait_for

NodeFactory = Callable[..., RunningNode]


# -- helpers -------------------------------------------------------------------------------


class Passes:
    """Counts finished assembler passes, to wait until one has run start to end after a point."""

    def __init__(self) -> None:
        self.count = 0

    def wait_for_a_full_pass(self) -> None:
        target = self.count + 2  # the pass in progress may have read the database before now
        wait_for(lambda: self.count >= target, 10, what="a full assembler pass")


@pytest.fixture
def passes(monkeypatch: pytest.MonkeyPatch) -> Passes:
    counter = Passes()
    real = node.assembly.run_once

    def counting(db: Database, cfg: Config) -> list[node.assembly.Decision]:
        try:
            return real(db, cfg)
        finally:
            counter.count += 1

    monkeypatch.setattr(node.assembly, "run_once", counting)
    return counter


def analyze_jobs(db: Database, study_uid: str) -> list[Job]:
    with db.read() as s:
        return list(s.execute(
            select(Job).join(Study, Job.study_id == Study.id)
            .where(Study.study_instance_uid == study_uid, Job.kind == JobKind.ANALYZE)
            .order_by(Job.id)).scalars())


def study_state(db: Database, study_uid: str) -> StudyState | None:
    with db.read() as s:
        return s.execute(select(Study.state).where(Study.study_instance_uid == study_uid)
                         ).scalar_one_or_none()


def send_with_storescu(node_: RunningNode, folder: Path, expected: int) -> None:
    done = storescu(node_.host, node_.port, [folder], called_aet=NODE_AE)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (done.stdout + done.stderr).count("Received Store Response (Success)") == expected


# -- over the network ----------------------------------------------------------------------


@pytest.mark.integration
def test_multi_series_study_queues_one_job_and_a_resend_queues_nothing(
        node_service: NodeFactory, passes: Passes, tmp_path: Path) -> None:
    node_ = node_service(assembly={"stable_after_s": 1.0})  # no gap inside one send is this long
    study = multi_series_study(3, 40, rows=32, cols=32)
    uid = study[0].StudyInstanceUID
    write_all(study, tmp_path / "study")

    send_with_storescu(node_, tmp_path / "study", 120)
    wait_for(lambda: study_state(node_.db, uid) == StudyState.QUEUED, 20,
             what="the study to be queued")

    (job,) = analyze_jobs(node_.db, uid)
    assert job.status == JobStatus.QUEUED
    assert job.payload["instances"] == 120
    assert sorted(job.payload["series"]) == sorted({ds.SeriesInstanceUID for ds in study})
    assert job.payload["input_hash"] == input_hash([ds.SOPInstanceUID for ds in study])
    assert job.dedupe_key is not None and job.dedupe_key.endswith(f":{TEST_MODEL}:unresolved")

    send_with_storescu(node_, tmp_path / "study", 120)  # the same study again
    passes.wait_for_a_full_pass()

    assert [j.id for j in analyze_jobs(node_.db, uid)] == [job.id]
    assert study_state(node_.db, uid) == StudyState.QUEUED
    assert node_.instance_count() == 120


@pytest.mark.integration
def test_a_study_that_grows_after_its_job_is_analysed_again(node_service: NodeFactory,
                                                            tmp_path: Path) -> None:
    node_ = node_service()
    uid = generate_uid()
    first = ct_series(10, study_uid=uid, rows=16, cols=16, series_number=1)
    more = ct_series(5, study_uid=uid, rows=16, cols=16, series_number=2)
    write_all(first, tmp_path / "first")
    write_all(more, tmp_path / "more")

    send_with_storescu(node_, tmp_path / "first", 10)
    wait_for(lambda: len(analyze_jobs(node_.db, uid)) == 1, 20, what="the first job")
    send_with_storescu(node_, tmp_path / "more", 5)
    wait_for(lambda: len(analyze_jobs(node_.db, uid)) == 2, 20, what="the second job")

    old, new = analyze_jobs(node_.db, uid)
    assert old.payload["instances"] == 10 and new.payload["instances"] == 15
    assert new.payload["input_hash"] == input_hash([ds.SOPInstanceUID for ds in first + more])
    assert new.payload["input_hash"] != old.payload["input_hash"]
    assert new.status == JobStatus.QUEUED
    wait_for(lambda: study_state(node_.db, uid) == StudyState.QUEUED, 10,
             what="the study to be queued")


@pytest.mark.integration
def test_a_study_no_rule_matches_is_stable_without_a_job(node_service: NodeFactory,
                                                         tmp_path: Path) -> None:
    node_ = node_service()
    series = ct_series(6, rows=16, cols=16, modality="MR")  # the rules want CT or CR
    uid = series[0].StudyInstanceUID
    write_all(series, tmp_path / "mr")

    send_with_storescu(node_, tmp_path / "mr", 6)
    wait_for(lambda: study_state(node_.db, uid) == StudyState.STABLE, 20,
             what="the study to be stable")

    assert analyze_jobs(node_.db, uid) == []  # decided in the transaction that set STABLE
    with node_.db.read() as s:
        assert s.execute(select(Job)).first() is None


# -- timing, with the frozen clock -----------------------------------------------------------


def unit_config(tmp_path: Path, **assembly: Any) -> Config:
    return Config.model_validate({
        "assembly": {"stable_after_s": 10, **assembly},
        "inference": {"models_dir": str(tmp_path / "models"), "workers": 0},
        "rules": [{"name": "ct-cr", "model": TEST_MODEL,
                   "match": {"modality": ["CT", "CR"]}}],
    })


def receive(db: Database, modality: str, study_uid: str | None = None) -> str:
    """Catalogue one instance as the receiver would (the file itself does not matter here)."""
    study_uid = study_uid or generate_uid()
    sop = generate_uid()
    meta = catalog.InstanceMeta(study_uid=study_uid, series_uid=generate_uid(),
                                sop_instance_uid=sop, sop_class_uid=CTImageStorage,
                                transfer_syntax_uid="1.2.840.10008.1.2.1", sha256="0" * 64,
                                modality=modality)
    with db.write() as s:
        catalog.record_instance(s, meta, StoredFile(path=f"instances/00/00/{sop}.dcm", size=1))
    return study_uid


def decided(db: Database, cfg: Config) -> set[str]:
    return {d.study_uid for d in run_once(db, cfg)}


def test_ct_waits_longer_than_cr_with_a_modality_override(db: Database, tmp_path: Path,
                                                          frozen_clock: FrozenClock) -> None:
    cfg = unit_config(tmp_path, modality_stable_after_s={"CT": 30})
    ct, cr = receive(db, "CT"), receive(db, "CR")
    mixed = receive(db, "CR")
    receive(db, "CT", mixed)  # a study holding both waits for the longer

    frozen_clock.advance(9.9)
    assert decided(db, cfg) == set()
    frozen_clock.advance(0.2)
    assert decided(db, cfg) == {cr}
    frozen_clock.advance(19.7)  # 29.8 s
    assert decided(db, cfg) == set()
    frozen_clock.advance(0.3)
    assert decided(db, cfg) == {ct, mixed}
    for uid in (ct, cr, mixed):
        assert study_state(db, uid) == StudyState.QUEUED
        assert len(analyze_jobs(db, uid)) == 1


def test_an_instance_arriving_restarts_the_quiet_time(db: Database, tmp_path: Path,
                                                      frozen_clock: FrozenClock) -> None:
    cfg = unit_config(tmp_path)
    uid = receive(db, "CT")
    frozen_clock.advance(8)
    receive(db, "CT", uid)
    frozen_clock.advance(8)
    assert decided(db, cfg) == set()
    frozen_clock.advance(2)
    assert decided(db, cfg) == {uid}
    (job,) = analyze_jobs(db, uid)
    assert job.payload["instances"] == 2


def test_a_decided_study_that_is_looked_at_again_queues_nothing(db: Database, tmp_path: Path,
                                                                frozen_clock: FrozenClock) -> None:
    cfg = unit_config(tmp_path)
    uid = receive(db, "CT")
    frozen_clock.advance(11)
    assert decided(db, cfg) == {uid}
    with db.write() as s:  # as if something had sent the study back to RECEIVING, unchanged
        s.execute(select(Study).where(Study.study_instance_uid == uid)).scalar_one().state = \
            StudyState.RECEIVING
    (d,) = run_once(db, cfg)
    assert d.job_id is None and "already queued" in d.reason
    assert len(analyze_jobs(db, uid)) == 1


# -- rule reasons (aidnode rules explain) -------------------------------------------------------


def series(modality: str = "CT", description: str = "Chest 1mm", instances: int = 40,
           uid: str = "1.2.3.1") -> SeriesInfo:
    return SeriesInfo(uid=uid, modality=modality, body_part="CHEST",
                      series_description=description, sop_class_uid=CTImageStorage,
                      image_type="ORIGINAL\\PRIMARY\\AXIAL", instances=instances)


def study(*members: SeriesInfo, description: str = "CT chest") -> StudyInfo:
    return StudyInfo(uid="1.2.3", study_description=description, calling_ae="MODALITY",
                     called_ae=NODE_AE, series=members)


def rule(name: str = "r", **match: Any) -> Any:
    return Config.model_validate({"rules": [{"name": name, "model": TEST_MODEL,
                                             "match": match}]}).rules[0]


def test_rule_reasons_name_a_modality_mismatch() -> None:
    v = evaluate(rule(modality=["CR"]), study(series("CT")))
    assert not v.matched
    assert v.series == ()
    assert any("Modality 'CT' not in ['CR']" in r for r in v.reasons)
    assert "no series matches" in v.reasons


def test_rule_reasons_name_a_description_that_does_not_match() -> None:
    v = evaluate(rule(study_description="^MR "), study(series()))
    assert not v.matched
    assert any("StudyDescription 'CT chest' !~ /^MR /" in r for r in v.reasons)
    v = evaluate(rule(series_description="lung"), study(series(description="Chest 1mm")))
    assert not v.matched
    assert any("SeriesDescription 'Chest 1mm' !~ /lung/" in r for r in v.reasons)


def test_rule_reasons_name_min_instances() -> None:
    v = evaluate(rule(min_instances=50), study(series(instances=40)))
    assert not v.matched
    assert any("40 instances selected, fewer than min_instances 50" in r for r in v.reasons)
    assert evaluate(rule(min_instances=40), study(series(instances=40))).matched


def test_the_first_matching_rule_wins_and_selects_its_series() -> None:
    info = study(series("CT", uid="1.1"), series("CR", description="PA", uid="1.2"))
    chosen, verdicts = first_match([rule("mr", modality=["MR"]), rule("cr", modality=["CR"]),
                                    rule("any")], info)
    assert chosen is not None and chosen.name == "cr"
    assert [v.rule for v in verdicts] == ["mr", "cr"]
    assert verdicts[-1].series == ("1.2",)
    assert verdicts[-1].reasons[0] == "selects 1 series, 40 instances"


def test_an_invalid_description_regex_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[[rules]]\nname = "bad"\n[rules.match]\nstudy_description = "CT("\n')
    with pytest.raises(ConfigError, match=r"rules\.0\.match\.study_description"):
        load_config(path, environ={})
