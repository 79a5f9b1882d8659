"""The shipped systemd unit keeps its contract (DESIGN.md §9) and its sandbox."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "aidnode.service"
MAX_EXPOSURE = 2.5
NVIDIA_NODES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")


def _service() -> dict[str, list[str]]:
    """Return the [Service] section as key -> every value, in order.

    A small parser rather than configparser: systemd keys repeat (DeviceAllow=, Environment=)
    and each repetition adds a value, which configparser would collapse to the last one.
    """
    section = ""
    values: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif section == "Service":
            key, sep, value = line.partition("=")
            assert sep, f"not a key=value line in {UNIT.name}: {raw!r}"
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def _one(service: dict[str, list[str]], key: str) -> str:
    assert key in service, f"{key}= missing from {UNIT.name}"
    return service[key][-1]


def test_unit_is_a_notify_service_with_watchdog_and_restart() -> None:
    service = _service()
    assert _one(service, "Type") == "notify"
    assert _one(service, "NotifyAccess") == "main"
    assert int(_one(service, "WatchdogSec")) > 0
    assert _one(service, "Restart") == "on-failure"
    assert _one(service, "KillSignal") == "SIGTERM"
    assert _one(service, "KillMode") == "mixed"  # serve stops its worker process itself
    assert _one(service, "ExecStart").endswith("aidnode --config /etc/aidnode/config.toml serve")


def test_unit_runs_as_dedicated_user_with_only_its_state_directory_writable() -> None:
    service = _service()
    assert _one(service, "User") == "aidnode"
    assert _one(service, "StateDirectory") == "aidnode"
    assert _one(service, "ProtectSystem") == "strict"
    assert _one(service, "NoNewPrivileges") == "yes"
    assert _one(service, "CapabilityBoundingSet") == ""
    env = service["Environment"]
    assert "AIDNODE_STORAGE__ROOT=/var/lib/aidnode/store" in env
    assert "AIDNODE_DATABASE__URL=sqlite:////var/lib/aidnode/aidnode.db" in env
    assert "ReadWritePaths" not in service


def test_unit_lets_the_model_leave_sched_idle_at_the_default_niceness() -> None:
    """``scheduling = "adaptive"`` needs RLIMIT_NICE >= 20 - nice to move the model back out
    of SCHED_IDLE (node/priority.py); the unit's limit must cover the default niceness."""
    from node.config import InferenceConfig

    nice = InferenceConfig().nice
    limit = _one(_service(), "LimitNICE")
    assert limit.startswith("+"), "a nice value, not a raw RLIMIT_NICE"
    assert int(limit[1:]) <= nice


def test_unit_allows_exactly_the_nvidia_device_nodes() -> None:
    service = _service()
    assert _one(service, "DevicePolicy") == "closed"
    assert "PrivateDevices" not in service  # it would hide the GPU
    allowed = {tuple(line.split()) for line in service["DeviceAllow"]}
    assert allowed == {(node, "rw") for node in NVIDIA_NODES}


def test_unit_leaves_memory_deny_write_execute_off_for_torch_jit() -> None:
    assert "MemoryDenyWriteExecute" not in _service()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_exposure_is_at_most_2_5() -> None:
    done = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=true",
            "--no-pager",
            f"--threshold={int(MAX_EXPOSURE * 10)}",
            str(UNIT),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", done.stdout)
    assert match, done.stdout + done.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr
