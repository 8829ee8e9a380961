"""Twitter-GMNER reader (v1 and v2.0), shared by training and evaluation. Pure Python.

On disk: ``txt/<split>.txt`` in CoNLL style (a tweet starts with ``IMGID:<id>``, then one
``token<TAB>tag`` row per token with BIO tags, a blank line ends it; tokens are HTML-escaped)
and ``xml/<id>.xml`` Pascal-VOC boxes in original-image pixels, whose ``<name>`` is the
entity's surface text. Quirks handled: a UTF-8 BOM, CRLF line ends, columns separated by
spaces instead of a tab, IOBES tags (S- and E- read as B- and I-), an I- tag that does not
continue an entity of its type (it starts one), float coordinates, and XML names written
escaped (v2.0, ``&amp ;``) or unescaped.

The tweet text is the tokens joined by spaces with HTML entities unescaped; each entity keeps
its token span and its character span in that text. Entities link to boxes by exact name
equality, taking every same-name object (the H-Index rule); an entity with no box is
ungroundable (region None).

This module knows nothing about images' pixels, models or metrics.
"""

from __future__ import annotations

import html
import logging
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError
from .geometry import Box
from .records import EntityRecord

__all__ = [
    "IMAGE_EXTENSIONS",
    "LABELS",
    "GoldEntity",
    "Tweet",
    "VocAnnotation",
    "find_image",
    "load_split",
    "read_conll",
    "read_voc",
    "split_stats",
]

log = logging.getLogger(__name__)

#: Entity types of Twitter-GMNER.
LABELS = ("PER", "LOC", "ORG", "OTHER")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".JPG", ".JPEG", ".PNG")


@dataclass(frozen=True, slots=True)
class GoldEntity:
    """A named entity of a tweet as annotated (the gold standard; results are
    :class:`gmner_rt.Entity`).

    Attributes:
        mention: the entity's text, HTML-unescaped; equals ``text[char_span[0]:char_span[1]]``.
        type: PER, LOC, ORG or OTHER.
        token_span: ``[start, end)`` token indices.
        char_span: ``[start, end)`` character offsets in the tweet text.
        surface: the tokens as in the file (HTML-escaped), joined by spaces.
        boxes: boxes in original-image pixels, or None when ungroundable.
    """

    mention: str
    type: str
    token_span: tuple[int, int]
    char_span: tuple[int, int]
    surface: str
    boxes: tuple[Box, ...] | None

    def record(self) -> EntityRecord:
        return EntityRecord(self.mention, self.type, self.boxes)


@dataclass(frozen=True, slots=True)
class Tweet:
    """One annotated tweet.

    Attributes:
        img_id: the image id (``IMGID:`` line), also the image's file stem.
        tokens: tokens as in the file (HTML-escaped).
        tags: one BIO tag per token.
        text: tokens unescaped and joined by spaces.
        entities: entities in text order.
        image_size: ``(width, height)`` from the XML's ``<size>``, or None.
        xml_objects: number of ``<object>`` boxes in the tweet's XML (0 without one).
    """

    img_id: str
    tokens: tuple[str, ...]
    tags: tuple[str, ...]
    text: str
    entities: tuple[GoldEntity, ...]
    image_size: tuple[int, int] | None
    xml_objects: int

    def records(self) -> tuple[EntityRecord, ...]:
        """Gold records in original-image pixels."""
        return tuple(e.record() for e in self.entities)


@dataclass(frozen=True, slots=True)
class VocAnnotation:
    """A VOC XML file: image size (or None when absent or zero) and named boxes."""

    size: tuple[int, int] | None
    objects: tuple[tuple[str, Box], ...]


# ---------------------------------------------------------------------------------------------
# CoNLL text
# ---------------------------------------------------------------------------------------------


def _normalise_tag(tag: str, where: str) -> str:
    if tag == "O":
        return tag
    prefix, sep, label = tag.partition("-")
    if not sep or not label or prefix not in ("B", "I", "S", "E"):
        raise DataError(f"{where}: unknown tag {tag!r} (expected O, B-TYPE or I-TYPE)")
    return ("B-" if prefix in ("B", "S") else "I-") + label


