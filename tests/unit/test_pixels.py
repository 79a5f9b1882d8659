"""Tests for inference.pixels against pydicom's bundled and pydicom-data test files."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian

from inference import pixels
from inference.errors import ImageTooLargeError, PixelDataError
from inference.pixels import (
    Letterbox,
    Windowing,
    check_size,
    display_uint8,
    frames,
    to_model_input,
)


def read(name: str) -> Dataset:
    """Read a pydicom test file without touching the network."""
    path = get_testdata_file(name, download=False)
    assert path is not None, f"test file {name} missing: install pydicom-data"
    return dcmread(path)


def linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 LINEAR window onto [0, 1], written out by hand."""
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


# --- Modality LUT, VOI, inversion ---------------------------------------------------------------


def test_ct_rescale_and_header_window_by_hand() -> None:
    ds = read("693_UNCI.dcm")  # CT, slope 1, intercept -1024, window 40/100
    stored = ds.pixel_array.astype(np.float64)
    out = frames(ds)
    assert out.shape == (1, 512, 512) and out.dtype == np.float32

    # One pixel inside the window, by hand: HU = stored * 1 - 1024.
    inside = np.argwhere((stored >= 1024 + 0) & (stored <= 1024 + 80))
    r, c = inside[len(inside) // 2]
    hu = stored[r, c] * 1.0 - 1024.0
    expected = (hu - 39.5) / 99.0 + 0.5
    assert 0.0 < expected < 1.0
    assert out[0, r, c] == pytest.approx(expected, abs=1e-6)

    # Air (below the window) is black, bone (above) white, everything else by the formula.
    assert out[0][stored - 1024 < -10].max() == 0.0
    assert out[0][stored - 1024 > 90].min() == 1.0
    np.testing.assert_allclose(out[0], linear_window(stored - 1024, 40, 100), atol=1e-6)


def test_override_window_replaces_header() -> None:
    ds = read("693_UNCI.dcm")
    hu = ds.pixel_array.astype(np.float64) - 1024
    out = frames(ds, Windowing(center=400, width=2000))
    np.testing.assert_allclose(out[0], linear_window(hu, 400, 2000), atol=1e-6)
    assert not np.allclose(out, frames(ds))


def test_percentile_fallback_when_header_ignored() -> None:
    ds = read("693_UNCI.dcm")
    hu = ds.pixel_array.astype(np.float64) - 1024
    out = frames(ds, Windowing(use_header=False))[0]
    low, high = np.percentile(hu, [0.5, 99.5])
    np.testing.assert_allclose(out, np.clip((hu - low) / (high - low), 0, 1), atol=1e-6)
    assert 0.002 < (out >= 1.0).mean() < 0.01  # about 0.5 % saturated at the top


def test_percentile_fallback_when_header_has_no_window() -> None:
    ds = read("CT_small.dcm")  # rescale but no window
    assert "WindowCenter" not in ds
    out = frames(ds)[0]
    assert out.min() == 0.0 and out.max() == 1.0
    assert 0.002 < (out >= 1.0).mean() < 0.01


def test_first_of_multiple_windows_is_used() -> None:
    ds = read("MR_small.dcm")  # window 600/1600
    single = frames(ds)
    ds.WindowCenter = [600, 100]
    ds.WindowWidth = [1600, 50]
    np.testing.assert_array_equal(frames(ds), single)
    np.testing.assert_allclose(
        single[0], linear_window(ds.pixel_array.astype(np.float64), 600, 1600), atol=1e-6
    )


def test_unusable_header_window_falls_back_to_percentiles() -> None:
    ds = read("MR_small.dcm")
    ds.WindowWidth = 0
    np.testing.assert_array_equal(frames(ds), frames(ds, Windowing(use_header=False)))


def test_monochrome1_is_inverted() -> None:
    ds = read("RG1_UNCI.dcm")  # CR, MONOCHROME1, window 15000/30000, no rescale
    stored = ds.pixel_array.astype(np.float64)
    out = frames(ds)[0]
    np.testing.assert_allclose(out, 1.0 - linear_window(stored, 15000, 30000), atol=1e-6)
    # High stored values are dark on MONOCHROME1: the brightest stored pixel is the darkest.
    assert out.flat[np.argmax(stored)] == out.min()
    assert np.corrcoef(stored.ravel(), out.ravel())[0, 1] < -0.99
    ds.PhotometricInterpretation = "MONOCHROME2"
    np.testing.assert_allclose(frames(ds)[0], 1.0 - out, atol=1e-6)


def test_modality_lut_sequence_by_hand() -> None:
    ds = read("mlut_18.dcm")  # Modality LUT: 4096 entries, first mapped -2048, 16 bits
    item = ds.ModalityLUTSequence[0]
    entries, first, _ = item.LUTDescriptor
    lut = np.asarray(item.LUTData, dtype=np.float64)  # US values
    assert len(lut) == entries
    mapped = lut[np.clip(ds.pixel_array.astype(np.int64) - first, 0, entries - 1)]
    out = frames(ds, Windowing(center=2048, width=4096))[0]
    np.testing.assert_allclose(out, linear_window(mapped, 2048, 4096), atol=1e-6)


def test_voi_lut_sequence_by_hand() -> None:
    ds = read("vlut_04.dcm")  # VOI LUT: 256 entries, 16-bit output
    item = ds.VOILUTSequence[0]
    lut = np.asarray(item.LUTData, dtype=np.float64)
    expected = lut[ds.pixel_array.astype(np.int64)] / 65535.0
    np.testing.assert_allclose(frames(ds)[0], expected, atol=1e-6)


def test_enhanced_ct_uses_functional_group_rescale_and_window() -> None:
    ds = read("eCT_Supplemental.dcm")  # shared groups: intercept -1024, window 49/102
    assert "RescaleIntercept" not in ds and "WindowCenter" not in ds
    out = frames(ds)
    hu = ds.pixel_array.astype(np.float64) - 1024
    assert out.shape == (2, 512, 512)
    np.testing.assert_allclose(out, linear_window(hu, 49, 102), atol=1e-6)


# --- colour -------------------------------------------------------------------------------------


def test_rgb_ultrasound_becomes_luminance() -> None:
    ds = read("US1_UNCR.dcm")
    rgb = ds.pixel_array.astype(np.float64)
    out = frames(ds)
    assert out.shape == (1, 480, 640)
    r, g, b = rgb[240, 320]
    assert out[0, 240, 320] == pytest.approx((0.299 * r + 0.587 * g + 0.114 * b) / 255, abs=1e-6)
    np.testing.assert_allclose(out[0], rgb @ [0.299, 0.587, 0.114] / 255, atol=1e-6)


def test_ybr_is_converted_to_rgb_first() -> None:
    rgb = frames(read("SC_rgb.dcm"))
    for name in ("SC_ybr_full_uncompressed.dcm", "SC_ybr_full_422_uncompressed.dcm"):
        np.testing.assert_allclose(frames(read(name)), rgb, atol=0.01)  # YBR rounding only


def test_palette_colour() -> None:
    single = frames(read("OBXXXX1A.dcm"))
    assert single.shape == (1, 600, 800) and single.std() > 0.05
    np.testing.assert_array_equal(frames(read("OBXXXX1A_rle_2frame.dcm"))[0], single[0])


# --- transfer syntaxes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoded", "reference"),
    [
        ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"),  # JPEG 2000 lossless, 10 frames
        ("US1_J2KR.dcm", "US1_UNCR.dcm"),  # JPEG 2000 lossless, YBR_RCT colour
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),  # JPEG-LS lossless
        ("emri_small_jpeg_ls_lossless.dcm", "emri_small.dcm"),
        ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb.dcm"),  # JPEG lossless process 14
        ("MR_small_RLE.dcm", "MR_small.dcm"),  # RLE
        ("emri_small_RLE.dcm", "emri_small.dcm"),
        ("SC_rgb_rle.dcm", "SC_rgb.dcm"),
        ("MR_small_bigendian.dcm", "MR_small.dcm"),  # explicit VR big endian
        ("emri_small_big_endian.dcm", "emri_small.dcm"),
    ],
)
def test_lossless_syntaxes_equal_uncompressed(encoded: str, reference: str) -> None:
    np.testing.assert_array_equal(frames(read(encoded)), frames(read(reference)))


