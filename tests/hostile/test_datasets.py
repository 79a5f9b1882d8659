"""Hostile data sets over real associations: each gets its exact C-STORE status (DESIGN §5,
PS3.4 B.2.3), nothing partial stays behind (files = rows, no temp file), and the node goes on
storing. The commands and data sets are written by hand (tests/hostile/rawpdu.py) where
pynetdicom or pydicom would refuse to send them.
"""

from __future__ import annotations

import struct
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, MRImageStorage
from sqlalchemy import select

from node.status import Status
from storage.models import Instance
from tests.conftest import NODE_AE, RunningNode
from tests.dicomgen import ct_series
from tests.hostile.rawpdu import (
    ABORT,
    P_DATA_TF,
    RawPeer,
    c_store_rq,
    command_status,
    encode_dataset,
)
from tests.integration.test_receiver import assert_consistent, assert_still_serving
from tests.peers import storescu

pytestmark = [
    pytest.mark.integration,
    # pydicom warns about the invalid UIDs these tests send; the node, in this process, must see
    # that warning as it does in production (printed), not as the error pytest makes of it.
    pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning"),
]

NodeFactory = Callable[..., RunningNode]
PeerFactory = Callable[[RunningNode], RawPeer]


def ct() -> Dataset:
    (ds,) = ct_series(1, rows=16, cols=16)
    return ds


def store(peer: RawPeer, command: bytes, data: bytes, context_id: int = 1) -> int:
    """Associate (CT, explicit VR LE, or what ``context_id`` names) and C-STORE: the status."""
    answer = peer.c_store(command, data, context_id)
    assert answer is not None and answer.kind == P_DATA_TF, answer
    return command_status(answer.fragment)


def with_uid(data: bytes, old: str, new: bytes) -> bytes:
    """Replace the (0008,0018) UI element holding ``old`` by one holding ``new`` as it is."""
    def element(value: bytes) -> bytes:
        value += b"\0" * (len(value) % 2)
        return struct.pack("<HH2sH", 0x0008, 0x0018, b"UI", len(value)) + value

    assert data.count(element(old.encode())) == 1
    return data.replace(element(old.encode()), element(new))


def command_with_uid(sop_class: str, uid: bytes) -> bytes:
    """A C-STORE-RQ whose Affected SOP Instance UID is ``uid`` byte for byte."""
    placeholder = "9" * 64
    command = c_store_rq(sop_class, placeholder)
    padded = uid + b"\0" * (len(uid) % 2)
    body = command[12:].replace(struct.pack("<HHI", 0, 0x1000, 64) + placeholder.encode(),
                                struct.pack("<HHI", 0, 0x1000, len(padded)) + padded)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def assert_nothing_stored(node: RunningNode) -> None:
    assert node.instance_count() == 0
    assert node.files() == []
    assert list(node.store.tmp.iterdir()) == []


# -- malformed UIDs: C210, and never a path --------------------------------------------------


HOSTILE_UIDS = {
    "parent folders": b"../../hostile-uid",
    "absolute path": b"/tmp/hostile-uid-abs",
    "NUL inside": b"1.2.3\x00.4",
    "non-ASCII": "1.2.\u00e9.3".encode(),
    "empty component": b"1.2..3",
    "leading zero": b"1.02.3",
}


@pytest.mark.parametrize("name", list(HOSTILE_UIDS))
def test_a_malformed_sop_instance_uid_is_0xC210_and_never_a_path(
        node_service: NodeFactory, raw_peer: PeerFactory, tmp_path: Path, name: str) -> None:
    node = node_service()
    uid = HOSTILE_UIDS[name]
    ds = ct()
    peer = raw_peer(node)
    assert peer.associate().kind == 0x02

    status = store(peer, command_with_uid(CTImageStorage, uid),
                   with_uid(encode_dataset(ds), ds.SOPInstanceUID, uid))

    assert status == Status.ERROR_CANNOT_UNDERSTAND
    assert_nothing_stored(node)
    assert not Path("/tmp/hostile-uid-abs").exists()
    assert not [p for p in tmp_path.parent.rglob("hostile-uid*")]
    assert_still_serving(node)


def test_a_sop_instance_uid_over_64_characters_is_0xC210(node_service: NodeFactory,
                                                         raw_peer: PeerFactory) -> None:
    node = node_service()
    ds = ct()
    peer = raw_peer(node)
    peer.associate()

    long_uid = b"1." + b"2" * 70
    status = store(peer, c_store_rq(CTImageStorage, ds.SOPInstanceUID),
                   with_uid(encode_dataset(ds), ds.SOPInstanceUID, long_uid))

    assert status == Status.ERROR_CANNOT_UNDERSTAND
    assert_nothing_stored(node)
    assert_still_serving(node)


