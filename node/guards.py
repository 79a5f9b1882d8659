"""Checks on what a C-STORE carries, made before anything is written (DESIGN §5).

Each raises ``InvalidDatasetError`` (C210), ``DatasetTooLargeError`` or ``ImageTooLargeError``
(A700) or ``UIDMismatchError`` (A900); ``node.status`` maps them to the answer.
"""

from __future__ import annotations

import re
import zlib
from io import BytesIO
from typing import Any

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator

from node.errors import DatasetTooLargeError, InvalidDatasetError, UIDMismatchError

UID_SYNTAX = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")  # PS3.5 9.1, whole value
INFLATE_CHUNK = 1 << 20  # bytes of inflated data held at a time while checking its size
UNDEFINED_LENGTH = 0xFFFFFFFF
DEFER_BYTES = 4096  # values longer than this are skipped, not read, while checking lengths


def valid_uid(value: object) -> bool:
    """A UID as PS3.5 9.1 defines it: digits and dots, no leading zeros, at most 64 characters
    (so never ``..``, ``/``, NUL or anything else a path or a log line could misuse)."""
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(UID_SYNTAX.fullmatch(value))


def check_inflated_size(raw: bytes, limit: int) -> bytes:
    """Inflate a deflated data set (PS3.5 A.5) in pieces, checking its size as it grows;
    return the inflated bytes (at most ``limit``), for ``check_complete``.

    Raises DatasetTooLargeError as soon as more than ``limit`` bytes came out (a deflate bomb
    inflates to gigabytes from a few megabytes), InvalidDatasetError when it is not deflate data.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    pending, total, pieces = raw, 0, []
    try:
        while not inflater.eof:
            out = inflater.decompress(pending, INFLATE_CHUNK)
            total += len(out)
            if total > limit:
                raise DatasetTooLargeError(
                    f"the deflated data set inflates to more than node.max_dataset_bytes ({limit})")
            pieces.append(out)
            pending = inflater.unconsumed_tail
            if not out and not pending:
                break  # the deflate stream itself is cut short: check_complete finds the rest
    except zlib.error as exc:
        raise InvalidDatasetError(f"the deflated data set cannot be inflated: {exc}") from exc
    return b"".join(pieces)


def check_complete(raw: bytes, implicit_vr: bool, little_endian: bool) -> None:
    """Every top-level element of the encoded data set is all there.

    pydicom reads a data set cut short without a word: the last value just comes out shorter,
    and a header cut in two ends the data set. Raises InvalidDatasetError for either, and for a
    sequence or item of undefined length whose delimiter never comes (PS3.5 7.5).
    """
    fp = BytesIO(raw)
    end = 0
    try:
        for elem in data_element_generator(fp, implicit_vr, little_endian,
                                           defer_size=DEFER_BYTES):
            if (isinstance(elem, RawDataElement) and elem.length != UNDEFINED_LENGTH
                    and elem.value_tell + elem.length > len(raw)):
                raise InvalidDatasetError(
                    f"the data set ends inside element {elem.tag} ({len(raw) - elem.value_tell}"
                    f" of its {elem.length} bytes)")
            end = fp.tell()
    except InvalidDatasetError:
        raise
    except Exception as exc:  # EOFError for a missing delimiter, struct.error, ...
        raise InvalidDatasetError(f"data set cannot be decoded: {exc}") from exc
    if end != len(raw):
        raise InvalidDatasetError(f"the data set ends inside an element header at byte {end}")


def check_dataset(ds: Dataset, request: Any, max_pixel_bytes: int,
                  context_sop_class: str | None = None) -> None:
    """Validate the decoded data set against the C-STORE command (PS3.4 B.2.3).

    ``context_sop_class`` is the abstract syntax of the presentation context the C-STORE came
    on: a command naming another SOP class is a mismatch too (A900). Images must pass the
    pixel-size guard (Rows x Columns x frames x samples x bytes) before anything decodes them.
    """
    try:
        sop_class, sop_uid = ds.SOPClassUID, ds.SOPInstanceUID
        study_uid, series_uid = ds.StudyInstanceUID, ds.SeriesInstanceUID
    except AttributeError as exc:
        raise InvalidDatasetError(f"required UID missing: {exc}") from exc
    except Exception as exc:  # pydicom decodes lazily: a broken element fails here
        raise InvalidDatasetError(f"dataset cannot be decoded: {exc}") from exc
    for name, value in (("SOPClassUID", sop_class), ("SOPInstanceUID", sop_uid),
                        ("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid)):
        if not valid_uid(value):
            raise InvalidDatasetError(f"{name} is not a valid UID")
    if sop_uid != request.AffectedSOPInstanceUID:
        raise UIDMismatchError("SOP Instance UID differs from the command's")
    if sop_class != request.AffectedSOPClassUID:
        raise UIDMismatchError("SOP Class UID differs from the command's")
    if context_sop_class is not None and sop_class != context_sop_class:
        raise UIDMismatchError("SOP Class UID differs from the presentation context's")
    if "PixelData" in ds or "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        from inference.errors import ImageTooLargeError
        from inference.pixels import check_size  # the same guard the model applies

        try:
            check_size(ds, max_pixel_bytes)
        except ImageTooLargeError:
            raise
        except Exception as exc:
            raise InvalidDatasetError(f"image attributes are invalid: {exc}") from exc


__all__ = ["check_complete", "check_dataset", "check_inflated_size", "valid_uid"]
