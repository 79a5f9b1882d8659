"""The receiver over real associations: what is answered Success is on disk and in the database,
every failure answers its DESIGN §5 status and leaves nothing behind, and the node keeps serving.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from sqlalchemy import select

from node import scp
from node.priority import ReceivingBeacon, beacon_path
from node.status import REJECT_CALLED_AE, REJECT_CALLING_AE, REJECT_TOO_MANY, Status
from storage.files import FileStore
from storage.models import Instance
from tests.conftest import NODE_AE, RunningNode
from tests.dicomgen import ct_series, write_all
from tests.peers import storescu, wait_for

pytestmark = pytest.mark.integration

NodeFactory = Callable[..., RunningNode]


# -- helpers -------------------------------------------------------------------------------


@contextmanager
def association(node: RunningNode, *, calling: str = "SCU", called: str = NODE_AE,
                ) -> Iterator[tuple[Association, list[Any]]]:
    """An association to ``node`` (CT storage, explicit VR LE) and the A-ASSOCIATE answers seen."""
    answers: list[Any] = []

    def on_acse(event: evt.Event) -> None:
        primitive = getattr(event, "primitive", None)  # set for EVT_ACSE_RECV
        if isinstance(primitive, A_ASSOCIATE) and primitive.result is not None:
            answers.append(primitive)

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(node.host, node.port, ae_title=called,
                         evt_handlers=[(evt.EVT_ACSE_RECV, on_acse)])
    try:
        yield assoc, answers
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def send(node: RunningNode, *items: Dataset | Path, calling: str = "SCU") -> list[int]:
    """C-STORE each dataset (or file, sent byte for byte) in one association; the statuses."""
    with association(node, calling=calling) as (assoc, _):
        assert assoc.is_established
        statuses = []
        for item in items:
            rsp = assoc.send_c_store(item)
            assert "Status" in rsp, "no C-STORE response"
            statuses.append(int(rsp.Status))
    return statuses


def rejection(node: RunningNode, **kwargs: str) -> tuple[int, int, int]:
    """Associate and return the A-ASSOCIATE-RJ (result, source, reason); fails if accepted."""
    with association(node, **kwargs) as (assoc, answers):
        assert assoc.is_rejected, "association was not rejected"
    (rj,) = answers
    return int(rj.result), int(rj.result_source), int(rj.diagnostic)


def raw_file(folder: Path, ds: Dataset, *, command_uid: str | None = None,
             body: bytes | None = None) -> Path:
    """A Part 10 file whose meta (which the C-STORE command is built from) names ``command_uid``
    and whose data set is ``ds`` encoded, or ``body`` as it is; send it with ``chunked_send``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(command_uid or ds.SOPInstanceUID)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    if body is None:
        plain = Dataset()
        plain.update(ds)  # the data set without its file meta
        buf = BytesIO()
        dcmwrite(buf, plain, implicit_vr=False, little_endian=True)
        body = buf.getvalue()
    head = DicomBytesIO()
    write_file_meta_info(head, meta, enforce_standard=True)
    path = folder / f"{generate_uid()}.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + head.getvalue() + body)
    return path