def test_a_command_uid_over_64_characters_is_aborted(node_service: NodeFactory,
                                                     raw_peer: PeerFactory) -> None:
    """pynetdicom cannot decode such a command set, so no status can answer it: A-ABORT."""
    node = node_service()
    ds = ct()
    peer = raw_peer(node)
    peer.associate()

    answer = peer.c_store(command_with_uid(CTImageStorage, b"1." + b"2" * 70),
                          encode_dataset(ds))

    assert answer is not None and answer.kind == ABORT
    assert_nothing_stored(node)
    assert_still_serving(node)


# -- truncated and garbage data sets: C210 -----------------------------------------------------


def _cut_in_pixel_data(data: bytes) -> bytes:
    return data[:-100]  # the last element is the 512-byte Pixel Data: its value ends early


def _cut_in_a_header(data: bytes) -> bytes:
    at = data.index(struct.pack("<HH", 0x7FE0, 0x0010))  # Pixel Data's tag
    return data[:at + 5]  # tag and half its VR and length


def _garbage(data: bytes) -> bytes:
    return bytes(range(256)) * 4


BROKEN = {"value cut short": _cut_in_pixel_data, "header cut short": _cut_in_a_header,
          "garbage": _garbage}


@pytest.mark.parametrize("name", list(BROKEN))
def test_a_truncated_or_garbage_data_set_is_0xC210(node_service: NodeFactory,
                                                   raw_peer: PeerFactory, name: str) -> None:
    node = node_service()
    ds = ct()
    peer = raw_peer(node)
    peer.associate()

    status = store(peer, c_store_rq(CTImageStorage, ds.SOPInstanceUID),
                   BROKEN[name](encode_dataset(ds)))

    assert status == Status.ERROR_CANNOT_UNDERSTAND
    assert_nothing_stored(node)
    assert_still_serving(node)


# -- the SOP class of the presentation context: A900 -------------------------------------------


def test_a_sop_class_other_than_the_contexts_is_0xA900(node_service: NodeFactory,
                                                       raw_peer: PeerFactory) -> None:
    node = node_service()
    ds = ct()
    ds.SOPClassUID = MRImageStorage  # command and data set agree; the context is CT's
    peer = raw_peer(node)
    peer.associate()

    status = store(peer, c_store_rq(MRImageStorage, ds.SOPInstanceUID), encode_dataset(ds))

    assert status == Status.ERROR_DATASET_MISMATCH
    assert_nothing_stored(node)
    assert_still_serving(node)


# -- absurd image sizes: the pixel-size guard before any decode ----------------------------------


def test_absurd_image_dimensions_are_0xA700_before_any_decode(node_service: NodeFactory,
                                                              raw_peer: PeerFactory) -> None:
    node = node_service()
    ds = ct()
    ds.Rows = ds.Columns = 65535
    ds.NumberOfFrames = 10000  # 85 TB decoded; the Pixel Data itself is 512 bytes
    peer = raw_peer(node)
    peer.associate()

    status = store(peer, c_store_rq(CTImageStorage, ds.SOPInstanceUID), encode_dataset(ds))

    assert status == Status.REFUSED_OUT_OF_RESOURCES
    assert_nothing_stored(node)
    assert_still_serving(node)


def test_impossible_image_dimensions_are_0xC210(node_service: NodeFactory,
                                                raw_peer: PeerFactory) -> None:
    node = node_service()
    ds = ct()
    ds.Rows = 0
    peer = raw_peer(node)
    peer.associate()

    status = store(peer, c_store_rq(CTImageStorage, ds.SOPInstanceUID), encode_dataset(ds))

    assert status == Status.ERROR_CANNOT_UNDERSTAND
    assert_nothing_stored(node)
    assert_still_serving(node)


# -- deflate: a bomb is refused without inflating it ------------------------------------------


DEFLATED_CT = [(1, CTImageStorage, [DeflatedExplicitVRLittleEndian])]


def deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


