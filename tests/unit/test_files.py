"""The instance file store: durable writes under server-chosen names, nothing left on failure."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.errors import OutOfSpaceError, StoreWriteError
from storage.files import FileStore

UID = b"1.2.826.0.1.3680043.8.498.12345678901234567890"
DATA = b"\x00" * 128 + b"DICM" + UID + bytes(range(256)) * 40
NAME = re.compile(r"^(instances|results)/([0-9a-f]{2})/([0-9a-f]{32})\.dcm$")


def leftovers(store: FileStore) -> list[Path]:
    """Every file under tmp/, instances/ and results/."""
    return [p for d in ("tmp", "instances", "results")
            for p in (store.root / d).rglob("*") if p.is_file()]


def test_write_returns_a_server_chosen_relative_path(store: FileStore) -> None:
    stored = store.write(DATA)
    m = NAME.match(stored.path)
    assert m is not None, stored.path
    kind, shard, name = m.groups()
    assert kind == "instances"
    assert shard == name[:2]
    assert not Path(stored.path).is_absolute()
    digest = hashlib.sha256(DATA).hexdigest()
    assert digest not in stored.path and digest[:32] != name  # not named after the content
    assert UID.decode() not in stored.path
    again = store.write(DATA)
    assert again.path != stored.path  # same bytes, another name


def test_write_records_the_size_and_keeps_the_bytes(store: FileStore) -> None:
    stored = store.write(DATA)
    assert stored.size == len(DATA)
    assert (store.root / stored.path).read_bytes() == DATA
    assert store.read(stored.path) == DATA
    assert list(store.files()) == [stored.path]


def test_write_accepts_chunks(store: FileStore) -> None:
    chunks = [DATA[:100], DATA[100:4000], b"", DATA[4000:]]
    stored = store.write(iter(chunks))
    assert store.read(stored.path) == DATA
    assert stored.size == len(DATA)


def test_write_results_kind_and_refuses_an_unknown_kind(store: FileStore) -> None:
    stored = store.write(b"sr", kind="results")
    assert stored.path.startswith("results/")
    assert list(store.files("results")) == [stored.path]
    with pytest.raises(ValueError, match='"kind"'):
        store.write(b"x", kind="../etc")
    assert leftovers(store) == [store.root / stored.path]


def test_write_leaves_no_part_file(store: FileStore) -> None:
    for _ in range(3):
        store.write(DATA)
    assert list(store.tmp.iterdir()) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_fsync_out_of_space_raises_out_of_space_and_leaves_nothing(
        store: FileStore, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    def no_space(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OutOfSpaceError, match="no space") as info:
        store.write(DATA)
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.retryable is True
    assert leftovers(store) == []


def test_failed_directory_fsync_after_rename_leaves_nothing(
        store: FileStore, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync, calls = os.fsync, []

    def second_fails(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:  # the first syncs the file, the second its directory
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", second_fails)
    with pytest.raises(OutOfSpaceError):
        store.write(DATA)
    assert len(calls) == 2
    assert leftovers(store) == []


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The path of everything fsynced from now on, in order."""
    paths: list[str] = []
    real_fsync = os.fsync

    def record(fd: int) -> None:
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    return paths


def test_a_write_fsyncs_its_file_and_its_folder_only(store: FileStore, synced: list[str]) -> None:
    store.ensure_layout()
    synced.clear()
    for _ in range(20):  # any of the 256 shards: ensure_layout made them all
        synced.clear()
        stored = store.write(DATA)
        final = store.root / stored.path
        assert len(synced) == 2
        assert synced[0].startswith(str(store.tmp / ""))  # the file, before its rename
        assert synced[1] == str(final.parent)


def test_a_missing_shard_folder_is_made_durably_by_the_write(store: FileStore,
                                                            synced: list[str]) -> None:
    store.ensure_layout()
    for shard in (store.root / "instances").iterdir():
        shard.rmdir()
    synced.clear()
    stored = store.write(DATA)
    final = store.root / stored.path
    assert final.read_bytes() == DATA
    # The new folder's entry (and its parent's), then the file's entry in it.
    assert synced[1:] == [str(final.parent.parent), str(store.root), str(final.parent)]


def test_ensure_layout_makes_the_folders_durable_whoever_made_them(
        tmp_path: Path, synced: list[str]) -> None:
    """A process that died between making the folders and fsyncing them, or another process
    starting on the same store at once, must not leave entries that a power cut could lose."""
    FileStore(tmp_path / "store").ensure_layout()
    synced.clear()
    store = FileStore(tmp_path / "store")
    store.ensure_layout()  # every folder exists already
    assert len(list((store.root / "instances").iterdir())) == 256
    for kind in ("instances", "results"):
        assert str(store.root / kind) in synced  # the shard folders' entries
    assert str(store.root) in synced  # the kinds' entries


def test_opening_a_store_to_read_it_writes_nothing(tmp_path: Path) -> None:
    """The CLI opens the store to read it, maybe as a user who may not write there: opening
    makes no shard folders (the service's ensure_layout does)."""
    root = tmp_path / "store"
    FileStore(root)
    (root / "instances" / "ab" / "cd").mkdir(parents=True)  # an earlier two-level layout
    store = FileStore(root)
    assert list(store.files()) == []
    assert [p.name for p in (root / "instances").iterdir()] == ["ab"]
    assert list((root / "results").iterdir()) == []


