"""Upper-layer PDUs (PS3.8 9.3) and DIMSE commands (PS3.7 E) built by hand, for hostile peers.

pynetdicom will not send what a hostile peer sends (a control character in an AE title, a PDU
over the negotiated maximum, half a data set), so these tests write the bytes themselves with
``struct`` and read the node's answers off a plain socket.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Self

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"  # PS3.7 A.2.1
IMPLEMENTATION_UID = PYDICOM_IMPLEMENTATION_UID

# PDU types, PS3.8 9.3.1
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = 0x04, 0x05, 0x06, 0x07

# Message control header, PS3.8 E.2: bit 0 command (1) or data set (0), bit 1 last fragment
DATASET_MORE, COMMAND_MORE, DATASET_LAST, COMMAND_LAST = 0x00, 0x01, 0x02, 0x03


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BxH", kind, len(body)) + body


def associate_rq(*, called: bytes, calling: bytes, contexts: list[tuple[int, str, list[str]]],
                 max_pdu: int) -> bytes:
    """A-ASSOCIATE-RQ (PS3.8 9.3.2); AE titles as raw bytes, padded with spaces to 16."""
    items = _item(0x10, APPLICATION_CONTEXT.encode())
    for context_id, abstract, syntaxes in contexts:
        sub = _item(0x30, abstract.encode()) + b"".join(_item(0x40, s.encode()) for s in syntaxes)
        items += _item(0x20, struct.pack(">B3x", context_id) + sub)
    user = _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, IMPLEMENTATION_UID.encode())
    items += _item(0x50, user)
    body = struct.pack(">H2x16s16s32x", 1, called.ljust(16), calling.ljust(16)) + items
    return struct.pack(">BxI", ASSOCIATE_RQ, len(body)) + body


def p_data(*pdvs: tuple[int, int, bytes]) -> bytes:
    """P-DATA-TF (PS3.8 9.3.5) of (context ID, message control header, fragment) items."""
    body = b"".join(struct.pack(">IBB", len(data) + 2, cid, mch) + data for cid, mch, data in pdvs)
    return struct.pack(">BxI", P_DATA_TF, len(body)) + body


def release_rq() -> bytes:
    return struct.pack(">BxI4x", RELEASE_RQ, 4)


def abort(source: int = 0, reason: int = 0) -> bytes:
    """A-ABORT (PS3.8 9.3.8): source 0 is the service user."""
    return struct.pack(">BxI2xBB", ABORT, 4, source, reason)


@dataclass(frozen=True)
class PDU:
    kind: int
    body: bytes

    @property
    def fragment(self) -> bytes:
        """P-DATA-TF: the first PDV's fragment (the node answers one PDV per PDU)."""
        assert self.kind == P_DATA_TF, f"PDU type 0x{self.kind:02X} is not a P-DATA-TF"
        (length,) = struct.unpack_from(">I", self.body, 0)
        return self.body[6:4 + length]

    @property
    def reject(self) -> tuple[int, int, int]:
        """A-ASSOCIATE-RJ (result, source, reason)."""
        assert self.kind == ASSOCIATE_RJ, f"PDU type 0x{self.kind:02X} is not an A-ASSOCIATE-RJ"
        return self.body[1], self.body[2], self.body[3]

    @property
    def abort_source_reason(self) -> tuple[int, int]:
        assert self.kind == ABORT, f"PDU type 0x{self.kind:02X} is not an A-ABORT"
        return self.body[2], self.body[3]

    def context_results(self) -> dict[int, int]:
        """A-ASSOCIATE-AC: presentation context ID -> result (PS3.8 9.3.3.2)."""
        assert self.kind == ASSOCIATE_AC, f"PDU type 0x{self.kind:02X} is not an A-ASSOCIATE-AC"
        out, at = {}, 68
        while at < len(self.body):
            kind, length = struct.unpack_from(">BxH", self.body, at)
            if kind == 0x21:
                out[self.body[at + 4]] = self.body[at + 6]
            at += 4 + length
        return out

    def max_pdu(self) -> int:
        """A-ASSOCIATE-AC: the acceptor's Maximum Length Received (PS3.8 D.1)."""
        at = 68
        while at < len(self.body):
            kind, length = struct.unpack_from(">BxH", self.body, at)
            if kind == 0x50:
                sub = at + 4
                while sub < at + 4 + length:
                    skind, slength = struct.unpack_from(">BxH", self.body, sub)
                    if skind == 0x51:
                        return int(struct.unpack_from(">I", self.body, sub + 4)[0])
                    sub += 4 + slength
            at += 4 + length
        raise AssertionError("no Maximum Length sub-item in the A-ASSOCIATE-AC")