def deflate_bomb(head: bytes, inflated: int) -> bytes:
    """Raw deflate of ``head`` and then zeros, ``inflated`` bytes in all, ~1 KiB per MiB.

    A full flush leaves nothing referring back, so one compressed MiB of zeros can be repeated.
    """
    mib = bytes(1 << 20)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    start = packer.compress(head) + packer.flush(zlib.Z_FULL_FLUSH)
    block = packer.compress(mib) + packer.flush(zlib.Z_FULL_FLUSH)
    return start + block * ((inflated - len(head)) // len(mib)) + packer.flush()


def test_a_deflated_data_set_is_stored(node_service: NodeFactory,
                                       raw_peer: PeerFactory) -> None:
    node = node_service()
    ds = ct()
    peer = raw_peer(node)
    assert peer.associate(contexts=DEFLATED_CT).context_results() == {1: 0}

    status = store(peer, c_store_rq(CTImageStorage, ds.SOPInstanceUID),
                   deflate(encode_dataset(ds)))

    assert status == Status.SUCCESS
    stored = node.store.root / node.instance_paths()[ds.SOPInstanceUID]
    assert dcmread(stored).PixelData == ds.PixelData
    assert_consistent(node)


@pytest.mark.parametrize("name", ["value cut short", "header cut short"])
def test_a_deflated_data_set_cut_short_is_0xC210(node_service: NodeFactory,
                                                 raw_peer: PeerFactory, name: str) -> None:
    """A complete deflate stream of a data set that is itself cut short."""
    node = node_service()
    ds = ct()
    peer = raw_peer(node)
    assert peer.associate(contexts=DEFLATED_CT).context_results() == {1: 0}

    status = store(peer, c_store_rq(CTImageStorage, ds.SOPInstanceUID),
                   deflate(BROKEN[name](encode_dataset(ds))))

    assert status == Status.ERROR_CANNOT_UNDERSTAND
    assert_nothing_stored(node)
    assert_still_serving(node)


def test_a_deflate_bomb_is_0xA700_in_bounded_memory(node_service: NodeFactory,
                                                    raw_peer: PeerFactory) -> None:
    node = node_service(node={"max_dataset_bytes": 8 * 2**20})
    ds = ct()
    data = encode_dataset(ds)
    head = data[:data.index(struct.pack("<HH", 0x7FE0, 0x0010))]  # all before Pixel Data
    head += struct.pack("<HH2s2xI", 0x7FE0, 0x0010, b"OB", 2**30)  # 1 GiB of zeros follows
    bomb = deflate_bomb(head, 2**30)
    assert len(bomb) < 2 * 2**20  # sent: under 2 MiB
    peer = raw_peer(node)
    assert peer.associate(contexts=DEFLATED_CT).context_results() == {1: 0}

    tracemalloc.start()
    try:
        status = store(peer, c_store_rq(CTImageStorage, ds.SOPInstanceUID), bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert status == Status.REFUSED_OUT_OF_RESOURCES
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB allocated while refusing the bomb"
    assert_nothing_stored(node)
    assert_still_serving(node)


# -- the preamble: whatever the sender's file had, ours is zeros ---------------------------------


def test_an_executable_preamble_never_reaches_the_store(node_service: NodeFactory,
                                                       tmp_path: Path) -> None:
    node = node_service()
    ds = ct()
    path = tmp_path / "polyglot.dcm"
    dcmwrite(path, ds, enforce_file_format=True)
    preamble = (b"MZ\x90\x00" + b"\0" * 56 + struct.pack("<I", 64) + b"\x7fELF\x02\x01\x01"
                ).ljust(128, b"\xcc")
    path.write_bytes(preamble + path.read_bytes()[128:])
    assert dcmread(path).preamble == preamble

    done = storescu(node.host, node.port, [path], called_aet=NODE_AE)

    assert done.returncode == 0, done.stdout + done.stderr
    stored = (node.store.root / node.instance_paths()[ds.SOPInstanceUID]).read_bytes()
    assert stored[:132] == b"\0" * 128 + b"DICM"
    assert b"MZ\x90\x00" not in stored and b"\x7fELF" not in stored
    assert dcmread(node.store.root / node.instance_paths()[ds.SOPInstanceUID]).PixelData \
        == ds.PixelData
    assert_consistent(node)


# -- duplicates under the replace policy -----------------------------------------------------


def test_a_different_duplicate_replaces_the_first_under_the_replace_policy(
        node_service: NodeFactory, raw_peer: PeerFactory) -> None:
    node = node_service(storage={"duplicate_policy": "replace"})
    first = ct()
    second = ct()
    second.SOPInstanceUID = first.SOPInstanceUID
    second.StudyInstanceUID, second.SeriesInstanceUID = (first.StudyInstanceUID,
                                                         first.SeriesInstanceUID)
    second.PixelData = bytes(len(first.PixelData))
    peer = raw_peer(node)
    peer.associate()

    for ds in (first, second):
        assert store(peer, c_store_rq(CTImageStorage, ds.SOPInstanceUID),
                     encode_dataset(ds)) == Status.SUCCESS

    assert node.instance_count() == 1 and len(node.files()) == 1
    kept = node.store.root / node.instance_paths()[first.SOPInstanceUID]
    assert dcmread(kept).PixelData == second.PixelData
    with node.db.read() as s:
        assert len(s.execute(select(Instance.sha256)).scalars().all()) == 1
    assert_consistent(node)
    assert_still_serving(node)
