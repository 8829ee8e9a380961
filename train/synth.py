"""``gmner data synth``: a small, learnable synthetic GMNER dataset in the Twitter-GMNER format.

Each tweet mentions 0-4 of 24 fixed names (:data:`NAMES`, six per type). Every name owns one
glyph: its shape says the type (PER circle, LOC square, ORG triangle, OTHER diamond) and its
saturated colour tells the six names of a type apart. The image is a light, mildly noisy
background with the glyphs of the mentioned names drawn at random places and sizes, except
that some mentioned names are not drawn (region None); a few glyphs of unmentioned names are
drawn as distractors, and now and then one mentioned name is drawn twice (two boxes). By
default the glyphs of one tweet (drawn or not, distractors included) all have different
colours, so a name's colour alone finds its glyph. A box is the drawn glyph's tight pixel box in
the original image, end-exclusive: ``(x1, y1, x2, y2)`` covers columns ``x1 .. x2-1``.

Written as ``txt/<split>.txt`` (CoNLL, ``IMGID:`` + ``token<TAB>tag``), ``xml/<id>.xml`` (VOC,
only for images with a box, as in the real data), ``images/<id>.png``, ``cot.jsonl`` (a short
reasoning per tweet, built from the ground truth, as ``{"img_id", "think"}``) and
``README.md``. Each tweet is drawn from its own generator seeded by ``(seed, split, index)``,
so a split does not change when another split's size does, and the same config writes the same
bytes.

This module knows nothing about models, tokenizers or training; it only writes files that
:mod:`gmner_rt.data` reads.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image, ImageDraw

from gmner_rt import progress
from gmner_rt.errors import InputError
from gmner_rt.geometry import Box
from gmner_rt.records import BAR, escape_mention

__all__ = [
    "COLOURS",
    "COMPASS",
    "NAMES",
    "SHAPES",
    "SPLITS",
    "TEMPLATES",
    "Glyph",
    "SynthConfig",
    "SynthTweet",
    "corpus_text",
    "plan_tweet",
    "render",
    "think_text",
    "write_synth",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")
#: Image ids are ``_ID_BASE * (split index + 1) + tweet index``: numeric, unique across splits.
_ID_BASE = 1_000_000

#: Saturated glyph colours, far from the light background and from each other (hue 60 apart).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (240, 135, 0),
    "green": (30, 150, 45),
    "cyan": (0, 165, 200),
    "blue": (40, 70, 215),
    "magenta": (200, 35, 170),
}
#: The shape of an entity type's glyphs.
SHAPES: dict[str, str] = {"PER": "circle", "LOC": "square", "ORG": "triangle", "OTHER": "diamond"}
_TYPE_WORDS = {"PER": "person", "LOC": "place", "ORG": "organisation", "OTHER": "other"}


@dataclass(frozen=True, slots=True)
class Glyph:
    """A drawn symbol: a shape (see :data:`SHAPES`) in a colour (see :data:`COLOURS`)."""

    shape: str
    colour: str

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.colour]


_NAMES_BY_TYPE = {
    "PER": ("Mira Vance", "Theo Brandt", "Lena Marsh", "Omar Kessel", "Ivy Calder", "Jonah Pike"),
    "LOC": ("Port Alder", "Lake Ormond", "Brightwater", "Sunvale", "Mount Tessa", "Eastmere"),
    "ORG": ("Zentro", "Norvik Labs", "Bluepeak", "Orbis Bank", "Talon FC", "Quillsoft"),
    "OTHER": ("Glowfest", "Starfall Cup", "Pixel Quest", "Aurora Prize", "Moonbyte", "Nova Run"),
}
#: The closed set of entities: name -> (type, glyph). The k-th name of a type has the k-th
#: colour of :data:`COLOURS` and its type's shape, so every name has its own glyph. No token
#: is shared by two names or with the template words, so a mention is never ambiguous.
NAMES: dict[str, tuple[str, Glyph]] = {
    name: (etype, Glyph(SHAPES[etype], colour))
    for etype, names in _NAMES_BY_TYPE.items()
    for name, colour in zip(names, COLOURS, strict=True)
}

#: Tweet templates by number of mentions; ``{i}`` is the i-th mention, tokens split on spaces.
TEMPLATES: dict[int, tuple[str, ...]] = {
    0: (
        "what a day , loving this weather",
        "new photo just dropped , thoughts ?",
        "cannot wait for the weekend !",
        "this made my morning",
    ),
    1: (
        "{0} is trending again",
        "big news from {0} today",
        "spotted {0} this morning",
        "cannot stop talking about {0}",
    ),
    2: (
        "{0} meets {1} today",
        "{0} and {1} are everywhere",
        "from {0} to {1} in one day",
        "{0} just shared a photo with {1}",
    ),
    3: (
        "{0} , {1} and {2} together at last",
        "{0} with {1} near {2}",
        "today : {0} , {1} , {2}",
    ),
    4: (
        "{0} , {1} , {2} and {3} all in one shot",
        "{0} and {1} join {2} at {3}",
    ),
}
_USERS = ("@user", "@newsbot", "@citypix", "@fanpage")
_HASHTAGS = ("#fun", "#news", "#weekend", "#photo", "#live")
_GAP = 4  # pixels kept free between two glyphs


def _check_probs(flag: str, probs: Sequence[float]) -> None:
    if not probs or any(p < 0 for p in probs) or abs(sum(probs) - 1) > 1e-6:
        raise InputError(f"{flag}: need non-negative probabilities summing to 1, got {probs}")


def _check_unit(flag: str, p: float) -> None:
    if not 0 <= p <= 1:
        raise InputError(f"{flag}: a probability in [0, 1], got {p}")


@dataclass(frozen=True)
class SynthConfig:
    """What to generate.

    Attributes:
        seed: seeds every tweet's generator (``--seed``).
        train: tweets in the train split (``--train``).
        dev: tweets in the dev split (``--dev``).
        test: tweets in the test split (``--test``).
        min_side: smallest image width or height in pixels; each is drawn independently.
        max_side: largest image width or height in pixels.
        glyph_min: smallest glyph side as a fraction of the image's shorter side.
        glyph_max: largest glyph side as a fraction of the image's shorter side (shrunk when
            the glyphs do not fit).
        mention_probs: probability of 0, 1, ... mentions per tweet (at most 4).
        not_drawn: probability that a mentioned name is not drawn (region None).
        distractor_probs: probability of 0, 1, ... distractor glyphs (unmentioned names).
        twice: probability that one drawn mentioned name is drawn a second time.
        retweet: probability of an ``RT @user :`` prefix.
        hashtag: probability of a ``#tag`` suffix.
        speckle: fraction of background pixels darkened a little (mild noise).
        position_wash: tint the background by position (red with x, blue with y), so that a
            small model can see where a glyph is (see ``_background``).
        wash_cells: with a grid, the position wash is constant within each cell (its centre's
            tint): every patch around a glyph shows the glyph's cell, not a place to bin.
        distinct_colours: the glyphs of one tweet, mentioned or distractor, drawn or not, all
            have different colours.
        grid: 0 draws glyphs at random places with sides from glyph_min to glyph_max; N > 0
            draws each in its own random cell of an N x N grid (side 0.75 to 0.9 of the cell,
            centre moved by up to 5 % of it), and the reasoning names the cell ("northwest"):
            a small model learns nine places far sooner than free coordinates.
        glyph_alpha: a glyph's opacity over the background; below 1 the position wash shows
            through every glyph pixel, not just around the glyph.
    """

    seed: int = 0
    train: int = 1200
    dev: int = 150
    test: int = 150
    min_side: int = 160
    max_side: int = 320
    glyph_min: float = 0.15
    glyph_max: float = 0.35
    mention_probs: tuple[float, ...] = (0.10, 0.30, 0.30, 0.20, 0.10)
    not_drawn: float = 0.30
    distractor_probs: tuple[float, ...] = (0.40, 0.40, 0.20)
    twice: float = 0.05
    retweet: float = 0.30
    hashtag: float = 0.50
    speckle: float = 0.02
    position_wash: bool = True
    distinct_colours: bool = True
    grid: int = 0
    glyph_alpha: float = 1.0
    wash_cells: bool = False

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise InputError(f"--seed: a non-negative integer, got {self.seed}")
        for split in SPLITS:
            n = getattr(self, split)
            if not 0 <= n < _ID_BASE:
                raise InputError(f"--{split}: a tweet count in [0, {_ID_BASE}), got {n}")
        if self.train + self.dev + self.test == 0:
            raise InputError("--train/--dev/--test: at least one split needs tweets")
        if not 32 <= self.min_side <= self.max_side <= 4096:
            raise InputError(
                f"min_side/max_side: need 32 <= min <= max <= 4096, got "
                f"{self.min_side}, {self.max_side}"
            )
        if not 0.05 <= self.glyph_min <= self.glyph_max <= 0.5:
            raise InputError(
                f"glyph_min/glyph_max: need 0.05 <= min <= max <= 0.5, got "
                f"{self.glyph_min}, {self.glyph_max}"
            )
        _check_probs("mention_probs", self.mention_probs)
        _check_probs("distractor_probs", self.distractor_probs)
        if len(self.mention_probs) > len(TEMPLATES):
            raise InputError(f"mention_probs: at most {len(TEMPLATES) - 1} mentions per tweet")
        if not 0.5 <= self.glyph_alpha <= 1.0:
            raise InputError(f"glyph_alpha: need 0.5 <= alpha <= 1, got {self.glyph_alpha}")
        for flag in ("not_drawn", "twice", "retweet", "hashtag", "speckle"):
            _check_unit(flag, getattr(self, flag))
        if self.wash_cells and not (self.grid and self.position_wash):
            raise InputError("wash_cells: needs a grid and position_wash")
        most = len(self.mention_probs) - 1 + len(self.distractor_probs) - 1
        if self.grid < 0 or (self.grid and most + 1 > self.grid**2):
            raise InputError(
                f"grid: 0 or a side whose cells hold every glyph of a tweet ({most + 1}), "
                f"got {self.grid}"
            )
        if self.distinct_colours and most > len(COLOURS):
            raise InputError(
                f"mention_probs/distractor_probs: up to {most} glyphs per tweet, but only "
                f"{len(COLOURS)} colours with distinct_colours"
            )


@dataclass(frozen=True)
class SynthTweet:
    """One planned tweet, before its image is drawn.

    Attributes:
        img_id: numeric image id.
        size: ``(width, height)`` of the image.
        tokens: the tweet's tokens.
        tags: one BIO tag per token.
        mentions: mentioned names in text order.
        glyphs: ``(name, x, y, side)`` of each glyph to draw: mentioned names (one twice when
            doubled) and distractors.
        distractors: drawn names that the text does not mention.
    """

    img_id: str
    size: tuple[int, int]
    tokens: tuple[str, ...]
    tags: tuple[str, ...]
    mentions: tuple[str, ...]
    glyphs: tuple[tuple[str, int, int, int], ...]
    distractors: tuple[str, ...]


# -- Planning ---------------------------------------------------------------------------------


def _choose(rng: np.random.Generator, k: int, taken: list[str], cfg: SynthConfig) -> list[str]:
    """``k`` names not in ``taken`` (nor of a taken colour with distinct_colours)."""
    chosen: list[str] = []
    for _ in range(k):
        used = {NAMES[n][1].colour for n in taken + chosen}
        pool = [
            n
            for n in NAMES
            if n not in taken + chosen and not (cfg.distinct_colours and NAMES[n][1].colour in used)
        ]
        chosen.append(pool[int(rng.integers(len(pool)))])
    return chosen


def _text(rng: np.random.Generator, mentions: Sequence[str], cfg: SynthConfig) -> list[str]:
    """The tweet's tokens: an optional retweet prefix, a template, an optional hashtag."""
    templates = TEMPLATES[len(mentions)]
    body = templates[int(rng.integers(len(templates)))].format(*mentions)
    prefix = (
        ["RT", _USERS[int(rng.integers(len(_USERS)))], ":"] if rng.random() < cfg.retweet else []
    )
    suffix = [_HASHTAGS[int(rng.integers(len(_HASHTAGS)))]] if rng.random() < cfg.hashtag else []
    return prefix + body.split() + suffix


