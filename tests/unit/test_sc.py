"""The heatmap Secondary Capture builder and PNG rendering (inference/sc.py)."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from inference.prediction import Finding, ImageRef, LabelCode
from inference.sc import build_heatmap_sc, colour_lut, overlay_png, render_overlay
from inference.uids import result_uids

STUDY = "1.2.826.0.1.3680043.10.1234.1"
NODULE = LabelCode("nodule", "SCT", "27925004", "Nodule", 0.5)
HOT = (slice(40, 80), slice(150, 200))  # off centre, so a flip or shift cannot pass
GREY = 128
UIDS = result_uids(STUDY, [f"{STUDY}.1.1"], "aidnode-demo-synthetic", "1.0")


def make_source(rows: int = 256, cols: int = 256, *, modality: str = "CR") -> Dataset:
    """A synthetic MONOCHROME2 16-bit image header with patient and study attributes."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    ds.SOPInstanceUID = f"{STUDY}.1.1"
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = f"{STUDY}.1"
    ds.Modality = modality
    ds.PatientName = "Synthetic^Test"
    ds.PatientID = "SYN0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "M"
    ds.AccessionNumber = "ACC0001"
    ds.StudyID = "S1"
    ds.StudyDate = "20240102"
    ds.StudyTime = "101010"
    ds.ReferringPhysicianName = ""
    ds.Manufacturer = "SynthCo"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.PatientOrientation = ["L", "F"]
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.zeros((rows, cols), dtype=np.uint16).tobytes()
    return ds


def make_finding(
    source: Dataset,
    heatmap: np.ndarray | None,
    probability: float = 0.91,
    frame: int | None = None,
) -> Finding:
    ref = ImageRef(source.SOPClassUID, source.SOPInstanceUID, source.SeriesInstanceUID, frame)
    return Finding(NODULE, probability, ref, heatmap)


def hot_map(shape: tuple[int, int] = (256, 256)) -> np.ndarray:
    heat = np.zeros(shape, dtype=np.float32)
    heat[HOT] = 1.0
    return heat


def grey_display(shape: tuple[int, int] = (256, 256)) -> np.ndarray:
    return np.full(shape, GREY, dtype=np.uint8)


def build(source: Dataset, finding: Finding, display: np.ndarray, **kwargs: object) -> Dataset:
    arguments: dict[str, object] = {
        "series_uid": UIDS.sc_series,
        "instance_uid": UIDS.sc_instance(finding.label.key),
        "series_number": 9002,
        "instance_number": 1,
        "series_description": "AI heatmaps (not for diagnosis)",
        "synthetic_demo": True,
    }
    arguments.update(kwargs)
    return build_heatmap_sc(finding, source, display, **arguments)  # type: ignore[arg-type]


def round_trip(ds: Dataset) -> Dataset:
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    buffer.seek(0)
    return dcmread(buffer)


def coloured(rgb: np.ndarray) -> np.ndarray:
    """Mask of pixels that are not grey (their channels differ)."""
    wide = rgb.astype(np.int16)
    return (wide.max(axis=2) - wide.min(axis=2)) > 20


def test_hot_region_is_coloured_exactly_where_the_map_is_hot() -> None:
    source = make_source()
    sc = round_trip(build(source, make_finding(source, hot_map()), grey_display()))
    pixels = sc.pixel_array
    assert pixels.shape[1:] == (256, 3) and pixels.shape[0] > 256
    image = pixels[:256]
    mask = coloured(image)
    expected = np.zeros((256, 256), dtype=bool)
    expected[HOT] = True
    assert np.array_equal(mask, expected)
    assert np.all(image[~expected] == GREY)
    # heat 1 is the hot (red) end of the map
    red, green, blue = image[HOT].reshape(-1, 3).mean(axis=0)
    assert red > green and red > blue


def test_smooth_heat_peak_stays_in_place() -> None:
    source = make_source(200, 300)
    yy, xx = np.mgrid[0:200, 0:300]
    peak = (60, 220)
    heat = np.exp(-((yy - peak[0]) ** 2 + (xx - peak[1]) ** 2) / (2 * 15.0**2)).astype(np.float32)
    display = np.zeros((200, 300), dtype=np.uint8)
    rgb = render_overlay(make_finding(source, heat), display)[:200].astype(np.float64)
    weight = rgb.sum(axis=2)
    centre = ((weight * yy).sum() / weight.sum(), (weight * xx).sum() / weight.sum())
    assert abs(centre[0] - peak[0]) < 1.0 and abs(centre[1] - peak[1]) < 1.0
    assert np.all(rgb[heat < 0.2] == 0)  # cold heat leaves the image untouched


def test_without_heatmap_the_image_is_unchanged_and_labelled() -> None:
    source = make_source()
    display = (np.arange(256 * 256) % 251).astype(np.uint8).reshape(256, 256)
    sc = round_trip(build(source, make_finding(source, None, probability=0.2), display))
    image = sc.pixel_array[:256]
    assert np.array_equal(image, np.repeat(display[:, :, None], 3, axis=2))
    assert sc.pixel_array[256:].max() > 200  # text below the image


def test_text_and_colour_bar_are_burned_in_below_the_image() -> None:
    source = make_source()
    finding = make_finding(source, hot_map())
    demo = render_overlay(finding, grey_display(), synthetic_demo=True)
    plain = render_overlay(finding, grey_display(), synthetic_demo=False)
    for rendering in (demo, plain):
        band = rendering[256:].astype(np.int16)
        white = np.all(band > 200, axis=2)
        yellow = (band[:, :, 0] > 200) & (band[:, :, 1] > 150) & (band[:, :, 2] < 80)
        assert white.sum() > 50  # finding and probability
        assert yellow.sum() > 50  # NOT FOR DIAGNOSTIC USE
        lut = colour_lut()
        bar_colours = {tuple(int(v) for v in px) for px in rendering[256:].reshape(-1, 3)}
        assert {tuple(int(v) for v in lut[0]), tuple(int(v) for v in lut[-1])} <= bar_colours
    assert demo.shape[0] > plain.shape[0]  # the extra SYNTHETIC DEMO MODEL line


