"""The test peers work: dcmtk and Orthanc receive generated series over real associations."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.uid import JPEG2000Lossless

from tests.dicomgen import ct_series, write_all
from tests.peers import dcmtk_storescp, echoscu, orthanc, storescu

pytestmark = pytest.mark.integration


def test_storescu_to_dcmtk_storescp_writes_every_instance(tmp_path: Path) -> None:
    series = ct_series(5)
    write_all(series, tmp_path / "send")
    received = tmp_path / "received"

    with dcmtk_storescp(received, aet="PACS") as peer:
        assert peer.proc.poll() is None
        done = storescu(peer.host, peer.port, [tmp_path / "send"], called_aet=peer.aet)
        assert done.returncode == 0, done.stderr

    files = sorted(received.iterdir())
    assert len(files) == 5
    got = {pydicom.dcmread(f).SOPInstanceUID for f in files}
    assert got == {ds.SOPInstanceUID for ds in series}
    assert peer.proc.returncode is not None  # stopped and reaped on leaving the context


def test_storescu_to_orthanc_makes_instances_visible_over_rest(tmp_path: Path) -> None:
    series = ct_series(5)
    paths = write_all(series, tmp_path / "send")
    study_uid = series[0].StudyInstanceUID

    with orthanc(tmp_path / "orthanc") as pacs:
        assert pacs.instances_in_study(study_uid) == []
        done = storescu(pacs.host, pacs.dicom_port, paths, called_aet=pacs.aet)
        assert done.returncode == 0, done.stderr
        # Orthanc indexes each instance before it answers the C-STORE, so no wait is needed;
        # count on the receiving side all the same (BASELINES: never trust a sender's exit code).
        assert len(pacs.instances_in_study(study_uid)) == 5
        assert pacs.rest("/statistics")["CountInstances"] == 5
    assert pacs.proc.returncode is not None


def test_compressed_file_arrives_in_its_own_transfer_syntax(tmp_path: Path) -> None:
    # Bundled with pydicom itself (not pydicom-data), so nothing is fetched.
    source = pydicom.data.get_testdata_file("MR_small_jp2klossless.dcm", read=False)
    assert isinstance(source, str)
    received = tmp_path / "received"

    with dcmtk_storescp(received) as peer:
        done = storescu(peer.host, peer.port, [source], called_aet=peer.aet)
        assert done.returncode == 0, done.stderr

    [stored] = received.iterdir()
    assert pydicom.dcmread(stored).file_meta.TransferSyntaxUID == JPEG2000Lossless


def test_echoscu_answers_from_orthanc(tmp_path: Path) -> None:
    with orthanc(tmp_path / "orthanc", aet="PACS2") as pacs:
        done = echoscu(pacs.host, pacs.dicom_port, called_aet="PACS2")
    assert done.returncode == 0, done.stderr


def test_refusing_storescp_makes_storescu_fail(tmp_path: Path) -> None:
    paths = write_all(ct_series(1), tmp_path / "send")
    received = tmp_path / "received"

    with dcmtk_storescp(received, extra_args=["--refuse"]) as peer:
        done = storescu(peer.host, peer.port, paths, called_aet=peer.aet)
        assert peer.proc.poll() is None  # refusing is not crashing

    assert done.returncode != 0
    assert "Association Rejected" in done.stderr
    assert list(received.iterdir()) == []


def test_aborting_storescp_makes_storescu_fail(tmp_path: Path) -> None:
    paths = write_all(ct_series(2), tmp_path / "send")

    with dcmtk_storescp(tmp_path / "received", extra_args=["--abort-after"]) as peer:
        done = storescu(peer.host, peer.port, paths, called_aet=peer.aet)

    assert done.returncode != 0
    assert "Store Failed" in done.stderr
