"""The result sender's SCU: what it proposes, and that files arrive as they were stored."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node.scu import Peer, send_files
from node.standin import StandInPACS
from tests.dicomgen import cr_image

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_a_file_arrives_in_its_own_transfer_syntax_unchanged(tmp_path: Path,
                                                            syntax: str) -> None:
    """A pynetdicom acceptor picks a context's syntax by its own preference (implicit VR
    first): the file's syntax is offered in a context of its own, so nothing is decoded and
    re-encoded on the way."""
    ds = cr_image()
    ds.file_meta.TransferSyntaxUID = syntax
    sent = tmp_path / "cr.dcm"
    ds.save_as(sent, enforce_file_format=True)
    pacs = StandInPACS(tmp_path / "pacs", ae_title="PACS")
    port = pacs.start()
    try:
        assert [st for _, st in send_files(Peer("PACS", "127.0.0.1", port), [sent])] == [0]
    finally:
        pacs.stop()
    (received,) = pacs.received
    got, want = dcmread(received), dcmread(sent)
    assert got.file_meta.TransferSyntaxUID == syntax  # as stored: nothing was transcoded
    assert got == want  # every data element, pixel data included
