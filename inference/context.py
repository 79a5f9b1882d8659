"""Clinical-context text for the language encoder, built only from allow-listed header fields.

The text is a short labelled sentence list, e.g. ``"Study: CHEST PA. Reason: cough. Age: 064Y.
Sex: F."``, in the order of the configured fields. Only keywords in :data:`ALLOWED_FIELDS` can
feed it; names and identifiers (:data:`FORBIDDEN_FIELDS`) are refused even when configured, so
the text can be recorded in the SR without carrying patient identity (cf. PS3.15 E.1).
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence

from pydicom.datadict import keyword_dict
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence

logger = logging.getLogger(__name__)

DEFAULT_FIELDS: tuple[str, ...] = (
    "StudyDescription",
    "SeriesDescription",
    "ReasonForTheRequestedProcedure",  # (0040,1002); "ReasonForRequestedProcedure" is an alias
    "RequestedProcedureDescription",
    "BodyPartExamined",
    "PatientAge",
    "PatientSex",
)

ALLOWED_FIELDS: Mapping[str, str] = {
    "StudyDescription": "Study",
    "SeriesDescription": "Series",
    "ReasonForTheRequestedProcedure": "Reason",
    "RequestedProcedureDescription": "Procedure",
    "BodyPartExamined": "Body part",
    "PatientAge": "Age",
    "PatientSex": "Sex",
    "Modality": "Modality",
    "ViewPosition": "View",
    "ImageLaterality": "Laterality",
    "Laterality": "Series laterality",
    "ProtocolName": "Protocol",
    "PerformedProcedureStepDescription": "Performed procedure",
    "ContrastBolusAgent": "Contrast",
}
"""Keywords that may feed the text, with their labels (DEFAULT_FIELDS first)."""

FORBIDDEN_FIELDS: frozenset[str] = frozenset(
    (
        *("PatientName", "PatientID", "IssuerOfPatientID", "OtherPatientIDs"),
        *("OtherPatientIDsSequence", "OtherPatientNames", "PatientBirthName"),
        *("PatientMotherBirthName", "PatientBirthDate", "PatientBirthTime", "PatientAddress"),
        *("PatientTelephoneNumbers", "MedicalRecordLocator", "AccessionNumber", "StudyID"),
        *("RequestedProcedureID", "InstitutionName", "InstitutionAddress", "StationName"),
        *("InstitutionalDepartmentName", "DeviceSerialNumber", "ReferringPhysicianName"),
        *("ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers", "RequestingPhysician"),
        *("PhysiciansOfRecord", "PerformingPhysicianName", "NameOfPhysiciansReadingStudy"),
        *("OperatorsName", "ScheduledPerformingPhysicianName", "StudyInstanceUID"),
        *("SeriesInstanceUID", "SOPInstanceUID"),
    )
)
"""Names and identifiers: never used, even when configured (dropped with a warning)."""

ALIASES: Mapping[str, str] = {"ReasonForRequestedProcedure": "ReasonForTheRequestedProcedure"}
"""Names people write for a keyword -> the keyword of the DICOM data dictionary."""

MAX_VALUE_CHARS = 64
"""Longest value kept from one field (longer values are cut)."""

MAX_TEXT_CHARS = 512
"""Longest text; fields that would take it past this are left out whole."""

# Sequences whose first non-empty value stands in for a missing top-level one (PS3.3 C.4.10).
_NESTED_SOURCES = ("RequestAttributesSequence",)
_CODE_FALLBACKS = {"ReasonForTheRequestedProcedure": "ReasonForRequestedProcedureCodeSequence"}
_WHITESPACE = re.compile(r"\s+")


def allowed_fields(fields: Iterable[str]) -> tuple[str, ...]:
    """Check configured fields; return the usable ones in order, without duplicates.

    Aliases (ALIASES) become their DICOM keyword; forbidden fields are dropped with a warning.
    Raises ValueError naming a keyword that is not a DICOM keyword or is not in ALLOWED_FIELDS,
    and TypeError when ``fields`` is a string.
    """
    if isinstance(fields, str):
        raise TypeError('Argument "fields" must be a sequence of keywords, not a string.')
    usable: list[str] = []
    for name in fields:
        keyword = ALIASES.get(name, name)
        if keyword in FORBIDDEN_FIELDS:
            logger.warning("context field %s identifies the patient or staff: ignored", keyword)
        elif keyword not in keyword_dict:
            raise ValueError(f'Context field "{keyword}" is not a DICOM keyword.')
        elif keyword not in ALLOWED_FIELDS:
            raise ValueError(
                f'Context field "{keyword}" is not allowed; use one of: '
                + ", ".join(ALLOWED_FIELDS)
            )
        elif keyword not in usable:
            usable.append(keyword)
    return tuple(usable)


def build_context(
    ds: Dataset, fields: Sequence[str] = DEFAULT_FIELDS
) -> tuple[str, tuple[str, ...]]:
    """Build the context text of one dataset; return it and the keywords actually used.

    Values are cleaned (control characters and line breaks removed, whitespace collapsed) and
    cut to MAX_VALUE_CHARS; the text is at most MAX_TEXT_CHARS. No value gives ``("", ())``.
    """
    return context_for_study([ds], fields)


def context_for_study(
    datasets: Sequence[Dataset], fields: Sequence[str] = DEFAULT_FIELDS
) -> tuple[str, tuple[str, ...]]:
    """Like :func:`build_context` for a study: each field comes from the first dataset with it.

    A study can carry the reason for the request on some series only.
    """
    parts: list[str] = []
    used: list[str] = []
    length = 0
    for keyword in allowed_fields(fields):
        value = next((v for ds in datasets if (v := field_value(ds, keyword))), "")
        if not value:
            continue
        part = f"{ALLOWED_FIELDS[keyword]}: {value}."
        added = len(part) + (1 if parts else 0)
        if length + added > MAX_TEXT_CHARS:
            continue
        parts.append(part)
        used.append(keyword)
        length += added
    return " ".join(parts), tuple(used)


def field_value(ds: Dataset, keyword: str) -> str:
    """The cleaned value of ``keyword`` in ``ds`` (top level, then request attributes), or ""."""
    value = clean(_raw_value(ds, keyword))
    if not value:
        for sequence in _NESTED_SOURCES:
            for item in ds.get(sequence) or ():
                if value := clean(_raw_value(item, keyword)):
                    break
            if value:
                break
    if not value and keyword in _CODE_FALLBACKS:
        for item in ds.get(_CODE_FALLBACKS[keyword]) or ():
            if value := clean(item.get("CodeMeaning")):
                break
    return value


def clean(value: object) -> str:
    """Make a header value safe for the text.

    Control and format characters (CR/LF, tabs, ESC, zero-width) become spaces, whitespace is
    collapsed, the value is cut to MAX_VALUE_CHARS and trailing dots and spaces are dropped.
    """
    if value is None:
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        text = ", ".join(str(v) for v in value)
    else:
        text = str(value)
    text = "".join(" " if unicodedata.category(ch)[0] == "C" else ch for ch in text)
    text = _WHITESPACE.sub(" ", text).strip()
    return text[:MAX_VALUE_CHARS].rstrip(" .")


def _raw_value(ds: Dataset, keyword: str) -> object:
    """The value of ``keyword`` unless it is absent or a sequence."""
    value = ds.get(keyword)
    return None if isinstance(value, DicomSequence) else value
