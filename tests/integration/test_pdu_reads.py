"""How the receiver reads a PDU off its socket (``node.listeners.PDULimits``): whole, in few
calls, and what pynetdicom expects when the peer closes or stalls. A socket pair stands in
for the association's TCP connection."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest

from node.listeners import Limits, PDULimits

LIMITS = Limits(max_pdu=262144, max_dataset_bytes=2**31, network_timeout_s=5,
                handshake_timeout_s=5)


class Counting:
    """A socket whose ``recv_into`` calls are counted."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.calls = sock, 0

    def recv_into(self, buffer: Any, nbytes: int = 0) -> int:
        self.calls += 1
        return self.sock.recv_into(buffer, nbytes)

    def send(self, data: bytes) -> int:
        return self.sock.send(data)


class FakeAssociationSocket:
    def __init__(self, sock: Counting) -> None:
        self.socket = sock

    def recv(self, nr_bytes: int) -> bytearray:
        raise AssertionError("pynetdicom's 4 KiB reads are replaced")

    def send(self, data: bytes) -> None:
        self.socket.send(data)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, Counting, FakeAssociationSocket]]:
    ours, peer = socket.socketpair()
    # Room for a whole test PDU in flight, so that sendall returns before anything is read.
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    ours.settimeout(0.5)
    counting = Counting(ours)
    fake = FakeAssociationSocket(counting)
    PDULimits(fake, LIMITS, "peer")  # type: ignore[arg-type]
    yield peer, counting, fake
    ours.close()
    peer.close()


def p_data(body_len: int) -> bytes:
    """A P-DATA-TF PDU with one data set PDV (last fragment) of ``body_len`` bytes in all."""
    value = bytes(range(256)) * ((body_len - 6) // 256 + 1)
    pdv = struct.pack(">IBB", body_len - 4, 1, 0x02) + value[:body_len - 6]
    return struct.pack(">BxI", 0x04, len(pdv)) + pdv


def test_a_pdu_already_arrived_is_read_in_one_call(pair: Any) -> None:
    peer, counting, fake = pair
    pdu = p_data(100_000)
    peer.sendall(pdu)
    header = fake.recv(6)
    body = fake.recv(len(pdu) - 6)
    assert bytes(header + body) == pdu
    assert counting.calls == 2  # pynetdicom's own recv made 26 calls of 4 KiB for the body


def test_a_peer_that_closes_mid_pdu_gives_what_came(pair: Any) -> None:
    peer, _, fake = pair
    pdu = p_data(50_000)
    peer.sendall(pdu[:30_006])
    peer.close()
    assert fake.recv(6) == pdu[:6]
    body = fake.recv(len(pdu) - 6)
    assert bytes(body) == pdu[6:30_006]  # shorter: pynetdicom takes it as a closed connection


def test_a_stalled_peer_times_out(pair: Any) -> None:
    peer, _, fake = pair
    pdu = p_data(50_000)
    peer.sendall(pdu[:1000])
    assert fake.recv(6) == pdu[:6]
    with pytest.raises(TimeoutError):
        fake.recv(len(pdu) - 6)
