"""Synthetic chest-like phantom radiographs, optional lesions with masks, and DICOM wrappers.

Everything is deterministic from a seed. The phantoms are crude on purpose: they exist so the
whole chain (receive -> model -> SR/heatmap) runs out of the box on data with known ground truth.
They are NOT patient images and a model trained on them says nothing about real radiographs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

DX_FOR_PRESENTATION = (
    "1.2.840.10008.5.1.4.1.1.1.1"  # PS3.4 B.5: Digital X-Ray Image - For Presentation
)
LESIONS = ("nodule", "effusion")
_STORED_MAX = 4095  # 12 bits stored in 16 allocated

_NODULE_REASONS = (
    "cough, rule out nodule",
    "follow-up of pulmonary nodule",
    "smoker with haemoptysis, ? lung mass",
    "weight loss, exclude lung lesion",
)
_EFFUSION_REASONS = (
    "shortness of breath, ? pleural effusion",
    "heart failure, increasing dyspnoea",
    "reduced breath sounds at the base",
)
_OTHER_REASONS = (
    "pre-operative chest x-ray",
    "fever, ? pneumonia",
    "chest pain after fall",
    "routine check",
    "line position check",
    "asthma exacerbation",
)


@dataclass(frozen=True)
class PhantomCase:
    """One phantom with its ground truth and the header text that goes with it."""

    image: np.ndarray  # float32 (size, size) in [0, 1]
    masks: dict[str, np.ndarray]  # lesion key -> bool (size, size); empty mask when absent
    labels: dict[str, int]
    reason: str
    age: int
    sex: str


def _smooth_noise(rng: np.random.Generator, size: int, nodes: int) -> np.ndarray:
    """Low-frequency noise: a nodes x nodes random grid bilinearly upsampled to (size, size).

    The grid is fixed in nodes, not pixels, so the mottle looks the same at every image size
    (a pixel-sized grid made nodule-sized blobs once a 512-px phantom was shrunk to 128 px).
    """
    n = max(2, nodes)
    coarse = rng.standard_normal((n, n)).astype(np.float32)
    pos = np.linspace(0, n - 1, size, dtype=np.float32)
    i0 = np.clip(pos.astype(int), 0, n - 2)
    f = pos - i0
    rows = coarse[i0] * (1 - f)[:, None] + coarse[i0 + 1] * f[:, None]
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]


def phantom(
    seed: int, size: int = 256, nodule: bool = False, effusion: bool = False
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A chest-like phantom (float32 (size, size) in [0, 1]) and lesion masks (bool).

    ``masks`` has a key per requested lesion. Nodules are round blobs of 3-6 % of the image
    width, some faint; an effusion is a basal fluid level in one or both lungs.
    """
    if size < 32:
        raise ValueError('Argument "size" must be at least 32.')
    rng = np.random.default_rng(seed)
    s = float(size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx = s * (0.5 + rng.uniform(-0.04, 0.04))
    cy = s * (0.52 + rng.uniform(-0.04, 0.04))
    scale = rng.uniform(0.85, 1.05)
    img = np.full((size, size), rng.uniform(0.02, 0.08), np.float32)

    body = ((xx - cx) / (0.46 * s * scale)) ** 2 + ((yy - cy) / (0.52 * s * scale)) ** 2 < 1
    img[body] = rng.uniform(0.45, 0.6)

    lungs = np.zeros((size, size), bool)
    lung_boxes = []
    for side in (-1, 1):
        lx = cx + side * 0.2 * s * scale
        ly = cy - 0.04 * s * scale
        rx, ry = 0.15 * s * scale * rng.uniform(0.9, 1.1), 0.3 * s * scale * rng.uniform(0.9, 1.1)
        inside = ((xx - lx) / rx) ** 2 + ((yy - ly) / ry) ** 2 < 1
        inside &= yy < ly + ry * rng.uniform(0.55, 0.75) - 0.15 * ry * ((xx - lx) / rx) ** 2
        lungs |= inside
        lung_boxes.append((lx, ly, rx, ry))
    lung_level = rng.uniform(0.15, 0.28)
    img[lungs] = lung_level + 0.08 * (yy[lungs] - cy) / s  # denser towards the bases

    # ribs: bright arcs over the lungs
    for side in (-1, 1):
        lx, ly, rx, ry = lung_boxes[(side + 1) // 2]
        for k in range(9):
            y0 = ly - ry * 0.9 + k * ry * 0.2
            arc = y0 + 0.25 * ry * ((xx - cx) / (0.4 * s)) ** 2 * 2.0
            rib = np.abs(yy - arc) < s * 0.008
            img[rib & lungs] += 0.07
    # mediastinum and heart
    medi = (np.abs(xx - cx) < 0.07 * s * scale) & (yy > cy - 0.4 * s * scale) & body
    img[medi] = np.maximum(img[medi], 0.65)
    heart = ((xx - cx - 0.05 * s) / (0.14 * s * scale)) ** 2 + (
        (yy - cy - 0.12 * s) / (0.11 * s)
    ) ** 2 < 1
    img[heart] = np.maximum(img[heart], 0.62)

    masks: dict[str, np.ndarray] = {}
    lung_mask = lungs & ~heart
    if effusion:
        fluid = np.zeros((size, size), bool)
        sides = [0, 1] if rng.random() < 0.3 else [int(rng.integers(2))]
        for i in sides:
            lx, ly, rx, ry = lung_boxes[i]
            level = ly + ry * rng.uniform(0.05, 0.35)
            meniscus = level - 0.12 * ry * np.abs(xx - lx) / rx  # curves up laterally
            fluid |= lung_mask & (yy > meniscus) & (np.abs(xx - lx) < rx)
        img[fluid] = np.maximum(img[fluid], rng.uniform(0.5, 0.6))
        masks["effusion"] = fluid
    if nodule:
        candidates = np.argwhere(lung_mask & (yy < cy + 0.1 * s))
        y, x = candidates[rng.integers(len(candidates))].astype(np.float32)
        r = s * rng.uniform(0.03, 0.06)
        contrast = rng.uniform(0.07, 0.12) if rng.random() < 0.3 else rng.uniform(0.14, 0.28)
        d2 = (xx - x) ** 2 + (yy - y) ** 2
        img += contrast * np.clip(1.2 - d2 / r**2, 0, 1).astype(np.float32)
        masks["nodule"] = d2 <= r**2

    img += 0.04 * _smooth_noise(rng, size, 6)  # mottle
    img += rng.uniform(0.01, 0.03) * rng.standard_normal((size, size)).astype(np.float32)
    gamma = rng.uniform(0.8, 1.25)
    img = np.clip(img, 0, 1) ** gamma
    lo, hi = rng.uniform(0.0, 0.05), rng.uniform(0.9, 1.0)
    img = np.clip(lo + (hi - lo) * img, 0, 1).astype(np.float32)
    return img, masks


def phantom_case(seed: int, size: int, nodule: bool, effusion: bool) -> PhantomCase:
    """A phantom plus a clinical-context story that correlates (noisily) with its lesions."""
    image, masks = phantom(seed, size, nodule=nodule, effusion=effusion)
    rng = np.random.default_rng([seed, 7])
    if nodule and rng.random() < 0.65:
        reason = str(rng.choice(_NODULE_REASONS))
    elif effusion and rng.random() < 0.65:
        reason = str(rng.choice(_EFFUSION_REASONS))
    elif rng.random() < 0.12:
        reason = str(rng.choice(_NODULE_REASONS + _EFFUSION_REASONS))
    else:
        reason = str(rng.choice(_OTHER_REASONS))
    age = int(np.clip(rng.normal(66 if nodule else 50, 14), 18, 95))
    sex = "M" if rng.random() < 0.5 else "F"
    full = {k: masks.get(k, np.zeros(image.shape, bool)) for k in LESIONS}
    labels = {"nodule": int(nodule), "effusion": int(effusion)}
    return PhantomCase(image, full, labels, reason, age, sex)


def phantom_dataset(
    image: np.ndarray,
    *,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    patient_id: str = "PHANTOM-0001",
    description: str = "XR CHEST PA",
    reason: str = "",
    age: int = 60,
    sex: str = "O",
    accession: str = "",
    instance_number: int = 1,
    modality: str = "DX",
) -> Dataset:
    """A Digital X-Ray For Presentation image (MONOCHROME2, 12 of 16 bits, window in header).

    The patient is synthetic ("PHANTOM^DEMO"); ``reason`` goes to ReasonForTheRequestedProcedure.
    """
    if image.ndim != 2:
        raise ValueError('Argument "image" must be a 2-D array.')
    pixels = np.round(np.clip(image, 0, 1) * _STORED_MAX).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(DX_FOR_PRESENTATION)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = "PHANTOM^DEMO"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = sex
    ds.PatientAge = f"{int(age):03d}Y"
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.ContentDate = "20240101"
    ds.ContentTime = "120000"
    ds.AccessionNumber = accession
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.Manufacturer = "aidnode synthetic phantom"
    ds.StudyDescription = description
    ds.SeriesDescription = "PA"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.ReasonForTheRequestedProcedure = reason  # (0040,1002)
    request = Dataset()
    request.ReasonForTheRequestedProcedure = reason
    request.RequestedProcedureID = ""
    request.ScheduledProcedureStepID = ""
    ds.RequestAttributesSequence = [request]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.PatientOrientation = ["L", "F"]
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [0.5, 0.5]
    ds.ImagerPixelSpacing = [0.5, 0.5]
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.WindowCenter = (_STORED_MAX + 1) // 2
    ds.WindowWidth = _STORED_MAX + 1
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1
    ds.PixelData = pixels.tobytes()
    return ds


def phantom_study(
    seed: int,
    n_images: int = 1,
    *,
    size: int = 512,
    nodule: bool | None = None,
    effusion: bool | None = None,
    patient_id: str = "PHANTOM-0001",
) -> list[Dataset]:
    """A study of ``n_images`` phantoms sharing study UID and clinical context.

    ``nodule``/``effusion`` None draws each with probability 0.5 from the seed; a lesion present
    in the study is drawn on the first image only. UIDs are derived from the seed.
    """
    if n_images < 1:
        raise ValueError('Argument "n_images" must be a positive integer.')
    rng = np.random.default_rng([seed, 11])
    has_nodule = bool(rng.random() < 0.5) if nodule is None else nodule
    has_effusion = bool(rng.random() < 0.5) if effusion is None else effusion
    study_uid = generate_uid(entropy_srcs=["aidnode-phantom", str(seed), "study"])
    series_uid = generate_uid(entropy_srcs=["aidnode-phantom", str(seed), "series"])
    story = phantom_case(seed, 32, has_nodule, has_effusion)  # the text only
    out = []
    for i in range(n_images):
        first = i == 0
        case = phantom(
            seed * 1000 + i, size, nodule=has_nodule and first, effusion=has_effusion and first
        )
        out.append(
            phantom_dataset(
                case[0],
                study_uid=study_uid,
                series_uid=series_uid,
                sop_uid=generate_uid(entropy_srcs=["aidnode-phantom", str(seed), str(i)]),
                patient_id=patient_id,
                reason=story.reason,
                age=story.age,
                sex=story.sex,
                instance_number=i + 1,
            )
        )
    return out
