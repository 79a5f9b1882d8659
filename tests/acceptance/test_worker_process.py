"""``aidnode serve`` with its worker in a child process (``inference.separate_process``, the
default): the study flows through both processes, a worker that dies is started again and its
job runs once more at once (not when its lease runs out), the child's metrics are served on the
parent's port, SIGTERM stops both, and ``kill -9`` of the parent leaves no worker behind.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.standin import StandInPACS
from storage import registry
from storage.models import JobKind, JobStatus
from tests.acceptance.test_serve import last_log, serve, stop
from tests.conftest import NODE_AE
from tests.faults.nodes import (
    NodeState,
    analysing_config,
    node_folder,
    node_state,
    process_state,
    send_until_gone,
    stat_fields,
)
from tests.faults.test_crash_points import assert_received_once, delivered, study
from tests.integration.test_metrics import samples
from tests.peers import free_port, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ANALYSIS_TIMEOUT_S = 240.0
LONG_LEASE_S = 3600.0  # a job re-queued in the test was re-queued by the parent, not by a lease



def child_config(tmp_path: Path, model: Path, pacs_port: int, metrics_port: int) -> Path:
    return node_folder(tmp_path, **analysing_config(
        model, pacs_port, inference={"separate_process": True, "lease_s": LONG_LEASE_S},
        metrics={"enabled": True, "port": metrics_port}))


def workers(node: NodeState) -> list[int]:
    """The pids of the live worker processes in the registry."""
    with node.db.read() as s:
        return [n.pid for n in registry.live(s) if n.role == "worker"]


def test_a_worker_process_that_dies_is_started_again_and_its_job_runs_once(
        tmp_path: Path, untrained_model: Path, standin: tuple[StandInPACS, int]) -> None:
    pacs, pacs_port = standin
    metrics_port = free_port()
    folder = child_config(tmp_path, untrained_model, pacs_port, metrics_port)
    files, uids = study(tmp_path)
    with node_state(folder) as node:
        # The crash point arms only the first child: it dies after the model ran.
        with serve(folder, {"AIDNODE_CRASH_AT": "worker.after_model"}) as proc:
            assert send_until_gone(node.config, files) == (uids, False)
            wait_for(lambda: delivered(node), ANALYSIS_TIMEOUT_S, what="analysis and delivery")
            log = last_log(folder).read_text()
            assert "died (killed by SIGKILL); re-queued its job(s) [1]" in log
            assert proc.poll() is None  # receiving went on: only the child died
            assert node.jobs(JobKind.ANALYZE) == [(JobStatus.SUCCEEDED, 2)]
            assert any(m.endswith("died; requeued") for m in node.job_messages(JobKind.ANALYZE))
            assert node.results() == 1
            assert_received_once(node, pacs)

            # One registry row for the new child, a child of `serve`.
            (child,) = workers(node)
            assert int(stat_fields(child)[1]) == proc.pid  # its parent
            # The parent's endpoint serves the child's series beside its own, each once. The
            # child counts its job after the commit that queued the deliveries: wait for it.
            succeeded = ("aidnode_jobs_total", (("kind", "ANALYZE"), ("outcome", "succeeded")))
            wait_for(lambda: samples(metrics_port).get(succeeded, 0) >= 1, 30,
                     what="the child's count of its job")
            got = samples(metrics_port)
            assert got[("aidnode_instances_received_total", (("outcome", "new"),))] == len(uids)
            assert got[succeeded] == 1
            assert got[("aidnode_inference_seconds_count",
                        (("model", "test-untrained"), ("version", "0.0.1")))] == 1
            assert got[("aidnode_worker_restarts_total", ())] == 1

            stop(proc, folder)  # SIGTERM: exit 0, and the child went with it
        assert process_state(child) == ""
        assert workers(node) == []
        node.assert_consistent()


def test_kill_9_of_serve_takes_its_worker_process_with_it(
        tmp_path: Path, untrained_model: Path, standin: tuple[StandInPACS, int]) -> None:
    """Even a child frozen mid-job (SIGSTOP after the model ran), which cannot notice that its
    parent's end of the link closed: the kernel kills it (``PR_SET_PDEATHSIG``), so no worker
    is left to publish into a node that restarted and recovered without it."""
    _pacs, pacs_port = standin
    folder = child_config(tmp_path, untrained_model, pacs_port, free_port())
    files, uids = study(tmp_path)
    child = 0
    try:
        with node_state(folder) as node, \
                serve(folder, {"AIDNODE_CRASH_AT": "worker.after_model:SIGSTOP"}) as proc:
            assert send_until_gone(node.config, files) == (uids, False)
            wait_for(lambda: len(workers(node)) == 1, 60, what="the worker process to register")
            (child,) = workers(node)
            wait_for(lambda: process_state(child) == "T", ANALYSIS_TIMEOUT_S,
                     what="the worker to freeze after the model ran")
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            wait_for(lambda: process_state(child) in ("", "Z"), 10,
                     what="the frozen worker process to die with its parent")
    finally:
        if child and process_state(child) not in ("", "Z"):
            os.kill(child, signal.SIGKILL)


def test_sigterm_to_both_processes_at_once_is_a_stop_not_a_death(
        tmp_path: Path, untrained_model: Path, standin: tuple[StandInPACS, int]) -> None:
    """What systemd without ``KillMode=mixed``, or Ctrl-C in a terminal, does: the signal
    reaches the child too. The child stops; the parent must not take that for a crash.

    An association held open keeps the parent draining (it waits for associations in
    progress before it stops its stages), so the child is gone first, every time."""
    _pacs, pacs_port = standin
    folder = child_config(tmp_path, untrained_model, pacs_port, free_port())
    with node_state(folder) as node, serve(folder) as proc:
        wait_for(lambda: len(workers(node)) == 1, 60, what="the worker process to register")
        (child,) = workers(node)
        ae = AE("MODALITY")
        ae.add_requested_context(Verification)
        assoc = ae.associate(node.config.node.host, node.config.node.port, ae_title=NODE_AE)
        assert assoc.is_established
        try:
            os.kill(child, signal.SIGTERM)
            os.kill(proc.pid, signal.SIGTERM)
            wait_for(lambda: process_state(child) in ("", "Z"), 30, what="the child to stop")
            time.sleep(0.5)  # where the parent, had it taken that for a death, would say so
        finally:
            assoc.release()
        assert proc.wait(timeout=60) == 0
    log = last_log(folder).read_text()
    assert f"worker process {child} exited (exit code 0)" in log
    assert "died" not in log and "again" not in log