def test_cr_jpeg2000_matches_uncompressed() -> None:
    # pydicom-data's RG1_J2KR is a different SOP instance from RG1_UNCI (not bit-identical), so
    # compare closely rather than exactly; both are inverted the same way.
    j2k, unc = frames(read("RG1_J2KR.dcm")), frames(read("RG1_UNCI.dcm"))
    assert j2k.shape == unc.shape == (1, 1955, 1841)
    assert np.abs(j2k - unc).mean() < 0.005


def test_jpeg_baseline_is_close_to_source() -> None:
    out = frames(read("SC_rgb_dcmtk_+eb+cr.dcm"))  # JPEG baseline, lossy
    assert np.abs(out - frames(read("SC_rgb.dcm"))).mean() < 0.02


def test_deflate_and_multiframe() -> None:
    deflated = frames(read("image_dfl.dcm"))
    assert deflated.shape == (1, 512, 512) and deflated.std() > 0.1
    multi = frames(read("emri_small.dcm"))
    assert multi.shape == (10, 64, 64)
    assert not np.array_equal(multi[0], multi[9])
    colour = frames(read("color3d_jpeg_baseline.dcm"))  # YBR_FULL_422 JPEG baseline
    assert colour.shape == (120, 480, 640) and colour.dtype == np.float32
    assert colour.min() >= 0.0 and colour.max() <= 1.0


