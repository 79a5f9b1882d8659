"""Result values passed from the model to the SR and SC builders.

These are plain frozen dataclasses: the model produces them, the builders in ``sr.py`` and
``sc.py`` turn them into DICOM datasets, and the worker stores a JSON summary of them
(``Prediction.summary()``). Nothing here touches the network, the database or torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DISCLAIMER = (
    "AI-generated result to assist the radiologist. Not for diagnostic use: "
    "it has not been cleared as a medical device and must be reviewed by a qualified reader."
)


@dataclass(frozen=True)
class LabelCode:
    """One finding the model reports, with its coded concept (SNOMED CT or RadLex)."""

    key: str  # short machine name, e.g. "nodule"
    coding_scheme: str  # "SCT" or "RADLEX"
    code_value: str  # e.g. "27925004"
    code_meaning: str  # e.g. "Nodule"
    threshold: float  # probability at or above which the finding is Present


@dataclass(frozen=True)
class ImageRef:
    """One analysed image (a frame of it when ``frame_number`` is set)."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    frame_number: int | None = None  # 1-based, only for multi-frame images


@dataclass(frozen=True, eq=False)
class Finding:
    """The study-level result for one label.

    ``probability`` is the maximum over the analysed images; ``image`` is the image that gave it.
    ``heatmap`` is float32 in [0, 1] with the shape (rows, columns) of that source image, or None
    when the finding is not present (heatmaps are computed for positive findings only) or the
    caller asked for none.
    """

    label: LabelCode
    probability: float
    image: ImageRef
    heatmap: np.ndarray | None = None

    @property
    def present(self) -> bool:
        return self.probability >= self.label.threshold


@dataclass(frozen=True, eq=False)
class Prediction:
    """Everything one analysis of one study produced."""

    model_name: str
    model_version: str
    synthetic_demo: bool  # True for the demo model trained on synthetic phantoms
    device: str  # "cpu" or "cuda:0"
    findings: tuple[Finding, ...]
    analysed: tuple[ImageRef, ...]
    context_text: str  # the clinical-context text fed to the text encoder
    context_fields: tuple[str, ...]  # DICOM keywords the text was built from
    per_image: dict[str, tuple[float, ...]] = field(default_factory=dict)
    # per_image: label key -> probabilities in the order of ``analysed``
    seconds: float = 0.0  # model time

    def positive(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.present)

    def summary(self) -> dict[str, object]:
        """A JSON-serialisable summary for the database and the CLI."""
        return {
            "model": self.model_name,
            "version": self.model_version,
            "synthetic_demo": self.synthetic_demo,
            "device": self.device,
            "images": len(self.analysed),
            "seconds": round(self.seconds, 3),
            "context_fields": list(self.context_fields),
            "findings": [
                {
                    "key": f.label.key,
                    "code": f"{f.label.coding_scheme}:{f.label.code_value}",
                    "meaning": f.label.code_meaning,
                    "probability": round(f.probability, 4),
                    "threshold": f.label.threshold,
                    "present": f.present,
                    "image": f.image.sop_instance_uid,
                    "frame": f.image.frame_number,
                }
                for f in self.findings
            ],
        }