@pytest.fixture
def chunked_send(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom sends files as they are (command UIDs from the file meta, bytes undecoded)."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def every_file(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def assert_consistent(node: RunningNode) -> None:
    """Every row's file exists under the store root, and no file lacks a row."""
    paths = node.instance_paths()
    for rel in paths.values():
        assert (node.store.root / rel).is_file(), rel
    assert sorted(node.files()) == sorted(paths.values())
    assert list(node.store.tmp.iterdir()) == []


def assert_still_serving(node: RunningNode) -> None:
    before = node.instance_count()
    (good,) = ct_series(1, rows=16, cols=16)
    assert send(node, good) == [Status.SUCCESS]
    assert good.SOPInstanceUID in node.instance_paths()
    assert node.instance_count() == before + 1
    assert_consistent(node)


# -- stored means on disk and in the database ----------------------------------------------


def test_storescu_series_is_on_disk_and_in_the_database(node_service: NodeFactory,
                                                         tmp_path: Path) -> None:
    node = node_service()
    series = ct_series(20, rows=32, cols=32)
    write_all(series, tmp_path / "send")

    done = storescu(node.host, node.port, [tmp_path / "send"], called_aet=NODE_AE)

    assert done.returncode == 0, done.stdout + done.stderr
    assert (done.stdout + done.stderr).count("Received Store Response (Success)") == 20
    paths = node.instance_paths()
    assert set(paths) == {ds.SOPInstanceUID for ds in series}
    assert node.instance_count() == 20
    assert_consistent(node)


def test_pynetdicom_series_is_on_disk_and_in_the_database(node_service: NodeFactory) -> None:
    node = node_service()
    series = ct_series(20, rows=32, cols=32)

    statuses = send(node, *series)

    assert statuses == [Status.SUCCESS] * 20
    assert set(node.instance_paths()) == {ds.SOPInstanceUID for ds in series}
    assert len(node.files()) == 20
    assert_consistent(node)


def test_receiving_marks_this_hosts_beacon_for_the_worker_process(
        node_service: NodeFactory) -> None:
    """``scheduling = "adaptive"`` (the default): each C-STORE tells this host's worker
    processes, through a file under the storage root, that the host is receiving."""
    node = node_service()
    assert node.config.inference.scheduling == "adaptive"
    beacon = ReceivingBeacon(beacon_path(node.store.root))
    assert beacon.age() == float("inf")  # nothing received yet

    before = time.monotonic()
    assert send(node, *ct_series(2, rows=32, cols=32)) == [Status.SUCCESS] * 2

    assert before <= beacon.stamp() <= time.monotonic()
    beacon.close()

    def open_to_beacon() -> list[str]:
        fds = Path("/proc/self/fd")
        return [fd.name for fd in fds.iterdir()
                if os.path.realpath(fd) == str(beacon_path(node.store.root).resolve())]

    assert len(open_to_beacon()) == 1  # the receiver's
    node.service.stop(grace_s=5)
    assert open_to_beacon() == []  # released at the stop


# -- C-STORE failure statuses (DESIGN §5) ---------------------------------------------------


@pytest.mark.usefixtures("chunked_send")
def test_dataset_uid_differing_from_the_command_is_0xA900(node_service: NodeFactory,
                                                          tmp_path: Path) -> None:
    node = node_service()
    (ds,) = ct_series(1, rows=16, cols=16)
    other = generate_uid()
    path = raw_file(tmp_path, ds, command_uid=other)

    assert send(node, path) == [Status.ERROR_DATASET_MISMATCH]
    assert node.instance_count() == 0
    assert node.files() == []
    assert_still_serving(node)


@pytest.mark.parametrize("missing", ["SOPInstanceUID", "StudyInstanceUID"])
@pytest.mark.usefixtures("chunked_send")
def test_missing_uid_is_0xC210(node_service: NodeFactory, tmp_path: Path, missing: str) -> None:
    node = node_service()
    (ds,) = ct_series(1, rows=16, cols=16)
    command_uid = ds.SOPInstanceUID
    delattr(ds, missing)
    path = raw_file(tmp_path, ds, command_uid=command_uid)

    assert send(node, path) == [Status.ERROR_CANNOT_UNDERSTAND]
    assert node.instance_count() == 0
    assert node.files() == []
    assert_still_serving(node)


@pytest.mark.usefixtures("chunked_send")
def test_undecodable_data_set_is_0xC210(node_service: NodeFactory, tmp_path: Path) -> None:
    node = node_service()
    (ds,) = ct_series(1, rows=16, cols=16)
    # (0008,0016) UI claiming 65535 bytes that are not there, then noise.
    garbage = b"\x08\x00\x16\x00UI\xff\xff" + bytes(range(7, 200))
    path = raw_file(tmp_path, ds, body=garbage)

    assert send(node, path) == [Status.ERROR_CANNOT_UNDERSTAND]
    assert node.instance_count() == 0
    assert node.files() == []
    assert_still_serving(node)


@pytest.mark.usefixtures("chunked_send")
def test_path_like_sop_instance_uid_is_0xC210_and_writes_nothing(node_service: NodeFactory,
                                                                 tmp_path: Path) -> None:
    node = node_service()
    (ds,) = ct_series(1, rows=16, cols=16)
    command_uid = ds.SOPInstanceUID
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):
        ds.SOPInstanceUID = "../../x"  # pydicom warns, and writes it all the same
    path = raw_file(tmp_path, ds, command_uid=command_uid)
    before = every_file(tmp_path)

    assert send(node, path) == [Status.ERROR_CANNOT_UNDERSTAND]
    assert node.instance_count() == 0
    assert node.files() == []
    new = every_file(tmp_path) - before
    assert not [p for p in new if node.store.root not in p.parents]  # nothing outside the store
    assert not any(p.name.startswith("x") for p in every_file(tmp_path.parent))
    assert_still_serving(node)


