"""The C-STORE guards on their own: UID syntax, complete data sets, bounded inflation."""

from __future__ import annotations

import zlib

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from node.errors import DatasetTooLargeError, InvalidDatasetError
from node.guards import check_complete, check_inflated_size, valid_uid
from tests.dicomgen import ct_series


def encode(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


@pytest.mark.parametrize("uid", ["1.2.3", "0", "1.2.840.10008.5.1.4.1.1.2", "1." + "2" * 62])
def test_valid_uids(uid: str) -> None:
    assert valid_uid(uid)


@pytest.mark.parametrize("uid", ["", "../x", "/abs", "1.2\x00.3", "1.2.3\n", "1..2", "01.2",
                                 "1.2.\u00e9", "1." + "2" * 63, "1.2 ", None, 12])
def test_invalid_uids(uid: object) -> None:
    assert not valid_uid(uid)


def test_a_data_set_cut_anywhere_but_between_elements_is_refused() -> None:
    (ds,) = ct_series(1, rows=4, cols=4)
    data = encode(ds)
    check_complete(data, implicit_vr=False, little_endian=True)
    accepted = []
    for cut in range(1, len(data)):
        try:
            check_complete(data[:cut], implicit_vr=False, little_endian=True)
        except InvalidDatasetError:
            continue
        accepted.append(cut)
    # only the cuts between two elements: one fewer than the data set's elements
    assert len(accepted) == len(ds) - 1


def test_inflation_stops_at_the_limit() -> None:
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = packer.compress(bytes(64 * 2**20)) + packer.flush()
    check_inflated_size(bomb, 64 * 2**20)
    with pytest.raises(DatasetTooLargeError, match=r"inflates to more than .*\(1048576\)"):
        check_inflated_size(bomb, 2**20)
    with pytest.raises(InvalidDatasetError, match="cannot be inflated"):
        check_inflated_size(b"\xff" * 100, 2**20)
