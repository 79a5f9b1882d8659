"""The fused model: shapes, text masking, and heatmap grid alignment."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.heatmap import cell_centre, grad_cam_heatmap, token_map_heatmap, upsample
from inference.model import VISION_STRIDE, FusedModel, ModelConfig, mask_to_tokens
from inference.pixels import to_model_input
from inference.synthetic import phantom

SIZE = 128


@pytest.fixture(scope="module")
def model() -> FusedModel:
    torch.manual_seed(0)
    return FusedModel(ModelConfig(num_labels=2, input_size=SIZE)).eval()


def _disc(shape: tuple[int, int], row: float, col: float, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return (yy - row) ** 2 + (xx - col) ** 2 <= radius**2


def _centroid(heat: np.ndarray) -> tuple[float, float]:
    yy, xx = np.mgrid[0 : heat.shape[0], 0 : heat.shape[1]]
    total = heat.sum()
    return float((yy * heat).sum() / total), float((xx * heat).sum() / total)


def test_forward_shapes(model: FusedModel) -> None:
    hidden, pad = model.encode_text(["Study: XR CHEST PA. Reason: cough.", ""])
    with torch.no_grad():
        out = model(torch.rand(2, 1, SIZE, SIZE), hidden, pad)
    grid = SIZE // VISION_STRIDE
    assert out.logits.shape == (2, 2)
    assert out.token_logits.shape == (2, 2, grid, grid)
    assert out.features.shape == (2, model.config.d_model, grid, grid)
    assert torch.isfinite(out.logits).all()


def test_one_text_is_broadcast_over_a_batch(model: FusedModel) -> None:
    hidden, pad = model.encode_text(["Reason: cough, rule out nodule."])
    images = torch.rand(3, 1, SIZE, SIZE)
    with torch.no_grad():
        batched = model(images, hidden, pad).logits
        single = model(images[1:2], hidden, pad).logits
    torch.testing.assert_close(batched[1:2], single, atol=1e-5, rtol=1e-4)


def test_text_mask_equals_empty_context_and_differs_from_text(model: FusedModel) -> None:
    images = torch.rand(1, 1, SIZE, SIZE)
    text = model.encode_text(["Reason: cough, rule out nodule. Age: 070Y."])
    empty = model.encode_text([""])
    with torch.no_grad():
        with_text = model(images, *text).logits
        masked = model(images, *text, text_mask=torch.tensor([True])).logits
        no_text = model(images, *empty).logits
    torch.testing.assert_close(masked, no_text, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(with_text, masked, atol=1e-4)


def test_text_encoder_is_frozen_and_not_in_the_trainable_state(model: FusedModel) -> None:
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    keys = model.trainable_state_dict()
    assert keys and not any(k.startswith("text_encoder.") for k in keys)
    assert "token_head.weight" in keys


def test_config_rejects_a_size_off_the_grid() -> None:
    with pytest.raises(ValueError, match="input_size"):
        ModelConfig(num_labels=2, input_size=100)
    with pytest.raises(ValueError, match="unknown architecture keys: colour"):
        ModelConfig.from_json({"num_labels": 1, "colour": "red"})


def test_single_cell_upsamples_to_its_centre() -> None:
    grid = torch.zeros(16, 16)
    grid[5, 11] = 1.0
    heat = upsample(grid).numpy()
    assert heat.shape == (16 * VISION_STRIDE, 16 * VISION_STRIDE)
    row, col = _centroid(heat)
    assert row == pytest.approx(cell_centre(5), abs=1e-4)  # 5*8 + 3.5, not 5*8 or 5*8 + 8
    assert col == pytest.approx(cell_centre(11), abs=1e-4)


@pytest.mark.parametrize(("row", "col"), [(100.0, 37.0), (21.0, 118.0), (64.0, 64.0)])
@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_pooled_lesion_upsamples_back_onto_the_lesion(row: float, col: float, mode: str) -> None:
    # Pool a lesion mask onto the token grid as training does, upsample it back: the centroid
    # must return to the lesion. A half-cell offset moves it 4 px, align_corners=True up to 2 px.
    mask = _disc((SIZE, SIZE), row, col, 5)
    tokens = mask_to_tokens(torch.from_numpy(mask.astype(np.float32))[None, None])[0, 0]
    r, c = _centroid(upsample(tokens, mode=mode).numpy())
    assert abs(r - row) < 0.5 and abs(c - col) < 0.5


@pytest.mark.parametrize(("row", "col"), [(100.0, 37.0), (21.0, 118.0), (50.5, 77.3)])
def test_token_heatmap_peaks_on_the_lesion(row: float, col: float) -> None:
    mask = _disc((SIZE, SIZE), row, col, 5)
    tokens = mask_to_tokens(torch.from_numpy(mask.astype(np.float32))[None, None])[0, 0]
    heat = token_map_heatmap(10 * tokens - 5)  # logits that rise with the lesion's share
    assert heat.shape == (SIZE, SIZE) and heat.dtype == np.float32
    assert heat.max() == pytest.approx(1.0) and heat.min() >= 0.0
    peak_row, peak_col = np.unravel_index(np.argmax(heat), heat.shape)
    assert mask[peak_row, peak_col]
    assert abs(peak_row - row) <= 2 and abs(peak_col - col) <= 2


def test_heatmap_maps_back_onto_a_non_square_source() -> None:
    # 400 x 250 source, lesion at (300, 60): letterboxed to 128, pooled to tokens, back again.
    mask = _disc((400, 250), 300, 60, 14)
    model_mask, box = to_model_input(mask.astype(np.float32), SIZE)
    tokens = mask_to_tokens(torch.from_numpy(model_mask)[None, None])[0, 0]
    heat = box.to_source(token_map_heatmap(10 * tokens - 5))
    assert heat.shape == (400, 250)
    assert mask[np.unravel_index(np.argmax(heat), heat.shape)]
    r, c = _centroid(heat * (heat > 0.5))
    assert abs(r - 300) < 4 and abs(c - 60) < 4  # under one source-space token cell (~25 px)


def test_phantoms_are_deterministic_and_masks_sit_on_the_lesion() -> None:
    a, masks = phantom(7, 192, nodule=True, effusion=True)
    b, _ = phantom(7, 192, nodule=True, effusion=True)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32 and 0.0 <= a.min() and a.max() <= 1.0
    nodule = masks["nodule"]
    assert 10 < nodule.sum() < 0.02 * a.size
    ring = _disc(a.shape, *np.argwhere(nodule).mean(axis=0), 20) & ~nodule
    assert a[nodule].mean() > a[ring].mean()  # the blob is brighter than its surroundings
    assert masks["effusion"].any() and not (masks["effusion"] & nodule).all()


def test_grad_cam_is_a_unit_map_at_input_size(model: FusedModel) -> None:
    hidden, pad = model.encode_text(["Reason: cough."])
    heat = grad_cam_heatmap(model, torch.rand(1, 1, SIZE, SIZE), hidden, pad, label_index=1)
    assert heat.shape == (SIZE, SIZE) and heat.dtype == np.float32
    assert 0.0 <= heat.min() and heat.max() <= 1.0
    assert not any(p.grad is not None for p in model.parameters())  # gradients stop at features
