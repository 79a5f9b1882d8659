"""Synthetic DICOM instances for tests: no patient data, deterministic pixels.

The instances carry the modules their IODs require (PS3.3 A.3 CT Image, A.2 CR Image) so that
dcmtk ``storescu``, Orthanc and ``dciodvfy`` take them as they are. Files are Explicit VR Little
Endian with file meta information.

UIDs: pass ``study_uid``/``series_uid`` to make them fixed (SOP Instance UIDs are then derived
from the series UID and the instance number, so the whole series is reproducible); left out, new
UIDs are generated, so two calls never collide in a PACS. ``seed`` drives the pixel values only.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

PATIENT_NAME = "SYNTHETIC^TEST"
STUDY_DATE = "20240102"
STUDY_TIME = "093000"
MANUFACTURER = "aidnode-tests"
PIXEL_SPACING_MM = 0.7
SLICE_THICKNESS_MM = 2.5
CT_RESCALE_INTERCEPT = -1024
CT_WINDOW = (40, 400)  # soft tissue: center, width in HU


def _instance_uid(series_uid: str, number: int) -> str:
    return generate_uid(entropy_srcs=[series_uid, str(number)])


def _file_meta(sop_class_uid: str, sop_instance_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _base(
    sop_class_uid: str,
    sop_instance_uid: str,
    *,
    study_uid: str,
    series_uid: str,
    patient_id: str,
    modality: str,
    series_number: int,
    instance_number: int,
) -> Dataset:
    """Patient, General Study, General Series, General Equipment, General Image, SOP Common."""
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class_uid, sop_instance_uid)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = STUDY_DATE
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = STUDY_TIME
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.Manufacturer = MANUFACTURER
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Synthetic test study"
    ds.SeriesDescription = f"Synthetic {modality} series {series_number}"
    ds.PatientName = PATIENT_NAME
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    return ds


def _phantom(rows: int, cols: int, z: float, rng: np.random.Generator) -> np.ndarray:
    """Return HU values: an ellipse of soft tissue with a bone disc that moves with ``z``."""
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float64)
    cy, cx = (rows - 1) / 2, (cols - 1) / 2
    hu = np.full((rows, cols), -1000.0)
    body = ((yy - cy) / (0.42 * rows)) ** 2 + ((xx - cx) / (0.46 * cols)) ** 2 <= 1
    hu[body] = 40.0
    bone_x = cx + 0.2 * cols * np.sin(z / 10.0)
    bone = (yy - cy * 1.2) ** 2 + (xx - bone_x) ** 2 <= (0.08 * min(rows, cols)) ** 2
    hu[bone & body] = 700.0
    hu += rng.normal(0.0, 12.0, size=hu.shape)
    return hu


def ct_series(
    n: int,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    rows: int = 64,
    cols: int = 64,
    patient_id: str = "TEST^ID",
    modality: str = "CT",
    seed: int = 0,
    series_number: int = 1,
) -> list[Dataset]:
    """Return ``n`` CT Image Storage instances of one axial series (PS3.3 A.3), head first.

    Pixels are signed 16-bit stored values with Rescale Intercept -1024 (HU = stored - 1024),
    a soft-tissue window, instance numbers 1..n and Image Position (Patient) stepping by the slice
    thickness. ``modality`` only sets the Modality attribute (to test routing rules); the SOP
    class stays CT Image Storage.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError('Argument "n" must be a positive integer.')
    if rows < 2 or cols < 2:
        raise ValueError('Arguments "rows" and "cols" must be at least 2.')
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid(entropy_srcs=[series_uid, "frame-of-reference"])
    rng = np.random.default_rng(seed)
    datasets = []
    for index in range(n):
        number = index + 1
        z = -index * SLICE_THICKNESS_MM
        ds = _base(
            CTImageStorage,
            _instance_uid(series_uid, number),
            study_uid=study_uid,
            series_uid=series_uid,
            patient_id=patient_id,
            modality=modality,
            series_number=series_number,
            instance_number=number,
        )
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.AcquisitionNumber = 1
        ds.AcquisitionDate = STUDY_DATE
        ds.AcquisitionTime = STUDY_TIME
        ds.BodyPartExamined = "CHEST"
        ds.KVP = 120
        ds.PatientPosition = "HFS"
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceThickness = SLICE_THICKNESS_MM
        ds.SliceLocation = z
        ds.PixelSpacing = [PIXEL_SPACING_MM, PIXEL_SPACING_MM]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [  # DS holds at most 16 characters: round
            round(-PIXEL_SPACING_MM * (cols - 1) / 2, 3),
            round(-PIXEL_SPACING_MM * (rows - 1) / 2, 3),
            z,
        ]
        stored = np.clip(np.rint(_phantom(rows, cols, z, rng) - CT_RESCALE_INTERCEPT), -1024, 4095)
        _set_pixels(ds, stored.astype(np.int16), photometric="MONOCHROME2", bits_stored=16)
        ds.RescaleIntercept = CT_RESCALE_INTERCEPT
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter, ds.WindowWidth = CT_WINDOW
        datasets.append(ds)
    return datasets


