"""Where routing rules find their models: a name under ``inference.models_dir`` or a path.

Reads only ``model.json`` (no torch), so the assembler can key jobs by model version cheaply.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from node.config import Config
from node.errors import NodeError

DEMO = "demo"


class ModelNotFoundError(NodeError):
    """A rule names a model that is not installed."""


@dataclass(frozen=True)
class ModelRef:
    directory: Path
    name: str
    version: str


def model_dir(cfg: Config, name: str) -> Path:
    p = Path(name)
    if p.is_absolute() or "/" in name:
        return p if p.is_absolute() else (cfg.inference.models_dir.parent / p).resolve()
    return cfg.inference.models_dir / name


def resolve(cfg: Config, name: str) -> ModelRef:
    """The model a rule names, from its model.json; ModelNotFoundError when absent."""
    d = model_dir(cfg, name)
    card = d / "model.json"
    try:
        data = json.loads(card.read_text(encoding="utf-8"))
        return ModelRef(directory=d, name=str(data["name"]), version=str(data["version"]))
    except FileNotFoundError:
        hint = " (run `aidnode model demo`)" if name == DEMO else ""
        raise ModelNotFoundError(f"model {name!r} is not installed at {d}{hint}") from None
    except (ValueError, KeyError) as exc:
        raise ModelNotFoundError(f"{card} is not a valid model card: {exc}") from exc


def installed(cfg: Config) -> list[ModelRef]:
    out = []
    root = cfg.inference.models_dir
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if (d / "model.json").is_file():
                try:
                    out.append(resolve(cfg, d.name))
                except ModelNotFoundError:
                    continue
    return out