def _tags(tokens: Sequence[str], mentions: Sequence[str]) -> list[str]:
    """BIO tags: each mention is found once, in order, as a whole-token span."""
    tags = ["O"] * len(tokens)
    start = 0
    for name in mentions:
        words = name.split()
        start = next(
            i for i in range(start, len(tokens)) if list(tokens[i : i + len(words)]) == words
        )
        etype = NAMES[name][0]
        tags[start : start + len(words)] = [f"B-{etype}"] + [f"I-{etype}"] * (len(words) - 1)
        start += len(words)
    return tags


def _fits(x: int, y: int, s: int, placed: Sequence[tuple[int, int, int]]) -> bool:
    """Whether an ``s``-square at ``(x, y)`` stays ``_GAP`` pixels away from every placed one."""
    return all(
        x + s + _GAP <= px or px + ps + _GAP <= x or y + s + _GAP <= py or py + ps + _GAP <= y
        for px, py, ps in placed
    )


def _try_place(
    rng: np.random.Generator, sides: Sequence[int], size: tuple[int, int]
) -> list[tuple[int, int]] | None:
    """Top-left corners for squares of the given sides (largest placed first), or None."""
    w, h = size
    corners: dict[int, tuple[int, int]] = {}
    placed: list[tuple[int, int, int]] = []
    for k in sorted(range(len(sides)), key=lambda k: -sides[k]):
        s = sides[k]
        for _ in range(100):
            x, y = int(rng.integers(w - s + 1)), int(rng.integers(h - s + 1))
            if _fits(x, y, s, placed):
                corners[k] = (x, y)
                placed.append((x, y, s))
                break
        else:
            return None
    return [corners[k] for k in range(len(sides))]


