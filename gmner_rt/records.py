"""The GMNER record format, defined once.

A model answer is ``<think>R</think><answer>RECORDS</answer>`` (the think part is optional).
``RECORDS`` is ``None`` when the text has no entity, else records joined by ``"; "``. A record is
``mention|TYPE|REGION`` where ``REGION`` is ``[x1,y1,x2,y2]``, ``[[x1,y1,x2,y2],[...]]`` for
several boxes, or ``None`` when the image does not show the entity. Boxes are integer pixel
coordinates of the image as the model sees it (after ``smart_resize``); mapping them to the
original image is :mod:`gmner_rt.geometry`'s job, not this module's.

Mentions are written verbatim, except that a backslash is put before each character that
would otherwise end a field or a record: ``\\``, ``|`` (and its look-alikes ``｜ │ ￨ ∣``),
``;`` and ``；``. So the dataset's ``Fox & ; Fin Financial Group`` is written
``Fox & \\; Fin Financial Group|ORG|None``. The reader undoes this; a backslash before any
other character is kept as it is.

:func:`format_answer` writes training targets; :func:`parse_output` reads what a model
generated and never raises: it accepts full-width and box-drawing bars, ``；`` and newlines
between records, floats and spaces in boxes, a missing ``</answer>``, only ``</think>``, no tags
at all, and truncated output. What it cannot read is returned as malformed segments.

This module knows nothing about images, tokenizers or models.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .geometry import Box

__all__ = [
    "ASCII_LOWER",
    "BAR",
    "BOX_CLOSE",
    "BOX_OPEN",
    "COORDINATE_SEPARATOR",
    "ESCAPE",
    "ESCAPED_CHARACTERS",
    "NO_ENTITY",
    "RECORD_FORMAT_VERSION",
    "RECORD_SEPARATOR",
    "Box",
    "EntityRecord",
    "ParsedOutput",
    "escape_mention",
    "format_answer",
    "format_record",
    "format_records",
    "parse_answer",
    "parse_output",
]

#: Bumped whenever the written form changes; bundles and training data carry it.
RECORD_FORMAT_VERSION = 1


#: Separates a record's fields (mention, type, region).
BAR = "|"
#: Separates records in an answer.
RECORD_SEPARATOR = "; "
#: An answer without entities, and a record whose entity the image does not show.
NO_ENTITY = "None"
#: A box is written ``[x1,y1,x2,y2]``; several boxes as a list of boxes.
BOX_OPEN, BOX_CLOSE, COORDINATE_SEPARATOR = "[", "]", ","
#: Written before a mention character that would otherwise end a field or a record.
ESCAPE = "\\"
_BAR_VARIANTS = frozenset("|｜│￨∣")
_RECORD_SEPARATORS = frozenset(";；\n\r")
#: The mention characters written with :data:`ESCAPE` before them.
ESCAPED_CHARACTERS = _BAR_VARIANTS | frozenset(";；") | {ESCAPE}
_ESCAPED = ESCAPED_CHARACTERS
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_TYPE_RE = re.compile(r"^\w[\w\-.]*\Z")  # \Z: "$" would accept "PER\n"
_REGION_CHARS_RE = re.compile(r"^[\s\d.,+\-\[\]()]*$")
_NUMBER_RE = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)")
_INNER_LIST_RE = re.compile(r"[\[(]([^\[\]()]*)[\])]")
_NONE_WORDS = frozenset({"none", "null", "n/a"})
#: Lower-cases ASCII only: ``str.lower`` turns "\u0130" into two characters, which would shift
#: the offsets found in the lowered text against the original one.
ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


@dataclass(frozen=True, slots=True)
class EntityRecord:
    """One entity: its mention as written in the text, its type, and its boxes or None.

    ``boxes`` is a non-empty tuple of integer ``(x1, y1, x2, y2)`` or None (not in the image).
    The coordinate space is the caller's: model space in answers, original pixels after
    mapping.
    """

    mention: str
    type: str
    boxes: tuple[Box, ...] | None = None

    def __post_init__(self) -> None:
        _check_mention(self.mention)
        if not isinstance(self.type, str) or not _TYPE_RE.match(self.type):
            raise ValueError(
                f"record type must be a word such as PER (letters, digits, _ - .), "
                f"got {self.type!r}"
            )
        if self.boxes is not None:
            object.__setattr__(self, "boxes", _check_boxes(self.boxes))

    def map_boxes(self, fn: Callable[[Box], Box]) -> EntityRecord:
        """The same record with ``fn`` applied to every box (a record without boxes is returned
        as it is)."""
        if self.boxes is None:
            return self
        return EntityRecord(self.mention, self.type, tuple(fn(b) for b in self.boxes))


@dataclass(frozen=True, slots=True)
class ParsedOutput:
    """What :func:`parse_output` read from a model's text.

    Attributes:
        think: the reasoning text (stripped), or None when there was none.
        records: the records that parsed, in order; repeats are kept.
        malformed: the record segments that could not be parsed, as written.
        answer_found: False when the text ended inside the reasoning (no answer part).
        answer_closed: True when ``</answer>`` was seen (False for truncated output).
    """

    think: str | None
    records: tuple[EntityRecord, ...]
    malformed: tuple[str, ...]
    answer_found: bool
    answer_closed: bool


def _check_mention(mention: object) -> None:
    if not isinstance(mention, str) or not mention or mention != mention.strip():
        raise ValueError(
            f"record mention must be a non-empty string without surrounding whitespace, "
            f"got {mention!r}"
        )
    if "\n" in mention or "\r" in mention:
        raise ValueError(f"record mention must be on one line, got {mention!r}")
    low = mention.lower()
    if any(tag in low for tag in _TAGS):
        raise ValueError(f"record mention must not contain a think/answer tag, got {mention!r}")


def _check_boxes(boxes: object) -> tuple[Box, ...]:
    if not isinstance(boxes, tuple | list) or not boxes:
        raise ValueError(f"record boxes must be None or a non-empty sequence, got {boxes!r}")
    checked = []
    for box in boxes:
        if not isinstance(box, tuple | list) or len(box) != 4:
            raise ValueError(f"a box must have 4 coordinates (x1, y1, x2, y2), got {box!r}")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in box):
            raise ValueError(f"box coordinates must be integers, got {box!r}")
        checked.append(tuple(box))
    return tuple(checked)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def escape_mention(mention: str) -> str:
    """The mention as written in a record (separator characters backslash-escaped)."""
    return "".join(ESCAPE + ch if ch in _ESCAPED else ch for ch in mention)


def _format_box(box: Box) -> str:
    return BOX_OPEN + COORDINATE_SEPARATOR.join(str(v) for v in box) + BOX_CLOSE


def format_record(record: EntityRecord) -> str:
    """``mention|TYPE|REGION`` for one record."""
    if record.boxes is None:
        region = NO_ENTITY
    elif len(record.boxes) == 1:
        region = _format_box(record.boxes[0])
    else:
        region = (
            BOX_OPEN + COORDINATE_SEPARATOR.join(_format_box(b) for b in record.boxes) + BOX_CLOSE
        )
    return f"{escape_mention(record.mention)}{BAR}{record.type}{BAR}{region}"


def format_records(records: Iterable[EntityRecord]) -> str:
    """The answer body: records joined by ``"; "``, or ``None`` when there are none."""
    parts = [format_record(r) for r in records]
    return RECORD_SEPARATOR.join(parts) if parts else NO_ENTITY


def format_answer(records: Iterable[EntityRecord], *, think: str | None = None) -> str:
    """A training target: ``[<think>think</think>]<answer>records</answer>``."""
    body = f"<answer>{format_records(records)}</answer>"
    if think is None:
        return body
    low = think.lower()
    if any(tag in low for tag in _TAGS):
        raise ValueError("think text must not contain <think>/<answer> tags")
    return f"<think>{think.strip()}</think>{body}"


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _find(low: str, tag: str, start: int = 0) -> int:
    return low.find(tag, start)


def _split_tags(text: str) -> tuple[str | None, str | None, bool]:
    """Split raw model text into (think, answer text, answer closed)."""
    low = text.translate(ASCII_LOWER)
    t_open = _find(low, "<think>")
    t_close = _find(low, "</think>", max(t_open, 0))
    a_open = _find(low, "<answer>", t_close if t_close >= 0 else 0)

    think: str | None = None
    if t_close >= 0:
        start = t_open + len("<think>") if 0 <= t_open < t_close else 0
        think = text[start:t_close].strip()
    elif t_open >= 0:
        end = a_open if a_open > t_open else len(text)
        think = text[t_open + len("<think>") : end].strip()
        if a_open < 0:
            return think, None, False  # cut off while reasoning

    if a_open >= 0:
        start = a_open + len("<answer>")
    elif t_close >= 0:
        start = t_close + len("</think>")
    else:
        start = 0
    end = _find(low, "</answer>", start)
    if end < 0:
        return think, text[start:], False
    return think, text[start:end], True


def _scan_fields(answer: str) -> list[tuple[str, list[str]]]:
    """Split the answer into segments (raw text, unescaped fields split on bars)."""
    segments: list[tuple[str, list[str]]] = []
    raw: list[str] = []
    fields: list[str] = []
    field: list[str] = []
    i, n = 0, len(answer)
    while i < n:
        ch = answer[i]
        if ch == "\\" and i + 1 < n and answer[i + 1] in _ESCAPED:
            field.append(answer[i + 1])
            raw.append(answer[i : i + 2])
            i += 2
            continue
        if ch in _RECORD_SEPARATORS:
            segments.append(("".join(raw), [*fields, "".join(field)]))
            raw, fields, field = [], [], []
        elif ch in _BAR_VARIANTS:
            fields.append("".join(field))
            field = []
            raw.append(ch)
        else:
            field.append(ch)
            raw.append(ch)
        i += 1
    segments.append(("".join(raw), [*fields, "".join(field)]))
    return segments


def _parse_region(region: str) -> tuple[Box, ...] | None | bool:
    """Boxes, None (no region), or False when the region cannot be read."""
    region = region.strip()
    if region.lower() in _NONE_WORDS:
        return None
    if not region or region[0] not in "[(" or not _REGION_CHARS_RE.match(region):
        return False
    depth = 0
    for ch in region:
        depth += ch in "[("
        depth -= ch in "])"
        if depth < 0 or depth > 2:
            return False
    if depth != 0:
        return False
    boxes: list[Box] = []
    for inner in _INNER_LIST_RE.findall(region):
        numbers = _NUMBER_RE.findall(inner)
        if not numbers or len(numbers) % 4:
            return False
        try:  # integers exactly (floats lose precision past 2**53); overflow is unreadable
            values = [int(v) if "." not in v else int(round(float(v))) for v in numbers]
        except (OverflowError, ValueError):
            return False
        boxes.extend(tuple(values[k : k + 4]) for k in range(0, len(values), 4))  # type: ignore[misc]
    return tuple(boxes) if boxes else False


def _parse_segment(fields: list[str]) -> EntityRecord | None:
    if len(fields) < 3:
        return None
    mention = BAR.join(fields[:-2]).strip()  # an unescaped bar inside a mention is kept
    etype = fields[-2].strip()
    boxes = _parse_region(fields[-1])
    if boxes is False:
        return None
    try:
        return EntityRecord(mention, etype, boxes)  # type: ignore[arg-type]
    except ValueError:
        return None


def parse_answer(answer: str) -> tuple[tuple[EntityRecord, ...], tuple[str, ...]]:
    """Records and malformed segments of an answer body (the text inside ``<answer>``)."""
    records: list[EntityRecord] = []
    malformed: list[str] = []
    for raw, fields in _scan_fields(answer):
        stripped = raw.strip()
        if not stripped or stripped.lower() == NO_ENTITY.lower():
            continue
        record = _parse_segment(fields)
        if record is None:
            malformed.append(stripped)
        else:
            records.append(record)
    return tuple(records), tuple(malformed)


def parse_output(text: str | None) -> ParsedOutput:
    """Read a model's generated text. Never raises."""
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    think, answer, closed = _split_tags(text)
    if answer is None:
        return ParsedOutput(think, (), (), answer_found=False, answer_closed=False)
    records, malformed = parse_answer(answer)
    return ParsedOutput(think, records, malformed, answer_found=True, answer_closed=closed)
