"""Heatmaps for one finding: the class-activation token map (default) or Grad-CAM.

Grid geometry: token cell ``i`` covers input pixels ``[i*s, (i+1)*s)`` and is centred at pixel
``i*s + (s-1)/2`` (s = ``VISION_STRIDE``), the same cells that ``model.mask_to_tokens`` pools the
training masks over. ``upsample`` maps a (g, g) grid to (g*s, g*s) pixels with exactly that
geometry; upsampling with ``align_corners=True`` or to a size that is not g*s would shift the
overlay by up to half a cell (MODEL_NOTES.md, "overlay offset pitfall").

Measured on the demo (held-out phantoms, see ``train.TrainReport``): the token map trained with
the mask loss points inside the nodule far more often than Grad-CAM on the vision features
(strict nodule pointing 0.98 vs 0.14 for the 700-step demo; effusion 1.00 vs 0.92), so
``HeatmapMethod.TOKEN_MAP`` is the default.
Upsampling the token logits bicubically rather than the probabilities bilinearly raised nodule
pointing from 0.77 to 0.85 on the same model: a bilinear map always peaks on a cell centre.

Heatmaps are float32 in [0, 1] at model input size; ``Letterbox.to_source`` maps them to the
source image.
"""

from __future__ import annotations

import enum

import numpy as np
import torch
import torch.nn.functional as F

from inference.model import VISION_STRIDE, FusedModel


class HeatmapMethod(enum.Enum):
    TOKEN_MAP = "token_map"
    GRAD_CAM = "grad_cam"


def cell_centre(index: int, stride: int = VISION_STRIDE) -> float:
    """Pixel coordinate of the centre of token cell ``index`` (0-based, pixel-centre units)."""
    return index * stride + (stride - 1) / 2


def upsample(
    grid: torch.Tensor, stride: int = VISION_STRIDE, mode: str = "bicubic"
) -> torch.Tensor:
    """Upsample (..., g, g) to (..., g*stride, g*stride) with cell centres at ``cell_centre``.

    ``mode`` is "bicubic" or "bilinear" (both with ``align_corners=False`` and an exact scale
    factor, which is what puts cell i's value at pixel i*stride + (stride-1)/2). Bilinear maps
    peak exactly on a cell centre, up to 5.7 px from a lesion between centres; bicubic on the
    token logits lets the neighbours move the peak inside the cell.
    """
    if mode not in ("bicubic", "bilinear"):
        raise ValueError('Argument "mode" must be "bicubic" or "bilinear".')
    lead = grid.shape[:-2]
    x = grid.reshape(-1, 1, *grid.shape[-2:]).float()
    out = F.interpolate(x, scale_factor=stride, mode=mode, align_corners=False)
    return out.reshape(*lead, *out.shape[-2:])


def _normalise(heat: torch.Tensor) -> np.ndarray:
    """Scale to [0, 1] by the maximum (a flat zero map stays zero)."""
    heat = heat.clamp(min=0)
    peak = float(heat.max())
    if peak > 0:
        heat = heat / peak
    return heat.detach().cpu().numpy().astype(np.float32)


def token_map_heatmap(token_logits: torch.Tensor, stride: int = VISION_STRIDE) -> np.ndarray:
    """Heatmap from one finding's token logits (g, g): logits upsampled (bicubic), then the
    sigmoid, scaled so the maximum is 1."""
    return _normalise(torch.sigmoid(upsample(token_logits.float(), stride, "bicubic")))


def grad_cam_heatmap(
    model: FusedModel,
    image: torch.Tensor,
    text_hidden: torch.Tensor,
    text_pad: torch.Tensor,
    label_index: int,
    *,
    text_mask: torch.Tensor | None = None,
) -> np.ndarray:
    """Grad-CAM on the stride-8 vision features for one image (1, 1, S, S) and one finding.

    The backward pass stops at the vision features (the encoder runs without gradients).
    """
    with torch.no_grad():
        feats = model.vision(image)
    feats = feats.detach().float().requires_grad_(True)
    with torch.enable_grad():
        out = model.forward_features(feats, text_hidden.float(), text_pad, text_mask)
        (grad,) = torch.autograd.grad(out.logits[0, label_index], feats)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * feats).sum(dim=1))[0]
    return _normalise(upsample(cam.detach(), mode="bilinear"))


def peak(heatmap: np.ndarray) -> tuple[int, int]:
    """(row, col) of the heatmap maximum."""
    r, c = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return int(r), int(c)


def points_inside(heatmap: np.ndarray, mask: np.ndarray, dilate: int = 0) -> bool:
    """Pointing game: does the heatmap maximum fall inside ``mask`` (dilated by ``dilate`` px)?"""
    r, c = peak(heatmap)
    if dilate <= 0:
        return bool(mask[r, c])
    r0, c0 = max(0, r - dilate), max(0, c - dilate)
    return bool(mask[r0 : r + dilate + 1, c0 : c + dilate + 1].any())
