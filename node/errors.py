"""Errors raised by the node package (networking, service, CLI)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class NodeError(Exception):
    """Base class for errors of the ``node`` package."""

    retryable = False


class ConfigError(NodeError):
    """The configuration is invalid; ``problems`` lists each with its key."""

    def __init__(self, problems: Sequence[str], source: Path | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{len(self.problems)} problem(s) in the configuration:\n  "
                         + "\n  ".join(self.problems))


class PeerAddressError(NodeError):
    """An ``AET@HOST:PORT`` argument is malformed."""


class AssociationError(NodeError):
    """A peer refused or dropped an association, or did not answer."""

    retryable = True


class SendError(NodeError):
    """A C-STORE to a destination failed; ``status`` is the DIMSE status when there is one."""

    def __init__(self, message: str, status: int | None = None, retryable: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


class InvalidDatasetError(NodeError):
    """A received dataset cannot be decoded, or required UIDs are missing or malformed."""


class UIDMismatchError(NodeError):
    """The dataset's SOP Class/Instance UID differs from the C-STORE command's."""


class DatasetTooLargeError(InvalidDatasetError):
    """A received data set, or its inflated form, is larger than ``node.max_dataset_bytes``."""