# -- the checks beside the write -------------------------------------------------------------


def test_the_checks_run_while_the_file_is_written(node_service: NodeFactory,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The checker thread checks the data set while the handler writes its file: each check
    here waits for a write to begin, which can only happen if the two run at once."""
    node = node_service()
    writing = threading.Event()
    write = FileStore.write
    check = scp.check_dataset

    def write_then_wait(store: FileStore, *args: Any, **kwargs: Any) -> Any:
        writing.set()
        return write(store, *args, **kwargs)

    def check_once_writing(*args: Any, **kwargs: Any) -> None:
        if not writing.wait(10):
            raise AssertionError("no file was being written while the data set was checked")
        check(*args, **kwargs)

    monkeypatch.setattr(FileStore, "write", write_then_wait)
    monkeypatch.setattr(scp, "check_dataset", check_once_writing)
    series = ct_series(3, rows=16, cols=16)
    for ds in series:
        writing.clear()
        assert send(node, ds) == [Status.SUCCESS]
    assert set(node.instance_paths()) == {ds.SOPInstanceUID for ds in series}
    assert_consistent(node)


@pytest.mark.usefixtures("chunked_send")
def test_a_refused_data_set_has_its_file_removed_once_written(
        node_service: NodeFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file of a data set the checks refuse is written all the same (beside the checks),
    then removed before the answer: nothing stays in place or in the temporary folder."""
    node = node_service()
    written: list[str] = []
    write = FileStore.write

    def recorded(store: FileStore, *args: Any, **kwargs: Any) -> Any:
        stored = write(store, *args, **kwargs)
        written.append(stored.path)
        return stored

    monkeypatch.setattr(FileStore, "write", recorded)
    (ds,) = ct_series(1, rows=16, cols=16)
    command_uid = ds.SOPInstanceUID
    del ds.StudyInstanceUID

    assert send(node, raw_file(tmp_path, ds, command_uid=command_uid)) == [
        Status.ERROR_CANNOT_UNDERSTAND]
    assert len(written) == 1
    assert not (node.store.root / written[0]).exists()
    assert node.instance_count() == 0
    assert node.files() == []
    assert list(node.store.tmp.iterdir()) == []
    assert_still_serving(node)


@pytest.mark.usefixtures("chunked_send")
def test_a_refused_data_set_is_answered_for_its_refusal_when_the_write_fails_too(
        node_service: NodeFactory, tmp_path: Path) -> None:
    """A data set that both fails its checks and cannot be written (below the free-disk floor)
    is answered 0xC210, as when the checks came before the write, not 0xA700."""
    node = node_service(storage={"min_free_mb": 10**9})
    (ds,) = ct_series(1, rows=16, cols=16)
    command_uid = ds.SOPInstanceUID
    del ds.SOPInstanceUID

    assert send(node, raw_file(tmp_path, ds, command_uid=command_uid)) == [
        Status.ERROR_CANNOT_UNDERSTAND]
    (good,) = ct_series(1, rows=16, cols=16)
    assert send(node, good) == [Status.REFUSED_OUT_OF_RESOURCES]  # the floor still holds
    assert node.instance_count() == 0
    assert node.files() == []
    assert list(node.store.tmp.iterdir()) == []


def test_the_checker_threads_end_with_the_node(node_service: NodeFactory) -> None:
    node = node_service()
    assert send(node, *ct_series(2, rows=16, cols=16)) == [Status.SUCCESS] * 2
    assert any(t.name.startswith("store-check") for t in threading.enumerate())

    node.service.stop(grace_s=5)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("store-check")]


