"""Training: ``train`` for labelled images (``aidnode model train``) and ``build_demo_package``.

Training runs a fixed number of steps from a fixed seed on the CPU so a package is reproducible.
When samples carry lesion masks (the synthetic demo) a mask loss on the token map is added: with
labels alone the heatmaps did not localise (MODEL_NOTES.md). Every run ends with a held-out
evaluation: AUROC per finding with the text and with the text masked, and, where masks exist,
the strict pointing game (the heatmap maximum must fall inside the undilated lesion mask).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F

from inference.context import DEFAULT_FIELDS, build_context
from inference.heatmap import grad_cam_heatmap, points_inside, token_map_heatmap
from inference.model import FusedModel, ModelConfig, mask_to_tokens
from inference.package import save_package
from inference.pixels import Windowing, frames, to_model_input
from inference.prediction import LabelCode

log = logging.getLogger(__name__)

Progress = Callable[[int, int, float], None]
DEMO_NAME = "aidnode-demo-synthetic"
DEMO_VERSION = "1.0.0"
DEMO_LABELS = (
    LabelCode("nodule", "SCT", "27925004", "Nodule", 0.5),
    LabelCode("effusion", "SCT", "60046008", "Pleural effusion", 0.5),
)
DEMO_STEPS = 700
_TEXT_DROP = 0.25  # share of training samples that see the null text token
_MASK_WEIGHT = 1.0
_MASK_POS_WEIGHT = 10.0


@dataclass(frozen=True, eq=False)
class TrainingSample:
    """One image in [0, 1] (any shape), its context text, 0/1 targets and optional masks."""

    image: np.ndarray
    text: str
    targets: tuple[int, ...]
    masks: np.ndarray | None = None  # bool (n_labels, rows, cols), same shape as image


@dataclass(frozen=True)
class TrainReport:
    """What a training run produced and how the held-out evaluation came out."""

    name: str
    package_dir: str
    steps: int
    seed: int
    seconds: float
    n_train: int
    n_heldout: int
    labels: tuple[str, ...]
    auroc_text: dict[str, float]
    auroc_no_text: dict[str, float]
    pointing_text: dict[str, float] | None  # token map, strict (undilated mask)
    pointing_no_text: dict[str, float] | None
    pointing_grad_cam: dict[str, float] | None  # Grad-CAM with text, for comparison
    final_loss: float

    def __str__(self) -> str:
        lines = [
            (
                f"{self.name}: {self.steps} steps (seed {self.seed}) in {self.seconds:.0f} s, "
                f"{self.n_train} training / {self.n_heldout} held-out images, "
                f"final loss {self.final_loss:.4f}"
            ),
            (
                f"{'finding':<12}{'AUROC text':>12}{'no text':>10}"
                f"{'point text':>12}{'no text':>10}{'Grad-CAM':>10}"
            ),
        ]

        def fmt(d: dict[str, float] | None, key: str) -> str:
            return "-" if d is None or math.isnan(d[key]) else f"{d[key]:.3f}"

        for key in self.labels:
            lines.append(
                f"{key:<12}{fmt(self.auroc_text, key):>12}{fmt(self.auroc_no_text, key):>10}"
                f"{fmt(self.pointing_text, key):>12}{fmt(self.pointing_no_text, key):>10}"
                f"{fmt(self.pointing_grad_cam, key):>10}"
            )
        lines.append(f"package: {self.package_dir}")
        return "\n".join(lines)


def auroc(scores: np.ndarray, targets: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied ranks averaged); NaN if one class."""
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets).astype(bool)
    n_pos, n_neg = int(targets.sum()), int((~targets).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[targets].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass
class _Tensors:
    images: torch.Tensor  # (N, 1, S, S)
    targets: torch.Tensor  # (N, C)
    token_targets: torch.Tensor | None  # (N, C, g, g)
    masks: np.ndarray | None  # bool (N, C, S, S), for pointing
    text_index: torch.Tensor  # (N,) into the text table
    texts: list[str]


def _prepare(samples: Sequence[TrainingSample], size: int, n_labels: int) -> _Tensors:
    has_masks = all(s.masks is not None for s in samples)
    images, masks, targets = [], [], []
    texts: list[str] = []
    text_ids: dict[str, int] = {}
    index = []
    for s in samples:
        if len(s.targets) != n_labels:
            raise ValueError(f"a sample has {len(s.targets)} targets, expected {n_labels}")
        img, _ = to_model_input(s.image.astype(np.float32), size)
        images.append(img)
        if has_masks and s.masks is not None:
            masks.append(np.stack([to_model_input(m.astype(np.float32), size)[0] for m in s.masks]))
        targets.append(s.targets)
        index.append(text_ids.setdefault(s.text, len(text_ids)))
        if len(text_ids) > len(texts):
            texts.append(s.text)
    soft = torch.from_numpy(np.stack(masks)) if has_masks else None
    return _Tensors(
        images=torch.from_numpy(np.stack(images))[:, None],
        targets=torch.tensor(targets, dtype=torch.float32),
        token_targets=mask_to_tokens(soft) if soft is not None else None,
        masks=(soft.numpy() >= 0.5) if soft is not None else None,
        text_index=torch.tensor(index),
        texts=texts,
    )


def _encode_texts(model: FusedModel, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """MiniLM states for every distinct text once (the text encoder is frozen)."""
    hidden, pads = [], []
    with torch.no_grad():
        for i in range(0, len(texts), 64):
            h, p = model.encode_text(texts[i : i + 64])
            hidden.append(h)
            pads.append(p)
    length = max(h.shape[1] for h in hidden)
    hidden = [F.pad(h, (0, 0, 0, length - h.shape[1])) for h in hidden]
    pads = [F.pad(p, (0, length - p.shape[1]), value=True) for p in pads]
    return torch.cat(hidden), torch.cat(pads)


def _freeze_early(model: FusedModel) -> list[torch.nn.Module]:
    """Keep the ImageNet stem and stride-2/4 blocks fixed (faster; generic edge filters)."""
    frozen = [model.vision.stem, model.vision.stem_bn, *model.vision.blocks8[:3]]
    for module in frozen:
        module.requires_grad_(False)
    return frozen


def _fit(
    model: FusedModel,
    data: _Tensors,
    *,
    steps: int,
    seed: int,
    batch_size: int,
    progress: Progress | None,
) -> float:
    gen = torch.Generator().manual_seed(seed)
    hidden, pads = _encode_texts(model, data.texts)
    frozen = _freeze_early(model)
    backbone = [p for p in model.vision.parameters() if p.requires_grad]
    ids = {id(p) for p in backbone}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    opt = torch.optim.AdamW(
        [{"params": backbone, "lr": 5e-4}, {"params": rest, "lr": 1.5e-3}], weight_decay=1e-4
    )
    base = [g["lr"] for g in opt.param_groups]
    warmup = max(1, steps // 20)
    pos_weight = torch.full((1, data.targets.shape[1], 1, 1), _MASK_POS_WEIGHT)
    n = data.images.shape[0]
    loss_avg = float("nan")
    model.train()
    for module in frozen:
        module.eval()
    for step in range(steps):
        scale = (
            (step + 1) / warmup
            if step < warmup
            else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        )
        for g, lr in zip(opt.param_groups, base, strict=True):
            g["lr"] = lr * scale
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        images = data.images[idx]
        flip = torch.rand(batch_size, generator=gen) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        gain = 1 + 0.1 * (torch.rand(batch_size, 1, 1, 1, generator=gen) - 0.5)
        images = (images * gain).clamp(0, 1)
        text_mask = torch.rand(batch_size, generator=gen) < _TEXT_DROP
        out = model(images, hidden[data.text_index[idx]], pads[data.text_index[idx]], text_mask)
        loss = F.binary_cross_entropy_with_logits(out.logits, data.targets[idx])
        if data.token_targets is not None:
            tt = data.token_targets[idx]
            tt = torch.where(flip[:, None, None, None], tt.flip(-1), tt)
            loss = loss + _MASK_WEIGHT * F.binary_cross_entropy_with_logits(
                out.token_logits, tt, pos_weight=pos_weight
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = float(loss.detach())
        loss_avg = value if math.isnan(loss_avg) else 0.95 * loss_avg + 0.05 * value
        if progress is not None:
            progress(step + 1, steps, value)
    model.eval()
    return loss_avg


def evaluate(
    model: FusedModel, data: _Tensors, labels: Sequence[LabelCode], grad_cam: bool = True
) -> dict[str, dict[str, float] | None]:
    """Held-out AUROC with/without text and strict pointing (token map; Grad-CAM with text)."""
    model.eval()
    hidden, pads = _encode_texts(model, data.texts)
    keys = [lab.key for lab in labels]
    result: dict[str, dict[str, float] | None] = {}
    for with_text in (True, False):
        probs, maps = [], []
        with torch.no_grad():
            for i in range(0, data.images.shape[0], 32):
                sl = slice(i, i + 32)
                t = data.text_index[sl]
                mask = torch.full((len(t),), not with_text)
                out = model(data.images[sl], hidden[t], pads[t], mask)
                probs.append(torch.sigmoid(out.logits))
                maps.append(out.token_logits)
        p = torch.cat(probs).numpy()
        m = torch.cat(maps)
        tag = "text" if with_text else "no_text"
        result[f"auroc_{tag}"] = {
            k: auroc(p[:, c], data.targets[:, c].numpy()) for c, k in enumerate(keys)
        }
        result[f"pointing_{tag}"] = None
        if data.masks is not None:
            result[f"pointing_{tag}"] = {
                k: _pointing(data, c, partial(_token_heat, m)) for c, k in enumerate(keys)
            }
    result["pointing_grad_cam"] = None
    if data.masks is not None and grad_cam:
        cam = partial(_cam_heat, model, data, hidden, pads)
        result["pointing_grad_cam"] = {k: _pointing(data, c, cam) for c, k in enumerate(keys)}
    return result


def _token_heat(maps: torch.Tensor, i: int, c: int) -> np.ndarray:
    return token_map_heatmap(maps[i, c])


def _cam_heat(
    model: FusedModel, data: _Tensors, hidden: torch.Tensor, pads: torch.Tensor, i: int, c: int
) -> np.ndarray:
    t = data.text_index[i : i + 1]
    return grad_cam_heatmap(model, data.images[i : i + 1], hidden[t], pads[t], c)


def _pointing(data: _Tensors, c: int, heat: Callable[[int, int], np.ndarray]) -> float:
    assert data.masks is not None
    hits = [
        points_inside(heat(i, c), data.masks[i, c])
        for i in range(len(data.targets))
        if data.targets[i, c] > 0 and data.masks[i, c].any()
    ]
    return float(np.mean(hits)) if hits else float("nan")


def train(
    samples: Sequence[TrainingSample],
    labels: Sequence[LabelCode],
    out_dir: str | os.PathLike[str],
    *,
    steps: int,
    seed: int = 0,
    batch_size: int = 16,
    input_size: int = 128,
    progress: Progress | None = None,
    heldout: Sequence[TrainingSample] | None = None,
    grad_cam: bool = True,
    name: str = "aidnode-model",
    version: str = "0.1.0",
    description: str = "",
    windowing: Windowing | None = None,
    text_fields: Sequence[str] = DEFAULT_FIELDS,
    synthetic_demo: bool = False,
) -> TrainReport:
    """Train a fused model and write a package to ``out_dir``.

    Without ``heldout`` a fifth of ``samples`` (chosen by ``seed``) is held out. Samples with
    masks (all of them) add the token-map mask loss and a pointing evaluation.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError('Arguments "steps" and "batch_size" must be positive integers.')
    if not samples:
        raise ValueError('Argument "samples" must not be empty.')
    started = time.monotonic()
    torch.manual_seed(seed)
    if heldout is None:
        order = np.random.default_rng(seed).permutation(len(samples))
        cut = len(samples) // 5
        heldout = [samples[i] for i in order[:cut]]
        samples = [samples[i] for i in order[cut:]]
    config = ModelConfig(num_labels=len(labels), input_size=input_size)
    model = FusedModel(config, imagenet=True)
    data = _prepare(samples, input_size, len(labels))
    loss = _fit(model, data, steps=steps, seed=seed, batch_size=batch_size, progress=progress)
    figures: dict[str, dict[str, float] | None] = {}
    if heldout:
        figures = evaluate(
            model, _prepare(heldout, input_size, len(labels)), labels, grad_cam=grad_cam
        )
    package = save_package(
        out_dir,
        model,
        name=name,
        version=version,
        description=description,
        labels=labels,
        windowing=windowing or Windowing(),
        text_fields=text_fields,
        synthetic_demo=synthetic_demo,
        extra={"training": {"steps": steps, "seed": seed, "batch_size": batch_size}},
    )
    nan = {lab.key: float("nan") for lab in labels}
    report = TrainReport(
        name=name,
        package_dir=str(package.directory),
        steps=steps,
        seed=seed,
        seconds=time.monotonic() - started,
        n_train=len(samples),
        n_heldout=len(heldout),
        labels=tuple(lab.key for lab in labels),
        auroc_text=figures.get("auroc_text") or nan,
        auroc_no_text=figures.get("auroc_no_text") or nan,
        pointing_text=figures.get("pointing_text"),
        pointing_no_text=figures.get("pointing_no_text"),
        pointing_grad_cam=figures.get("pointing_grad_cam"),
        final_loss=loss,
    )
    log.info("trained %s in %.1f s", name, report.seconds)
    return report


def demo_samples(seed: int, count: int) -> list[TrainingSample]:
    """Synthetic phantoms with masks and header text built exactly as at inference time."""
    from inference.synthetic import LESIONS, phantom_case, phantom_dataset

    rng = np.random.default_rng([seed, 3])
    out = []
    for i in range(count):
        size = int(rng.choice((160, 256, 384, 512), p=(0.3, 0.3, 0.2, 0.2)))
        nodule, effusion = bool(rng.random() < 0.5), bool(rng.random() < 0.45)
        case = phantom_case(int(rng.integers(2**31)), size, nodule, effusion)
        header = phantom_dataset(
            np.zeros((1, 1), np.float32),
            study_uid="1.2.3",
            series_uid="1.2.3.4",
            sop_uid="1.2.3.4.5",
            reason=case.reason,
            age=case.age,
            sex=case.sex,
        )
        text, _ = build_context(header, DEFAULT_FIELDS)
        out.append(
            TrainingSample(
                image=case.image,
                text=text,
                targets=(int(nodule), int(effusion)),
                masks=np.stack([case.masks[k] for k in LESIONS]),
            )
        )
    return out


def build_demo_package(
    out_dir: str | os.PathLike[str],
    *,
    steps: int = DEMO_STEPS,
    seed: int = 0,
    progress: Progress | None = None,
    n_train: int = 1200,
    n_heldout: int = 300,
    grad_cam: bool = True,
) -> TrainReport:
    """Train the synthetic-data demo model (nodule, effusion) and write its package.

    ``grad_cam`` adds the Grad-CAM pointing figure (for comparison; it costs a backward pass
    per positive held-out image).
    """
    started = time.monotonic()
    report = train(
        demo_samples(seed, n_train),
        DEMO_LABELS,
        out_dir,
        steps=steps,
        seed=seed,
        batch_size=16,
        input_size=128,
        progress=progress,
        heldout=demo_samples(seed + 1_000_003, n_heldout),
        grad_cam=grad_cam,
        name=DEMO_NAME,
        version=DEMO_VERSION,
        description="DEMO trained on synthetic phantom radiographs only; not for clinical use. "
        "It finds synthetic nodules and effusions in synthetic phantoms.",
        synthetic_demo=True,
    )
    return replace(report, seconds=time.monotonic() - started)  # phantoms included


def samples_from_folder(
    folder: str | os.PathLike[str],
    labels_csv: str | os.PathLike[str],
    label_keys: Sequence[str],
    *,
    windowing: Windowing | None = None,
    text_fields: Sequence[str] = DEFAULT_FIELDS,
    max_image_bytes: int = 1 << 30,
    input_size: int = 128,
) -> list[TrainingSample]:
    """Samples for ``aidnode model train``: DICOM files in ``folder``, labels from a CSV.

    The CSV has a ``sop_instance_uid`` or ``file`` column and one 0/1 column per label key;
    every frame of a multi-frame image becomes a sample with the image's labels. Frames are
    kept letterboxed to ``input_size`` (pass the size you train at), not at full resolution.
    """
    with open(labels_csv, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{labels_csv} has no rows")
    id_col = "sop_instance_uid" if "sop_instance_uid" in rows[0] else "file"
    if id_col not in rows[0]:
        raise ValueError(f"{labels_csv} needs a sop_instance_uid or file column")
    missing = [k for k in label_keys if k not in rows[0]]
    if missing:
        raise ValueError(f"{labels_csv} lacks label columns: {', '.join(missing)}")
    wanted = {r[id_col].strip(): tuple(int(r[k]) for k in label_keys) for r in rows}
    out = []
    for path in sorted(Path(folder).rglob("*")):
        if not path.is_file():
            continue
        try:
            ds = pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError:
            continue
        key = str(ds.get("SOPInstanceUID", "")) if id_col == "sop_instance_uid" else path.name
        if key not in wanted:
            continue
        text, _ = build_context(ds, text_fields)
        for frame in frames(ds, windowing or Windowing(), max_image_bytes):
            image, _ = to_model_input(frame, input_size)
            out.append(TrainingSample(image=image, text=text, targets=wanted[key]))
    return out
