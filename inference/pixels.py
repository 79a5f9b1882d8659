"""Pixel pipeline: decode a DICOM image and turn it into grey model input in [0, 1].

The steps follow the grayscale pipeline of PS3.4 N.2.1: stored values -> Modality LUT (rescale
slope/intercept or a LUT, PS3.3 C.11.1) -> VOI LUT or window (PS3.3 C.11.2) -> MONOCHROME1
inversion. Colour images (RGB, YBR_*, PALETTE COLOR) become RGB and then luminance. Decoding is
pydicom's (``pydicom.pixels``, with pylibjpeg/openjpeg for the compressed transfer syntaxes); the
size guard runs before anything is decoded. Multi-frame images are decoded frame by frame, and
enhanced (functional-group) images use each frame's rescale and window (PS3.3 C.7.6.16.2).
"""

from __future__ import annotations

import logging
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    apply_windowing,
    convert_color_space,
    get_decoder,
)
from pydicom.pixels.utils import as_pixel_options

from inference.errors import ImageTooLargeError, PixelDataError

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 1 << 30
"""Default pixel-size guard: 1 GiB of decoded pixel data."""

PERCENTILES = (0.5, 99.5)
"""Low/high percentiles of the modality output used as the window when there is none."""

LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])
"""ITU-R BT.601 luma weights (the same as PIL's RGB -> "L" conversion)."""

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_MODALITY_KEYWORDS = ("RescaleSlope", "RescaleIntercept", "RescaleType")
_VOI_KEYWORDS = ("WindowCenter", "WindowWidth", "VOILUTFunction")
_TOP_LEVEL_KEYWORDS = ("PhotometricInterpretation", "ModalityLUTSequence", "VOILUTSequence")
# Functional-group macros that carry per-frame values (PS3.3 C.7.6.16.2.9 and .10).
_GROUP_MACROS = (
    ("PixelValueTransformationSequence", _MODALITY_KEYWORDS),
    ("FrameVOILUTSequence", _VOI_KEYWORDS),
)
# What pydicom's LUT functions raise on malformed LUT attributes.
_LUT_ERRORS = (ValueError, TypeError, KeyError, AttributeError, IndexError, NotImplementedError,
               struct.error)  # LUT Data shorter than its descriptor says
_VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")
_YBR_TO_RGB = ("YBR_FULL", "YBR_FULL_422")  # left as YBR only if a decoder plugin did not convert


@dataclass(frozen=True)
class Windowing:
    """How to choose the VOI window for grey images.

    ``center``/``width`` (both or neither) override the header with a LINEAR window (PS3.3
    C.11.2.1.2.1) in modality-LUT output units, e.g. Hounsfield units for CT. Without an
    override the header's VOI LUT or first window is used when ``use_header`` is true;
    otherwise, or when the header has none, the 0.5/99.5 percentiles of each frame are the
    window. Colour images are not windowed (PS3.4 N.2: the VOI LUT applies to grey only).
    """

    center: float | None = None
    width: float | None = None
    use_header: bool = True

    def __post_init__(self) -> None:
        if (self.center is None) != (self.width is None):
            raise ValueError('Arguments "center" and "width" must be given together or not at all.')
        if self.center is not None and not math.isfinite(self.center):
            raise ValueError('Argument "center" must be a finite number.')
        if self.width is not None and not (math.isfinite(self.width) and self.width >= 1):
            raise ValueError('Argument "width" must be a finite number >= 1 (LINEAR window).')


@dataclass(frozen=True)
class Letterbox:
    """Geometry of :func:`to_model_input`: the source scaled by ``scale`` then padded.

    In continuous coordinates (pixel edges at integers) a source point ``(y, x)`` lies at
    ``(y * scale + pad_top, x * scale + pad_left)`` in the model image; for pixel centres use
    :meth:`to_model_point` and :meth:`to_source_point`.
    """

    scale: float
    pad_top: int
    pad_left: int
    src_rows: int
    src_cols: int

    @property
    def rows(self) -> int:
        """Rows the source occupies in the model image (without padding)."""
        return _scaled_extent(self.src_rows, self.scale)

    @property
    def cols(self) -> int:
        """Columns the source occupies in the model image (without padding)."""
        return _scaled_extent(self.src_cols, self.scale)

    def to_model_point(self, row: float, col: float) -> tuple[float, float]:
        """Map the centre of source pixel ``(row, col)`` to model pixel coordinates."""
        return (
            (row + 0.5) * self.scale - 0.5 + self.pad_top,
            (col + 0.5) * self.scale - 0.5 + self.pad_left,
        )

    def to_source_point(self, row: float, col: float) -> tuple[float, float]:
        """Map model pixel ``(row, col)`` to source pixel coordinates (inverse of the above)."""
        return (
            (row - self.pad_top + 0.5) / self.scale - 0.5,
            (col - self.pad_left + 0.5) / self.scale - 0.5,
        )

    def to_source(self, heat: np.ndarray) -> np.ndarray:
        """Map a model-sized map (e.g. a heatmap) back onto the source grid.

        Crops the padding and resizes bilinearly with the exact inverse geometry. Returns
        float32 (src_rows, src_cols). Raises ValueError when ``heat`` is not 2-D or is smaller
        than the letterboxed image.
        """
        heat = np.asarray(heat)
        if heat.ndim != 2:
            raise ValueError(f'Argument "heat" must be 2-D, got shape {heat.shape}.')
        rows, cols = self.rows, self.cols
        if heat.shape[0] < self.pad_top + rows or heat.shape[1] < self.pad_left + cols:
            raise ValueError(
                f'Argument "heat" of shape {heat.shape} does not hold the letterboxed image '
                f"({rows}x{cols} at offset {self.pad_top},{self.pad_left})."
            )
        crop = heat[self.pad_top : self.pad_top + rows, self.pad_left : self.pad_left + cols]
        # One replicated row/column so the box (src * scale, just above rows/cols) fits.
        crop = np.pad(crop.astype(np.float32), ((0, 1), (0, 1)), mode="edge")
        box = (
            0.0,
            0.0,
            min(self.src_cols * self.scale, cols + 1.0),
            min(self.src_rows * self.scale, rows + 1.0),
        )
        out = Image.fromarray(crop).resize(
            (self.src_cols, self.src_rows), Image.Resampling.BILINEAR, box=box
        )
        return np.asarray(out, dtype=np.float32).copy()


def check_size(ds: Dataset, max_bytes: int) -> None:
    """Refuse an image whose decoded size is above ``max_bytes``, before any decode.

    The size is Rows x Columns x NumberOfFrames x SamplesPerPixel x ceil(BitsAllocated / 8).
    Raises ImageTooLargeError above the limit and PixelDataError when Rows, Columns or
    BitsAllocated are missing or not positive (or NumberOfFrames/SamplesPerPixel invalid).
    """
    rows = _positive_int(ds, "Rows")
    cols = _positive_int(ds, "Columns")
    bits = _positive_int(ds, "BitsAllocated")
    n_frames = _positive_int(ds, "NumberOfFrames", default=1)
    samples = _positive_int(ds, "SamplesPerPixel", default=1)
    size = rows * cols * n_frames * samples * math.ceil(bits / 8)
    if size > max_bytes:
        raise ImageTooLargeError(
            f"image of {rows} rows x {cols} columns x {n_frames} frames x {samples} samples at "
            f"{bits} bits allocated is {size} bytes, above the limit of {max_bytes} bytes"
        )


def frames(
    ds: Dataset, windowing: Windowing = Windowing(), max_bytes: int = DEFAULT_MAX_BYTES
) -> np.ndarray:
    """Decode every frame to grey float32 (n_frames, rows, cols) in [0, 1].

    Applies the size guard, the Modality LUT, the VOI LUT/window chosen by ``windowing``,
    MONOCHROME1 inversion, and colour -> luminance. Raises ImageTooLargeError or
    PixelDataError (which names the transfer syntax when decoding fails).
    """
    check_size(ds, max_bytes)
    n_frames = _positive_int(ds, "NumberOfFrames", default=1)
    out = np.empty((n_frames, int(ds.Rows), int(ds.Columns)), dtype=np.float32)
    for index in range(n_frames):
        out[index] = _unit_frame(ds, index, windowing)
    return out


def to_model_input(img: np.ndarray, size: int) -> tuple[np.ndarray, Letterbox]:
    """Resize a 2-D image keeping its aspect ratio and pad it to ``size`` x ``size`` with 0.

    Downscaling is antialiased (PIL's bilinear filter widens with the scale). Returns float32
    (size, size) and the :class:`Letterbox` that maps points and maps back to the source.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f'Argument "size" must be a positive integer, got {size!r}.')
    img = np.asarray(img)
    if img.ndim != 2 or img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f'Argument "img" must be a non-empty 2-D array, got shape {img.shape}.')
    src_rows, src_cols = img.shape
    scale = min(size / src_rows, size / src_cols)
    rows, cols = _scaled_extent(src_rows, scale), _scaled_extent(src_cols, scale)
    pad_top, pad_left = (size - rows) // 2, (size - cols) // 2
    # The box makes both axes use exactly ``scale`` (it can only be a fraction of a pixel short).
    box = (0.0, 0.0, min(cols / scale, src_cols), min(rows / scale, src_rows))
    source = Image.fromarray(np.nan_to_num(img.astype(np.float32)))
    resized = source.resize((cols, rows), Image.Resampling.BILINEAR, box=box)
    out = np.zeros((size, size), dtype=np.float32)
    out[pad_top : pad_top + rows, pad_left : pad_left + cols] = np.asarray(resized)
    return out, Letterbox(scale, pad_top, pad_left, src_rows, src_cols)


def display_uint8(ds: Dataset, frame: int = 0, windowing: Windowing = Windowing()) -> np.ndarray:
    """Return one frame windowed as for the model, as uint8 (rows, cols), for overlays.

    ``frame`` is 0-based. Raises ValueError for a frame out of range, and the errors of
    :func:`frames` otherwise.
    """
    check_size(ds, DEFAULT_MAX_BYTES)
    n_frames = _positive_int(ds, "NumberOfFrames", default=1)
    if isinstance(frame, bool) or not isinstance(frame, int) or not 0 <= frame < n_frames:
        raise ValueError(f'Argument "frame" must be an integer in [0, {n_frames}), got {frame!r}.')
    unit = _unit_frame(ds, frame, windowing)
    return np.rint(unit * 255.0).astype(np.uint8)


def _scaled_extent(length: int, scale: float) -> int:
    """Pixels a source extent occupies once scaled: floor, at least 1 (never past the box)."""
    return max(1, math.floor(length * scale + 1e-6))


def _positive_int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    """Read an integer attribute that must be positive; PixelDataError otherwise."""
    try:
        value = ds.get(keyword)
    except Exception as exc:  # pydicom converts on first access: e.g. IS "inf" overflows
        raise PixelDataError(f"image attribute {keyword} cannot be read: {exc}") from exc
    if value is None or value == "":
        if default is None:
            raise PixelDataError(f"image attribute {keyword} is missing")
        return default
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise PixelDataError(f"image attribute {keyword} is not an integer: {value!r}") from exc
    if number <= 0:
        raise PixelDataError(f"image attribute {keyword} must be positive, got {number}")
    return number


def _unit_frame(ds: Dataset, index: int, windowing: Windowing) -> np.ndarray:
    """Decode frame ``index`` and take it through the LUTs to float32 (rows, cols) in [0, 1]."""
    raw, photometric = _decode_frame(ds, index)
    try:
        if raw.ndim == 3 or photometric == "PALETTE COLOR":
            unit = _colour_to_unit(raw, ds, photometric)
        else:
            unit = _grey_to_unit(raw, _frame_attributes(ds, index), windowing)
    except _LUT_ERRORS as exc:
        raise PixelDataError(f"cannot apply the LUTs of frame {index + 1}: {exc}") from exc
    if unit.shape != raw.shape[:2]:  # e.g. a multi-valued Rescale Slope broadcast the frame
        raise PixelDataError(f"the LUTs of frame {index + 1} turned {raw.shape[:2]} pixels "
                             f"into {unit.shape}: a multi-valued rescale or window?")
    return np.clip(np.nan_to_num(unit, nan=0.0), 0.0, 1.0).astype(np.float32)


def _decode_frame(ds: Dataset, index: int) -> tuple[np.ndarray, str]:
    """Decode one frame with pydicom; return it and the photometric interpretation it is in."""
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        raise PixelDataError("the dataset has no pixel data")
    tsyntax = getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID")
    if not tsyntax:
        raise PixelDataError("the dataset has no (0002,0010) Transfer Syntax UID to decode with")
    try:
        decoder = get_decoder(tsyntax)
        arr, meta = decoder.as_array(ds, index=index, **as_pixel_options(ds))
    except Exception as exc:  # any failure of the decoder or its plugins
        raise PixelDataError(
            f"cannot decode frame {index + 1} with transfer syntax {tsyntax.name} ({tsyntax}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    photometric = str(meta.get("photometric_interpretation", ds.get("PhotometricInterpretation")))
    return arr, photometric


def _frame_attributes(ds: Dataset, index: int) -> Dataset:
    """The Modality LUT and VOI attributes that apply to frame ``index``.

    Top-level values, overridden by the shared and then the per-frame functional groups.
    """
    attrs = Dataset()
    if hasattr(ds, "file_meta"):
        attrs.file_meta = ds.file_meta  # LUT Data in OW needs the endianness
    for keyword in (*_TOP_LEVEL_KEYWORDS, *_MODALITY_KEYWORDS, *_VOI_KEYWORDS):
        if keyword in ds:
            attrs[keyword] = ds[keyword]
    shared = ds.get("SharedFunctionalGroupsSequence") or []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    items = [shared[0] if shared else None, per_frame[index] if index < len(per_frame) else None]
    for item in items:
        if item is None:
            continue
        for macro, keywords in _GROUP_MACROS:
            if not item.get(macro):
                continue
            for keyword in keywords:
                if keyword in item[macro][0]:
                    attrs[keyword] = item[macro][0][keyword]
    return attrs


def _grey_to_unit(raw: np.ndarray, attrs: Dataset, windowing: Windowing) -> np.ndarray:
    """Modality LUT, then VOI LUT / window / percentile stretch, then MONOCHROME1 inversion."""
    values = apply_modality_lut(raw, attrs)
    if windowing.center is not None and windowing.width is not None:
        unit = _window(values, windowing.center, windowing.width, "LINEAR")
    elif windowing.use_header and attrs.get("VOILUTSequence"):
        unit = _voi_lut(values, attrs)
    elif windowing.use_header and (header := _header_window(attrs)) is not None:
        unit = _window(values, *header)
    else:
        unit = _percentile_stretch(values)
    if attrs.get("PhotometricInterpretation") == "MONOCHROME1":
        unit = 1.0 - unit
    return unit


def _header_window(attrs: Dataset) -> tuple[float, float, str] | None:
    """The first header window (center, width, function), or None when absent or unusable."""
    if "WindowCenter" not in attrs or "WindowWidth" not in attrs:
        return None
    try:
        center = float(_first(attrs.WindowCenter))
        width = float(_first(attrs.WindowWidth))
    except (TypeError, ValueError, IndexError):
        logger.warning("unreadable header window; using the percentile window instead")
        return None
    function = str(attrs.get("VOILUTFunction") or "LINEAR").upper()
    # PS3.3 C.11.2.1.2: width >= 1 for LINEAR, > 0 for LINEAR_EXACT and SIGMOID.
    valid_width = width >= 1 if function == "LINEAR" else width > 0
    if function not in _VOI_FUNCTIONS or not (math.isfinite(center) and valid_width):
        logger.warning("bad header window %s/%s %s: using percentiles", center, width, function)
        return None
    return center, width, function


def _first(value: Any) -> Any:
    """The first value of a multi-valued element (VM > 1), or the value itself."""
    if isinstance(value, (list, tuple, MultiValue)):
        return value[0]
    return value


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """Apply a window (PS3.3 C.11.2.1.2) with pydicom, mapped onto [0, 1]."""
    window = Dataset()
    window.PhotometricInterpretation = "MONOCHROME2"
    window.PixelRepresentation = 0
    window.BitsStored = 1  # output range [0, 2**1 - 1] = [0, 1]
    window.WindowCenter = center
    window.WindowWidth = width
    window.VOILUTFunction = function
    return apply_windowing(values, window)


def _voi_lut(values: np.ndarray, attrs: Dataset) -> np.ndarray:
    """Apply the first VOI LUT (PS3.3 C.11.2.1.1) with pydicom, mapped onto [0, 1]."""
    descriptor = attrs.VOILUTSequence[0].LUTDescriptor
    entries, first_mapped, depth = int(descriptor[0]) or 1 << 16, *map(int, descriptor[1:3])
    # The LUT indexes integers; clip first so no input wraps around in a narrow index type.
    indices = np.clip(np.rint(values), first_mapped, first_mapped + entries - 1).astype(np.int64)
    return apply_voi(indices, attrs).astype(np.float64) / float((1 << depth) - 1)


def _percentile_stretch(values: np.ndarray) -> np.ndarray:
    """Map the robust range (PERCENTILES) of a frame onto [0, 1]; a flat frame gives 0."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(values.shape)
    low, high = np.percentile(finite, PERCENTILES)
    if high <= low:
        low, high = float(finite.min()), float(finite.max())
    if high <= low:
        return np.zeros(values.shape)
    return (values.astype(np.float64) - low) / (high - low)


def _colour_to_unit(raw: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    """RGB (YBR already converted by the decoder) or palette -> BT.601 luminance in [0, 1]."""
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(raw, ds)
        full_scale = float(np.iinfo(rgb.dtype).max)
    elif raw.ndim == 3 and raw.shape[-1] == 3 and photometric in ("RGB", *_YBR_TO_RGB):
        rgb = convert_color_space(raw, photometric, "RGB") if photometric != "RGB" else raw
        full_scale = float((1 << _positive_int(ds, "BitsStored")) - 1)
    else:
        raise ValueError(f"photometric interpretation {photometric} is not supported")
    return (rgb.astype(np.float64) @ LUMA_WEIGHTS) / full_scale
