"""Errors raised by the storage package."""

from __future__ import annotations


class StorageError(Exception):
    """Base class for every error raised by ``storage``."""

    retryable = False


class OutOfSpaceError(StorageError):
    """The store is below its free-disk floor or a write failed for lack of space."""

    retryable = True


class StoreWriteError(StorageError):
    """Writing, syncing or renaming an instance file failed."""

    retryable = True


class DatabaseUnavailableError(StorageError):
    """The database is locked past the busy timeout or cannot be reached.

    ``maybe_committed``: the COMMIT itself failed, so the server may have committed all the
    same (a connection lost while it answered).
    """

    retryable = True

    def __init__(self, message: str, maybe_committed: bool = False) -> None:
        super().__init__(message)
        self.maybe_committed = maybe_committed


class SchemaOutOfDateError(StorageError):
    """The database schema is older than this version of aidnode."""


class JobStateError(StorageError):
    """A job transition was refused: the job is not in the expected state or lease."""
