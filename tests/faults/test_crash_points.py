"""``aidnode serve`` killed at each crash point (``storage.faults``), then restarted.

Each test runs the node as a subprocess with ``AIDNODE_CRASH_AT`` set, sends a study, waits for
the process to die of SIGKILL at that point, looks at what the crash left (proving it struck
where it claims), restarts the node without the variable and checks what a user would: every
instance answered Success is stored, the store and the database agree (no orphan file, no
partial file, no row without its file), the study is analysed once and every result object
reaches the PACS once.

The receiver points use a stand-in PACS that counts every C-STORE it receives, so "once" is
exact. After a crash between the PACS's acknowledgement and the node's record, the node sends
that object again (delivery is at-least-once, DESIGN §3); that test uses Orthanc, which keeps
one copy per SOP Instance UID, and checks one copy per UID there and one recorded delivery per
object.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from pydicom import dcmread

from node.standin import StandInPACS
from storage.faults import POINTS
from storage.models import JobKind, JobStatus
from tests.acceptance.test_serve import serve, stop
from tests.faults.nodes import (
    NEVER_STABLE,
    NodeState,
    analysing_config,
    node_folder,
    node_state,
    send_until_gone,
)
from tests.integration.test_pipeline import write_study
from tests.peers import orthanc, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RECEIVER_POINTS = ("store.after_write", "store.after_fsync", "store.after_rename",
                   "scp.after_commit")
N_IMAGES = 4
CRASH_ON = 3  # the third instance of the study
LEASE_S = 3600.0  # never runs out in a test: a restart re-queues the jobs it left RUNNING
ANALYSIS_TIMEOUT_S = 240.0
ANALYZE, DELIVER = JobKind.ANALYZE, JobKind.DELIVER
SUCCEEDED, RUNNING = JobStatus.SUCCEEDED, JobStatus.RUNNING



def study(tmp_path: Path) -> tuple[list[Path], set[str]]:
    files = write_study(tmp_path / "study", seed=11, n=N_IMAGES)
    return files, {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}


def delivered(node: NodeState) -> bool:
    jobs = node.jobs(DELIVER)
    return bool(jobs) and all(status == SUCCEEDED for status, _ in jobs)


def assert_received_once(node: NodeState, pacs: StandInPACS) -> None:
    """Every result object reached the PACS exactly once and is recorded as sent once."""
    objects = node.result_objects()
    assert len(objects) == 3  # an SR and a heatmap per present finding (2 labels)
    received = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in pacs.received]
    assert sorted(received) == sorted(objects)
    assert node.deliveries_per_object() == [1] * len(objects)


def test_every_crash_point_has_a_test() -> None:
    assert {*RECEIVER_POINTS, "worker.after_model", "sender.after_ack"} == set(POINTS)


@pytest.mark.parametrize("point", RECEIVER_POINTS)
def test_crash_while_receiving_loses_nothing_acknowledged(
        point: str, tmp_path: Path, untrained_model: Path,
        standin: tuple[StandInPACS, int]) -> None:
    pacs, pacs_port = standin
    folder = node_folder(tmp_path, **analysing_config(untrained_model, pacs_port))
    files, uids = study(tmp_path)
    with node_state(folder) as node:
        # 1. The node dies while storing the third instance.
        crash = {"AIDNODE_CRASH_AT": f"{point}@{CRASH_ON}", **NEVER_STABLE}
        with serve(folder, crash) as proc:
            acked, lost = send_until_gone(node.config, files)
            assert proc.wait(timeout=30) == -signal.SIGKILL
        assert lost and len(acked) == CRASH_ON - 1
        assert acked <= set(node.instances()), "an acknowledged instance was lost"
        # What the crash left, before any recovery, shows where it struck.
        rows, stored = node.instances(), list(node.store.files("instances"))
        if point in ("store.after_write", "store.after_fsync"):
            assert (len(node.parts()), len(stored), len(rows)) == (1, 2, 2)
        elif point == "store.after_rename":
            assert (len(node.parts()), len(stored), len(rows)) == (0, 3, 2)  # one orphan file
        else:  # committed, never answered: stored, and the modality will send it again
            assert (len(node.parts()), len(stored), len(rows)) == (0, 3, 3)

        # 2. Restarted: recovered before the first association; the modality sends it all again.
        with serve(folder, NEVER_STABLE) as proc:
            node.assert_consistent()
            assert acked <= set(node.instances())
            again, lost = send_until_gone(node.config, files)
            assert (again, lost) == (uids, False)
            assert set(node.instances()) == uids
            node.assert_consistent()
            stop(proc, folder)

        # 3. Quiet time as configured: analysed once, every result delivered once.
        with serve(folder) as proc:
            wait_for(lambda: delivered(node), ANALYSIS_TIMEOUT_S, what="analysis and delivery")
            stop(proc, folder)
        assert node.jobs(ANALYZE) == [(SUCCEEDED, 1)]
        assert node.results() == 1
        assert_received_once(node, pacs)
        node.assert_consistent()


def test_crash_after_the_model_ran_publishes_one_result(
        tmp_path: Path, untrained_model: Path, standin: tuple[StandInPACS, int]) -> None:
    pacs, pacs_port = standin
    folder = node_folder(tmp_path, **analysing_config(untrained_model, pacs_port,
                                                      inference={"lease_s": LEASE_S}))
    files, uids = study(tmp_path)
    with node_state(folder) as node:
        with serve(folder, {"AIDNODE_CRASH_AT": "worker.after_model"}) as proc:
            acked, lost = send_until_gone(node.config, files)
            assert (acked, lost) == (uids, False)
            assert proc.wait(timeout=ANALYSIS_TIMEOUT_S) == -signal.SIGKILL
        # The model ran and its objects are on disk; nothing was published or sent.
        assert node.jobs(ANALYZE) == [(RUNNING, 1)]
        assert node.results() == 0 and node.result_objects() == {}
        assert len(list(node.store.files("results"))) == 3
        assert pacs.received == []

        # Restarted: the orphans go, the job is re-queued at once (its lease is an hour), runs
        # again and publishes once.
        with serve(folder) as proc:
            wait_for(lambda: delivered(node), ANALYSIS_TIMEOUT_S, what="analysis and delivery")
            stop(proc, folder)
        assert node.jobs(ANALYZE) == [(SUCCEEDED, 2)]
        assert any("the node restarted; requeued" in m for m in node.job_messages(ANALYZE))
        assert node.results() == 1
        assert set(node.instances()) == uids
        assert_received_once(node, pacs)
        node.assert_consistent()


def test_crash_after_the_pacs_acknowledged_keeps_one_copy_per_uid(
        tmp_path: Path, untrained_model: Path) -> None:
    with orthanc(tmp_path / "orthanc", aet="PACS") as pacs:
        folder = node_folder(tmp_path, **analysing_config(untrained_model, pacs.dicom_port,
                                                          inference={"lease_s": LEASE_S}))
        files, uids = study(tmp_path)
        study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        with node_state(folder) as node:
            with serve(folder, {"AIDNODE_CRASH_AT": "sender.after_ack"}) as proc:
                acked, lost = send_until_gone(node.config, files)
                assert (acked, lost) == (uids, False)
                assert proc.wait(timeout=ANALYSIS_TIMEOUT_S) == -signal.SIGKILL
            # The PACS holds the first object; the node has not recorded sending it.
            assert node.jobs(ANALYZE) == [(SUCCEEDED, 1)]
            assert node.jobs(DELIVER) == [(RUNNING, 1)]
            assert node.deliveries_per_object() == [0, 0, 0]
            assert len(pacs.instances_in_study(study_uid)) == 1

            # Restarted: the delivery is re-queued at once and completes; the unrecorded
            # object goes again, and Orthanc keeps one copy of it.
            with serve(folder) as proc:
                wait_for(lambda: delivered(node), ANALYSIS_TIMEOUT_S, what="the delivery")
                stop(proc, folder)
            assert node.jobs(ANALYZE) == [(SUCCEEDED, 1)]  # the model did not run again
            assert node.jobs(DELIVER) == [(SUCCEEDED, 2)]
            assert any("the node restarted; requeued" in m for m in node.job_messages(DELIVER))
            assert node.results() == 1
            objects = node.result_objects()
            assert node.deliveries_per_object() == [1] * len(objects) == [1, 1, 1]
            in_pacs = [pacs.rest(f"/instances/{oid}")["MainDicomTags"]["SOPInstanceUID"]
                       for oid in pacs.instances_in_study(study_uid)]
            assert sorted(in_pacs) == sorted(objects)
            node.assert_consistent()
