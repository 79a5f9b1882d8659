"""The file meta written before each received data set: pynetdicom's, byte for byte."""

from __future__ import annotations

import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
)
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from node import filemeta
from tests.dicomgen import ct_series

CT = "1.2.840.10008.5.1.4.1.1.2"
CASES = [
    (CT, "1.2.3.4", ExplicitVRLittleEndian),  # even lengths
    (CT, "1.2.3.45", ImplicitVRLittleEndian),  # an odd one, padded with NUL
    ("1.2.840.10008.5.1.4.1.1.7", "1.2.826.0.1.3680043.8.498." + "1" * 38, JPEG2000Lossless),
    ("1.2.840.10008.5.1.4.1.1.88.34", "2.25.1", DeflatedExplicitVRLittleEndian),
]


@pytest.mark.parametrize(("sop_class", "sop_instance", "syntax"), CASES)
def test_the_header_is_what_pynetdicom_encodes(sop_class: str, sop_instance: str,
                                               syntax: str) -> None:
    expected = filemeta.PREAMBLE + encode_file_meta(create_file_meta(
        sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=syntax))
    assert filemeta.header(sop_class, sop_instance, syntax) == expected


def test_a_file_with_the_header_reads_back_with_its_meta() -> None:
    (ds,) = ct_series(1, rows=8, cols=8)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    data = filemeta.header(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian)
    back = dcmread(DicomBytesIO(data + buffer.getvalue()))
    meta = back.file_meta
    assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert meta.MediaStorageSOPClassUID == ds.SOPClassUID
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert meta.ImplementationClassUID == PYNETDICOM_IMPLEMENTATION_UID
    assert meta.ImplementationVersionName == PYNETDICOM_IMPLEMENTATION_VERSION
    assert meta.FileMetaInformationGroupLength == len(data) - 132 - 12
    assert back.SOPInstanceUID == ds.SOPInstanceUID


def test_a_uid_that_is_not_ascii_is_refused() -> None:
    with pytest.raises(ValueError, match="ascii"):
        filemeta.header(CT, "1.2.3.\u00e94", ExplicitVRLittleEndian)
