"""Fuzz the pixel pipeline (``inference.pixels``) with small images whose header hypothesis
makes up: Rows, Columns, frames, samples, BitsAllocated/Stored, HighBit, PixelRepresentation,
PhotometricInterpretation, PlanarConfiguration, rescale, window, VOI function, LUT sequences
and the pixel bytes, each mostly plausible and sometimes anything.

The data set is written as bytes and read back with pydicom, as the worker reads a stored
instance, so values pydicom's writer would refuse still arrive. ``frames`` must return float32
of shape (frames, rows, cols), finite and in [0, 1], or raise an ``InferenceError``; so must
``display_uint8`` (uint8) and ``to_model_input`` on the result. Anything else is a bug. As in
production, warnings are not errors here. Run longer by hand:
``AIDNODE_FUZZ_EXAMPLES=20000 python3 -m pytest tests/fuzz -x``.
"""

from __future__ import annotations

import math
import struct
import warnings
from io import BytesIO

import numpy as np
import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from inference.errors import InferenceError, PixelDataError
from inference.pixels import Windowing, display_uint8, frames, to_model_input
from tests.fuzz.dicombytes import (
    FUZZ,
    REPORT_WARNING,
    Element,
    encode,
    lut_element,
    numbers,
    text_bytes,
    us,
)

pytestmark = pytest.mark.filterwarnings(REPORT_WARNING)

MAX_BYTES = 1 << 16  # the size guard: anything bigger must be refused, not decoded
PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR",
               "YBR_ICT", "HSV", "", "junk")


WILD = ("samples", "photometric", "rows", "columns", "bits", "stored", "high", "sign", "frames",
        "planar", "pixels")


