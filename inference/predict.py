"""Run a model package over a study: batching, device and precision are chosen here only.

Every frame of every image is analysed (CT series and multi-frame images image by image, in
batches); the clinical-context text is built and encoded once per study. The study probability
of a finding is the maximum over the images; a heatmap is made for each positive finding on the
image that scored highest, mapped back to that image's rows x columns.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pydicom.dataset import Dataset

from inference.context import context_for_study
from inference.errors import DeviceError
from inference.heatmap import HeatmapMethod, grad_cam_heatmap, token_map_heatmap
from inference.package import ModelPackage
from inference.pixels import Letterbox, frames, to_model_input
from inference.prediction import Finding, ImageRef, Prediction

log = logging.getLogger(__name__)


class Precision(enum.Enum):
    """Arithmetic for the forward pass. AUTO: fp32 on CPU, fp16/bf16 autocast on CUDA."""

    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"  # autocast; on CPU measure it first (bench/inference.py): not always faster
    FP16 = "fp16"  # CUDA only


def choose_device(device: str = "auto") -> torch.device:
    """ "auto" -> the first CUDA device when one is usable, else the CPU."""
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f'Argument "device" {device!r} is not a torch device.') from exc
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} requested but CUDA is not available")
        if chosen.index is None:
            chosen = torch.device("cuda:0")
    elif chosen.type != "cpu":
        raise ValueError(f'Argument "device" must be "auto", "cpu" or "cuda[:N]", not {device!r}.')
    return chosen


@dataclass
class _Image:
    ref: ImageRef
    letterbox: Letterbox
    shape: tuple[int, int]
    model_input: np.ndarray | None  # kept only for Grad-CAM


class Predictor:
    """A loaded model package that analyses studies; keep one per process and reuse it."""

    def __init__(
        self,
        package: ModelPackage,
        device: str = "auto",
        batch_size: int = 8,
        max_image_bytes: int = 1 << 30,
        precision: Precision | str = Precision.AUTO,
        heatmap_method: HeatmapMethod = HeatmapMethod.TOKEN_MAP,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError('Argument "batch_size" must be a positive integer.')
        if max_image_bytes < 1:
            raise ValueError('Argument "max_image_bytes" must be positive.')
        self.package = package
        self.device = choose_device(device)
        self.batch_size = batch_size
        self.max_image_bytes = max_image_bytes
        self.heatmap_method = heatmap_method
        self.precision = self._resolve(Precision(precision))
        try:
            model = package.build_model().to(self.device)
            if self.device.type == "cpu":
                model.vision.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        except torch.OutOfMemoryError as exc:
            raise DeviceError(f"out of memory loading {package.name} on {self.device}") from exc
        self.model = model.eval()
        log.info(
            "model %s %s on %s (%s)",
            package.name,
            package.version,
            self.device,
            self.precision.value,
        )

    def _resolve(self, precision: Precision) -> Precision:
        if self.device.type == "cpu":
            if precision is Precision.FP16:
                raise ValueError("fp16 is for CUDA only; use bf16 or fp32 on the CPU")
            return Precision.FP32 if precision is Precision.AUTO else precision
        if precision is Precision.AUTO:
            return Precision.BF16 if torch.cuda.is_bf16_supported() else Precision.FP16
        return precision

    def _autocast(self) -> torch.autocast:
        dtype = torch.bfloat16 if self.precision is Precision.BF16 else torch.float16
        return torch.autocast(
            self.device.type, dtype=dtype, enabled=self.precision is not Precision.FP32
        )

    @property
    def device_name(self) -> str:
        return str(self.device)

    def predict(self, datasets: Sequence[Dataset], heatmaps: bool = True) -> Prediction:
        """Analyse one study (its image datasets) and return a Prediction.

        Raises PixelDataError (not retryable) for images that cannot be decoded, DeviceError
        (retryable) when the device runs out of memory or fails.
        """
        if not datasets:
            raise ValueError('Argument "datasets" must hold at least one image.')
        started = time.perf_counter()
        pkg = self.package
        text, fields = context_for_study(datasets, pkg.text_fields)
        try:
            return self._predict(datasets, heatmaps, text, fields, started)
        except (torch.OutOfMemoryError, MemoryError) as exc:
            raise DeviceError(f"out of memory on {self.device}") from exc
        except RuntimeError as exc:
            if self.device.type == "cuda" and "CUDA" in str(exc):
                raise DeviceError(f"CUDA error: {exc}") from exc
            raise

    def _predict(
        self,
        datasets: Sequence[Dataset],
        heatmaps: bool,
        text: str,
        fields: tuple[str, ...],
        started: float,
    ) -> Prediction:
        pkg = self.package
        with torch.inference_mode(), self._autocast():
            hidden, pad = self.model.encode_text([text])
        images: list[_Image] = []
        probs: list[np.ndarray] = []
        maps: list[torch.Tensor] = []
        keep_inputs = heatmaps and self.heatmap_method is HeatmapMethod.GRAD_CAM
        for batch in self._batches(datasets, images, keep_inputs):
            x = torch.from_numpy(batch)[:, None].to(self.device)
            if self.device.type == "cpu":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), self._autocast():
                out = self.model(x, hidden, pad)
            probs.append(torch.sigmoid(out.logits.float()).cpu().numpy())
            maps.append(out.token_logits.float().cpu())
        p = np.concatenate(probs)
        token_maps = torch.cat(maps)
        findings = []
        for c, label in enumerate(pkg.labels):
            best = int(np.argmax(p[:, c]))
            prob = float(p[best, c])
            heat = None
            if heatmaps and prob >= label.threshold:
                heat = self._heatmap(images[best], token_maps[best, c], c, hidden, pad)
            findings.append(
                Finding(label=label, probability=prob, image=images[best].ref, heatmap=heat)
            )
        seconds = time.perf_counter() - started
        log.info("analysed %d images in %.2f s on %s", len(images), seconds, self.device)
        return Prediction(
            model_name=pkg.name,
            model_version=pkg.version,
            synthetic_demo=pkg.synthetic_demo,
            device=self.device_name,
            findings=tuple(findings),
            analysed=tuple(im.ref for im in images),
            context_text=text,
            context_fields=fields,
            per_image={
                lab.key: tuple(float(v) for v in p[:, c]) for c, lab in enumerate(pkg.labels)
            },
            seconds=seconds,
        )

    def _batches(
        self, datasets: Sequence[Dataset], images: list[_Image], keep_inputs: bool
    ) -> Iterator[np.ndarray]:
        """Decode image by image and yield model-input batches; fills ``images`` in order."""
        size = self.package.input_size
        pending: list[np.ndarray] = []
        for ds in datasets:
            stack = frames(ds, self.package.windowing, self.max_image_bytes)
            multi = int(ds.get("NumberOfFrames", 1) or 1) > 1
            for index, frame in enumerate(stack):
                model_input, box = to_model_input(frame, size)
                ref = ImageRef(
                    sop_class_uid=str(ds.SOPClassUID),
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
                    frame_number=index + 1 if multi else None,
                )
                images.append(_Image(ref, box, frame.shape, model_input if keep_inputs else None))
                pending.append(model_input)
                if len(pending) == self.batch_size:
                    yield np.stack(pending)
                    pending = []
            del stack
        if pending:
            yield np.stack(pending)

    def _heatmap(
        self,
        image: _Image,
        token_logits: torch.Tensor,
        label_index: int,
        hidden: torch.Tensor,
        pad: torch.Tensor,
    ) -> np.ndarray:
        if self.heatmap_method is HeatmapMethod.GRAD_CAM and image.model_input is not None:
            x = torch.from_numpy(image.model_input)[None, None].to(self.device)
            heat = grad_cam_heatmap(self.model, x, hidden.float(), pad, label_index)
        else:
            heat = token_map_heatmap(token_logits)
        source = image.letterbox.to_source(heat)
        return np.clip(source, 0.0, 1.0).astype(np.float32)