def read_pdu(sock: socket.socket) -> PDU | None:
    """The next PDU from ``sock``; None when the node closed the connection."""
    head = _read_exactly(sock, 6)
    if head is None:
        return None
    kind, length = struct.unpack(">BxI", head)
    body = _read_exactly(sock, length)
    return None if body is None else PDU(kind, body)


def _read_exactly(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        try:
            chunk = sock.recv(n - len(data))
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        data += chunk
    return data


# -- DIMSE commands, implicit VR little endian (PS3.7 6.3.1, E.1) -------------------------------


def _element(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, elem, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode()
    return raw + b"\0" * (len(raw) % 2)


def c_store_rq(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    """A C-STORE-RQ command set (PS3.7 9.3.1.1) announcing a data set."""
    body = (_element(0x0002, _uid(sop_class)) + _element(0x0100, struct.pack("<H", 0x0001))
            + _element(0x0110, struct.pack("<H", message_id))
            + _element(0x0700, struct.pack("<H", 0x0000))
            + _element(0x0800, struct.pack("<H", 0x0000))
            + _element(0x1000, _uid(sop_instance)))
    return _element(0x0000, struct.pack("<I", len(body))) + body


def command_status(fragment: bytes) -> int:
    """(0000,0900) Status from a complete command set."""
    at = 0
    while at < len(fragment):
        _, elem, length = struct.unpack_from("<HHI", fragment, at)
        if elem == 0x0900:
            return int(struct.unpack_from("<H", fragment, at + 8)[0])
        at += 8 + length
    raise AssertionError("no Status element in the command set")


def encode_dataset(ds: Dataset) -> bytes:
    """``ds`` without file meta, explicit VR little endian."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    plain = Dataset()
    plain.update(ds)
    write_dataset(fp, plain)
    return fp.getvalue()


# -- a peer ------------------------------------------------------------------------------------

CT_CONTEXT = [(1, "1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])]  # CT, explicit VR LE
FRAGMENT_BYTES = 16000  # data set bytes per P-DATA-TF: below every maximum PDU we negotiate


class RawPeer:
    """A TCP connection to the node that sends hand-built PDUs and reads the answers."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self) -> PDU | None:
        return read_pdu(self.sock)

    def associate(self, *, calling: bytes = b"RAW", called: bytes = b"AIDNODE",
                  contexts: list[tuple[int, str, list[str]]] | None = None,
                  max_pdu: int = 16384) -> PDU:
        """Send an A-ASSOCIATE-RQ; the node's answer (AC, RJ or A-ABORT)."""
        self.send(associate_rq(called=called, calling=calling,
                               contexts=CT_CONTEXT if contexts is None else contexts,
                               max_pdu=max_pdu))
        answer = self.read()
        assert answer is not None, "the node closed the connection without an answer"
        return answer

    def send_dataset(self, data: bytes, context_id: int = 1, *, last: bool = True) -> None:
        """``data`` as data set fragments of FRAGMENT_BYTES; the last one flagged if ``last``."""
        pieces = [data[i:i + FRAGMENT_BYTES] for i in range(0, len(data), FRAGMENT_BYTES)]
        for n, piece in enumerate(pieces, 1):
            control = DATASET_LAST if last and n == len(pieces) else DATASET_MORE
            self.send(p_data((context_id, control, piece)))

    def c_store(self, command: bytes, dataset: bytes, context_id: int = 1) -> PDU | None:
        """Send a C-STORE-RQ and its data set; the node's next PDU (None: it closed)."""
        self.send(p_data((context_id, COMMAND_LAST, command)))
        self.send_dataset(dataset, context_id)
        return self.read()

    def release(self) -> None:
        self.send(release_rq())
        answer = self.read()
        assert answer is not None and answer.kind == RELEASE_RP, answer