def test_an_association_that_outlives_the_checker_threads_goes_on_storing(
        node_service: NodeFactory) -> None:
    """``Service.stop`` ends the checker threads once its grace period is over; an association
    still open then has its data sets checked in its own thread, and stored as before."""
    node = node_service()
    first, second = ct_series(2, rows=16, cols=16)
    with association(node) as (assoc, _):
        assert int(assoc.send_c_store(first).Status) == Status.SUCCESS
        node.service.receiver.close()
        assert int(assoc.send_c_store(second).Status) == Status.SUCCESS
    assert set(node.instance_paths()) == {first.SOPInstanceUID, second.SOPInstanceUID}
    assert_consistent(node)


# -- duplicates -------------------------------------------------------------------------------


def test_same_instance_twice_is_success_with_one_copy(node_service: NodeFactory) -> None:
    node = node_service()
    (ds,) = ct_series(1, rows=16, cols=16)

    assert send(node, ds) == [Status.SUCCESS]
    assert send(node, ds) == [Status.SUCCESS]

    assert node.instance_count() == 1
    assert len(node.files()) == 1
    assert_consistent(node)


def test_same_uid_different_bytes_warns_and_keeps_the_first(node_service: NodeFactory) -> None:
    node = node_service()
    series_uid, study_uid = generate_uid(), generate_uid()
    (first,) = ct_series(1, rows=16, cols=16, study_uid=study_uid, series_uid=series_uid, seed=1)
    (second,) = ct_series(1, rows=16, cols=16, study_uid=study_uid, series_uid=series_uid, seed=2)
    assert first.SOPInstanceUID == second.SOPInstanceUID
    assert first.PixelData != second.PixelData

    assert send(node, first) == [Status.SUCCESS]
    with node.db.read() as s:
        sha_before = s.execute(select(Instance.sha256)).scalar_one()
    kept = node.files()
    assert send(node, second) == [Status.WARNING_ELEMENTS_DISCARDED]

    with node.db.read() as s:
        assert s.execute(select(Instance.sha256)).scalars().all() == [sha_before]
    assert node.files() == kept
    assert_consistent(node)
    assert_still_serving(node)


# -- the free-disk floor --------------------------------------------------------------------


def test_below_the_free_disk_floor_is_0xA700_and_leaves_nothing(node_service: NodeFactory) -> None:
    node = node_service(storage={"min_free_mb": 10**9})
    (ds,) = ct_series(1, rows=16, cols=16)

    assert send(node, ds) == [Status.REFUSED_OUT_OF_RESOURCES]
    assert node.instance_count() == 0
    assert node.files() == []
    assert list(node.store.tmp.iterdir()) == []

    node.store.min_free_bytes = 0  # space is freed: the same node stores again
    assert_still_serving(node)


# -- association negotiation ----------------------------------------------------------------


def test_unknown_calling_ae_is_rejected_with_reason_3(node_service: NodeFactory) -> None:
    node = node_service(peers=[{"ae_title": "MODALITY", "host": "127.0.0.1"}])

    assert rejection(node, calling="STRANGER") == REJECT_CALLING_AE
    assert send(node, *ct_series(1, rows=16, cols=16), calling="MODALITY") == [Status.SUCCESS]


def test_wrong_called_ae_is_rejected_with_reason_7(node_service: NodeFactory) -> None:
    node = node_service()

    assert rejection(node, called="NOT-US") == REJECT_CALLED_AE
    assert_still_serving(node)


def test_allowed_title_from_another_host_is_rejected(node_service: NodeFactory) -> None:
    node = node_service(peers=[{"ae_title": "MODALITY", "host": "127.0.0.2"},
                               {"ae_title": "OTHER", "host": "127.0.0.1"}])

    assert rejection(node, calling="MODALITY") == REJECT_CALLING_AE
    assert send(node, *ct_series(1, rows=16, cols=16), calling="OTHER") == [Status.SUCCESS]


def test_association_over_the_limit_is_rejected_transiently(node_service: NodeFactory) -> None:
    node = node_service(node={"max_associations": 2})

    with association(node) as (first, _), association(node) as (second, _):
        assert first.is_established and second.is_established
        assert rejection(node) == REJECT_TOO_MANY
    wait_for(lambda: not node.service.server.active_associations, 10,
             what="the held associations to end")
    assert_still_serving(node)
