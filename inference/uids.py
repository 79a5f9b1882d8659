"""Deterministic UIDs for result objects.

Result objects get UIDs derived from what produced them (study, input set, model name and
version), so that a repeated analysis or a repeated delivery yields the same UIDs and the PACS
sees a harmless duplicate instead of a second copy (DESIGN.md §3).

UIDs are in the ``2.25`` arc (PS3.5 B.2): the decimal form of a 128-bit integer laid out as a
UUID. The integer is taken from a SHA-256 of the parts, with the RFC 9562 version 8 ("custom")
and variant bits set, so every UID is a valid UUID-derived UID of at most 44 characters.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from pydicom.uid import RE_VALID_UID

UID_ROOT = "2.25."
_NAMESPACE = "aidnode-result-v1"


def is_valid_uid(value: object) -> bool:
    """Return whether ``value`` is a str with valid UID syntax of at most 64 characters."""
    return isinstance(value, str) and len(value) <= 64 and bool(RE_VALID_UID.match(value))


def derived_uid(*parts: str) -> str:
    """Return a ``2.25.<int>`` UID derived from a SHA-256 of ``parts``.

    The same parts always give the same UID; parts are length-prefixed before hashing, so
    ``("ab", "c")`` and ``("a", "bc")`` give different UIDs. At least one part is required.
    """
    if not parts:
        raise ValueError('Argument "parts" must contain at least one string.')
    digest = hashlib.sha256()
    for index, part in enumerate(parts):
        if not isinstance(part, str):
            raise TypeError(f'Item #{index + 1} of argument "parts" must have type str.')
        encoded = part.encode("utf-8")
        digest.update(f"{len(encoded)}:".encode("ascii"))
        digest.update(encoded)
    value = int.from_bytes(digest.digest()[:16], "big")
    value = (value & ~(0xF << 76)) | (8 << 76)  # version 8 (RFC 9562 section 5.8)
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # variant 10xx (RFC 9562 section 4.1)
    return f"{UID_ROOT}{value}"


@dataclass(frozen=True)
class ResultUIDs:
    """The UIDs of the result objects of one analysis.

    ``basis`` is the UID every other UID is derived from (itself a function of study, input
    set, model name and version); SC instances get one UID per finding label.
    """

    basis: str
    sr_series: str
    sr_instance: str
    sc_series: str

    def sc_instance(self, label_key: str) -> str:
        """Return the SOP Instance UID of the heatmap SC for the finding ``label_key``."""
        if not isinstance(label_key, str):
            raise TypeError('Argument "label_key" must have type str.')
        if not label_key:
            raise ValueError('Argument "label_key" must not be empty.')
        return derived_uid(self.basis, "sc-instance", label_key)


def result_uids(
    study_uid: str,
    input_sop_uids: Iterable[str],
    model_name: str,
    model_version: str,
) -> ResultUIDs:
    """Return the deterministic result UIDs for one analysis.

    ``input_sop_uids`` is treated as a set: its order and any repetition do not matter. A
    different study, input set, model name or model version gives different UIDs.
    """
    for name, value in (
        ("study_uid", study_uid),
        ("model_name", model_name),
        ("model_version", model_version),
    ):
        if not isinstance(value, str):
            raise TypeError(f'Argument "{name}" must have type str.')
        if not value:
            raise ValueError(f'Argument "{name}" must not be empty.')
    if not is_valid_uid(study_uid):
        raise ValueError(f'Argument "study_uid" is not a valid UID: "{study_uid}".')
    if isinstance(input_sop_uids, str):
        raise TypeError('Argument "input_sop_uids" must be an iterable of UIDs, not a str.')
    given = list(input_sop_uids)
    if not given:
        raise ValueError('Argument "input_sop_uids" must contain at least one UID.')
    for uid in given:
        if not isinstance(uid, str):
            raise TypeError('Items of argument "input_sop_uids" must have type str.')
    inputs = sorted(set(given))
    basis = derived_uid(_NAMESPACE, study_uid, "\\".join(inputs), model_name, model_version)
    return ResultUIDs(
        basis=basis,
        sr_series=derived_uid(basis, "sr-series"),
        sr_instance=derived_uid(basis, "sr-instance"),
        sc_series=derived_uid(basis, "sc-series"),
    )
