"""The file store for received instances and result objects.

A write goes to a temporary file on the same filesystem, is fsynced, renamed to a server-chosen
path (a random name, never one built from a UID) and the directory is fsynced; only then does
``write`` return. The 256 shard folders per kind are made when the service starts
(``ensure_layout``), so a write fsyncs its file and one folder, never a new folder's parent as
well. Paths in the database are relative to the root, so the root can move or sit on a
filesystem that several processes mount.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from storage.errors import OutOfSpaceError, StoreWriteError
from storage.faults import crash_point

_KINDS = ("instances", "results")
_HOST = socket.gethostname()


def _pid_namespace() -> int:
    """The pid namespace's inode: two containers may share a host name, never a namespace."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


_PIDNS = _pid_namespace()
#: On a store several hosts share, another host's partial write is removed only this late.
FOREIGN_TMP_AGE_S = 3600.0


@dataclass(frozen=True)
class StoredFile:
    path: str  # relative to the store root
    size: int


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_durable_dirs(parent: Path, names: list[str]) -> None:
    """Make sure the folders ``names`` exist under ``parent`` and survive a crash: ``parent``
    and its own parent are fsynced every time, whoever created the folders (a process that
    died before its fsync, or another process opening the same store at the same moment)."""
    parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        (parent / name).mkdir(exist_ok=True)
    _fsync_dir(parent)
    _fsync_dir(parent.parent)


class FileStore:
    """Durable, server-named files under ``root``/{instances,results}/xx/<uuid>.dcm.

    Stores written by earlier versions (``xx/yy/<uuid>.dcm``) stay readable: the database
    holds each file's relative path.
    """

    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes
        self.tmp = self.root / "tmp"
        for d in (self.tmp, *(self.root / k for k in _KINDS)):
            d.mkdir(parents=True, exist_ok=True)

    def ensure_layout(self) -> None:
        """Make the 256 shard folders per kind durable (the service calls it at start; opening
        a store only to read it, as the CLI does, writes nothing)."""
        for kind in _KINDS:
            _make_durable_dirs(self.root / kind, [f"{i:02x}" for i in range(256)])

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_space(self, needed: int = 0) -> None:
        """Raise OutOfSpaceError when writing ``needed`` bytes would cross the free-disk floor."""
        if self.free_bytes() - needed < self.min_free_bytes:
            raise OutOfSpaceError(
                f"free disk under {self.root} is below the floor of "
                f"{self.min_free_bytes // 2**20} MiB")

    def write(self, chunks: Iterable[bytes] | bytes, kind: str = "instances") -> StoredFile:
        """Write the bytes durably and return where; nothing is left behind on failure.

        Callers hash what they need (the receiver hashes the dataset without its file meta).
        """
        if kind not in _KINDS:
            raise ValueError(f'Argument "kind" must be one of {_KINDS}.')
        name = uuid.uuid4().hex
        rel = Path(kind) / name[:2] / f"{name}.dcm"
        final = self.root / rel
        # Whose partial write this is: host, pid namespace, pid.
        tmp = self.tmp / f"{_HOST}.{_PIDNS}.{os.getpid()}.{name}.part"
        size = 0
        try:
            with open(tmp, "xb") as fh:
                for chunk in ([chunks] if isinstance(chunks, bytes | bytearray | memoryview)
                              else chunks):
                    fh.write(chunk)
                    size += len(chunk)
                fh.flush()
                crash_point("store.after_write")
                os.fsync(fh.fileno())
            crash_point("store.after_fsync")
            if not final.parent.is_dir():  # not laid out yet (ensure_layout), or removed
                _make_durable_dirs(final.parent.parent, [final.parent.name])
            os.rename(tmp, final)
            _fsync_dir(final.parent)
            crash_point("store.after_rename")
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            final.unlink(missing_ok=True)  # a rename that happened before a failed dir fsync
            if not isinstance(exc, OSError):
                raise  # e.g. the chunk source failed: nothing is left behind either way
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutOfSpaceError(f"no space left writing under {self.root}") from exc
            raise StoreWriteError(f"writing {rel} failed: {exc}") from exc
        return StoredFile(path=rel.as_posix(), size=size)

    def path(self, rel: str) -> Path:
        """The absolute path of a stored file; refuses anything outside the root."""
        p = (self.root / rel).resolve()
        if self.root.resolve() not in p.parents:
            raise ValueError(f"path {rel!r} is outside the store")
        return p

    def read(self, rel: str) -> bytes:
        return self.path(rel).read_bytes()

    def remove(self, rel: str) -> None:
        self.path(rel).unlink(missing_ok=True)

    def prefetch(self, paths: Iterable[Path]) -> None:
        """Ask the kernel to start reading ``paths`` now (``posix_fadvise`` WILLNEED), so that a
        series read file after file does not wait on the disk for each one.

        Read back cold (page cache dropped), 300 CT instances of 513 KiB took 0.38 s to
        ``dcmread`` one after the other and 0.24 s after this (0.17 s from the cache). Only a
        hint: a file that is missing or a platform without it is left to the read to report.
        """
        advise = getattr(os, "posix_fadvise", None)
        if advise is None:
            return
        for p in paths:
            try:
                fd = os.open(p, os.O_RDONLY)
            except OSError:
                continue
            try:
                advise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            finally:
                os.close(fd)

    def files(self, kind: str = "instances") -> Iterator[str]:
        """Every stored file of ``kind`` as a relative path."""
        base = self.root / kind
        for p in base.rglob("*.dcm"):
            yield p.relative_to(self.root).as_posix()

    def clean_tmp(self, shared: bool = False) -> int:
        """Remove partial writes left by a crash; returns how many. Call it at start-up, before
        this process writes anything.

        With ``shared`` (a store that processes on other hosts write to as well), only this
        host's partial files whose process is gone are removed at once; another host's only
        when older than ``FOREIGN_TMP_AGE_S``. Without it, every partial file goes.
        """
        n = 0
        for p in self.tmp.glob("*.part"):
            if shared and not _abandoned(p):
                continue
            p.unlink(missing_ok=True)
            n += 1
        return n


def _abandoned(part: Path) -> bool:
    """True when the process that was writing ``part`` cannot still be writing it."""
    fields = part.name[:-len(".part")].rsplit(".", 3)  # host (may hold dots), pidns, pid, uuid
    if (len(fields) == 4 and fields[0] == _HOST and fields[1] == str(_PIDNS)
            and fields[2].isdigit()):
        pid = int(fields[2])
        if pid == os.getpid():
            return True  # an earlier process that had our pid (a container's pid 1): not us yet
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # alive, someone else's
        # Alive: it is the writer, or a later process that got its pid; only age tells.
    try:
        return time.time() - part.stat().st_mtime > FOREIGN_TMP_AGE_S
    except FileNotFoundError:
        return False
