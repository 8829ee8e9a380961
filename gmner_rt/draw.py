"""Entities drawn on their image: one coloured box per region, labelled ``mention (TYPE)``.

This module only paints: it takes an RGB PIL image and entities whose boxes are already in
that image's pixels (``Extraction.records`` are, for the EXIF-oriented image that
:func:`gmner_rt.vision.to_rgb` returns). It knows nothing about models, bundles, records'
text format or how the image was opened. Pure PIL.
"""

from __future__ import annotations

import colorsys
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

from PIL import Image, ImageDraw, ImageFont

from .errors import InputError

__all__ = ["TYPE_COLOURS", "DrawableEntity", "draw_entities", "type_colour"]

RGB = tuple[int, int, int]

#: Fixed colours of the Twitter-GMNER types; other types get a hashed colour.
TYPE_COLOURS: dict[str, RGB] = {
    "PER": (230, 25, 75),
    "LOC": (60, 180, 75),
    "ORG": (0, 130, 200),
    "OTHER": (245, 130, 48),
}


class DrawableEntity(Protocol):
    """What :func:`draw_entities` reads from an entity (``Entity`` and ``EntityRecord`` fit)."""

    @property
    def mention(self) -> str: ...

    @property
    def type(self) -> str: ...

    @property
    def boxes(self) -> Sequence[Sequence[float]] | None: ...


def type_colour(etype: str) -> RGB:
    """The colour of a type: fixed for PER, LOC, ORG and OTHER, else a stable hashed hue
    (crc32, the same in every process, unlike ``hash``)."""
    if etype in TYPE_COLOURS:
        return TYPE_COLOURS[etype]
    hue = zlib.crc32(etype.encode("utf-8")) % 360 / 360
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.9)
    return round(255 * r), round(255 * g), round(255 * b)


def _text_colour(background: RGB) -> RGB:
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def _clip(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int] | None:
    x1, y1, x2, y2 = (round(v) for v in box)
    x1, x2 = sorted((min(max(x1, 0), width - 1), min(max(x2, 0), width - 1)))
    y1, y2 = sorted((min(max(y1, 0), height - 1), min(max(y2, 0), height - 1)))
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


def _draw_label(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    label: str,
    colour: RGB,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    pad: int,
    size: tuple[int, int],
) -> None:
    """The label on a filled background above the box, or inside its top when no room."""
    left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
    w, h = right - left + 2 * pad, bottom - top + 2 * pad
    x = max(0, min(box[0], size[0] - w))
    y = box[1] - h if box[1] - h >= 0 else box[1]
    draw.rectangle((x, y, x + w - 1, y + h - 1), fill=colour)
    draw.text((x + pad - left, y + pad - top), label, fill=_text_colour(colour), font=font)


def draw_entities(
    image: Image.Image, entities: Iterable[DrawableEntity], *, out: str | Path | None = None
) -> Image.Image:
    """A copy of ``image`` with every box of ``entities`` outlined in its type's colour and
    labelled ``mention (TYPE)``; entities without boxes are not drawn.

    Boxes are clipped to the image; line width and font size scale with the image. With
    ``out`` the drawing is also saved there (the format follows the extension).
    """
    canvas = image.convert("RGB") if image.mode != "RGB" else image.copy()
    width, height = canvas.size
    line = max(1, round(min(width, height) / 200))
    font = ImageFont.load_default(size=max(10, round(max(width, height) / 45)))
    draw = ImageDraw.Draw(canvas)
    labels = []
    for entity in entities:
        colour = type_colour(entity.type)
        for raw_box in entity.boxes or ():
            box = _clip(raw_box, width, height)
            if box is not None:
                draw.rectangle(box, outline=colour, width=line)
                labels.append((box, f"{entity.mention} ({entity.type})", colour))
    for box, label, colour in labels:  # after all boxes, so no outline crosses a label
        _draw_label(draw, box, label, colour, font, line + 1, (width, height))
    if out is not None:
        _save(canvas, Path(out))
    return canvas


def _save(canvas: Image.Image, out: Path) -> None:
    if not out.parent.is_dir():
        raise InputError(f"{out}: folder {out.parent} does not exist")
    try:
        canvas.save(out)
    except (ValueError, OSError) as exc:  # ValueError: an extension PIL does not know
        raise InputError(f"{out}: cannot write the drawing ({exc})") from None
