"""An administrator's session: ``aidnode serve`` runs, ``aidnode send`` pushes a study, and
``aidnode status`` / ``studies list`` follow it until the results are sent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from node.standin import StandInPACS
from tests.acceptance.test_serve import serve
from tests.conftest import NODE_AE, node_config_text
from tests.integration.test_pipeline import write_study
from tests.peers import free_port, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def aidnode(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from node.cli import main; main()",
                           "-c", str(config), *args], capture_output=True, text=True,
                          timeout=120, check=False)


def as_json(config: Path, *args: str) -> Any:
    run = aidnode(config, *args, "--json")
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_send_then_watch_until_sent(tmp_path: Path, untrained_model: Path) -> None:
    pacs = StandInPACS(tmp_path / "pacs", ae_title="PACS")
    pacs_port = pacs.start()
    folder = tmp_path / "node"
    folder.mkdir()
    port = free_port()
    config = folder / "config.toml"
    config.write_text(node_config_text(
        port, rules=[{"name": "chest", "model": str(untrained_model), "destinations": ["pacs"],
                      "match": {"modality": ["DX"]}}],
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                       "port": pacs_port}],
        assembly={"stable_after_s": 2, "check_interval_s": 0.1},
        inference={"workers": 1, "models_dir": "models"}), encoding="utf-8")
    try:
        with serve(folder):
            files = write_study(tmp_path / "study", seed=9)
            sent = aidnode(config, "send", str(files[0].parent), "--to",
                           f"{NODE_AE}@127.0.0.1:{port}", "--json")
            assert sent.returncode == 0, sent.stderr
            assert json.loads(sent.stdout)["sent"] == 2
            # While it works: the study is listed (receiving or further along) ...
            studies = as_json(config, "studies", "list")
            assert len(studies) == 1 and studies[0]["instances"] == 2
            status = as_json(config, "status")
            assert set(status["queues"]) == {"ANALYZE", "DELIVER"}
            assert status["studies"] == 1
            # ... and it ends sent, with both objects acknowledged by the PACS.
            wait_for(lambda: as_json(config, "studies", "list")[0]["state"] == "sent", 120,
                     what="the study to be sent")
            shown = as_json(config, "studies", "show", studies[0]["study_uid"])
            kinds = sorted(o["kind"] for o in shown["results"][0]["objects"])
            assert kinds[0] == "SC" and kinds[-1] == "SR"
            assert len(pacs.received) == len(kinds)
            deliveries = as_json(config, "deliveries", "list")
            assert deliveries[0]["status"] == "SUCCEEDED"
            assert deliveries[0]["acknowledged"] == deliveries[0]["objects"] == len(kinds)
            final = as_json(config, "status")
            assert final["queues"]["ANALYZE"]["queued"] == 0
            assert final["queues"]["DELIVER"]["dead"] == 0
    finally:
        pacs.stop()
