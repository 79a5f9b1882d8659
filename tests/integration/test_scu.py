"""The result sender's SCU: what it proposes, and that files arrive as they were stored."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pynetdicom.association
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import ComputedRadiographyImageStorage  # type: ignore[attr-defined]

from node.errors import AssociationError
from node.scu import Peer, send_files
from node.standin import StandInPACS
from tests.dicomgen import cr_image
from tests.peers import free_port

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


def test_a_peer_that_aborts_before_the_first_request_fails_the_send_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom 3.0's send_c_store() reads the file before it pauses the reactor. If the
    peer aborts in between, the reactor takes the state machine's wake-up off the DIMSE queue
    and ends, and the call waited the whole DIMSE timeout for a response (a CI run: a PACS
    stopped just after accepting, and the delivery thread came back a minute later). It must
    fail at once."""
    sent = _cr_file(tmp_path)
    reading, aborted = threading.Event(), threading.Event()
    read = pynetdicom.association.dcmread

    def read_once_the_reactor_has_gone(*args: Any, **kwargs: Any) -> Any:
        # Between send_c_store()'s check that the association is up and its wait for the
        # reactor: hold the read until the peer's abort has ended our side's reactor.
        reading.set()
        assert aborted.wait(10)
        for t in threading.enumerate():
            if isinstance(t, Association) and t.is_requestor:
                t.join(10)
                assert not t.is_alive()
        return read(*args, **kwargs)

    monkeypatch.setattr(pynetdicom.association, "dcmread", read_once_the_reactor_has_gone)
    outcome: list[BaseException | None] = []

    def send() -> None:
        try:
            send_files(Peer("PACS", "127.0.0.1", port), [sent], timeout_s=60)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    sender = threading.Thread(target=send, daemon=True)
    # The peer aborts once our side has checked that the association is up.
    with aborting_peer(after=reading, then=aborted) as port:
        sender.start()
        sender.join(30)  # well under the 60 s DIMSE timeout
        assert not sender.is_alive(), "send_files() still waiting after 30 s"
        assert len(outcome) == 1 and isinstance(outcome[0], AssociationError), outcome


def test_a_peer_gone_before_the_first_request_is_a_lost_association(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The peer aborts before send_c_store() is called: pynetdicom raises RuntimeError ("must
    be established"), which the sender would log as an unexpected error; it is a lost
    association like any other."""
    sent = _cr_file(tmp_path)
    calling = threading.Event()
    store = Association.send_c_store

    def store_once_gone(self: Association, *args: Any, **kwargs: Any) -> Any:
        calling.set()
        self.join(10)  # the reactor ends with the peer's abort
        assert not self.is_alive()
        return store(self, *args, **kwargs)

    monkeypatch.setattr(Association, "send_c_store", store_once_gone)
    # Not before the call: an abort during negotiation fails the association instead.
    with aborting_peer(after=calling) as port, \
            pytest.raises(AssociationError, match="ended before cr.dcm was sent"):
        send_files(Peer("PACS", "127.0.0.1", port), [sent], timeout_s=60)


def _cr_file(folder: Path) -> Path:
    path = folder / "cr.dcm"
    cr_image().save_as(path, enforce_file_format=True)
    return path


@contextmanager
def aborting_peer(after: threading.Event, then: threading.Event | None = None) -> Iterator[int]:
    """A pynetdicom acceptor (CR storage) that aborts each association it accepts once
    ``after`` is set, then sets ``then``; yields its port."""
    def abort(event: evt.Event) -> None:
        after.wait(10)
        event.assoc.abort()
        if then is not None:
            then.set()

    ae = AE(ae_title="PACS")
    ae.add_supported_context(ComputedRadiographyImageStorage,
                             [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_ACCEPTED, abort)])
    assert server is not None
    try:
        yield port
    finally:
        server.shutdown()
