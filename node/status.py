"""DIMSE status codes and the table that maps failures to them.

Codes from PS3.4 Annex B.2.3 (Storage Service Class, C-STORE statuses) and PS3.7 Annex C.
"""

from __future__ import annotations

from enum import IntEnum

from inference.errors import ImageTooLargeError
from node.errors import (
    DatasetTooLargeError,
    InvalidDatasetError,
    NodeError,
    UIDMismatchError,
)
from storage.errors import DatabaseUnavailableError, OutOfSpaceError, StoreWriteError


class Status(IntEnum):
    SUCCESS = 0x0000
    WARNING_COERCION = 0xB000  # PS3.4 B.2.3: coercion of data elements
    WARNING_ELEMENTS_DISCARDED = 0xB006  # PS3.4 B.2.3: elements discarded
    REFUSED_OUT_OF_RESOURCES = 0xA700  # PS3.4 B.2.3: A7xx
    ERROR_DATASET_MISMATCH = 0xA900  # PS3.4 B.2.3: A9xx data set does not match SOP class
    ERROR_CANNOT_UNDERSTAND = 0xC210  # PS3.4 B.2.3: Cxxx cannot understand
    PROCESSING_FAILURE = 0x0110  # PS3.7 C.4.2


#: failure -> the status the C-STORE handler answers. The first matching class wins.
#:
#: A data set over one of our size limits (``node.max_dataset_bytes``, also checked on the
#: inflated size of a deflated data set, and ``node.max_pixel_bytes``, Rows x Columns x frames x
#: samples x bytes, checked before any decode) is A700 Refused: Out of Resources (PS3.4 B.2.3),
#: not C210 Cannot Understand: it may be valid, only too large for this node.
EXCEPTION_STATUS: tuple[tuple[type[BaseException], Status], ...] = (
    (UIDMismatchError, Status.ERROR_DATASET_MISMATCH),
    (DatasetTooLargeError, Status.REFUSED_OUT_OF_RESOURCES),
    (InvalidDatasetError, Status.ERROR_CANNOT_UNDERSTAND),
    (ImageTooLargeError, Status.REFUSED_OUT_OF_RESOURCES),
    (OutOfSpaceError, Status.REFUSED_OUT_OF_RESOURCES),
    (StoreWriteError, Status.REFUSED_OUT_OF_RESOURCES),
    (DatabaseUnavailableError, Status.REFUSED_OUT_OF_RESOURCES),
    (NodeError, Status.PROCESSING_FAILURE),
)


def status_for(exc: BaseException) -> Status:
    """The C-STORE status for a failure; anything unexpected is a processing failure."""
    for cls, status in EXCEPTION_STATUS:
        if isinstance(exc, cls):
            return status
    return Status.PROCESSING_FAILURE


def is_success(status: int) -> bool:
    return status == Status.SUCCESS


def is_warning(status: int) -> bool:
    return status in (0x0001, 0x0107, 0x0116) or (status & 0xF000) == 0xB000


# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service user, calling AE not recognised
REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # permanent, service user, called AE not recognised
REJECT_TOO_MANY = (0x02, 0x03, 0x02)  # transient, provider (presentation), local limit exceeded

# A-ABORT (source, reason), PS3.8 9.3.8 table 9-26
ABORT_PDU_TOO_LONG = (0x02, 0x06)  # service provider, invalid PDU parameter value (its length)
ABORT_DATASET_TOO_LARGE = (0x00, 0x00)  # service user (a local limit); reason not significant