def _place_in_grid(
    rng: np.random.Generator, names: Sequence[str], size: tuple[int, int], grid: int
) -> tuple[tuple[str, int, int, int], ...]:
    """``(name, x, y, side)`` for each glyph, each in its own random cell of the grid."""
    cw, ch = size[0] / grid, size[1] / grid
    cells = rng.choice(grid * grid, size=len(names), replace=False)
    out = []
    for name, cell in zip(names, cells.tolist(), strict=True):
        row, col = divmod(cell, grid)
        side = int(rng.uniform(0.75, 0.9) * min(cw, ch))
        cx = (col + 0.5 + rng.uniform(-0.05, 0.05)) * cw
        cy = (row + 0.5 + rng.uniform(-0.05, 0.05)) * ch
        x = min(max(int(round(cx - side / 2)), 0), size[0] - side)
        y = min(max(int(round(cy - side / 2)), 0), size[1] - side)
        out.append((name, x, y, side))
    return tuple(out)


#: The cells of a 3 x 3 grid by row, each one word (one token in the demo tokenizer).
COMPASS = (
    ("northwest", "north", "northeast"),
    ("west", "centre", "east"),
    ("southwest", "south", "southeast"),
)


def cell_words(box: Box, size: tuple[int, int], grid: int) -> str:
    """Where a box's centre lies: a compass word on a 3 x 3 grid ("northwest" ...
    "southeast"), else "row R column C"."""
    col = min(int((box[0] + box[2]) / 2 / size[0] * grid), grid - 1)
    row = min(int((box[1] + box[3]) / 2 / size[1] * grid), grid - 1)
    if grid == 3:
        return COMPASS[row][col]
    return f"row {row + 1} column {col + 1}"


