"""Entities drawn on their image.

:func:`draw_entities`: one coloured box per region, labelled ``mention (TYPE)``.
:func:`draw_panel`: a prediction checked against gold, told truthfully: predicted boxes solid
and numbered, gold boxes dashed, and under the image the tweet, each prediction marked right
or wrong (with the reason given by the caller), and the gold entities that were missed; the
numbers never hide each other.

This module only paints: it takes an RGB PIL image and entities whose boxes are already in
that image's pixels (``Extraction.records`` are, for the EXIF-oriented image that
:func:`gmner_rt.vision.to_rgb` returns). It knows nothing about models, bundles, records'
text format, metrics or how the image was opened. Pure PIL.
"""

from __future__ import annotations

import colorsys
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from PIL import Image, ImageDraw, ImageFont

from .errors import InputError

__all__ = [
    "TYPE_COLOURS",
    "DrawableEntity",
    "Verdict",
    "draw_entities",
    "draw_panel",
    "type_colour",
]

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


@dataclass(frozen=True)
class Verdict:
    """One predicted entity and whether it is right.

    Attributes:
        entity: the prediction (boxes in the image's pixels, or None).
        right: mention, type and region all right.
        reason: why it is wrong ("" when right), e.g. "box in another place".
    """

    entity: DrawableEntity
    right: bool
    reason: str = ""


_COLOUR_NAMES = {"PER": "red", "LOC": "green", "ORG": "blue", "OTHER": "orange"}
RIGHT_COLOUR: RGB = (20, 140, 60)
WRONG_COLOUR: RGB = (200, 30, 30)
GOLD_NOTE = "dashed: gold"


def _dashed_rectangle(
    draw: ImageDraw.ImageDraw, box: Sequence[int], colour: RGB, width: int, dash: int
) -> None:
    x1, y1, x2, y2 = box
    for a, b, fixed, horizontal in (
        (x1, x2, y1, True),
        (x1, x2, y2, True),
        (y1, y2, x1, False),
        (y1, y2, x2, False),
    ):
        for start in range(a, b, 2 * dash):
            end = min(start + dash, b)
            line = (start, fixed, end, fixed) if horizontal else (fixed, start, fixed, end)
            draw.line(line, fill=colour, width=width)


def _overlaps(a: Sequence[int], b: Sequence[int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _place_tag(
    corner: tuple[int, int], size: tuple[int, int], taken: list, bounds: tuple[int, int]
) -> tuple[int, int, int, int]:
    """A tag rectangle at ``corner`` (inside a box's top-left), moved right then down until
    it overlaps no tag placed before; kept inside the image."""
    w, h = size
    x0 = min(max(corner[0], 0), bounds[0] - w)
    y0 = min(max(corner[1], 0), bounds[1] - h)
    for row in range(0, bounds[1], h):
        for col in range(0, bounds[0], w):
            x = (x0 + col) % max(1, bounds[0] - w + 1)
            y = (y0 + row) % max(1, bounds[1] - h + 1)
            rect = (x, y, x + w, y + h)
            if not any(_overlaps(rect, t) for t in taken):
                return rect
    return (x0, y0, x0 + w, y0 + h)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return [*lines, line] if line else lines


def draw_panel(
    image: Image.Image,
    text: str,
    verdicts: Sequence[Verdict],
    gold: Sequence[DrawableEntity],
    missed: Sequence[DrawableEntity],
    *,
    width: int = 480,
    out: str | Path | None = None,
) -> Image.Image:
    """The image (scaled to ``width`` pixels) with ``gold`` boxes dashed and predicted boxes
    solid, each predicted box numbered in a tag that is green when right and red when wrong;
    below it the tweet, one line per prediction (number, RIGHT or WRONG and the reason) and
    the ``missed`` gold entities. Tags are placed so that none covers another."""
    scale = width / image.width
    shown = image.convert("RGB").resize(
        (width, max(1, round(image.height * scale))), Image.Resampling.BICUBIC
    )
    draw = ImageDraw.Draw(shown)
    font = ImageFont.load_default(size=15)
    line = 3

    def scaled(box):
        return _clip([v * scale for v in box], *shown.size)

    for entity in gold:
        for raw in entity.boxes or ():
            box = scaled(raw)
            if box is not None:
                _dashed_rectangle(draw, box, type_colour(entity.type), 2, 7)
    numbered: list[tuple[int, tuple[int, int, int, int], Verdict]] = []
    for number, verdict in enumerate(verdicts, 1):
        for raw in verdict.entity.boxes or ():
            box = scaled(raw)
            if box is not None:
                draw.rectangle(box, outline=type_colour(verdict.entity.type), width=line)
                numbered.append((number, box, verdict))
    taken: list = []
    for number, box, verdict in numbered:
        label = str(number)
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        size = (right - left + 8, bottom - top + 6)
        rect = _place_tag((box[0] + line, box[1] + line), size, taken, shown.size)
        taken.append(rect)
        fill = RIGHT_COLOUR if verdict.right else WRONG_COLOUR
        draw.rectangle(rect, fill=fill, outline=(255, 255, 255))
        draw.text((rect[0] + 4 - left, rect[1] + 3 - top), label, fill=(255, 255, 255), font=font)
    lines: list[tuple[str, RGB]] = [(t, (0, 0, 0)) for t in _wrap(draw, text, font, width - 16)]
    lines.append(("", (0, 0, 0)))
    boxed = {number for number, _, _ in numbered}
    for number, verdict in enumerate(verdicts, 1):
        e = verdict.entity
        tag = str(number) if number in boxed else "-"
        status = "RIGHT" if verdict.right else "WRONG"
        where = "" if e.boxes else ", not in the image"
        reason = f": {verdict.reason}" if verdict.reason else ""
        colour = RIGHT_COLOUR if verdict.right else WRONG_COLOUR
        lines.append((f"{tag} {status}  {e.mention} ({e.type}){where}{reason}", colour))
    if not verdicts:
        lines.append(("no entity predicted", (0, 0, 0)))
    for e in missed:
        lines.append((f"missed  {e.mention} ({e.type}), dashed", WRONG_COLOUR))
    lines.append(("solid, numbered: predicted; dashed: gold", (110, 110, 110)))
    lines.append(("number tags: green right, red wrong", (110, 110, 110)))
    types = ", ".join(f"{t} {name}" for t, name in _COLOUR_NAMES.items())
    lines.append((f"box colours: {types}", (110, 110, 110)))
    wrapped: list[tuple[str, RGB]] = []
    for text_line, colour in lines:
        wrapped += [(t, colour) for t in _wrap(draw, text_line, font, width - 16) or [""]]
    height = 8 + 20 * len(wrapped)
    canvas = Image.new("RGB", (width, shown.height + height), "white")
    canvas.paste(shown, (0, 0))
    text_draw = ImageDraw.Draw(canvas)
    for i, (text_line, colour) in enumerate(wrapped):
        text_draw.text((8, shown.height + 6 + 20 * i), text_line, fill=colour, font=font)
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
