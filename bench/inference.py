"""Inference latency: per-image time and images/s for 512x512 sources, and a 300-slice CT series.

    python bench/inference.py [--package DIR] [--repeats 5] [--ct-slices 300]

Runs on the CPU (and CUDA when present): batch 1 and 8, with and without heatmaps, fp32 and
bf16 autocast; reports the largest probability difference bf16 vs fp32. Without --package a
package with untrained weights is written to a temporary directory (the cost is the same).
Times include decoding, windowing and letterboxing (what a job pays), not model loading.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.model import FusedModel, ModelConfig
from inference.package import ModelPackage, load_package, save_package
from inference.pixels import Windowing
from inference.predict import Precision, Predictor
from inference.synthetic import phantom_study
from inference.train import DEMO_LABELS


def _package(path: str | None, tmp: str) -> ModelPackage:
    if path:
        return load_package(path)
    torch.manual_seed(0)
    model = FusedModel(ModelConfig(num_labels=len(DEMO_LABELS), input_size=128))
    return save_package(
        Path(tmp) / "bench",
        model,
        name="bench-untrained",
        version="0",
        description="untrained, for timing",
        labels=DEMO_LABELS,
        windowing=Windowing(),
        text_fields=("StudyDescription",),
    )


def _ct_series(n: int) -> list:
    """n 512x512 CT-like slices (MONOCHROME2, signed 16-bit, HU rescale) with their own UIDs."""
    base = phantom_study(1, 1, size=512, nodule=True, effusion=False)[0]
    hu = (np.frombuffer(base.PixelData, np.uint16).astype(np.int32) - 1024).astype(np.int16)
    base.Modality = "CT"
    base.SOPClassUID = base.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    base.PixelRepresentation = 1
    base.RescaleIntercept = 0
    base.RescaleType = "HU"
    base.WindowCenter, base.WindowWidth = -600, 1500
    base.PixelData = hu.tobytes()
    series = generate_uid()
    out = []
    for i in range(n):
        ds = copy.copy(base)
        ds.SOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = series
        ds.InstanceNumber = i + 1
        out.append(ds)
    return out


def _time(predictor: Predictor, study: list, heatmaps: bool, repeats: int) -> float:
    predictor.predict(study[:1], heatmaps=heatmaps)  # warm-up
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        predictor.predict(study, heatmaps=heatmaps)
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", help="model package directory (default: untrained)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ct-slices", type=int, default=300)
    args = parser.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    with tempfile.TemporaryDirectory() as tmp:
        package = _package(args.package, tmp)
        print(
            f"model {package.name}, input {package.input_size} px, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"load average {os.getloadavg()[0]:.1f} (other work on the machine skews times)"
        )
        # every image positive for the heatmap path: the phantoms carry a nodule and an effusion
        studies = {
            n: [
                ds
                for s in range(n)
                for ds in phantom_study(100 + s, 1, size=512, nodule=True, effusion=True)
            ]
            for n in (1, 8)
        }
        print(f"{'device':<7}{'prec':<6}{'batch':>6}{'heatmaps':>10}{'ms/image':>10}{'img/s':>8}")
        for device in devices:
            probs = {}
            for precision in (Precision.FP32, Precision.BF16):
                for batch in (1, 8):
                    predictor = Predictor(
                        package, device=device, batch_size=batch, precision=precision
                    )
                    for heatmaps in (False, True):
                        study = studies[batch]
                        seconds = _time(predictor, study, heatmaps, args.repeats) / len(study)
                        print(
                            f"{device:<7}{precision.value:<6}{batch:>6}{heatmaps!s:>10}"
                            f"{seconds * 1000:>10.1f}{1 / seconds:>8.1f}",
                            flush=True,
                        )
                    result = predictor.predict(studies[8], heatmaps=False)
                    probs[precision] = np.array([result.per_image[k] for k in result.per_image])
            diff = float(np.abs(probs[Precision.FP32] - probs[Precision.BF16]).max())
            print(f"{device}: max |p(bf16) - p(fp32)| = {diff:.4f}")
            series = _ct_series(args.ct_slices)
            for precision in (Precision.FP32, Precision.BF16):
                predictor = Predictor(package, device=device, batch_size=8, precision=precision)
                predictor.predict(series[:8])
                started = time.perf_counter()
                predictor.predict(series, heatmaps=True)
                print(
                    f"{device} {precision.value}: {len(series)}-slice CT series "
                    f"{time.perf_counter() - started:.1f} s (batch 8, heatmaps)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
