"""C-STORE responses encoded by ``node.responses``: pynetdicom's bytes, and pynetdicom's way
for whatever is not a plain status."""

from __future__ import annotations

from typing import Any

import pytest
from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.pdu_primitives import P_DATA

from node import responses
from node.status import Status

CT = "1.2.840.10008.5.1.4.1.1.2"


class FakeDUL:
    def __init__(self) -> None:
        self.sent: list[P_DATA] = []

    def send_pdu(self, primitive: P_DATA) -> None:
        self.sent.append(primitive)


class FakeAssociation:
    """Just what DIMSEServiceProvider.send_msg and responses.attach use."""

    def __init__(self, max_pdu: int = 16384, dimse_sent_handlers: bool = False) -> None:
        self.dul = FakeDUL()
        self.is_requestor = False
        self.requestor = type("Peer", (), {"maximum_length": max_pdu})()
        self._handlers = [(lambda e: None, None)] if dimse_sent_handlers else []
        self.dimse = DIMSEServiceProvider(self)  # type: ignore[arg-type]
        self.calls = 0
        original = self.dimse.send_msg

        def counted(primitive: Any, context_id: int) -> None:
            self.calls += 1
            original(primitive, context_id)

        self.dimse.send_msg = counted  # type: ignore[method-assign]

    def _abort_nonblocking(self) -> None:  # what evt.trigger sets as ``abort`` for handlers
        raise AssertionError("no handler aborts here")

    def get_handlers(self, event: Any) -> list[Any]:
        return self._handlers if event is evt.EVT_DIMSE_SENT else []


def response(status: int, sop_instance: str = "1.2.3.45", message_id: int = 7,
             comment: str | None = None) -> C_STORE:
    """A C-STORE response as pynetdicom's StorageServiceClass.SCP builds it."""
    rsp = C_STORE()
    rsp.MessageID = message_id
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPInstanceUID = sop_instance
    rsp.AffectedSOPClassUID = CT
    rsp.Status = status
    if comment is not None:
        rsp.ErrorComment = comment
    return rsp


def sent(primitive: Any, attached: bool, **kwargs: Any) -> tuple[list[Any], int]:
    """The PDVs sent for ``primitive`` and how many times pynetdicom's send_msg ran."""
    assoc = FakeAssociation(**kwargs)
    if attached:
        responses.attach(assoc)
    assoc.dimse.send_msg(primitive, 3)
    return [pdata.presentation_data_value_list for pdata in assoc.dul.sent], assoc.calls


@pytest.mark.parametrize("status", [int(s) for s in Status])
@pytest.mark.parametrize(("sop_instance", "message_id"), [
    ("1.2.3.45", 7), ("1.2.826.0.1.3680043.8.498.1234567890", 65535), ("2.25.1", 1)])
def test_the_bytes_are_pynetdicoms(status: int, sop_instance: str, message_id: int) -> None:
    ours, by_pynetdicom = sent(response(status, sop_instance, message_id), attached=True)[0], \
        sent(response(status, sop_instance, message_id), attached=False)[0]
    assert ours == by_pynetdicom
    assert len(ours) == 1 and ours[0][0][0] == 3 and ours[0][0][1][:1] == b"\x03"


def test_a_plain_response_skips_pynetdicoms_encoder() -> None:
    assert sent(response(0x0000), attached=True)[1] == 0
    assert sent(response(0x0000), attached=False)[1] == 1


@pytest.mark.parametrize(("make", "kwargs"), [
    (lambda: response(0xC210, comment="cannot decode"), {}),  # an error comment
    (lambda: response(0x0000), {"dimse_sent_handlers": True}),  # EVT_DIMSE_SENT is bound
    (lambda: response(0x0000), {"max_pdu": 64}),  # split into fragments
], ids=["error comment", "EVT_DIMSE_SENT bound", "fragments"])
def test_anything_else_goes_pynetdicoms_way(make: Any, kwargs: dict[str, Any],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(evt, "trigger", lambda *args, **kw: None)  # the fake has no handlers
    primitive = make()
    ours, calls = sent(primitive, attached=True, **kwargs)
    assert calls == 1
    assert ours == sent(primitive, attached=False, **kwargs)[0]


def test_a_uid_that_is_not_ascii_goes_pynetdicoms_way(monkeypatch: pytest.MonkeyPatch) -> None:
    """The attached sender hands it to the send_msg it wrapped (here a recorder); what
    pynetdicom then sends is in tests/hostile/test_datasets.py: 0xC210."""
    rsp = response(0xC210)
    monkeypatch.setattr(C_STORE, "AffectedSOPInstanceUID", property(lambda self: "1.2.\u00e9.3"))
    assoc = FakeAssociation()
    wrapped: list[Any] = []
    assoc.dimse.send_msg = (  # type: ignore[method-assign]
        lambda primitive, context_id: wrapped.append(primitive))
    responses.attach(assoc)
    assoc.dimse.send_msg(rsp, 3)
    assert wrapped == [rsp] and assoc.dul.sent == []


def test_other_messages_go_pynetdicoms_way() -> None:
    echo = C_ECHO()
    echo.MessageIDBeingRespondedTo = 1
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    echo.Status = 0
    assert sent(echo, attached=True)[1] == 1


def test_a_pynetdicom_it_was_not_compared_with_is_left_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(responses.pynetdicom, "__version__", "4.0.0")
    assert sent(response(0x0000), attached=True)[1] == 1  # pynetdicom's own send_msg ran
