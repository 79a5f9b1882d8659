"""The first `serve` trains the demo model for minutes: the log shows it moving."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import inference.train
from node import service
from node.config import Config


def test_training_the_demo_model_logs_ten_progress_lines(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    cfg = Config.model_validate({
        "inference": {"models_dir": str(tmp_path / "models"), "demo_steps": 700},
        "rules": [{"name": "r", "model": "demo", "match": {"modality": ["CR"]}}]})
    seen: dict[str, Any] = {}

    def fake_build(folder: Path, *, steps: int, seed: int, progress: Any) -> str:
        seen["steps"] = steps
        for step in range(1, steps + 1):
            progress(step, steps, 1.0 / step)
        return "trained"

    monkeypatch.setattr(inference.train, "build_demo_package", fake_build)
    with caplog.at_level(logging.INFO, logger="node.service"):
        service.ensure_models(cfg)
    lines = [r.getMessage() for r in caplog.records if "training the demo model" in r.getMessage()]
    assert seen["steps"] == 700
    assert len(lines) == 10
    assert lines[0] == "training the demo model: step 70 of 700 (10%), loss 0.014"
    assert lines[-1] == "training the demo model: step 700 of 700 (100%), loss 0.001"


def test_no_rule_naming_the_demo_model_trains_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = Config.model_validate({"inference": {"models_dir": str(tmp_path / "models")},
                                 "rules": [{"name": "r", "model": "other",
                                            "match": {"modality": ["CR"]}}]})

    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("trained although no rule names the demo model")

    monkeypatch.setattr(inference.train, "build_demo_package", refuse)
    service.ensure_models(cfg)


def test_the_service_trains_in_a_process_of_its_own(tmp_path: Path) -> None:
    """``serve`` trains in a spawned process: the package appears, the training's log lines
    come out as the service's, and the calling process never imports the training code (nor
    keeps its memory). A fresh interpreter runs the call, so this test's own imports do not
    count; 2 steps keep it short."""
    script = f"""
import sys
from node import logging as node_logging, service
from node.config import Config
node_logging.setup("INFO")
cfg = Config.model_validate({{
    "inference": {{"models_dir": {str(tmp_path / "models")!r}, "demo_steps": 2}},
    "rules": [{{"name": "r", "model": "demo", "match": {{"modality": ["CR"]}}}}]}})
service.ensure_models(cfg, in_process=False)
print("imported:", sorted(m for m in ("inference.train", "torch") if m in sys.modules))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "imported: []"
    assert "training the demo model: step 2 of 2 (100%)" in run.stderr
    assert "demo model ready" in run.stderr
    assert (tmp_path / "models" / "demo" / "model.json").is_file()