# --- guards and errors --------------------------------------------------------------------------


def huge_claim() -> Dataset:
    """A dataset whose header claims 65535 x 65535 x 100 frames but holds 4 bytes."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows = ds.Columns = 65535
    ds.NumberOfFrames = 100
    ds.SamplesPerPixel = 1
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = b"\x00" * 4
    return ds


def test_size_guard_refuses_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decode(*args: object) -> None:
        raise AssertionError("decoder called")

    monkeypatch.setattr(pixels, "get_decoder", no_decode)
    with pytest.raises(ImageTooLargeError, match=r"65535 rows x 65535 columns x 100 frames.*1024"):
        frames(huge_claim(), max_bytes=1024)
    with pytest.raises(ImageTooLargeError):
        display_uint8(huge_claim())


def test_size_guard_limit_is_inclusive() -> None:
    ds = read("693_UNCI.dcm")
    check_size(ds, 512 * 512 * 2)
    with pytest.raises(ImageTooLargeError, match="16 bits"):
        check_size(ds, 512 * 512 * 2 - 1)
    rgb = read("US1_UNCR.dcm")
    check_size(rgb, 480 * 640 * 3)
    with pytest.raises(ImageTooLargeError):
        check_size(rgb, 480 * 640 * 3 - 1)


@pytest.mark.parametrize(
    ("keyword", "value"), [("Rows", "absent"), ("Columns", 0), ("BitsAllocated", None)]
)
def test_size_guard_needs_positive_dimensions(keyword: str, value: int | str | None) -> None:
    ds = huge_claim()
    if value == "absent":
        del ds[keyword]
    else:
        setattr(ds, keyword, value)  # None: present with an empty value
    with pytest.raises(PixelDataError, match=keyword):
        check_size(ds, 1 << 40)


def test_corrupt_jpeg2000_names_transfer_syntax() -> None:
    ds = read("693_J2KR.dcm")
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 100])
    with pytest.raises(PixelDataError, match="JPEG 2000") as info:
        frames(ds)
    assert info.value.__cause__ is not None


def test_truncated_native_pixel_data() -> None:
    ds = read("693_UNCI.dcm")
    ds.PixelData = ds.PixelData[:1000]
    with pytest.raises(PixelDataError, match="Explicit VR Little Endian"):
        frames(ds)


def test_missing_pixel_data_and_syntax() -> None:
    ds = read("MR_small.dcm")
    no_syntax = copy.deepcopy(ds)
    del no_syntax.file_meta.TransferSyntaxUID
    with pytest.raises(PixelDataError, match="Transfer Syntax"):
        frames(no_syntax)
    del ds.PixelData
    with pytest.raises(PixelDataError, match="no pixel data"):
        frames(ds)


def test_windowing_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="together"):
        Windowing(center=40)
    with pytest.raises(ValueError, match="width"):
        Windowing(center=40, width=0.5)


# --- display ------------------------------------------------------------------------------------


def test_display_uint8_matches_model_window() -> None:
    ds = read("emri_small.dcm")
    shown = display_uint8(ds, frame=3)
    assert shown.dtype == np.uint8 and shown.shape == (64, 64)
    np.testing.assert_array_equal(shown, np.rint(frames(ds)[3] * 255).astype(np.uint8))
    with pytest.raises(ValueError, match="frame"):
        display_uint8(ds, frame=10)


# --- letterbox ----------------------------------------------------------------------------------


def blob(shape: tuple[int, int], row: float, col: float, sigma: float) -> np.ndarray:
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    return np.exp(-((rr - row) ** 2 + (cc - col) ** 2) / (2 * sigma**2)).astype(np.float32)


def centroid(img: np.ndarray) -> tuple[float, float]:
    rr, cc = np.mgrid[: img.shape[0], : img.shape[1]]
    total = float(img.sum())
    return float((rr * img).sum()) / total, float((cc * img).sum()) / total


@pytest.mark.parametrize(
    ("shape", "size", "dot"),
    [((600, 400), 256, (420, 90)), ((90, 150), 224, (30, 100)), ((512, 512), 128, (100, 400))],
)
def test_letterbox_maps_a_dot_both_ways(
    shape: tuple[int, int], size: int, dot: tuple[int, int]
) -> None:
    sigma = max(shape) / 40
    img = blob(shape, *dot, sigma)
    model, box = to_model_input(img, size)
    assert model.shape == (size, size) and model.dtype == np.float32
    assert box.scale == pytest.approx(min(size / shape[0], size / shape[1]))

    # The dot lands at (r * scale + pad_top, c * scale + pad_left), to within a pixel...
    peak = np.unravel_index(np.argmax(model), model.shape)
    assert abs(peak[0] - (dot[0] * box.scale + box.pad_top)) <= 1
    assert abs(peak[1] - (dot[1] * box.scale + box.pad_left)) <= 1
    # ... and exactly at the pixel-centre mapping.
    assert centroid(model) == pytest.approx(box.to_model_point(*dot), abs=0.05)
    assert box.to_source_point(*box.to_model_point(*dot)) == pytest.approx(dot)

    # Padding is zero; the image is centred.
    assert model[: box.pad_top].max(initial=0.0) == 0.0
    assert model[box.pad_top + box.rows :].max(initial=0.0) == 0.0
    assert model[:, : box.pad_left].max(initial=0.0) == 0.0
    assert abs((size - box.rows - box.pad_top) - box.pad_top) <= 1

    # Back to the source: same shape, the dot where it was.
    back = box.to_source(model)
    assert back.shape == shape and back.dtype == np.float32
    assert centroid(back) == pytest.approx(dot, abs=0.1)


def test_heat_drawn_in_model_space_maps_to_source() -> None:
    box = Letterbox(scale=0.5, pad_top=0, pad_left=56, src_rows=448, src_cols=224)
    heat = blob((224, 224), *box.to_model_point(300, 50), sigma=4)
    assert centroid(box.to_source(heat)) == pytest.approx((300, 50), abs=0.2)


def test_letterbox_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="img"):
        to_model_input(np.zeros((2, 3, 4)), 64)
    with pytest.raises(ValueError, match="size"):
        to_model_input(np.zeros((8, 8)), 0)
    _, box = to_model_input(np.zeros((100, 50)), 64)
    with pytest.raises(ValueError, match="heat"):
        box.to_source(np.zeros((32, 32)))


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 700),
    cols=st.integers(1, 700),
    size=st.integers(8, 320),
)
def test_letterbox_geometry_property(rows: int, cols: int, size: int) -> None:
    img = np.ones((rows, cols), dtype=np.float32)
    model, box = to_model_input(img, size)
    assert model.shape == (size, size)
    assert 1 <= box.rows <= size and 1 <= box.cols <= size
    assert max(box.rows, box.cols) == size
    assert box.pad_top >= 0 and box.pad_top + box.rows <= size
    assert box.pad_left >= 0 and box.pad_left + box.cols <= size
    inside = model[box.pad_top : box.pad_top + box.rows, box.pad_left : box.pad_left + box.cols]
    assert inside.min() > 0.99 and model.sum() == pytest.approx(inside.sum())
    # Mapped back, a flat image stays flat up to its last row and column (no padding bleeds in).
    np.testing.assert_allclose(box.to_source(model), 1.0, atol=1e-5)