def _place(
    rng: np.random.Generator, names: Sequence[str], size: tuple[int, int], cfg: SynthConfig
) -> tuple[tuple[str, int, int, int], ...]:
    """``(name, x, y, side)`` for each glyph: in grid cells, or at random places with all of
    them shrunk until they fit apart."""
    if cfg.grid:
        return _place_in_grid(rng, names, size, cfg.grid)
    short = min(size)
    sides = [rng.uniform(cfg.glyph_min, cfg.glyph_max) * short for _ in names]
    scale = 1.0
    for _ in range(30):
        scaled = [max(4, int(round(s * scale))) for s in sides]
        corners = _try_place(rng, scaled, size)
        if corners is not None:
            return tuple((n, x, y, s) for n, (x, y), s in zip(names, corners, scaled, strict=True))
        scale *= 0.85
    raise InputError(f"min_side {cfg.min_side}: {len(names)} glyphs do not fit in {size}")


def plan_tweet(rng: np.random.Generator, cfg: SynthConfig, img_id: str) -> SynthTweet:
    """Draw one tweet's size, mentions, glyphs and text from ``rng``."""
    size = (
        int(rng.integers(cfg.min_side, cfg.max_side + 1)),
        int(rng.integers(cfg.min_side, cfg.max_side + 1)),
    )
    k = int(rng.choice(len(cfg.mention_probs), p=cfg.mention_probs))
    mentions = _choose(rng, k, [], cfg)
    drawn = [n for n in mentions if rng.random() >= cfg.not_drawn]
    if drawn and rng.random() < cfg.twice:
        drawn.append(drawn[int(rng.integers(len(drawn)))])
    n_distractors = int(rng.choice(len(cfg.distractor_probs), p=cfg.distractor_probs))
    distractors = _choose(rng, n_distractors, mentions, cfg)
    glyphs = _place(rng, drawn + distractors, size, cfg)
    tokens = _text(rng, mentions, cfg)
    return SynthTweet(
        img_id=img_id,
        size=size,
        tokens=tuple(tokens),
        tags=tuple(_tags(tokens, mentions)),
        mentions=tuple(mentions),
        glyphs=glyphs,
        distractors=tuple(distractors),
    )


