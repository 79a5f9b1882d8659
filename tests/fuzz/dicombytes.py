"""Hypothesis strategies that produce DICOM data sets as bytes, valid or not, for the fuzzers.

Data sets are written element by element here rather than with pydicom, so the fuzzers can
say what pydicom's writer would refuse: any tag, any VR (or none that exists), any value bytes,
odd lengths, out-of-order tags, nested sequences. ``FUZZ`` is the settings every fuzz test uses.

How many examples: ``AIDNODE_FUZZ_EXAMPLES`` (default 200, what CI runs). To fuzz for longer by
hand::

    AIDNODE_FUZZ_EXAMPLES=20000 python3 -m pytest tests/fuzz -x

A failure prints the smallest example hypothesis found and a ``@reproduce_failure`` blob; the
example is also kept in ``.hypothesis/`` and tried first on the next run.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from io import BytesIO

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from pydicom import dcmwrite
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
)

from tests.dicomgen import cr_image, ct_series

EXAMPLES = int(os.environ.get("AIDNODE_FUZZ_EXAMPLES", "200"))
#: hypothesis's failure report imports mypy_extensions, which warns; without this the report
#: itself fails under ``filterwarnings = error`` and hides the falsifying example.
REPORT_WARNING = "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning"
FUZZ = settings(max_examples=EXAMPLES, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])

VRS = ("AE", "AS", "AT", "CS", "DA", "DS", "DT", "FL", "FD", "IS", "LO", "LT", "OB", "OD", "OF",
       "OL", "OV", "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN",
       "UR", "US", "UT", "UV")
LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "UV", "SV"}
LE_SYNTAXES = (ImplicitVRLittleEndian, ExplicitVRLittleEndian)
ANY_SYNTAX = (*LE_SYNTAXES, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian,
              JPEGBaseline8Bit, RLELossless)

SOP_CLASS, SOP_INSTANCE = 0x00080016, 0x00080018
STUDY, SERIES = 0x0020000D, 0x0020000E
REQUIRED_UIDS = (SOP_CLASS, SOP_INSTANCE, STUDY, SERIES)
# tag -> its VR: what the receiver and the pixel pipeline read.
INTERESTING = {
    0x00080005: "CS",  # SpecificCharacterSet
    0x00080008: "CS",  # ImageType
    0x00080060: "CS",  # Modality
    0x00081030: "LO",  # StudyDescription
    0x0008103E: "LO",  # SeriesDescription
    0x00180015: "CS",  # BodyPartExamined
    0x00280002: "US",  # SamplesPerPixel
    0x00280004: "CS",  # PhotometricInterpretation
    0x00280006: "US",  # PlanarConfiguration
    0x00280008: "IS",  # NumberOfFrames
    0x00280010: "US",  # Rows
    0x00280011: "US",  # Columns
    0x00280100: "US",  # BitsAllocated
    0x00280101: "US",  # BitsStored
    0x00280102: "US",  # HighBit
    0x00280103: "US",  # PixelRepresentation
    0x00281050: "DS",  # WindowCenter
    0x00281051: "DS",  # WindowWidth
    0x00281052: "DS",  # RescaleIntercept
    0x00281053: "DS",  # RescaleSlope
    0x00281056: "CS",  # VOILUTFunction
    0x00283000: "SQ",  # ModalityLUTSequence
    0x00283010: "SQ",  # VOILUTSequence
    0x7FE00010: "OW",  # PixelData
}

Value = bytes | list[list["Element"]]


@dataclass(frozen=True)
class Element:
    tag: int
    vr: str
    value: Value  # bytes, or the items of a sequence


def encode(elements: list[Element], *, implicit: bool) -> bytes:
    """Little endian data set bytes, elements in the order given, lengths as they come."""
    out = bytearray()
    for e in elements:
        value = e.value if isinstance(e.value, bytes) else encode_items(e.value, implicit)
        out += struct.pack("<HH", e.tag >> 16, e.tag & 0xFFFF)
        if implicit:
            out += struct.pack("<I", len(value))
        elif e.vr in LONG_VRS:
            out += e.vr.encode("latin-1")[:2].ljust(2, b"\0") + b"\0\0"
            out += struct.pack("<I", len(value))
        else:
            out += e.vr.encode("latin-1")[:2].ljust(2, b"\0")
            out += struct.pack("<H", min(len(value), 0xFFFF))
            value = value[:0xFFFF]
        out += value
    return bytes(out)


def encode_items(items: list[list[Element]], implicit: bool) -> bytes:
    out = bytearray()
    for item in items:
        body = encode(item, implicit=implicit)
        out += struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body
    return bytes(out)


# -- values --------------------------------------------------------------------------------

uid_component = st.one_of(st.just("0"), st.integers(1, 10**12).map(str))
valid_uids = st.lists(uid_component, min_size=2, max_size=8).map(".".join).filter(
    lambda u: len(u) <= 64)
hostile_uids = st.one_of(
    valid_uids.map(lambda u: u + "\0"),  # the padding PS3.5 allows
    valid_uids.map(lambda u: u + " "),
    st.sampled_from(["", "../../x", "1.2.3\\1.2.4", "1.02.3", "1..2", ".1.2", "1.2.", "a.b",
                     "1.2.840.10008.1.2\0\0", "9" * 65, "1." + "2" * 63, "\u00e9.1"]),
    st.text(max_size=70),
)
uids = st.one_of(valid_uids, valid_uids, valid_uids, hostile_uids)  # a quarter hostile
numbers = st.one_of(st.integers(-(2**40), 2**40).map(str),
                    st.floats(allow_nan=True, allow_infinity=True).map(repr),
                    st.sampled_from(["nan", "inf", "-inf", "1e308", "-1e308", "1e-320", "0",
                                     "-0", " 5 ", "1\\2", "", "x", "1,5", "+1"]))
texts = st.one_of(st.text(max_size=40), st.sampled_from([
    "CT", "CR", "DX", "OT", "MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422",
    "PALETTE COLOR", "ISO_IR 100", "ISO_IR 192", "ISO 2022 IR 87", "GB18030", "ORIGINAL\\PRIMARY",
    "LINEAR", "SIGMOID", "LINEAR_EXACT", "\\\\", "\0"]))


def text_bytes(s: str) -> bytes:
    data = s.encode("utf-8")
    return data + b" " if len(data) % 2 else data


def us(n: int) -> bytes:
    return struct.pack("<H", n & 0xFFFF)


def value_for(vr: str, tag: int) -> st.SearchStrategy[Value]:
    """Bytes for a value of ``vr``: mostly plausible, sometimes anything."""
    raw = st.binary(max_size=64)
    if vr == "UI":
        typed: st.SearchStrategy[bytes] = uids.map(text_bytes)
    elif vr in ("US", "SS"):
        typed = st.one_of(st.sampled_from([0, 1, 2, 3, 7, 8, 12, 15, 16, 32, 64, 65535])
                          .map(us), st.integers(0, 0xFFFF).map(us))
    elif vr in ("IS", "DS"):
        typed = numbers.map(text_bytes)
    elif vr in ("CS", "LO", "SH", "LT", "ST", "UT", "PN", "UC"):
        typed = texts.map(text_bytes)
    elif vr in ("OB", "OW", "UN"):
        typed = st.binary(max_size=512)
    elif vr == "SQ":
        return st.lists(st.lists(lut_element(), max_size=3), max_size=2)
    else:
        typed = raw
    return st.one_of(typed, raw) if tag not in REQUIRED_UIDS else typed


@st.composite
def lut_element(draw: st.DrawFn) -> Element:
    """An element of a LUT item: descriptor, data, explanation, or anything."""
    tag, vr = draw(st.sampled_from([(0x00283002, "US"), (0x00283006, "OW"),
                                    (0x00283003, "LO"), (0x00281052, "DS")]))
    if tag == 0x00283002:  # LUTDescriptor: entries, first mapped, bits
        value = b"".join(us(draw(st.integers(0, 0xFFFF))) for _ in range(draw(st.integers(0, 4))))
    else:
        value = draw(st.binary(max_size=64))
    return Element(tag, vr, value)


PRESENT = (True,) * 9 + (False,)  # sampled uniformly, unlike a drawn integer


@st.composite
def elements(draw: st.DrawFn, *, with_uids: bool = True) -> list[Element]:
    """The required UIDs (each may be missing or hostile), interesting attributes with their
    own VR or another, and arbitrary tags; sorted by tag unless hypothesis chooses otherwise."""
    out: list[Element] = []
    if with_uids:
        for tag in REQUIRED_UIDS:
            if draw(st.sampled_from(PRESENT)):  # nine times out of ten
                out.append(Element(tag, "UI", draw(value_for("UI", tag))))
    for tag in draw(st.sets(st.sampled_from(sorted(INTERESTING)), max_size=10)):
        vr = draw(st.one_of(st.just(INTERESTING[tag]), st.sampled_from(VRS)))
        out.append(Element(tag, vr, draw(value_for(vr, tag))))
    for _ in range(draw(st.integers(0, 3))):
        tag = draw(st.integers(0x00020000, 0xFFFEE0DD))
        vr = draw(st.one_of(st.sampled_from(VRS), st.text(
            st.characters(max_codepoint=255), min_size=2, max_size=2)))
        out.append(Element(tag, vr, draw(value_for(vr, tag))))
    if draw(st.sampled_from(PRESENT)):  # in tag order nine times out of ten
        out.sort(key=lambda e: e.tag)
    return out


# -- valid instances and their mutations ----------------------------------------------------


def dataset_bytes(ds: Dataset, syntax: UID = ExplicitVRLittleEndian) -> bytes:
    """The data set alone (no file meta), as a C-STORE carries it."""
    plain = Dataset()
    plain.update(ds)
    buf = BytesIO()
    dcmwrite(buf, plain, implicit_vr=syntax.is_implicit_VR,
             little_endian=syntax.is_little_endian)
    return buf.getvalue()


VALID = [ct_series(1, rows=8, cols=8)[0], cr_image(rows=8, cols=8, seed=1)]


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a few byte-level mutations: flips, overwrites, cuts, insertions."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "overwrite", "truncate", "insert", "delete", "dup"]))
        pos = draw(st.integers(0, max(0, len(buf) - 1)))
        if op == "flip" and buf:
            buf[pos] ^= draw(st.integers(1, 255))
        elif op == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=8))
            buf[pos:pos + len(chunk)] = chunk
        elif op == "truncate":
            del buf[pos:]
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del buf[pos:pos + draw(st.integers(1, 16))]
        else:
            n = draw(st.integers(1, 16))
            buf[pos:pos] = buf[pos:pos + n]
    return bytes(buf)
