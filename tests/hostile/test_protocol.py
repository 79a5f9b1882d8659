"""Hostile peers at the upper layer (PS3.8): each gets its exact association outcome
(A-ASSOCIATE-AC with its context results, or an A-ABORT and a closed connection), nothing partial
stays behind, and other associations go on being served.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from node.status import ABORT_DATASET_TOO_LARGE, ABORT_PDU_TOO_LONG, Status
from tests.conftest import RunningNode
from tests.dicomgen import ct_series
from tests.hostile.rawpdu import (
    ABORT,
    ASSOCIATE_AC,
    COMMAND_LAST,
    COMMAND_MORE,
    P_DATA_TF,
    RawPeer,
    abort,
    c_store_rq,
    command_status,
    encode_dataset,
    p_data,
)
from tests.integration.test_receiver import assert_still_serving
from tests.peers import wait_for

pytestmark = pytest.mark.integration

NodeFactory = Callable[..., RunningNode]
PeerFactory = Callable[[RunningNode], RawPeer]
PRIVATE_SOP_CLASS = "1.2.826.0.1.3680043.8.498.1.999"  # no storage SOP class we support
ABSTRACT_SYNTAX_NOT_SUPPORTED = 3  # PS3.8 9.3.3.2, presentation context result


def assert_aborted(peer: RawPeer) -> tuple[int, int]:
    """The node's next PDU is an A-ABORT; its (source, reason). The peer is expected to close
    then; the node waits for that for up to the ACSE timeout (PS3.8 9.2, state Sta13)."""
    answer = peer.read()
    assert answer is not None and answer.kind == ABORT, answer
    return answer.abort_source_reason


def assert_aborted_and_closed(peer: RawPeer) -> tuple[int, int]:
    """An A-ABORT, and the node closes the connection itself (it reads nothing more)."""
    source_reason = assert_aborted(peer)
    assert peer.read() is None, "the connection stayed open after the A-ABORT"
    return source_reason


def no_associations_left(node: RunningNode) -> None:
    wait_for(lambda: not node.service.server.active_associations, 15,
             what="the node to end the association")


def assert_nothing_stored(node: RunningNode) -> None:
    assert node.instance_count() == 0
    assert node.files() == []
    assert list(node.store.tmp.iterdir()) == []


def store_rq() -> tuple[bytes, bytes]:
    (ds,) = ct_series(1, rows=64, cols=64)
    return c_store_rq(CTImageStorage, ds.SOPInstanceUID), encode_dataset(ds)


# -- negotiation -------------------------------------------------------------------------------


def test_an_unknown_sop_class_has_its_context_rejected(node_service: NodeFactory,
                                                       raw_peer: PeerFactory) -> None:
    node = node_service()
    peer = raw_peer(node)

    answer = peer.associate(contexts=[(1, PRIVATE_SOP_CLASS, [ExplicitVRLittleEndian]),
                                      (3, CTImageStorage, [ExplicitVRLittleEndian])])

    assert answer.kind == ASSOCIATE_AC
    assert answer.context_results() == {1: ABSTRACT_SYNTAX_NOT_SUPPORTED, 3: 0}
    command, data = store_rq()
    reply = peer.c_store(command, data, context_id=3)  # the CT context still works
    assert reply is not None and command_status(reply.fragment) == Status.SUCCESS
    peer.release()
    assert_still_serving(node)


def test_a_store_on_a_rejected_context_is_aborted(node_service: NodeFactory,
                                                  raw_peer: PeerFactory) -> None:
    node = node_service()
    peer = raw_peer(node)
    peer.associate(contexts=[(1, PRIVATE_SOP_CLASS, [ExplicitVRLittleEndian]),
                             (3, CTImageStorage, [ExplicitVRLittleEndian])])

    command, data = store_rq()
    peer.send(p_data((1, COMMAND_LAST, command)))
    peer.send_dataset(data, context_id=1)

    assert_aborted_and_closed(peer)
    no_associations_left(node)
    assert_nothing_stored(node)
    assert_still_serving(node)


def test_a_huge_requested_maximum_pdu_is_answered_with_ours(node_service: NodeFactory,
                                                           raw_peer: PeerFactory) -> None:
    node = node_service()
    peer = raw_peer(node)

    answer = peer.associate(max_pdu=0xFFFFFFFF)

    assert answer.kind == ASSOCIATE_AC and answer.max_pdu() == node.config.node.max_pdu
    command, data = store_rq()
    reply = peer.c_store(command, data)
    assert reply is not None and command_status(reply.fragment) == Status.SUCCESS
    peer.release()
    assert node.instance_count() == 1
    assert_still_serving(node)


# -- PDUs too long, data sets too large ---------------------------------------------------------


def test_a_p_data_pdu_over_our_maximum_is_aborted_as_its_header_arrives(
        node_service: NodeFactory, raw_peer: PeerFactory) -> None:
    node = node_service()  # network timeout 20 s: the answer must come well before
    peer = raw_peer(node)
    peer.associate()
    peer.sock.settimeout(5)

    peer.send(struct.pack(">BxI", P_DATA_TF, node.config.node.max_pdu + 1) + b"\0" * 64)

    assert assert_aborted_and_closed(peer) == ABORT_PDU_TOO_LONG
    no_associations_left(node)
    assert_nothing_stored(node)
    assert_still_serving(node)


def test_a_data_set_over_max_dataset_bytes_is_aborted_as_it_arrives(
        node_service: NodeFactory, raw_peer: PeerFactory) -> None:
    limit = 64 * 1024
    node = node_service(node={"max_dataset_bytes": limit})
    peer = raw_peer(node)
    peer.associate()
    for ds in ct_series(2, rows=128, cols=128):  # 33 KB each, 66 KB together: each is counted
        reply = peer.c_store(c_store_rq(CTImageStorage, ds.SOPInstanceUID), encode_dataset(ds))
        assert reply is not None and command_status(reply.fragment) == Status.SUCCESS
    (big,) = ct_series(1, rows=256, cols=256)  # 128 KiB of pixels

    peer.send(p_data((1, COMMAND_LAST, c_store_rq(CTImageStorage, big.SOPInstanceUID))))
    try:
        peer.send_dataset(encode_dataset(big))
    except (BrokenPipeError, ConnectionResetError):
        pass  # the node aborted and closed before the last fragments: its A-ABORT is still read

    assert assert_aborted_and_closed(peer) == ABORT_DATASET_TOO_LARGE
    no_associations_left(node)
    assert big.SOPInstanceUID not in node.instance_paths()
    assert node.instance_count() == 2 and len(node.files()) == 2
    assert_still_serving(node)


def test_a_command_set_that_never_ends_is_aborted_before_it_fills_memory(
        node_service: NodeFactory, raw_peer: PeerFactory) -> None:
    """pynetdicom buffers command fragments until one is marked last: a peer that never marks
    one would grow that buffer without end, each PDU well within our maximum."""
    node = node_service()
    peer = raw_peer(node)
    peer.associate()
    chunk = b"\x00" * 16_000
    for _ in range(5):  # 80 KB of command fragments, none of them the last
        peer.send(p_data((1, COMMAND_MORE, chunk)))
    assert assert_aborted_and_closed(peer) == ABORT_DATASET_TOO_LARGE
    no_associations_left(node)
    assert_nothing_stored(node)
    assert_still_serving(node)


# -- garbage, silence, and peers that vanish ------------------------------------------------------


def test_garbage_after_association_is_aborted_while_others_go_on(
        node_service: NodeFactory, raw_peer: PeerFactory) -> None:
    node = node_service()
    bystander = raw_peer(node)
    assert bystander.associate().kind == ASSOCIATE_AC
    peer = raw_peer(node)
    peer.associate()

    peer.send(bytes(range(0xF0, 0x100)) * 8)

    source, _ = assert_aborted(peer)
    assert source == 0x02  # the service provider: an unrecognised PDU (PS3.8 9.3.8)
    peer.close()
    command, data = store_rq()
    reply = bystander.c_store(command, data)
    assert reply is not None and command_status(reply.fragment) == Status.SUCCESS
    bystander.release()
    assert node.instance_count() == 1
    assert_still_serving(node)


def test_an_idle_association_is_aborted_at_the_network_timeout(node_service: NodeFactory,
                                                                raw_peer: PeerFactory) -> None:
    node = node_service(node={"network_timeout_s": 1})
    peer = raw_peer(node)
    peer.associate()
    peer.sock.settimeout(10)

    assert_aborted_and_closed(peer)  # after about a second of silence
    no_associations_left(node)
    assert_still_serving(node)


def test_a_pdu_stalled_halfway_ends_at_the_network_timeout(node_service: NodeFactory,
                                                           raw_peer: PeerFactory) -> None:
    """pynetdicom's own timer runs between PDUs only; the socket timeout ends this one."""
    node = node_service(node={"network_timeout_s": 1, "max_associations": 1})
    peer = raw_peer(node)
    peer.associate()
    peer.sock.settimeout(10)

    peer.send(struct.pack(">BxI", P_DATA_TF, 1000) + b"\0" * 10)  # 990 bytes never come

    answer = peer.read()
    assert answer is None or answer.kind == ABORT
    no_associations_left(node)  # the only slot is free again
    assert_nothing_stored(node)
    assert_still_serving(node)


HOW_PEERS_VANISH = ("A-ABORT after half the data set", "close after half the data set",
                    "close inside a PDU")


@pytest.mark.parametrize("how", HOW_PEERS_VANISH)
def test_a_peer_that_vanishes_mid_data_set_leaves_nothing(node_service: NodeFactory,
                                                          raw_peer: PeerFactory,
                                                          how: str) -> None:
    node = node_service()
    (ds,) = ct_series(1, rows=128, cols=128)  # 32 KiB: three fragments
    data = encode_dataset(ds)
    peer = raw_peer(node)
    peer.associate()

    peer.send(p_data((1, COMMAND_LAST, c_store_rq(CTImageStorage, ds.SOPInstanceUID))))
    peer.send_dataset(data[:len(data) // 2], last=False)
    if how.startswith("A-ABORT"):
        peer.send(abort())
    elif how == "close inside a PDU":
        peer.send(struct.pack(">BxI", P_DATA_TF, 4000) + b"\0" * 100)
    peer.sock.shutdown(socket.SHUT_RDWR)
    peer.close()

    no_associations_left(node)
    assert_nothing_stored(node)
    assert_still_serving(node)