# -- Drawing ----------------------------------------------------------------------------------


def _shape_mask(shape: str, side: int) -> np.ndarray:
    """A ``side x side`` boolean mask of the shape filling its square."""
    layer = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(layer)
    e = side - 1
    if shape == "circle":
        draw.ellipse((0, 0, e, e), fill=255)
    elif shape == "square":
        draw.rectangle((0, 0, e, e), fill=255)
    elif shape == "triangle":
        draw.polygon([(0, e), (e, e), (e / 2, 0)], fill=255)
    elif shape == "diamond":
        draw.polygon([(e / 2, 0), (e, e / 2), (e / 2, e), (0, e / 2)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(layer) > 0


def _wash_ramp(n: int, cells: int) -> np.ndarray:
    """Position in 0..1 along an axis of ``n`` pixels: linear, or with ``cells`` > 0 the
    position of each pixel's cell (0 for the first cell, 1 for the last)."""
    if not cells:
        return np.linspace(0.0, 1.0, n)
    cell = np.minimum(np.arange(n) * cells // n, cells - 1)
    return cell / max(cells - 1, 1)


def _background(
    rng: np.random.Generator,
    size: tuple[int, int],
    speckle: float,
    position_wash: bool,
    cells: int = 0,
) -> np.ndarray:
    """A light background with sparse dark speckles, float HxWx3.

    With ``position_wash`` the red channel rises from left to right and the blue one from top
    to bottom (pastel, far from the saturated glyph colours), so every patch shows where it
    is: Qwen2.5-VL's attention is relative (rotary), and a small model learns boxes much
    faster when absolute position is visible in the pixels, as layout cues are in real
    photos. With ``cells`` > 0 the wash steps from cell to cell of a ``cells`` x ``cells``
    grid instead of rising smoothly. Without the wash, a random soft linear gradient.
    """
    w, h = size
    if position_wash:
        x = _wash_ramp(w, cells)[None, :]
        y = _wash_ramp(h, cells)[:, None]
        arr = np.empty((h, w, 3))
        arr[..., 0] = 170 + 85 * x
        arr[..., 1] = 235 + 0 * x * y
        arr[..., 2] = 170 + 85 * y
    else:
        base = rng.integers(222, 250, size=3).astype(np.float64)
        tilt_x, tilt_y = rng.uniform(-12, 12, size=2)
        ramp = tilt_x * np.linspace(-0.5, 0.5, w)[None, :]
        ramp = ramp + tilt_y * np.linspace(-0.5, 0.5, h)[:, None]
        arr = base[None, None, :] + ramp[:, :, None]
    dots = rng.random((h, w)) < speckle
    arr[dots] -= rng.integers(8, 30, size=(int(dots.sum()), 1))
    return arr


def render(
    tweet: SynthTweet, rng: np.random.Generator, cfg: SynthConfig
) -> tuple[Image.Image, list[tuple[str, Box]]]:
    """The tweet's image and each glyph's tight box ``(name, (x1, y1, x2, y2))``, end-exclusive."""
    cells = cfg.grid if cfg.wash_cells else 0
    arr = _background(rng, tweet.size, cfg.speckle, cfg.position_wash, cells)
    boxes: list[tuple[str, Box]] = []
    for name, x, y, side in tweet.glyphs:
        glyph = NAMES[name][1]
        mask = _shape_mask(glyph.shape, side)
        colour = np.clip(np.array(glyph.rgb) + rng.integers(-10, 11, size=3), 0, 255)
        patch = arr[y : y + side, x : x + side]
        patch[mask] = cfg.glyph_alpha * colour + (1 - cfg.glyph_alpha) * patch[mask]
        ys, xs = np.nonzero(mask)
        box = (x + int(xs.min()), y + int(ys.min()), x + int(xs.max()) + 1, y + int(ys.max()) + 1)
        boxes.append((name, box))
    image = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")
    return image, boxes


def think_text(tweet: SynthTweet, boxes: Sequence[tuple[str, Box]], grid: int = 0) -> str:
    """A short reasoning from the ground truth, in two parts.

    First what the image shows: every drawn glyph (distractors too) by colour, in the order of
    :data:`COLOURS`, each with its cell (or "shown" without a grid): "Glyphs: red northwest,
    cyan south." Then each mention in text order with its type, its glyph's colour and where
    that colour was seen, or "nowhere", and then its place once more after the name and type
    laid out as the answer's record starts: "Zentro (organisation): red northwest,
    Zentro|ORG| northwest."

    The order is what a small model learns fastest: listing colours asks the image a fixed
    question per colour; the place of a mention is then copied from the list by its colour, a
    lookup in the text, rather than asked of the image with a query built from the name; and
    the record's own start (:data:`gmner_rt.records.BAR`) right before the place lets the
    answer find the place where its text matches the answer's own last tokens. (With just the
    name before the place, a quarter of the answer's boxes went to a neighbouring mention's
    place.)
    """
    order = {colour: k for k, colour in enumerate(COLOURS)}
    seen: dict[str, list[str]] = {}
    ranked = sorted(boxes, key=lambda nb: (order[NAMES[nb[0]][1].colour], nb[1][1], nb[1][0]))
    for name, box in ranked:
        place = cell_words(box, tweet.size, grid) if grid else "shown"
        seen.setdefault(NAMES[name][1].colour, []).append(place)
    listed = ", ".join(f"{colour} {' '.join(places)}" for colour, places in seen.items())
    parts = [f"Glyphs: {listed or 'none'}."]
    if not tweet.mentions:
        parts.append("No named entity.")
    for name in tweet.mentions:
        etype, glyph = NAMES[name]
        where = " ".join(seen.get(glyph.colour, ["nowhere"]))
        key = f"{escape_mention(name)}{BAR}{etype}{BAR}"
        parts.append(f"{name} ({_TYPE_WORDS[etype]}): {glyph.colour} {where}, {key} {where}.")
    return " ".join(parts)


def corpus_text() -> str:
    """The words of this task (templates, names, the reasoning's phrases), a line each: extra
    text for a tiny model's tokenizer (:mod:`.tiny_model`), so each word is one token or
    two, as in a real model's vocabulary."""
    names = list(NAMES)
    lines = []
    for k, templates in TEMPLATES.items():
        for j, template in enumerate(templates):
            lines.append(template.format(*(names[(j * 5 + i * 7) % len(names)] for i in range(k))))
    lines += [f"RT {user} :" for user in _USERS] + [" ".join(_HASHTAGS)]
    cells = [word for row in COMPASS for word in row]
    for i, (name, (etype, glyph)) in enumerate(NAMES.items()):
        head = f"{name} ({_TYPE_WORDS[etype]}):"
        lines.append(f"Glyphs: {glyph.colour} {cells[i % 9]}, {glyph.colour} {cells[i % 7]}.")
        lines.append(f"{head} {glyph.colour} {cells[i % 9]}. {head} {glyph.shape} nowhere.")
    lines.append("Glyphs: none. No named entity. shown")
    return "\n".join(lines) + "\n"


# -- Writing ----------------------------------------------------------------------------------


def _conll(tweet: SynthTweet) -> str:
    rows = "".join(f"{t}\t{g}\n" for t, g in zip(tweet.tokens, tweet.tags, strict=True))
    return f"IMGID:{tweet.img_id}\n{rows}\n"


def _voc(tweet: SynthTweet, objects: Sequence[tuple[str, Box]]) -> str:
    w, h = tweet.size
    lines = [
        "<annotation>",
        "\t<folder>images</folder>",
        f"\t<filename>{tweet.img_id}.png</filename>",
        f"\t<size>\n\t\t<width>{w}</width>\n\t\t<height>{h}</height>\n\t\t<depth>3</depth>\n\t</size>",
        "\t<segmented>0</segmented>",
    ]
    for name, (x1, y1, x2, y2) in objects:
        lines += [
            "\t<object>",
            f"\t\t<name>{escape(name)}</name>",
            "\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n\t\t<difficult>0</difficult>",
            f"\t\t<bndbox>\n\t\t\t<xmin>{x1}</xmin>\n\t\t\t<ymin>{y1}</ymin>",
            f"\t\t\t<xmax>{x2}</xmax>\n\t\t\t<ymax>{y2}</ymax>\n\t\t</bndbox>",
            "\t</object>",
        ]
    return "\n".join([*lines, "</annotation>"]) + "\n"


def _prepare(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise InputError(f"--out {out_dir}: folder is not empty; give a new or empty folder")
    for sub in ("txt", "xml", "images"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)


def _write_tweet(
    out_dir: Path, tweet: SynthTweet, cfg: SynthConfig, rng: np.random.Generator
) -> list[tuple[str, Box]]:
    """Write the image and XML of one tweet; returns its glyph boxes."""
    image, boxes = render(tweet, rng, cfg)
    image.save(out_dir / "images" / f"{tweet.img_id}.png", format="PNG")
    order = {name: k for k, name in enumerate(tweet.mentions)}
    objects = sorted(((n, b) for n, b in boxes if n in order), key=lambda nb: (order[nb[0]], nb[1]))
    if objects:
        (out_dir / "xml" / f"{tweet.img_id}.xml").write_text(_voc(tweet, objects), "utf-8")
    return boxes


def write_synth(out_dir: str | Path, cfg: SynthConfig) -> dict[str, dict[str, int]]:
    """Write the dataset into a new or empty folder; returns counts per split.

    Counts: tweets, entities (mentions), grounded (drawn mentions), none (mentions not drawn),
    boxes (of mentions), doubled (mentions drawn twice), distractors and xml files.
    """
    out_dir = Path(out_dir)
    _prepare(out_dir)
    counts: dict[str, dict[str, int]] = {}
    with (out_dir / "cot.jsonl").open("w", encoding="utf-8", newline="\n") as cot:
        for split_index, split in enumerate(SPLITS):
            n = getattr(cfg, split)
            if n == 0:
                continue
            c = dict.fromkeys(
                (
                    "tweets",
                    "entities",
                    "grounded",
                    "none",
                    "boxes",
                    "doubled",
                    "distractors",
                    "xml",
                ),
                0,
            )
            text = []
            for i in progress.track(range(n), desc=f"synthetic {split}", unit="tweet"):
                rng = np.random.default_rng([cfg.seed, split_index, i])
                tweet = plan_tweet(rng, cfg, str(_ID_BASE * (split_index + 1) + i))
                boxes = _write_tweet(out_dir, tweet, cfg, rng)
                text.append(_conll(tweet))
                row = {
                    "img_id": tweet.img_id,
                    "image_path": f"images/{tweet.img_id}.png",
                    "think": think_text(tweet, boxes, cfg.grid),
                }
                cot.write(json.dumps(row) + "\n")
                drawn = [name for name, _ in boxes if name in tweet.mentions]
                c["tweets"] += 1
                c["entities"] += len(tweet.mentions)
                c["grounded"] += len(set(drawn))
                c["none"] += len(tweet.mentions) - len(set(drawn))
                c["boxes"] += len(drawn)
                c["doubled"] += len(drawn) - len(set(drawn))
                c["distractors"] += len(tweet.distractors)
                c["xml"] += bool(drawn)
            (out_dir / "txt" / f"{split}.txt").write_text("".join(text), "utf-8")
            counts[split] = c
    (out_dir / "README.md").write_text(readme(cfg, counts), "utf-8")
    return counts


def readme(cfg: SynthConfig, counts: dict[str, dict[str, int]]) -> str:
    """The README written next to the data: what it is, how it was made, its counts."""
    names = "\n".join(
        f"| {name} | {etype} | {glyph.colour} {glyph.shape} |"
        for name, (etype, glyph) in NAMES.items()
    )
    keys = ("tweets", "entities", "grounded", "none", "boxes", "doubled", "distractors", "xml")
    table = "\n".join(
        f"| {split} | " + " | ".join(str(c[k]) for k in keys) + " |" for split, c in counts.items()
    )
    settings = "\n".join(f"- `{k}`: {v}" for k, v in asdict(cfg).items())
    return f"""# Synthetic GMNER data

Written by `gmner data synth` ({__name__}). Twitter-GMNER layout: `txt/<split>.txt` (one
`token<TAB>BIO-tag` per line, `IMGID:<id>` first, a blank line after each tweet),
`xml/<id>.xml` (Pascal VOC boxes in original-image pixels, `<name>` = the mention; only for
images that show a mentioned entity), `images/<id>.png`, and `cot.jsonl` (`img_id`, `think`:
a short reasoning built from the ground truth, for `gmner data sft --cot`).

Each tweet mentions 0-4 of the 24 names below. A name's glyph has its type's shape and its
own colour. Some mentioned names are not drawn (region None), some drawn glyphs belong to names
the tweet does not mention (distractors), and a mentioned name is sometimes drawn twice (two
boxes). Boxes are tight around the glyph's pixels, end-exclusive. Image ids are numeric and
unique across splits; tweet `i` of split `s` comes from a generator seeded by `(seed, s, i)`.

## Counts

| split | tweets | entities | grounded | none | boxes | doubled | distractors | xml |
|---|---|---|---|---|---|---|---|---|
{table}

## Names

| name | type | glyph |
|---|---|---|
{names}

## Settings

{settings}
"""