@pytest.mark.parametrize("target", ["fsync", "rename"])
def test_other_os_errors_raise_store_write_error_and_leave_nothing(
        store: FileStore, monkeypatch: pytest.MonkeyPatch, target: str) -> None:
    def io_error(*args: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, target, io_error)
    with pytest.raises(StoreWriteError, match="Input/output error") as info:
        store.write(DATA)
    assert not isinstance(info.value, OutOfSpaceError)
    assert isinstance(info.value.__cause__, OSError)
    assert leftovers(store) == []


def test_a_failing_chunk_source_leaves_nothing(store: FileStore) -> None:
    class SourceError(Exception):
        pass

    def failing() -> Iterator[bytes]:
        yield DATA[:10]
        raise SourceError("association aborted mid-dataset")

    with pytest.raises(SourceError):
        store.write(failing())
    assert leftovers(store) == []


def test_check_space_below_the_floor_raises(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    FileStore(tmp_path / "ok", min_free_bytes=0).check_space(1024)
    tight = FileStore(tmp_path / "tight", min_free_bytes=free + 2**40)
    with pytest.raises(OutOfSpaceError, match="below the floor"):
        tight.check_space()
    roomy = FileStore(tmp_path / "roomy", min_free_bytes=0)
    with pytest.raises(OutOfSpaceError):
        roomy.check_space(needed=free + 2**40)


@pytest.mark.parametrize("rel", ["../x", "instances/../../x", "/etc/passwd", ""])
def test_path_refuses_anything_outside_the_root(store: FileStore, rel: str) -> None:
    with pytest.raises(ValueError, match="outside the store"):
        store.path(rel)


def test_remove_deletes_a_stored_file_and_refuses_escapes(store: FileStore,
                                                          tmp_path: Path) -> None:
    outside = tmp_path / "precious"
    outside.write_bytes(b"keep")
    stored = store.write(DATA)
    assert store.path(stored.path) == (store.root / stored.path).resolve()
    store.remove(stored.path)
    assert leftovers(store) == []
    with pytest.raises(ValueError):
        store.remove("../precious")
    assert outside.read_bytes() == b"keep"


def test_prefetch_advises_the_kernel_for_each_file_and_skips_missing_ones(
        store: FileStore, monkeypatch: pytest.MonkeyPatch) -> None:
    stored = [store.path(store.write(bytes([n]) * 1000).path) for n in range(3)]
    advised: list[tuple[str, int]] = []
    real = os.posix_fadvise

    def record(fd: int, offset: int, length: int, advice: int) -> None:
        advised.append((os.readlink(f"/proc/self/fd/{fd}"), advice))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", record)
    store.prefetch([stored[0], store.root / "instances" / "gone.dcm", *stored[1:]])
    assert advised == [(str(p), os.POSIX_FADV_WILLNEED) for p in stored]
    assert [p.read_bytes() for p in stored] == [bytes([n]) * 1000 for n in range(3)]
    fds_before = len(os.listdir("/proc/self/fd"))
    store.prefetch(stored)
    assert len(os.listdir("/proc/self/fd")) == fds_before  # every descriptor is closed


def test_clean_tmp_removes_leftover_part_files(store: FileStore) -> None:
    for name in ("a.part", "b.part"):
        (store.tmp / name).write_bytes(b"half a dataset")
    kept = store.write(DATA)
    assert store.clean_tmp() == 2
    assert list(store.tmp.iterdir()) == []
    assert store.read(kept.path) == DATA
    assert store.clean_tmp() == 0


def test_store_creates_its_folders(tmp_path: Path) -> None:
    root = tmp_path / "deep" / "store"
    FileStore(root)
    assert all((root / d).is_dir() for d in ("tmp", "instances", "results"))


def test_clean_tmp_on_a_shared_store_spares_live_writers(store: FileStore) -> None:
    """On a store other processes write to, only partial files whose writer is gone are removed
    at start-up: a dead pid in our pid namespace on this host, or anything older than an hour
    (another host's, another container's, or a pid since reused)."""
    import os
    import socket
    import time

    from storage import files

    dead = _dead_pid()
    me = f"{socket.gethostname()}.{files._PIDNS}"
    mine_dead = store.tmp / f"{me}.{dead}.aa.part"
    mine_live = store.tmp / f"{me}.{os.getppid()}.bb.part"  # the parent is alive
    mine_live_old = store.tmp / f"{me}.{os.getppid()}.ee.part"  # alive, but its pid was reused
    other_ns = store.tmp / f"{socket.gethostname()}.1.{dead}.ff.part"  # another container
    other_new = store.tmp / "scanner-host.4026531836.1234.cc.part"
    other_old = store.tmp / "scanner-host.4026531836.1234.dd.part"
    for p in (mine_dead, mine_live, mine_live_old, other_ns, other_new, other_old):
        p.write_bytes(b"partial")
    old = time.time() - files.FOREIGN_TMP_AGE_S - 60
    for p in (other_old, mine_live_old):
        os.utime(p, (old, old))
    assert store.clean_tmp(shared=True) == 3
    assert sorted(p.name for p in store.tmp.glob("*.part")) == sorted(
        [mine_live.name, other_ns.name, other_new.name])
    assert store.clean_tmp() == 3  # a store of its own: everything partial goes


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid
