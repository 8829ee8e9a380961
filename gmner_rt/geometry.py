"""Image geometry: Qwen's ``smart_resize``, box mapping between spaces, IoU.

Two coordinate spaces exist. *Original* space is the pixels of the image file. *Model* space is
the pixels of the image after ``smart_resize`` (both sides multiples of ``factor``, area within
``[min_pixels, max_pixels]``); models read and write boxes there. Boxes are ``(x1, y1, x2, y2)``
with ``x1 <= x2`` and ``y1 <= y2`` after mapping, clipped to the target image.

This module knows nothing about the record format or about image pixels themselves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "FACTOR",
    "DEFAULT_MIN_PIXELS",
    "DEFAULT_MAX_PIXELS",
    "Box",
    "ImageGeometry",
    "clip_box",
    "iou",
    "map_box",
    "smart_resize",
]

Box = tuple[int, int, int, int]

#: patch size 14 x spatial merge 2: model-space sides are multiples of this.
FACTOR = 28
#: Qwen2-VL / Qwen2.5-VL image processor defaults.
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
#: Largest side ratio the reference processor accepts.
MAX_ASPECT_RATIO = 200


def smart_resize(
    height: int,
    width: int,
    factor: int = FACTOR,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """``(height, width)`` after resizing, identical to transformers' Qwen2-VL processor.

    Raises ``ValueError`` for non-positive sizes or an aspect ratio over 200 (as the reference
    does); Python's ``round`` (half to even) is used on purpose, as there.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height} width={width}")
    if min_pixels <= 0 or max_pixels < min_pixels:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, "
            f"got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


#: Coordinates beyond this are clamped before any arithmetic (a model may write a number of
#: hundreds of digits; no image is a billion pixels wide).
_COORDINATE_LIMIT = 1e9


def _coordinate(value: float) -> float:
    """``value`` as a finite float within +-:data:`_COORDINATE_LIMIT` (NaN becomes 0)."""
    if isinstance(value, int):  # may be too large for a float
        return float(max(-_COORDINATE_LIMIT, min(_COORDINATE_LIMIT, value)))
    number = float(value)
    if math.isnan(number):
        return 0.0
    return max(-_COORDINATE_LIMIT, min(_COORDINATE_LIMIT, number))


def _span(a: int, b: int, size: int) -> tuple[int, int]:
    """Ordered, clipped to ``[0, size]``, and at least one pixel wide (``size >= 1``)."""
    a, b = sorted((min(max(a, 0), size), min(max(b, 0), size)))
    if a == b:
        a, b = (a, a + 1) if a < size else (a - 1, a)
    return a, b


def clip_box(box: Sequence[float], width: int, height: int) -> Box:
    """Round, order and clip a box to ``[0, width] x [0, height]``; a box that rounds to no
    width or height keeps one pixel of it, so every box has an area."""
    x1, y1, x2, y2 = (int(round(_coordinate(v))) for v in box)
    x1, x2 = _span(x1, x2, width)
    y1, y2 = _span(y1, y2, height)
    return x1, y1, x2, y2


def map_box(box: Sequence[float], src: tuple[int, int], dst: tuple[int, int]) -> Box:
    """Map a box from an image of size ``src = (w, h)`` to one of size ``dst = (w, h)``."""
    sx = dst[0] / src[0]
    sy = dst[1] / src[1]
    x1, y1, x2, y2 = (_coordinate(v) for v in box)
    return clip_box((x1 * sx, y1 * sy, x2 * sx, y2 * sy), dst[0], dst[1])


@dataclass(frozen=True, slots=True)
class ImageGeometry:
    """An image's original size and the size the model sees it at.

    Attributes:
        width, height: original image size in pixels.
        model_width, model_height: size after ``smart_resize``.
    """

    width: int
    height: int
    model_width: int
    model_height: int

    @classmethod
    def for_image(
        cls,
        width: int,
        height: int,
        *,
        min_pixels: int = DEFAULT_MIN_PIXELS,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        factor: int = FACTOR,
    ) -> ImageGeometry:
        model_h, model_w = smart_resize(height, width, factor, min_pixels, max_pixels)
        return cls(width, height, model_w, model_h)

    @property
    def original_size(self) -> tuple[int, int]:
        return self.width, self.height

    @property
    def model_size(self) -> tuple[int, int]:
        return self.model_width, self.model_height

    def to_model(self, box: Sequence[float]) -> Box:
        """Original-pixel box -> model-space box (rounded, ordered, clipped)."""
        return map_box(box, self.original_size, self.model_size)

    def to_original(self, box: Sequence[float]) -> Box:
        """Model-space box -> original-pixel box (rounded, ordered, clipped)."""
        return map_box(box, self.model_size, self.original_size)


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes; 0.0 for empty boxes."""
    ix = min(a[2], b[2]) - max(a[0], b[0])
    iy = min(a[3], b[3]) - max(a[1], b[1])
    if ix <= 0 or iy <= 0:
        return 0.0
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