def test_text_is_scaled_up_for_large_images() -> None:
    small = make_source(256, 256)
    large = make_source(2048, 2048)
    band_small = render_overlay(make_finding(small, None), grey_display()).shape[0] - 256
    band_large = (
        render_overlay(make_finding(large, None), grey_display((2048, 2048))).shape[0] - 2048
    )
    assert band_large > 4 * band_small


def test_png_is_the_same_rendering_as_the_sc() -> None:
    source = make_source()
    finding = make_finding(source, hot_map())
    png = Image.open(io.BytesIO(overlay_png(finding, grey_display(), synthetic_demo=True)))
    assert png.format == "PNG" and png.mode == "RGB"
    sc = round_trip(build(source, finding, grey_display(), synthetic_demo=True))
    assert np.array_equal(np.asarray(png), sc.pixel_array)


def test_sc_attributes() -> None:
    source = make_source()
    finding = make_finding(source, hot_map())
    sc = round_trip(build(source, finding, grey_display(), instance_number=4))
    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    assert sc.SOPInstanceUID == UIDS.sc_instance("nodule")
    assert sc.SeriesInstanceUID == UIDS.sc_series != source.SeriesInstanceUID
    assert (sc.SeriesNumber, sc.InstanceNumber) == (9002, 4)
    assert sc.SeriesDescription == "AI heatmaps (not for diagnosis)"
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID"):
        assert sc[keyword].value == source[keyword].value
    assert list(sc.ImageType) == ["DERIVED", "SECONDARY"]
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
    assert sc.BurnedInAnnotation == "NO"
    assert list(sc.PatientOrientation) == ["L", "F"]
    (reference,) = sc.SourceImageSequence
    assert reference.ReferencedSOPClassUID == source.SOPClassUID
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert "ReferencedFrameNumber" not in reference
    assert any(e.Manufacturer == "aidnode" for e in sc.ContributingEquipmentSequence)


def test_burned_in_annotation_is_copied_from_the_source() -> None:
    source = make_source()
    source.BurnedInAnnotation = "YES"
    sc = round_trip(build(source, make_finding(source, hot_map()), grey_display()))
    assert sc.BurnedInAnnotation == "YES"


def test_frame_of_a_multiframe_source_is_referenced() -> None:
    source = make_source()
    source.NumberOfFrames = 4
    sc = round_trip(build(source, make_finding(source, hot_map(), frame=3), grey_display()))
    assert sc.SourceImageSequence[0].ReferencedFrameNumber == 3


def test_orientation_comes_from_image_orientation_or_is_left_empty() -> None:
    ct = make_source(modality="CT")
    del ct.PatientOrientation
    ct.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    sc = round_trip(build(ct, make_finding(ct, hot_map()), grey_display()))
    assert list(sc.PatientOrientation) == ["L", "P"]
    del ct.ImageOrientationPatient
    sc = round_trip(build(ct, make_finding(ct, hot_map()), grey_display()))
    assert "PatientOrientation" in sc and not sc.PatientOrientation


def test_bad_input_names_the_argument() -> None:
    source = make_source()
    finding = make_finding(source, hot_map())
    with pytest.raises(ValueError, match='"display"'):
        build(source, finding, grey_display((128, 128)))
    with pytest.raises(ValueError, match='"display"'):
        build(source, finding, grey_display().astype(np.float32))
    with pytest.raises(TypeError, match='"display"'):
        render_overlay(finding, [[0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match='"finding" has a heatmap'):
        build(source, make_finding(source, hot_map((10, 10))), grey_display())
    other = make_source()
    other.SOPInstanceUID = f"{STUDY}.1.2"
    with pytest.raises(ValueError, match='"source" must be the image of the finding'):
        build(other, finding, grey_display())
    with pytest.raises(ValueError, match='"series_number"'):
        build(source, finding, grey_display(), series_number=0)
    with pytest.raises(ValueError, match='"instance_uid"'):
        build(source, finding, grey_display(), instance_uid="1.02.3")
    with pytest.raises(TypeError, match='"source"'):
        build({}, finding, grey_display())  # type: ignore[arg-type]


def _dciodvfy(ds: Dataset, tmp_path: Path) -> tuple[list[str], str]:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not on PATH")
    path = tmp_path / "sc.dcm"
    dcmwrite(path, ds, enforce_file_format=True)
    done = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    output = done.stdout + done.stderr
    return [line for line in output.splitlines() if line.startswith("Error")], output


@pytest.mark.parametrize("variant", ["cr", "ct-no-heatmap", "no-orientation"])
def test_dciodvfy_finds_no_errors(variant: str, tmp_path: Path) -> None:
    source = make_source(modality="CT" if variant.startswith("ct") else "CR")
    heat = None if variant == "ct-no-heatmap" else hot_map()
    if variant != "cr":
        del source.PatientOrientation
    if variant == "ct-no-heatmap":
        source.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    sc = build(source, make_finding(source, heat), grey_display())
    errors, output = _dciodvfy(sc, tmp_path)
    assert errors == [], output


def test_dciodvfy_check_can_fail(tmp_path: Path) -> None:
    source = make_source()
    sc = build(source, make_finding(source, hot_map()), grey_display())
    del sc.ConversionType  # Type 1 in the SC Equipment module (PS3.3 C.8.6.1)
    errors, output = _dciodvfy(sc, tmp_path)
    assert errors, output
