"""The worker's warm-up: the rules' models are loaded before the first job, nothing is kept."""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import pytest
from sqlalchemy import func, select

from node.config import Config
from node.metrics import Metrics
from node.worker import Analyzer
from storage.db import Database
from storage.files import FileStore
from storage.models import Job, Result, ResultObject


def config(models_dir: Path, *rule_models: str) -> Config:
    return Config.model_validate({
        "inference": {"models_dir": str(models_dir), "device": "cpu"},
        "rules": [{"name": f"r{i}", "model": m, "match": {"modality": ["CR"]}}
                  for i, m in enumerate(rule_models)]})


def counted_findings(metrics: Metrics) -> float:
    return sum(sample.value for metric in metrics.findings.collect()
               for sample in metric.samples if sample.name.endswith("_total"))


def test_warm_up_loads_each_rule_model_once_and_keeps_nothing(
        untrained_model: Path, db: Database, store: FileStore,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="node.worker")
    metrics = Metrics()
    # Two rules name one model, spelled two ways (paths, as rules may name models): it is
    # loaded once.
    worker = Analyzer(config(untrained_model.parent, str(untrained_model),
                             f"{untrained_model}/"), db, store, metrics)
    assert gc.get_freeze_count() == 0
    worker.warm_up()
    assert len(worker._predictors) == 1
    assert len([r for r in caplog.records if "loaded on" in r.getMessage()]) == 1
    assert len([r for r in caplog.records if "warmed up" in r.getMessage()]) == 2
    # What the model and its libraries left alive is exempt from later collections.
    assert gc.get_freeze_count() > 10_000
    # The throwaway result went nowhere: no file, no row, no finding counted.
    assert list(store.files("results")) == []
    with db.read() as s:
        for model in (Job, Result, ResultObject):
            assert s.execute(select(func.count()).select_from(model)).scalar_one() == 0
    assert counted_findings(metrics) == 0
    # The first job finds the model loaded: run_once does not warm up again.
    loads = [r for r in caplog.records if "loaded on" in r.getMessage()]
    assert worker.run_once() is False  # no job queued
    assert [r for r in caplog.records if "loaded on" in r.getMessage()] == loads


def test_a_model_that_cannot_be_loaded_is_reported_and_the_worker_goes_on(
        tmp_path: Path, db: Database, store: FileStore,
        caplog: pytest.LogCaptureFixture) -> None:
    worker = Analyzer(config(tmp_path / "models", "absent"), db, store, Metrics())
    worker.warm_up()
    assert worker._predictors == {}
    assert any("could not warm up model 'absent'" in r.getMessage()
               and r.levelno == logging.WARNING for r in caplog.records)
    assert worker.run_once() is False


def test_warm_up_can_be_turned_off(untrained_model: Path, db: Database,
                                   store: FileStore) -> None:
    cfg = config(untrained_model.parent, str(untrained_model))
    cfg = cfg.model_copy(update={"inference": cfg.inference.model_copy(
        update={"warm_up": False})})
    worker = Analyzer(cfg, db, store, Metrics())
    assert worker.run_once() is False
    assert worker._predictors == {}
