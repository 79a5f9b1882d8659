"""The TID 1500 Comprehensive 3D SR builder (inference/sr.py), round-tripped through bytes."""

from __future__ import annotations

import copy
import io
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import Comprehensive3DSRStorage, ExplicitVRLittleEndian

import inference.sr
from inference.errors import ResultBuildError
from inference.prediction import DISCLAIMER, Finding, ImageRef, LabelCode, Prediction
from inference.sr import ABSENT, PRESENT, PROBABILITY, SYNTHETIC_NOTE, build_sr
from inference.uids import ResultUIDs, result_uids

ROOT = "1.2.826.0.1.3680043.10.1234"
STUDY = f"{ROOT}.1"
CR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1"
CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"
NODULE = LabelCode("nodule", "SCT", "27925004", "Nodule", 0.5)
EFFUSION = LabelCode("effusion", "SCT", "60046008", "Pleural effusion", 0.4)
CONTEXT_FIELDS = ("StudyDescription", "BodyPartExamined", "PatientSex")


def _patient_study(ds: Dataset, study_uid: str = STUDY) -> None:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID = study_uid
    ds.PatientName = "Synthetic^Test"
    ds.PatientID = "SYN0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.AccessionNumber = "ACC0001"
    ds.StudyID = "S1"
    ds.StudyDate = "20240102"
    ds.StudyTime = "101010"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CHEST"
    ds.Manufacturer = "SynthCo"
    ds.InstanceNumber = 1


def make_cr(study_uid: str = STUDY) -> Dataset:
    """A synthetic 256 x 256 MONOCHROME2 16-bit CR image with patient and study attributes."""
    ds = Dataset()
    _patient_study(ds, study_uid)
    ds.SOPClassUID = CR_SOP_CLASS
    ds.SOPInstanceUID = f"{study_uid}.1.1"
    ds.SeriesInstanceUID = f"{study_uid}.1"
    ds.Modality = "CR"
    ds.SeriesNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.PatientOrientation = ["L", "F"]
    ds.Rows = ds.Columns = 256
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(256 * 256, dtype=np.uint16) % 4096).tobytes()
    return ds


def make_ct_series(study_uid: str = STUDY) -> list[Dataset]:
    """Three synthetic axial CT slices of one series."""
    slices = []
    for index in range(3):
        ds = Dataset()
        _patient_study(ds, study_uid)
        ds.SOPClassUID = CT_SOP_CLASS
        ds.SOPInstanceUID = f"{study_uid}.2.{index + 1}"
        ds.SeriesInstanceUID = f"{study_uid}.2"
        ds.Modality = "CT"
        ds.SeriesNumber = 2
        ds.InstanceNumber = index + 1
        ds.FrameOfReferenceUID = f"{study_uid}.3"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, 5.0 * index]
        ds.PixelSpacing = [0.7, 0.7]
        ds.SliceThickness = 5.0
        ds.Rows = ds.Columns = 64
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = np.zeros((64, 64), dtype=np.int16).tobytes()
        slices.append(ds)
    return slices


def ref_of(ds: Dataset, frame: int | None = None) -> ImageRef:
    return ImageRef(ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID, frame)


def make_prediction(
    sources: list[Dataset],
    probabilities: tuple[float, float] = (0.91, 0.12),
    *,
    synthetic_demo: bool = True,
    version: str = "1.0",
) -> Prediction:
    refs = tuple(ref_of(s) for s in sources)
    return Prediction(
        model_name="aidnode-demo-synthetic",
        model_version=version,
        synthetic_demo=synthetic_demo,
        device="cpu",
        findings=(
            Finding(NODULE, probabilities[0], refs[-1]),
            Finding(EFFUSION, probabilities[1], refs[0]),
        ),
        analysed=refs,
        context_text="CHEST; F",
        context_fields=CONTEXT_FIELDS,
    )


def uids_for(prediction: Prediction) -> ResultUIDs:
    return result_uids(
        STUDY,
        [r.sop_instance_uid for r in prediction.analysed],
        prediction.model_name,
        prediction.model_version,
    )


