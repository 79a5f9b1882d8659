"""Resources that run out under a running receiver: a full disk and a database locked past its
busy timeout. Over real associations the answer is 0xA700 (out of resources, DESIGN §5), nothing
is left behind, and once the resource is back the same instances are stored.

The full disk is a 2 MiB tmpfs mounted as the store root (root only; the test skips when mount(2)
answers EPERM and fails on any other error).
"""

from __future__ import annotations

import ctypes
import errno
import os
import sqlite3
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset
from sqlalchemy import Connection
from sqlalchemy.engine import RootTransaction
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from node.status import Status
from storage import catalog
from tests.conftest import RunningNode
from tests.dicomgen import ct_series
from tests.integration.test_receiver import assert_consistent, send

pytestmark = pytest.mark.integration

NodeFactory = Callable[..., RunningNode]
PAGE = 4096  # tmpfs allocates whole pages
MNT_DETACH = 2


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, unmounted at teardown (request it before ``node_service``, so the node
    stops first)."""
    target = tmp_path / "disk"
    target.mkdir()
    libc = _libc()
    if libc.mount(b"tmpfs", os.fsencode(target), b"tmpfs", 0, b"size=2m") != 0:
        err = ctypes.get_errno()
        if err == errno.EPERM:
            pytest.skip("mounting a tmpfs needs root (mount(2) answered EPERM)")
        raise OSError(err, f"mount -t tmpfs {target}: {os.strerror(err)}")
    try:
        yield target
    finally:
        if libc.umount2(os.fsencode(target), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"umount {target}: {os.strerror(err)}")


def padded_instance(multiple: int) -> Dataset:
    """A small CT whose data set, encoded as the SCP receives it (explicit VR little endian,
    no file meta), is an exact multiple of ``multiple`` bytes long."""
    (ds,) = ct_series(1, rows=32, cols=32)
    ds.ImageComments = ""
    length = len(encoded(ds))
    ds.ImageComments = "x" * (-length % multiple)  # the element header is there already
    assert len(encoded(ds)) % multiple == 0
    return ds


def encoded(ds: Dataset) -> bytes:
    plain = Dataset()
    plain.update(ds)
    buf = BytesIO()
    dcmwrite(buf, plain, implicit_vr=False, little_endian=True)
    return buf.getvalue()


def fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` to the last page, then free ``leave`` bytes (a multiple of PAGE)."""
    filler = disk / "filler"
    chunk = b"\0" * PAGE * 16
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    pages = -(-filler.stat().st_size // PAGE)
    os.truncate(filler, (pages - leave // PAGE) * PAGE)
    st = os.statvfs(disk)
    assert st.f_bavail * st.f_frsize == leave, "tmpfs did not free exactly the pages asked"
    return filler


@pytest.mark.parametrize(("room", "refusal"), [
    ("none", "below the floor"),  # the free-disk check refuses before writing
    ("data set but not file", "no space left writing"),  # write() itself fails
])
def test_full_disk_answers_0xA700_and_stores_once_space_is_back(
        small_disk: Path, node_service: NodeFactory, room: str, refusal: str,
        caplog: pytest.LogCaptureFixture) -> None:
    node = node_service(storage={"root": str(small_disk), "min_free_mb": 0})
    ds = padded_instance(PAGE)
    # "none": nothing free. Otherwise exactly the pages the data set needs, so the free-disk
    # check passes, but the file is the data set after the preamble and file meta, one page
    # more: the write itself fails with ENOSPC.
    leave = 0 if room == "none" else len(encoded(ds))
    filler = fill(small_disk, leave)

    assert send(node, ds) == [Status.REFUSED_OUT_OF_RESOURCES]
    assert refusal in caplog.text
    assert node.instance_count() == 0
    assert node.files() == []
    assert list(node.store.tmp.iterdir()) == []  # no partial file

    filler.unlink()  # space is freed: the modality's retry is stored
    assert send(node, ds) == [Status.SUCCESS]
    assert list(node.instance_paths()) == [ds.SOPInstanceUID]
    assert_consistent(node)


def test_database_locked_past_the_busy_timeout_answers_0xA700(
        node_service: NodeFactory, caplog: pytest.LogCaptureFixture) -> None:
    # 1 s: long enough for the node's own writers (audit, heartbeat) on a slow machine
    node = node_service(database={"busy_timeout_ms": 1000})
    first, *rest = ct_series(3, rows=16, cols=16)
    assert send(node, first) == [Status.SUCCESS]

    path = node.config.database.url.split("///", 1)[1]
    locker = sqlite3.connect(path, isolation_level=None, timeout=5)
    try:
        locker.execute("BEGIN EXCLUSIVE")  # another process holding the write lock
        statuses = send(node, *rest)
        assert statuses == [Status.REFUSED_OUT_OF_RESOURCES] * 2
        assert "database unavailable" in caplog.text
        assert len(node.files()) == 1  # the refused instances' files are gone again
        assert list(node.store.tmp.iterdir()) == []
    finally:
        locker.rollback()
        locker.close()

    assert list(node.instance_paths()) == [first.SOPInstanceUID]
    assert send(node, *rest) == [Status.SUCCESS] * 2  # the retry after the lock is released
    assert set(node.instance_paths()) == {ds.SOPInstanceUID for ds in (first, *rest)}
    assert_consistent(node)


@pytest.fixture
def lost_after_commit(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The first C-STORE's COMMIT takes effect, then raises as a PostgreSQL connection lost
    while the server answered would; the list gets the SOP Instance UID it happened to."""
    hit: list[str] = []
    armed: set[Connection] = set()
    record, commit = catalog.record_instances, RootTransaction.commit

    def record_and_arm(s: Session | Connection, items: list[tuple[catalog.InstanceMeta, Any]],
                       *args: Any, **kwargs: Any) -> Any:
        if not hit:
            hit.append(items[0][0].sop_instance_uid)
            armed.add(s.connection() if isinstance(s, Session) else s)
        return record(s, items, *args, **kwargs)

    def commit_then_lose(self: RootTransaction) -> None:
        lose = self.connection in armed
        armed.discard(self.connection)
        commit(self)
        if lose:
            raise OperationalError("COMMIT", None,
                                   Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(catalog, "record_instances", record_and_arm)
    monkeypatch.setattr(RootTransaction, "commit", commit_then_lose)
    return hit


def test_a_commit_that_fails_after_taking_effect_keeps_the_file(
        node_service: NodeFactory, lost_after_commit: list[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """The row was committed: its file stays, and the modality's re-send finds both."""
    node = node_service()
    (ds,) = ct_series(1, rows=16, cols=16)

    assert send(node, ds) == [Status.REFUSED_OUT_OF_RESOURCES]  # the receiver cannot know
    assert lost_after_commit == [ds.SOPInstanceUID]
    assert "failed after it took effect; the files are kept" in caplog.text
    assert list(node.instance_paths()) == [ds.SOPInstanceUID]
    assert_consistent(node)  # the row's file is there

    assert send(node, ds) == [Status.SUCCESS]  # the retry: a duplicate of the stored instance
    assert len(node.files()) == 1
    assert_consistent(node)
    path = node.store.root / node.instance_paths()[ds.SOPInstanceUID]
    assert dcmread(path).PixelData == ds.PixelData