def read_conll(path: str | Path) -> list[tuple[str, list[str], list[str]]]:
    """``(img_id, tokens, tags)`` for each tweet of a CoNLL file, in file order."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from None
    tweets: list[tuple[str, list[str], list[str]]] = []
    seen: dict[str, int] = {}
    current: tuple[str, list[str], list[str]] | None = None
    for number, line in enumerate(lines, 1):
        where = f"{path}:{number}"
        if line.startswith("IMGID:"):
            img_id = line[len("IMGID:") :].strip()
            if not img_id:
                raise DataError(f"{where}: empty IMGID")
            if img_id in seen:
                raise DataError(f"{where}: IMGID {img_id} repeats line {seen[img_id]}")
            seen[img_id] = number
            current = (img_id, [], [])
            tweets.append(current)
            continue
        if not line.strip():
            continue
        if current is None:
            raise DataError(f"{where}: token row before any IMGID line: {line!r}")
        parts = line.split("\t") if "\t" in line else line.rsplit(None, 1)
        if len(parts) != 2 or not parts[0].strip():
            raise DataError(f"{where}: expected 'token<TAB>tag', got {line!r}")
        current[1].append(parts[0].strip())
        current[2].append(_normalise_tag(parts[1].strip(), where))
    for img_id, tokens, _ in tweets:
        if not tokens:
            raise DataError(f"{path}:{seen[img_id]}: tweet {img_id} has no tokens")
    return tweets


def _spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """``(type, start, end)`` token spans of the BIO tags."""
    spans: list[tuple[str, int, int]] = []
    for i, tag in enumerate(tags):
        if tag == "O":
            continue
        label = tag[2:]
        continues = tag[0] == "I" and spans and spans[-1][2] == i and spans[-1][0] == label
        if continues:
            spans[-1] = (label, spans[-1][1], i + 1)
        else:
            spans.append((label, i, i + 1))
    return spans


# ---------------------------------------------------------------------------------------------
# VOC XML
# ---------------------------------------------------------------------------------------------


def _number(node: ET.Element | None, field: str, where: str) -> float:
    child = node.find(field) if node is not None else None
    if child is None or child.text is None:
        raise DataError(f"{where}: missing <{field}>")
    try:
        return float(child.text.strip())
    except ValueError:
        raise DataError(f"{where}: <{field}> is not a number: {child.text!r}") from None


def read_voc(path: str | Path) -> VocAnnotation:
    """Read a Pascal-VOC XML file; boxes are rounded, ordered and clipped to the size."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise DataError(f"{path}: malformed XML ({exc})") from None
    size: tuple[int, int] | None = None
    size_node = root.find("size")
    if size_node is not None:
        w = int(round(_number(size_node, "width", f"{path} <size>")))
        h = int(round(_number(size_node, "height", f"{path} <size>")))
        size = (w, h) if w > 0 and h > 0 else None
    objects: list[tuple[str, Box]] = []
    for k, obj in enumerate(root.iter("object")):
        where = f"{path} <object> #{k + 1}"
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise DataError(f"{where}: empty <name>")
        bnd = obj.find("bndbox")
        x1, y1, x2, y2 = (
            int(round(_number(bnd, f, where))) for f in ("xmin", "ymin", "xmax", "ymax")
        )
        box = (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))
        if size is not None:
            clipped = (max(0, box[0]), max(0, box[1]), min(size[0], box[2]), min(size[1], box[3]))
            if clipped != box:
                log.warning("%s: box %s clipped to the image size %s", where, box, size)
            box = clipped
        if box[0] >= box[2] or box[1] >= box[3]:
            raise DataError(f"{where} ({name!r}): empty box {box}")
        objects.append((name, box))
    return VocAnnotation(size, tuple(objects))


# ---------------------------------------------------------------------------------------------
# Tweets
# ---------------------------------------------------------------------------------------------


def _text_and_offsets(tokens: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    pieces = [html.unescape(t) for t in tokens]
    offsets: list[tuple[int, int]] = []
    pos = 0
    for piece in pieces:
        offsets.append((pos, pos + len(piece)))
        pos += len(piece) + 1
    return " ".join(pieces), offsets


def _boxes_by_name(voc: VocAnnotation | None) -> dict[str, list[Box]]:
    by_name: dict[str, list[Box]] = {}
    if voc is not None:
        for name, box in voc.objects:
            by_name.setdefault(name, []).append(box)
            unescaped = html.unescape(name)
            if unescaped != name:
                by_name.setdefault(unescaped, []).append(box)
    return by_name


def build_tweet(
    img_id: str, tokens: Sequence[str], tags: Sequence[str], voc: VocAnnotation | None
) -> Tweet:
    """A :class:`Tweet` from its tokens, tags and (optional) VOC annotation."""
    text, offsets = _text_and_offsets(tokens)
    by_name = _boxes_by_name(voc)
    entities = []
    for label, start, end in _spans(tags):
        char_span = (offsets[start][0], offsets[end - 1][1])
        surface = " ".join(tokens[start:end])
        mention = text[char_span[0] : char_span[1]]
        boxes = by_name.get(surface) or by_name.get(mention)
        entities.append(
            GoldEntity(
                mention, label, (start, end), char_span, surface, tuple(boxes) if boxes else None
            )
        )
    return Tweet(
        img_id=img_id,
        tokens=tuple(tokens),
        tags=tuple(tags),
        text=text,
        entities=tuple(entities),
        image_size=voc.size if voc is not None else None,
        xml_objects=len(voc.objects) if voc is not None else 0,
    )


def _split_file(root: Path, split: str) -> Path:
    for candidate in (root / "txt" / f"{split}.txt", root / f"{split}.txt"):
        if candidate.is_file():
            return candidate
    present = ", ".join(available_splits(root)) or "none"
    raise DataError(
        f"{root}: no {split!r} split (looked for txt/{split}.txt and {split}.txt); "
        f"splits here: {present}"
    )


def load_split(root: str | Path, split: str) -> list[Tweet]:
    """All tweets of one split of a Twitter-GMNER folder, in file order."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    xml_dir = root / "xml"
    tweets = []
    for img_id, tokens, tags in read_conll(_split_file(root, split)):
        xml_path = xml_dir / f"{img_id}.xml"
        voc = read_voc(xml_path) if xml_path.is_file() else None
        tweets.append(build_tweet(img_id, tokens, tags, voc))
    return tweets


def available_splits(root: str | Path) -> list[str]:
    """Split names present in a data folder, train/dev/test first."""
    root = Path(root)
    names = {p.stem for d in (root / "txt", root) if d.is_dir() for p in d.glob("*.txt")}
    order = {"train": 0, "dev": 1, "test": 2}
    return sorted(names, key=lambda n: (order.get(n, 3), n))


def find_image(image_dirs: Iterable[str | Path], img_id: str) -> Path | None:
    """The image file of a tweet in one of the folders, or None."""
    for folder in image_dirs:
        for ext in IMAGE_EXTENSIONS:
            candidate = Path(folder) / f"{img_id}{ext}"
            if candidate.is_file():
                return candidate
    return None


def split_stats(tweets: Iterable[Tweet]) -> dict:
    """Counts for one split: tweets, entities, groundable entities, boxes, XML objects, types.

    ``boxes`` counts, for each groundable entity, every box linked to it (an entity written
    twice in a tweet counts its boxes twice); ``xml_objects`` counts the XML's objects.
    """
    totals: Counter[str] = Counter()
    by_type: dict[str, Counter[str]] = {}
    for tweet in tweets:
        totals["tweets"] += 1
        totals["xml_objects"] += tweet.xml_objects
        for e in tweet.entities:
            n_boxes = len(e.boxes) if e.boxes else 0
            for counter in (totals, by_type.setdefault(e.type, Counter())):
                counter["entities"] += 1
                counter["groundable"] += n_boxes > 0
                counter["boxes"] += n_boxes
    keys = ("tweets", "entities", "groundable", "boxes", "xml_objects")
    return {
        **{k: totals[k] for k in keys},
        "by_type": {
            t: {k: c[k] for k in ("entities", "groundable", "boxes")}
            for t, c in sorted(by_type.items())
        },
    }