def build(prediction: Prediction, sources: list[Dataset], **kwargs: object) -> Dataset:
    arguments: dict[str, object] = {
        "uids": uids_for(prediction),
        "series_number": 9001,
        "series_description": "AI results (not for diagnosis)",
        "software_version": "aidnode 0.1.0",
    }
    arguments.update(kwargs)
    return build_sr(prediction, sources, **arguments)  # type: ignore[arg-type]


def round_trip(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def read_back(ds: Dataset) -> hd.sr.Comprehensive3DSR:
    sr = hd.sr.srread(io.BytesIO(round_trip(ds)))
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    return sr


def report_of(sr: hd.sr.Comprehensive3DSR) -> hd.sr.MeasurementReport:
    content = sr.content
    assert content[0].ContentTemplateSequence[0].TemplateIdentifier == "1500"
    return hd.sr.MeasurementReport.from_sequence(content)


def texts(item: Dataset) -> list[str]:
    """Every TEXT value anywhere below ``item``."""
    found = []
    for child in item.get("ContentSequence", []):
        if child.ValueType == "TEXT":
            found.append(str(child.TextValue))
        found.extend(texts(child))
    return found


def dciodvfy_errors(ds: Dataset, tmp_path: Path) -> tuple[list[str], str]:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not on PATH")
    path = tmp_path / "object.dcm"
    path.write_bytes(round_trip(ds))
    done = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    output = done.stdout + done.stderr
    return [line for line in output.splitlines() if line.startswith("Error")], output


def test_each_finding_is_a_group_with_evaluation_and_probability() -> None:
    source = make_cr()
    prediction = make_prediction([source], (0.91, 0.12))
    report = report_of(read_back(build(prediction, [source])))

    groups = report.get_image_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["nodule", "effusion"]
    expected = {"nodule": (NODULE, 0.91, PRESENT), "effusion": (EFFUSION, 0.12, ABSENT)}
    for group in groups:
        label, probability, verdict = expected[str(group.tracking_identifier)]
        (evaluation,) = group.get_qualitative_evaluations()
        assert evaluation.name.value == label.code_value
        assert evaluation.name.scheme_designator == label.coding_scheme
        assert evaluation.name.meaning == label.code_meaning
        assert evaluation.value == verdict
        (measurement,) = group.get_measurements(name=PROBABILITY)
        assert measurement.value == pytest.approx(probability)
        assert measurement.unit.scheme_designator == "UCUM"
        assert [r.referenced_sop_instance_uid for r in measurement.referenced_images] == [
            source.SOPInstanceUID
        ]


@pytest.mark.parametrize(
    ("probability", "verdict"),
    [(0.5, PRESENT), (0.4999, ABSENT), (1.0, PRESENT), (0.0, ABSENT)],
)
def test_present_absent_follows_the_threshold(probability: float, verdict: object) -> None:
    source = make_cr()
    prediction = make_prediction([source], (probability, 0.9))
    report = report_of(read_back(build(prediction, [source])))
    group = report.get_image_measurement_groups()[0]
    (evaluation,) = group.get_qualitative_evaluations()
    assert evaluation.value == verdict


def test_algorithm_identification_names_model_and_context_fields() -> None:
    source = make_cr()
    prediction = make_prediction([source])
    sr = read_back(build(prediction, [source]))
    group = report_of(sr).get_image_measurement_groups()[0][0]  # the CONTAINER item
    by_name: dict[str, list[str]] = {}
    for item in group.ContentSequence:
        if item.ValueType == "TEXT":
            meaning = item.ConceptNameCodeSequence[0].CodeMeaning
            by_name.setdefault(meaning, []).append(str(item.TextValue))
    assert by_name["Algorithm Name"] == ["aidnode-demo-synthetic"]
    assert by_name["Algorithm Version"] == ["1.0"]
    parameters = " ".join(by_name["Algorithm Parameters"])
    for field in CONTEXT_FIELDS:
        assert field in parameters
    assert "threshold=0.5" in parameters


def test_document_joins_the_source_study_in_a_new_series() -> None:
    source = make_cr()
    prediction = make_prediction([source])
    uids = uids_for(prediction)
    ds = dcmread(io.BytesIO(round_trip(build(prediction, [source], instance_number=3))))
    assert ds.SOPClassUID == Comprehensive3DSRStorage
    assert ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.SeriesInstanceUID == uids.sr_series != source.SeriesInstanceUID
    assert ds.SOPInstanceUID == uids.sr_instance
    assert (ds.SeriesNumber, ds.InstanceNumber) == (9001, 3)
    assert ds.SeriesDescription == "AI results (not for diagnosis)"
    assert ds.Modality == "SR"
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
        assert ds[keyword].value == source[keyword].value
    for keyword in ("AccessionNumber", "StudyID", "StudyDate", "StudyTime"):
        assert ds[keyword].value == source[keyword].value
    assert "PredecessorDocumentsSequence" not in ds


def test_every_analysed_image_is_referenced() -> None:
    slices = make_ct_series()
    prediction = make_prediction(slices)
    sr = read_back(build(prediction, slices))
    wanted = {s.SOPInstanceUID for s in slices}
    for group in report_of(sr).get_image_measurement_groups():
        assert [i.referenced_sop_instance_uid for i in group.source_images] == [
            s.SOPInstanceUID for s in slices]
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == wanted


@pytest.mark.parametrize("n_slices", [1, 3, 40])
def test_group_sources_added_after_the_build_give_highdicoms_own_document(
        monkeypatch: pytest.MonkeyPatch, n_slices: int) -> None:
    """build_sr builds each group with its first source image and inserts the others after
    highdicom's build (its cost grows with findings x images): the document must be the one
    highdicom builds with every reference in every group."""
    slices = make_ct_series()
    slices = [copy.deepcopy(slices[i % 3]) for i in range(n_slices)]
    for i, s in enumerate(slices):
        s.SOPInstanceUID = f"{STUDY}.2.{i + 1}"
    prediction = make_prediction(slices)
    fast = build(prediction, slices)
    monkeypatch.setattr(inference.sr, "_DEFER_GROUP_SOURCES", False)
    full = build(prediction, slices)
    assert fast.ContentSequence == full.ContentSequence
    assert (fast.CurrentRequestedProcedureEvidenceSequence
            == full.CurrentRequestedProcedureEvidenceSequence)
    for ds in (fast, full):  # and every group holds every slice, in order
        for group in report_of(read_back(ds)).get_image_measurement_groups():
            assert [i.referenced_sop_instance_uid for i in group.source_images] == [
                s.SOPInstanceUID for s in slices]


def test_frames_of_a_multiframe_image_are_referenced() -> None:
    source = make_cr()
    source.NumberOfFrames = 3
    refs = (ref_of(source, 1), ref_of(source, 3))
    prediction = Prediction("m", "1", False, "cpu", (Finding(NODULE, 0.7, refs[1]),), refs, "", ())
    sr = read_back(build(prediction, [source]))
    (group,) = report_of(sr).get_image_measurement_groups()
    (image,) = group.source_images
    assert image.referenced_frame_numbers == [1, 3]


@pytest.mark.parametrize("synthetic_demo", [True, False])
def test_disclaimer_is_stated(synthetic_demo: bool) -> None:
    source = make_cr()
    prediction = make_prediction([source], synthetic_demo=synthetic_demo)
    sr = read_back(build(prediction, [source]))
    statements = texts(sr)
    assert any(DISCLAIMER in t for t in statements)
    assert any(SYNTHETIC_NOTE in t for t in statements) is synthetic_demo


def test_contributing_equipment_names_aidnode() -> None:
    source = make_cr()
    ds = dcmread(io.BytesIO(round_trip(build(make_prediction([source]), [source]))))
    ours = [e for e in ds.ContributingEquipmentSequence if e.Manufacturer == "aidnode"]
    assert len(ours) == 1
    assert ours[0].SoftwareVersions == "aidnode 0.1.0"
    assert ours[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109102"


def test_predecessor_is_referenced() -> None:
    source = make_cr()
    first = build(make_prediction([source], version="1.0"), [source])
    newer = make_prediction([source], version="1.1")
    ds = dcmread(io.BytesIO(round_trip(build(newer, [source], predecessor=first))))
    assert ds.SOPInstanceUID != first.SOPInstanceUID
    (study,) = ds.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == STUDY
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    (item,) = series.ReferencedSOPSequence
    assert item.ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert item.ReferencedSOPClassUID == first.SOPClassUID


def test_same_inputs_give_same_identifiers() -> None:
    source = make_cr()
    one = read_back(build(make_prediction([source]), [source]))
    two = read_back(build(make_prediction([source]), [source]))
    assert one.SOPInstanceUID == two.SOPInstanceUID
    assert [g.tracking_uid for g in report_of(one).get_image_measurement_groups()] == [
        g.tracking_uid for g in report_of(two).get_image_measurement_groups()
    ]


def test_missing_type2_patient_attributes_are_sent_empty() -> None:
    source = make_cr()
    del source.PatientBirthDate, source.ReferringPhysicianName, source.AccessionNumber
    ds = dcmread(io.BytesIO(round_trip(build(make_prediction([source]), [source]))))
    assert ds.PatientBirthDate == "" and ds.AccessionNumber == ""
    assert ds.PatientID == source.PatientID


@pytest.mark.parametrize("kind", ["cr", "ct", "ct-superseding"])
def test_dciodvfy_finds_no_errors(kind: str, tmp_path: Path) -> None:
    sources = [make_cr()] if kind == "cr" else make_ct_series()
    predecessor = None
    if kind == "ct-superseding":
        predecessor = build(make_prediction(sources, version="0.9"), sources)
    ds = build(make_prediction(sources), sources, predecessor=predecessor)
    errors, output = dciodvfy_errors(ds, tmp_path)
    assert errors == [], output


def test_dciodvfy_check_can_fail(tmp_path: Path) -> None:
    source = make_cr()
    ds = build(make_prediction([source]), [source])
    del ds.CompletionFlag  # Type 1 in the SR Document General module (PS3.3 C.17.2)
    errors, output = dciodvfy_errors(ds, tmp_path)
    assert errors, output


def _bad(kind: str) -> tuple[Prediction, list[Dataset], dict[str, object]]:
    source = make_cr()
    prediction = make_prediction([source])
    other = make_cr(study_uid=f"{ROOT}.2")
    if kind == "series_number":
        return prediction, [source], {"series_number": 0}
    if kind == "no sources":
        return prediction, [], {}
    if kind == "two studies":
        return prediction, [source, other], {}
    if kind == "unknown image":
        return make_prediction([other]), [source], {}
    if kind == "probability":
        return make_prediction([source], (1.5, 0.1)), [source], {}
    if kind == "description":
        return prediction, [source], {"series_description": "x" * 65}
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("series_number", '"series_number" must be a positive integer'),
        ("no sources", '"sources" must contain at least one'),
        ("two studies", '"sources" must all belong to one study'),
        ("unknown image", '"sources" lacks images'),
        ("probability", '"prediction" .* probability'),
        ("description", '"series_description"'),
    ],
)
def test_bad_values_raise_value_error(kind: str, match: str) -> None:
    prediction, sources, kwargs = _bad(kind)
    with pytest.raises(ValueError, match=match):
        build(prediction, sources, **kwargs)


def test_bad_types_raise_type_error() -> None:
    source = make_cr()
    prediction = make_prediction([source])
    with pytest.raises(TypeError, match='"predecessor"'):
        build(prediction, [source], predecessor="1.2.3")
    with pytest.raises(TypeError, match='"sources"'):
        build(prediction, source)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match='"uids"'):
        build(prediction, [source], uids="1.2.3")


def test_highdicom_failure_is_a_result_build_error() -> None:
    source = make_cr()
    long_meaning = LabelCode("x", "SCT", "1", "m" * 70, 0.5)  # Code Meaning is LO: 64 chars
    prediction = Prediction(
        "m",
        "1",
        False,
        "cpu",
        (Finding(long_meaning, 0.7, ref_of(source)),),
        (ref_of(source),),
        "",
        (),
    )
    with pytest.raises(ResultBuildError, match="Code meaning"):
        build(prediction, [source])
