"""Model packages: save/load round trip and every refusal names what is wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom.dataset import Dataset
from safetensors.torch import save_file

from inference.errors import ModelPackageError, PixelDataError
from inference.model import FusedModel, ModelConfig
from inference.package import (
    MODEL_JSON,
    WEIGHTS_FILE,
    load_package,
    save_package,
    sha256_of,
    verify_package,
)
from inference.pixels import Windowing
from inference.predict import Predictor
from inference.prediction import LabelCode
from inference.synthetic import phantom, phantom_dataset

LABELS = (
    LabelCode("nodule", "SCT", "27925004", "Nodule", 0.5),
    LabelCode("effusion", "SCT", "60046008", "Pleural effusion", 0.4),
)


@pytest.fixture(scope="module")
def model() -> FusedModel:
    torch.manual_seed(1)
    return FusedModel(ModelConfig(num_labels=2, input_size=64)).eval()


@pytest.fixture(scope="module")
def saved(model: FusedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pkg") / "good"
    save_package(
        out,
        model,
        name="test-model",
        version="0.1",
        description="unit test",
        labels=LABELS,
        windowing=Windowing(center=40.0, width=400.0),
        text_fields=("StudyDescription", "PatientAge"),
    )
    return out


@pytest.fixture()
def pkg(saved: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "pkg"
    shutil.copytree(saved, copy)
    return copy


def _edit_card(directory: Path, **changes: object) -> None:
    card = json.loads((directory / MODEL_JSON).read_text())
    card.update(changes)
    (directory / MODEL_JSON).write_text(json.dumps(card))


def _rewrite_weights(directory: Path, state: dict[str, torch.Tensor]) -> None:
    save_file(state, str(directory / WEIGHTS_FILE))
    _edit_card(directory, weights_sha256=sha256_of((directory / WEIGHTS_FILE).read_bytes()))


def test_round_trip_gives_the_same_outputs(pkg: Path, model: FusedModel) -> None:
    assert verify_package(pkg) == []
    loaded = load_package(pkg)
    assert loaded.labels == LABELS
    assert loaded.windowing == Windowing(center=40.0, width=400.0)
    assert loaded.text_fields == ("StudyDescription", "PatientAge")
    assert loaded.input_size == 64
    rebuilt = loaded.build_model(text_encoder=model.text_encoder, tokenizer=model.tokenizer)
    hidden, pad = model.encode_text(["Study: CHEST."])
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, hidden, pad).logits, model(x, hidden, pad).logits)
    card = json.loads((pkg / MODEL_JSON).read_text())
    assert card["text_encoder"] == "all-MiniLM-L6-v2" and "weights_sha256" in card


def test_weights_hold_no_text_encoder(pkg: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(pkg / WEIGHTS_FILE), "pt") as fh:
        names = list(fh.keys())  # safe_open is not a mapping
    assert names and not [k for k in names if k.startswith("text_encoder.")]
    assert (pkg / WEIGHTS_FILE).stat().st_size < 8 * 1024 * 1024


@pytest.mark.parametrize("name", [MODEL_JSON, WEIGHTS_FILE])
def test_missing_file(pkg: Path, name: str) -> None:
    (pkg / name).unlink()
    assert any(f"{name} is missing" in p for p in verify_package(pkg))
    with pytest.raises(ModelPackageError, match=f"{name} is missing"):
        load_package(pkg)


def test_bad_json(pkg: Path) -> None:
    (pkg / MODEL_JSON).write_text("{not json")
    with pytest.raises(ModelPackageError, match="model.json is not valid JSON"):
        load_package(pkg)


def test_wrong_label_count(pkg: Path) -> None:
    card = json.loads((pkg / MODEL_JSON).read_text())
    extra = dict(card["labels"][0], key="mass", code_value="4147007", code_meaning="Mass")
    _edit_card(pkg, labels=[*card["labels"], extra])
    with pytest.raises(ModelPackageError, match="lists 3 labels but the head weights have 2"):
        load_package(pkg)


@pytest.mark.parametrize("threshold", [0.0, 1.0, 1.5, -0.1, "0.5"])
def test_threshold_outside_open_interval(pkg: Path, threshold: object) -> None:
    card = json.loads((pkg / MODEL_JSON).read_text())
    card["labels"][1]["threshold"] = threshold
    _edit_card(pkg, labels=card["labels"])
    assert any("labels[1].threshold" in p and "outside (0, 1)" in p for p in verify_package(pkg))


def test_unknown_coding_scheme(pkg: Path) -> None:
    card = json.loads((pkg / MODEL_JSON).read_text())
    card["labels"][0]["coding_scheme"] = "ICD10"
    _edit_card(pkg, labels=card["labels"])
    with pytest.raises(ModelPackageError, match="unknown coding scheme 'ICD10'"):
        load_package(pkg)


def test_sha256_mismatch(pkg: Path) -> None:
    data = bytearray((pkg / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor
    (pkg / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ModelPackageError, match="SHA-256 .* does not match"):
        load_package(pkg)


def test_pickled_file_refused(pkg: Path, model: FusedModel) -> None:
    torch.save(model.trainable_state_dict(), pkg / "weights.pth")
    with pytest.raises(ModelPackageError, match="weights.pth: pickled weight files are refused"):
        load_package(pkg)


def test_unexpected_and_missing_keys(pkg: Path, model: FusedModel) -> None:
    state = model.trainable_state_dict()
    del state["fusion.norm_text.weight"]
    state["surprise.weight"] = torch.zeros(3)
    _rewrite_weights(pkg, state)
    problems = verify_package(pkg)
    assert any("unexpected keys surprise.weight" in p for p in problems)
    assert any("missing keys fusion.norm_text.weight" in p for p in problems)


def test_text_encoder_keys_in_the_file_are_refused(pkg: Path, model: FusedModel) -> None:
    state = model.trainable_state_dict()
    state["text_encoder.pooler.dense.bias"] = torch.zeros(384)
    _rewrite_weights(pkg, state)
    with pytest.raises(ModelPackageError, match="holds text-encoder keys"):
        load_package(pkg)


def test_not_a_directory(tmp_path: Path) -> None:
    assert verify_package(tmp_path / "absent") == [f"{tmp_path / 'absent'} is not a directory"]


def test_save_refuses_a_label_count_that_does_not_fit(model: FusedModel, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match='"labels" must have one entry per model output'):
        save_package(
            tmp_path,
            model,
            name="x",
            version="1",
            description="",
            labels=LABELS[:1],
            windowing=Windowing(),
            text_fields=(),
        )


@pytest.fixture(scope="module")
def predictor(saved: Path) -> Predictor:
    return Predictor(load_package(saved), device="cpu", batch_size=2)


def _image(seed: int, n_frames: int = 1) -> Dataset:
    pixels = np.stack([phantom(seed + i, 96)[0] for i in range(n_frames)])
    ds = phantom_dataset(
        pixels[0],
        study_uid="1.2.3",
        series_uid="1.2.3.1",
        sop_uid=f"1.2.3.1.{seed}",
        reason="cough, rule out nodule",
        age=70,
    )
    if n_frames > 1:
        ds.NumberOfFrames = n_frames
        ds.PixelData = np.round(pixels * 4095).astype(np.uint16).tobytes()
    return ds


def test_predictor_analyses_every_frame_and_keeps_the_order(predictor: Predictor) -> None:
    study = [_image(1), _image(2, n_frames=3), _image(9)]
    result = predictor.predict(study, heatmaps=True)
    assert result.device == "cpu" and result.seconds > 0
    assert [(a.sop_instance_uid, a.frame_number) for a in result.analysed] == [
        ("1.2.3.1.1", None),
        ("1.2.3.1.2", 1),
        ("1.2.3.1.2", 2),
        ("1.2.3.1.2", 3),
        ("1.2.3.1.9", None),
    ]
    assert result.context_fields == ("StudyDescription", "PatientAge")
    assert result.context_text == "Study: XR CHEST PA. Age: 070Y."
    for finding, label in zip(result.findings, LABELS, strict=True):
        probs = result.per_image[label.key]
        assert len(probs) == 5 and finding.probability == max(probs)
        best = result.analysed[probs.index(max(probs))]
        assert finding.image == best
        if finding.present:
            assert finding.heatmap is not None and finding.heatmap.shape == (96, 96)
        else:
            assert finding.heatmap is None


def test_predictor_gives_the_same_answer_in_any_batch_size(
    saved: Path, predictor: Predictor
) -> None:
    study = [_image(3), _image(4), _image(5)]
    one = Predictor(load_package(saved), device="cpu", batch_size=1).predict(study, False)
    two = predictor.predict(study, heatmaps=False)
    for key in one.per_image:
        np.testing.assert_allclose(one.per_image[key], two.per_image[key], atol=1e-5)


def test_predictor_lets_pixel_errors_through(predictor: Predictor) -> None:
    broken = _image(6)
    broken.PixelData = broken.PixelData[:100]
    with pytest.raises(PixelDataError):
        predictor.predict([broken])
    with pytest.raises(ValueError, match="at least one image"):
        predictor.predict([])


def test_predictor_refuses_an_unknown_device(saved: Path) -> None:
    with pytest.raises(ValueError, match='"device"'):
        Predictor(load_package(saved), device="tpu")