@st.composite
def images(draw: st.DrawFn) -> tuple[bytes, bool]:
    """(data set bytes, implicit VR) of a small image with a made-up header: a consistent one
    with at most a few fields (``WILD``) made anything, plus optional rescale, window and LUTs.
    """
    wild = draw(st.sets(st.sampled_from(WILD), max_size=3))
    rows, cols = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    n_frames, samples = draw(st.integers(1, 3)), draw(st.sampled_from([1, 3]))
    bits = draw(st.sampled_from([1, 8, 16, 32]) if samples == 1 else st.just(8))
    stored = draw(st.integers(1, bits))
    any_us = st.integers(0, 0xFFFF).map(us)

    def field(name: str, plausible: bytes, anything: st.SearchStrategy[bytes] = any_us) -> bytes:
        return draw(anything) if name in wild else plausible

    grey = draw(st.sampled_from(["MONOCHROME1", "MONOCHROME2"]))
    colour = draw(st.sampled_from(["RGB", "YBR_FULL"]))
    els = [
        Element(0x00280002, "US", field("samples", us(samples))),
        Element(0x00280004, "CS", field("photometric", text_bytes(grey if samples == 1 else colour),
                                        st.sampled_from(PHOTOMETRIC).map(text_bytes))),
        Element(0x00280010, "US", field("rows", us(rows))),
        Element(0x00280011, "US", field("columns", us(cols))),
        Element(0x00280100, "US", field("bits", us(bits))),
        Element(0x00280101, "US", field("stored", us(stored))),
        Element(0x00280102, "US", field("high", us(stored - 1))),
        Element(0x00280103, "US", field("sign", us(draw(st.integers(0, 1))))),
    ]
    if n_frames > 1 or "frames" in wild or draw(st.booleans()):
        els.append(Element(0x00280008, "IS", field("frames", text_bytes(str(n_frames)),
                                                   numbers.map(text_bytes))))
    if samples == 3 or "planar" in wild:
        els.append(Element(0x00280006, "US", field("planar", us(draw(st.integers(0, 1))))))
    for tag in (0x00281052, 0x00281053, 0x00281050, 0x00281051):  # intercept, slope, window
        if draw(st.booleans()):
            values = draw(st.lists(numbers, min_size=1, max_size=3))
            els.append(Element(tag, "DS", text_bytes("\\".join(values))))
    if draw(st.booleans()):
        els.append(Element(0x00281056, "CS", text_bytes(draw(st.sampled_from(
            ["LINEAR", "LINEAR_EXACT", "SIGMOID", "", "BOGUS"])))))
    for tag in (0x00283000, 0x00283010):  # Modality LUT, VOI LUT sequences
        if draw(st.integers(0, 5)) == 0:
            els.append(Element(tag, "SQ", draw(st.lists(st.lists(lut_element(), max_size=3),
                                                        min_size=1, max_size=2))))
    size = rows * cols * n_frames * samples
    expected = math.ceil(size / 8) if bits == 1 else size * (bits // 8)
    exact = draw(st.binary(min_size=expected, max_size=expected))
    pixels = field("pixels", exact + b"\0" * (len(exact) % 2), st.one_of(
        st.just(exact), st.binary(max_size=2 * expected + 8)))
    els.append(Element(0x7FE00010, "OB" if bits <= 8 else "OW", pixels))
    els.sort(key=lambda e: e.tag)
    implicit = draw(st.booleans())
    return encode(els, implicit=implicit), implicit


def read(data: bytes, implicit: bool) -> Dataset:
    ds = read_dataset(BytesIO(data), is_implicit_VR=implicit, is_little_endian=True)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return ds


def header_shape(ds: Dataset) -> tuple[int, int, int]:
    n = ds.get("NumberOfFrames")
    return int(n) if n not in (None, "") else 1, int(ds.Rows), int(ds.Columns)


windowings = st.one_of(
    st.just(Windowing()),
    st.just(Windowing(use_header=False)),
    st.builds(Windowing, center=st.floats(-5000, 5000), width=st.floats(1, 10000)),
)


@FUZZ
@given(image=images(), windowing=windowings)
def test_pixel_pipeline_returns_unit_floats_or_an_inference_error(
        image: tuple[bytes, bool], windowing: Windowing) -> None:
    ds = read(*image)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = frames(ds, windowing, max_bytes=MAX_BYTES)
        except InferenceError as exc:
            event(f"refused: {type(exc).__name__}: {str(exc)[:50]}")
            return
        event("decoded")
        assert out.dtype == np.float32
        assert out.shape == header_shape(ds)
        assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
        shown = display_uint8(ds, 0, windowing)  # decodes again: the same answer
        assert shown.dtype == np.uint8 and shown.shape == out.shape[1:]
        model_input, box = to_model_input(out[0], 16)
        assert model_input.shape == (16, 16) and np.isfinite(model_input).all()
        assert (box.src_rows, box.src_cols) == out.shape[1:]


def plain(**changes: Element) -> list[Element]:
    """A 1 x 2 MONOCHROME1 8-bit image, with elements added or replaced by keyword."""
    els = {"samples": Element(0x00280002, "US", us(1)),
           "photometric": Element(0x00280004, "CS", b"MONOCHROME1 "),
           "rows": Element(0x00280010, "US", us(1)), "columns": Element(0x00280011, "US", us(2)),
           "bits": Element(0x00280100, "US", us(8)), "stored": Element(0x00280101, "US", us(8)),
           "high": Element(0x00280102, "US", us(7)), "sign": Element(0x00280103, "US", us(0)),
           "pixels": Element(0x7FE00010, "OB", b"\x00\x10")}
    els.update(changes)
    return sorted(els.values(), key=lambda e: e.tag)


def test_a_plausible_image_decodes() -> None:
    """The harness can succeed: a 2 x 3 MONOCHROME2 16-bit image comes out as unit floats."""
    els = plain(photometric=Element(0x00280004, "CS", b"MONOCHROME2 "),
                rows=Element(0x00280010, "US", us(2)), columns=Element(0x00280011, "US", us(3)),
                bits=Element(0x00280100, "US", us(16)), stored=Element(0x00280101, "US", us(12)),
                high=Element(0x00280102, "US", us(11)),
                pixels=Element(0x7FE00010, "OW", struct.pack("<6H", 0, 100, 200, 300, 400, 4095)))
    out = frames(read(encode(els, implicit=False), False))
    assert out.shape == (1, 2, 3) and out.dtype == np.float32
    assert out[0, 0, 0] == 0 and out[0, 1, 2] == 1


# Found by the fuzzer above; each escaped as something other than an InferenceError.
REGRESSIONS = {
    # pydicom converts IS "inf" on first access, outside the int() conversion's guard, and
    # overflows (OverflowError).
    "number of frames inf": plain(frames=Element(0x00280008, "IS", b"inf ")),
    # A Modality LUT whose descriptor says 65536 entries (0) with 1 byte of data: struct.error.
    "short modality LUT data": plain(lut=Element(0x00283000, "SQ", [[
        Element(0x00283002, "US", us(0) + us(0) + us(0)),
        Element(0x00283006, "OW", b"\x00")]])),
    # Rescale Slope with two values: the frame broadcast to (1, 2) x (2,), a numpy ValueError
    # when frames() stored it.
    "two rescale slopes": plain(rows=Element(0x00280010, "US", us(1)),
                                columns=Element(0x00280011, "US", us(1)),
                                pixels=Element(0x7FE00010, "OB", b"\x00\x00"),
                                intercept=Element(0x00281052, "DS", b"0 "),
                                slope=Element(0x00281053, "DS", b"0\\0 ")),
}


@pytest.mark.parametrize("els", REGRESSIONS.values(), ids=REGRESSIONS.keys())
@pytest.mark.parametrize("use_header", [True, False])
def test_found_by_fuzzing_is_a_pixel_data_error(els: list[Element], use_header: bool) -> None:
    ds = read(encode(els, implicit=False), False)
    with pytest.raises(PixelDataError), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about each of these values
        frames(ds, Windowing(use_header=use_header), max_bytes=MAX_BYTES)
