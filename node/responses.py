"""C-STORE responses (PS3.7 9.3.1.2) encoded with ``struct`` instead of pydicom.

After the C-STORE handler returns, pynetdicom turns its C-STORE response primitive into a
DIMSE message (a pydicom Dataset, built element by element) and encodes its command set with
pydicom's writer: about 15% of the interpreter's time in a receiving association. A C-STORE
response is always the same seven elements in implicit VR little endian (PS3.7 6.3.1): this
module's ``encode`` gives those bytes directly, and ``attach`` has an accepted association send
its plain C-STORE responses that way, one P-DATA-TF with one PDV (the command's last fragment,
control header 0x03, PS3.8 E.2), which is what pynetdicom sends for them. Anything else (an
error comment or offending element, another message, a handler bound to ``EVT_DIMSE_SENT``, a
command set over the peer's maximum PDU, a UID that is not ASCII) goes pynetdicom's way. ``tests/unit/test_responses.py``
compares the bytes with pynetdicom's for every status the receiver answers with.
"""

from __future__ import annotations

import logging
import struct
from typing import Any

import pynetdicom
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

log = logging.getLogger(__name__)

#: pynetdicom versions whose send_msg and C-STORE-RSP encoding this was compared with.
TESTED_VERSIONS = ("3.0.",)
C_STORE_RSP_FIELD = 0x8001  # PS3.7 E.1-1: CommandField of a C-STORE-RSP
NO_DATA_SET = 0x0101  # PS3.7 E.1-1: CommandDataSetType, no data set follows
LAST_COMMAND_FRAGMENT = b"\x03"  # PS3.8 E.2: a command fragment, the last one


def _ui(tag_element: int, uid: str) -> bytes:
    value = uid.encode("ascii")
    value += b"\x00" * (len(value) % 2)  # PS3.5 6.2: UI padded with NUL to even length
    return struct.pack("<HHI", 0x0000, tag_element, len(value)) + value


def _us(tag_element: int, value: int) -> bytes:
    return struct.pack("<HHIH", 0x0000, tag_element, 2, value)


def encode(sop_class_uid: str, sop_instance_uid: str, message_id: int, status: int) -> bytes:
    """The command set of a C-STORE-RSP without error comment or offending element, implicit
    VR little endian, with its group length (PS3.7 9.3.1.2, E.1-1)."""
    elements = b"".join((
        _ui(0x0002, sop_class_uid), _us(0x0100, C_STORE_RSP_FIELD), _us(0x0120, message_id),
        _us(0x0800, NO_DATA_SET), _us(0x0900, status), _ui(0x1000, sop_instance_uid)))
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(elements)) + elements


def _plain(primitive: Any) -> bool:
    """A C-STORE response that is only a status: no error comment, no offending element."""
    return (type(primitive) is C_STORE and primitive.MessageIDBeingRespondedTo is not None
            and primitive.Status is not None and primitive.AffectedSOPClassUID is not None
            and primitive.AffectedSOPInstanceUID is not None
            and primitive.ErrorComment is None and primitive.OffendingElement is None)


def attach(assoc: Any) -> None:
    """Send ``assoc``'s plain C-STORE responses as ``encode`` makes them; call before the
    association's threads start (``EVT_CONN_OPEN`` of an accepted association). Does nothing
    for a pynetdicom it was not compared with."""
    if not pynetdicom.__version__.startswith(TESTED_VERSIONS):
        return
    dimse = assoc.dimse
    send_msg = dimse.send_msg

    def send(primitive: Any, context_id: int) -> None:
        if not _plain(primitive) or assoc.get_handlers(evt.EVT_DIMSE_SENT):
            send_msg(primitive, context_id)
            return
        try:
            command = encode(str(primitive.AffectedSOPClassUID),
                             str(primitive.AffectedSOPInstanceUID),
                             int(primitive.MessageIDBeingRespondedTo), int(primitive.Status))
        except (UnicodeEncodeError, struct.error):  # a UID that is not ASCII, say: as ever
            send_msg(primitive, context_id)
            return
        limit = dimse.maximum_pdu_size
        if limit and len(command) > limit - 6:  # pynetdicom splits it into fragments then
            send_msg(primitive, context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, LAST_COMMAND_FRAGMENT + command))
        dimse.dul.send_pdu(pdata)

    dimse.send_msg = send


__all__ = ["TESTED_VERSIONS", "attach", "encode"]