def multi_series_study(
    n_series: int,
    per_series: int,
    *,
    study_uid: str | None = None,
    rows: int = 64,
    cols: int = 64,
    patient_id: str = "TEST^ID",
    seed: int = 0,
) -> list[Dataset]:
    """Return ``n_series`` CT series of ``per_series`` instances each, all in one study.

    Series are numbered 1..n_series and each has its own Series Instance UID and pixel seed.
    """
    if not isinstance(n_series, int) or n_series < 1:
        raise ValueError('Argument "n_series" must be a positive integer.')
    study_uid = study_uid or generate_uid()
    datasets: list[Dataset] = []
    for index in range(n_series):
        datasets += ct_series(
            per_series,
            study_uid=study_uid,
            rows=rows,
            cols=cols,
            patient_id=patient_id,
            seed=seed + index,
            series_number=index + 1,
        )
    return datasets


def cr_image(
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    rows: int = 256,
    cols: int = 256,
    patient_id: str = "TEST^ID",
    photometric: str = "MONOCHROME1",
    seed: int = 0,
) -> Dataset:
    """Return one CR Image Storage instance (PS3.3 A.2): a PA chest-like radiograph, 12 bits.

    ``photometric`` is MONOCHROME1 (white is low, as on most CR chest films) or MONOCHROME2.
    """
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError('Argument "photometric" must be "MONOCHROME1" or "MONOCHROME2".')
    series_uid = series_uid or generate_uid()
    ds = _base(
        ComputedRadiographyImageStorage,
        _instance_uid(series_uid, 1),
        study_uid=study_uid or generate_uid(),
        series_uid=series_uid,
        patient_id=patient_id,
        modality="CR",
        series_number=1,
        instance_number=1,
    )
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.ImagerPixelSpacing = [0.15, 0.15]
    ds.KVP = 120
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float64)
    # Attenuation: two lung fields let more X-rays through than the mediastinum and the edges.
    lungs = sum(
        np.exp(-(((yy - rows * 0.5) / (rows * 0.28)) ** 2 + ((xx - cx) / (cols * 0.15)) ** 2))
        for cx in (cols * 0.3, cols * 0.7)
    )
    exposure = 600 + 2800 * lungs + rng.normal(0, 40, size=(rows, cols))
    values = exposure if photometric == "MONOCHROME2" else 4095 - exposure
    _set_pixels(
        ds,
        np.clip(np.rint(values), 0, 4095).astype(np.uint16),
        photometric=photometric,
        bits_stored=12,
    )
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    return ds


def _set_pixels(ds: Dataset, pixels: np.ndarray, *, photometric: str, bits_stored: int) -> None:
    """Image Pixel module (PS3.3 C.7.6.3) for one grayscale frame, native (uncompressed)."""
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()


def write_all(datasets: Iterable[Dataset], folder: Path | str) -> list[Path]:
    """Write each dataset as a DICOM file (PS3.10) into ``folder``; return the paths in order.

    Files are named by SOP Instance UID, so writing the same instance twice overwrites it.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = out / f"{ds.SOPInstanceUID}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths
