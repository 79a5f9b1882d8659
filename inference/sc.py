"""Build the heatmap Secondary Capture image for one finding, and the same rendering as PNG.

The rendering keeps the source image at its own pixel grid in the top ``rows x columns`` of the
output, so a heatmap pixel lands on the image pixel it was computed for; below it a band holds
the colour bar and the burned-in text (finding, probability, "NOT FOR DIAGNOSTIC USE"), so no
annotation covers the anatomy. The SC object follows DESIGN.md §8 (PS3.3 A.8.1).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from inference.errors import ResultBuildError
from inference.prediction import Finding
from inference.uids import is_valid_uid

NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"
SYNTHETIC_DEMO_MODEL = "SYNTHETIC DEMO MODEL"
HEAT_FLOOR = 0.2  # heat below this is not drawn: it would only tint the whole image
MAX_ALPHA = 0.6  # opacity of the colour map where the heat is 1
_RAMP = 0.3  # heat range over which opacity rises from 0 to MAX_ALPHA
_TEXT_COLOUR = (255, 255, 255)
_WARN_COLOUR = (255, 215, 0)

# Polynomial fit of Google's Turbo colour map (Mikhailov 2019, Apache-2.0), per channel:
# coefficients of 1, x, x^2, x^3, x^4, x^5.
_TURBO = np.array(
    [
        [0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943],
        [0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604],
        [0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973],
    ]
)


def colour_lut() -> np.ndarray:
    """Return the 256 x 3 uint8 Turbo-like colour map (0 = dark blue, 255 = dark red)."""
    x = np.linspace(0.0, 1.0, 256)
    powers = np.stack([x**k for k in range(6)])
    rgb = np.clip(_TURBO @ powers, 0.0, 1.0).T
    return np.round(rgb * 255.0).astype(np.uint8)


def render_overlay(
    finding: Finding, display: np.ndarray, *, synthetic_demo: bool = False
) -> np.ndarray:
    """Return the RGB rendering (uint8, rows + band, columns, 3) of ``finding`` on ``display``.

    ``display`` is the windowed source image, uint8 (rows, columns). ``finding.heatmap``, when
    not None, is float in [0, 1] of the same shape and is blended where it is at least
    HEAT_FLOOR; pixel (r, c) of the image part is pixel (r, c) of the source.
    """
    _check_display(finding, display)
    grey = np.repeat(display[:, :, np.newaxis], 3, axis=2).astype(np.float64)
    heat = finding.heatmap
    if heat is not None:
        heat = np.clip(np.nan_to_num(np.asarray(heat, dtype=np.float32)), 0.0, 1.0)
        colours = colour_lut()[np.round(heat * 255.0).astype(np.intp)].astype(np.float64)
        alpha = MAX_ALPHA * np.clip((heat - HEAT_FLOOR) / _RAMP, 0.0, 1.0)[:, :, np.newaxis]
        grey = grey * (1.0 - alpha) + colours * alpha
    picture = np.clip(np.round(grey), 0, 255).astype(np.uint8)
    band = _legend_band(finding, display.shape[1], synthetic_demo, heat is not None)
    return np.concatenate([picture, band], axis=0)


def overlay_png(finding: Finding, display: np.ndarray, *, synthetic_demo: bool = False) -> bytes:
    """Return the rendering of :func:`render_overlay` as PNG bytes (for the CLI demo)."""
    buffer = io.BytesIO()
    Image.fromarray(render_overlay(finding, display, synthetic_demo=synthetic_demo)).save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


def build_heatmap_sc(
    finding: Finding,
    source: Dataset,
    display: np.ndarray,
    *,
    series_uid: str,
    instance_uid: str,
    series_number: int,
    instance_number: int,
    series_description: str,
    synthetic_demo: bool,
    manufacturer: str = "aidnode",
) -> Dataset:
    """Return an RGB Secondary Capture of ``finding``'s heatmap over ``source``.

    ``source`` is the image ``finding.image`` names (headers suffice); ``display`` is its
    windowed pixel data as uint8 (rows, columns) (the analysed frame for multi-frame images).
    The SC joins the source's study in series ``series_uid``; ImageType is DERIVED\\SECONDARY,
    BurnedInAnnotation is the source's (default "NO": the overlay adds no identifying text) and
    SourceImageSequence references the source image and frame.

    Raises TypeError or ValueError naming the argument for bad input, and ResultBuildError when
    highdicom refuses to build the image.
    """
    if not isinstance(source, Dataset):
        raise TypeError('Argument "source" must be a pydicom Dataset.')
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"):
        if not source.get(keyword):
            raise ValueError(f'Argument "source" lacks {keyword}.')
    if not isinstance(finding, Finding):
        raise TypeError('Argument "finding" must have type Finding.')
    if finding.image.sop_instance_uid != source.SOPInstanceUID:
        raise ValueError(
            'Argument "source" must be the image of the finding '
            f'("{finding.image.sop_instance_uid}"), not "{source.SOPInstanceUID}".'
        )
    _check_uids_and_numbers(series_uid, instance_uid, series_number, instance_number)
    if not isinstance(series_description, str) or not 0 < len(series_description) <= 64:
        raise ValueError('Argument "series_description" must be a str of 1 to 64 characters.')
    rows, columns = int(source.get("Rows", 0)), int(source.get("Columns", 0))
    if isinstance(display, np.ndarray) and display.shape[:2] != (rows, columns):
        raise ValueError(
            f'Argument "display" has shape {display.shape}; the source is {rows} x {columns}.'
        )
    pixels = render_overlay(finding, display, synthetic_demo=synthetic_demo)
    try:
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=instance_uid,
            instance_number=instance_number,
            manufacturer=manufacturer,
            patient_orientation=_patient_orientation(source) or ("L", "F"),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=series_description,
            contributing_equipment=[
                hd.ContributingEquipment(
                    manufacturer=manufacturer,
                    purpose_of_reference=codes.DCM.ProcessingEquipment,
                    contribution_description="AI heatmap overlay",
                )
            ],
        )
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        raise ResultBuildError(f"highdicom could not build the SC image: {exc}") from exc
    if _patient_orientation(source) is None:
        # Type 2 (PS3.3 C.7.6.1): unknown orientation is sent empty, never guessed; the
        # placeholder above only satisfies highdicom's constructor.
        del sc.PatientOrientation
        sc.add_new("PatientOrientation", "CS", None)
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = source.get("BurnedInAnnotation") or "NO"
    sc.DerivationDescription = (
        f"AI heatmap of {finding.label.code_meaning} over the windowed source image"
    )[:1024]
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if finding.image.frame_number is not None:
        reference.ReferencedFrameNumber = finding.image.frame_number
    sc.SourceImageSequence = [reference]
    for keyword in ("Laterality", "BodyPartExamined"):
        if source.get(keyword):
            setattr(sc, keyword, source.get(keyword))
    return sc


def _check_display(finding: Finding, display: np.ndarray) -> None:
    """Raise TypeError/ValueError when ``display`` or the heatmap cannot be rendered."""
    if not isinstance(display, np.ndarray):
        raise TypeError('Argument "display" must be a numpy array.')
    if display.dtype != np.uint8 or display.ndim != 2:
        raise ValueError('Argument "display" must be a 2-D uint8 array (rows, columns).')
    if min(display.shape) < 1:
        raise ValueError('Argument "display" must not be empty.')
    heat = finding.heatmap
    if heat is not None and (not isinstance(heat, np.ndarray) or heat.shape != display.shape):
        raise ValueError(
            f'Argument "finding" has a heatmap whose shape differs from "display" {display.shape}.'
        )


def _check_uids_and_numbers(
    series_uid: str, instance_uid: str, series_number: int, instance_number: int
) -> None:
    """Raise TypeError/ValueError, naming the argument, for bad UIDs or numbers."""
    for name, uid in (("series_uid", series_uid), ("instance_uid", instance_uid)):
        if not isinstance(uid, str):
            raise TypeError(f'Argument "{name}" must have type str.')
        if not is_valid_uid(uid):
            raise ValueError(f'Argument "{name}" is not a valid UID: "{uid}".')
    for name, number in (("series_number", series_number), ("instance_number", instance_number)):
        if isinstance(number, bool) or not isinstance(number, int):
            raise TypeError(f'Argument "{name}" must have type int.')
        if number < 1:
            raise ValueError(f'Argument "{name}" must be a positive integer.')


def _patient_orientation(source: Dataset) -> tuple[str, str] | None:
    """Return the source's row/column orientation as single letters, or None if unknown.

    Taken from PatientOrientation when present, otherwise from the dominant axes of
    ImageOrientationPatient (PS3.3 C.7.6.1.1.1 and C.7.6.2.1.1).
    """
    letters = ("L", "R"), ("P", "A"), ("H", "F")  # +x, -x; +y, -y; +z, -z
    given = source.get("PatientOrientation")
    if given and len(given) == 2 and all(str(v)[:1] in "LRAPHF" and str(v) for v in given):
        return str(given[0])[0], str(given[1])[0]
    cosines = source.get("ImageOrientationPatient")
    if cosines and len(cosines) == 6:
        result = []
        for vector in (cosines[:3], cosines[3:]):
            axis = int(np.argmax(np.abs(np.asarray(vector, dtype=float))))
            result.append(letters[axis][0] if float(vector[axis]) > 0 else letters[axis][1])
        return result[0], result[1]
    return None


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Return Pillow's default font at ``size`` pixels (its bitmap font without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):
        return ImageFont.load_default()


def _legend_lines(finding: Finding, synthetic_demo: bool, has_heat: bool) -> list[str]:
    """Return the burned-in text lines: finding, probability, warnings."""
    verdict = "present" if finding.present else "absent"
    lines = [
        finding.label.code_meaning,
        f"p = {finding.probability:.2f} ({verdict}, threshold {finding.label.threshold:.2f})",
    ]
    if not has_heat:
        lines.append("no heatmap")
    lines.append(NOT_FOR_DIAGNOSTIC_USE)
    if synthetic_demo:
        lines.append(SYNTHETIC_DEMO_MODEL)
    return lines


_Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


def _fit(draw: ImageDraw.ImageDraw, lines: Sequence[str], width: int) -> tuple[_Font, int]:
    """Return the largest font (about 1/40 of the width, at least 10 px) that fits ``lines``."""
    size = max(10, width // 40)
    while True:
        font = _font(size)
        widest = max(draw.textlength(line, font=font) for line in lines)
        if widest <= width - 2 * max(2, size // 3) or size <= 6:
            return font, size
        size -= 1


def _legend_band(finding: Finding, width: int, synthetic_demo: bool, has_heat: bool) -> np.ndarray:
    """Return the RGB band drawn under the image: colour bar and text."""
    lines = _legend_lines(finding, synthetic_demo, has_heat)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font, size = _fit(probe, lines, width)
    margin = max(2, size // 3)
    line_height = size + margin
    bar_height = max(4, size // 2) if has_heat else 0
    bar_block = bar_height + line_height + margin if has_heat else 0
    height = margin + bar_block + line_height * len(lines) + margin
    band = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(band)
    y = margin
    if has_heat:
        bar_width = max(1, width - 2 * margin)
        ramp = colour_lut()[np.linspace(0, 255, bar_width).round().astype(np.intp)]
        bar = np.repeat(ramp[np.newaxis, :, :], bar_height, axis=0)
        band.paste(Image.fromarray(bar), (margin, y))
        y += bar_height
        draw.text((margin, y), "0", fill=_TEXT_COLOUR, font=font)
        right = width - margin - draw.textlength("1", font=font)
        draw.text((right, y), "1", fill=_TEXT_COLOUR, font=font)
        y += line_height
    for line in lines:
        colour = _TEXT_COLOUR if line == lines[0] or line.startswith("p =") else _WARN_COLOUR
        draw.text((margin, y), line, fill=colour, font=font)
        y += line_height
    return np.asarray(band, dtype=np.uint8)
