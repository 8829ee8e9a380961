"""GMNER, MNER and EEG micro precision / recall / F1 for generated answers.

Two protocols:

``hindex`` (default; the H-Index rule, README "Metrics"): answers are read with
:func:`gmner_rt.records.parse_output`. Mentions compare after HTML-unescape and whitespace
collapse. A region is right when both are None, or every predicted box has IoU > 0.5 with some
gold box. Repeated identical records stay separate predictions; a record that cannot be parsed
is a prediction and wrong. Correct = size of a maximum matching between predictions and gold
entities (each used once), for all three tasks. MNER ignores regions, EEG ignores types.

``e2e``: the E2E-GMNER reference's evaluator (``engine/evaluator.py`` and
``evaluation/{parsing,geometry,metrics}.py`` of Finch-coder/E2E-GMNER), to compare with its
numbers. It scores the model's RAW text in MODEL pixels (:class:`~gmner_rt.predictions.
ModelText`), never text gmner has parsed or mapped: gold boxes are scaled to model space as
the reference scales them (``round(x * model_w / w)``, clamped to the image, ordered), gold is
written as the reference's answer text and read back by the same parser as the prediction;
answers are split on ``;``/``；``/newlines and bars (five Unicode bar look-alikes read as
``|``), no escapes; segments with fewer than three fields are dropped; a region that does not
parse never matches; mentions compare as written; a region is right when both are None or the
best IoU between any predicted and any gold box is >= 0.5; GMNER and EEG count a maximum
matching, MNER a greedy one. Tweets whose image has a side under 28 pixels (or an aspect ratio
over 200) are dropped from both sides, as the reference's ``smart_resize`` drops them; so is a
tweet whose gold answer text does not parse.

This module knows nothing about models, images or files.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .geometry import Box, iou
from .predictions import ModelText
from .records import EntityRecord, parse_output

__all__ = [
    "PROTOCOLS",
    "ModelText",
    "RewardWeights",
    "reward",
    "e2e_gold_text",
    "Counts",
    "EvalReport",
    "evaluate",
    "max_matching",
    "normalize_mention",
    "region_correct",
]

PROTOCOLS = ("hindex", "e2e")
IOU_THRESHOLD = 0.5
#: The reference's smart_resize refuses images with a side under its factor (28) or an
#: aspect ratio over 200; its evaluation drops such tweets.
E2E_MIN_SIDE = 28
E2E_MAX_ASPECT = 200


@dataclass(frozen=True, slots=True)
class Counts:
    """Micro counts of one task; precision, recall and F1 derive from them."""

    correct: int = 0
    predicted: int = 0
    gold: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(
            self.correct + other.correct,
            self.predicted + other.predicted,
            self.gold + other.gold,
        )

    @property
    def precision(self) -> float:
        return self.correct / self.predicted if self.predicted else 0.0

    @property
    def recall(self) -> float:
        return self.correct / self.gold if self.gold else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "correct": self.correct,
            "predicted": self.predicted,
            "gold": self.gold,
        }


@dataclass(frozen=True, slots=True)
class EvalReport:
    """Scores of one evaluation.

    Attributes:
        gmner, mner, eeg: totals of each task.
        by_type: per gold/predicted type, GMNER and MNER counts (unparseable predictions have
            no type and appear only in the totals).
        malformed: predicted segments that could not be parsed (wrong in ``hindex``, dropped
            in ``e2e``).
        tweets: tweets scored; missing: of them, tweets without a prediction.
        protocol: ``hindex`` or ``e2e``.
        dropped: tweets the ``e2e`` protocol leaves out (image side < 28 px, aspect > 200,
            or gold text that does not parse), as the reference does.
    """

    gmner: Counts
    mner: Counts
    eeg: Counts
    by_type: dict[str, dict[str, Counts]]
    malformed: int
    tweets: int
    missing: int
    protocol: str
    dropped: int = 0

    def as_dict(self) -> dict:
        return {
            "gmner": self.gmner.as_dict(),
            "mner": self.mner.as_dict(),
            "eeg": self.eeg.as_dict(),
            "by_type": {
                t: {task: c.as_dict() for task, c in tasks.items()}
                for t, tasks in sorted(self.by_type.items())
            },
            "malformed": self.malformed,
            "tweets": self.tweets,
            "missing": self.missing,
            "protocol": self.protocol,
            "dropped": self.dropped,
        }


@dataclass(frozen=True, slots=True)
class _Pred:
    """A prediction as a protocol reads it.

    ``parsed`` False (an unreadable segment) matches nothing; ``region_ok`` False (an
    unreadable region in the ``e2e`` reading) never matches a region.
    """

    mention: str
    type: str | None
    boxes: tuple[Box, ...] | None
    region_ok: bool = True
    parsed: bool = True


@dataclass(slots=True)
class _Totals:
    gmner: Counts = field(default_factory=Counts)
    mner: Counts = field(default_factory=Counts)
    eeg: Counts = field(default_factory=Counts)
    by_type: dict[str, dict[str, Counts]] = field(default_factory=dict)

    def add_type(self, etype: str, task: str, counts: Counts) -> None:
        tasks = self.by_type.setdefault(etype, {"gmner": Counts(), "mner": Counts()})
        tasks[task] = tasks[task] + counts


# ---------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------


def normalize_mention(mention: str) -> str:
    """HTML-unescape and collapse whitespace, the ``hindex`` protocol's mention comparison."""
    return " ".join(html.unescape(mention).split())


def region_correct(
    pred: tuple[Box, ...] | None, gold: tuple[Box, ...] | None, *, rule: str = "hindex"
) -> bool:
    """Whether a predicted region is right for a gold region.

    ``hindex``: both None, or every predicted box has IoU > 0.5 with some gold box.
    ``e2e``: both None, or the best IoU over all (predicted, gold) box pairs is >= 0.5.
    """
    if pred is None or gold is None:
        return pred is None and gold is None
    if rule == "hindex":
        return all(any(iou(p, g) > IOU_THRESHOLD for g in gold) for p in pred)
    return max(iou(p, g) for p in pred for g in gold) >= IOU_THRESHOLD


def max_matching(n_left: int, edges: Mapping[int, Sequence[int]]) -> int:
    """Size of a maximum bipartite matching; ``edges[i]`` lists right nodes joined to ``i``."""
    owner: dict[int, int] = {}

    def augment(i: int, seen: set[int]) -> bool:
        for j in edges.get(i, ()):
            if j in seen:
                continue
            seen.add(j)
            if j not in owner or augment(owner[j], seen):
                owner[j] = i
                return True
        return False

    return sum(augment(i, set()) for i in range(n_left))


def _greedy_matching(n_left: int, edges: Mapping[int, Sequence[int]]) -> int:
    used: set[int] = set()
    for i in range(n_left):
        for j in edges.get(i, ()):
            if j not in used:
                used.add(j)
                break
    return len(used)


# ---------------------------------------------------------------------------------------------
# Reading predictions per protocol
# ---------------------------------------------------------------------------------------------


def _read_hindex(text: str) -> tuple[list[_Pred], int]:
    parsed = parse_output(text)
    preds = [_Pred(normalize_mention(r.mention), r.type, r.boxes) for r in parsed.records]
    # An unparseable segment is a prediction that matches nothing.
    preds += [_Pred(seg, None, None, parsed=False) for seg in parsed.malformed]
    return preds, len(parsed.malformed)


_E2E_BARS = str.maketrans({c: "|" for c in "｜│丨￨∣"})
_E2E_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)
_E2E_AFTER_THINK = re.compile(r"</think>\s*(.*)$", re.S | re.I)
_E2E_NUMBER = re.compile(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?")


def _e2e_answer(text: str) -> str:
    text = (text or "").strip()
    m = _E2E_ANSWER.search(text) or _E2E_AFTER_THINK.search(text)
    return (m.group(1) or "").strip() if m else text


def _e2e_region(region: str) -> tuple[tuple[Box, ...] | None, bool]:
    """The reference's ``parse_bbox_regions`` (non-strict): JSON first, else every number
    in the text, four by four; ``(None, False)`` when nothing usable is there."""
    if region.lower() in ("none", "n/a"):
        return None, True
    try:
        value = json.loads(region)
    except (ValueError, RecursionError):
        value = None
    if isinstance(value, list):
        try:  # as the reference: any failure here (a bad element, an integer too large
            # for a float) falls through to reading the numbers below
            if len(value) == 4 and all(isinstance(v, int | float) for v in value):
                return (_box(value),), True
            if value and all(isinstance(b, list) for b in value):
                if all(len(b) == 4 and all(isinstance(v, int | float) for v in b) for b in value):
                    return tuple(_box(b) for b in value), True
            elif not value:
                return None, False
        except (OverflowError, TypeError, ValueError):
            pass
    numbers = [float(v) for v in _E2E_NUMBER.findall(region)]
    if not numbers or len(numbers) % 4:
        return None, False
    return tuple(_box(numbers[k : k + 4]) for k in range(0, len(numbers), 4)), True


def _box(values: Sequence[float]) -> Box:
    return tuple(float(v) for v in values)  # type: ignore[return-value]


def _read_e2e(text: str) -> tuple[list[_Pred], int]:
    """The reference's ``extract_answer_text`` then ``parse_triples`` (non-strict)."""
    answer = _e2e_answer(text).translate(_E2E_BARS).strip()
    if not answer or answer.lower() == "none":
        return [], 0
    preds: list[_Pred] = []
    dropped = 0
    for seg in re.split(r"[;；\n]+", answer):
        seg = seg.strip()
        if not seg or seg.lower() == "none":
            continue
        parts = [p.strip() for p in seg.split("|") if p.strip()]
        if len(parts) < 3:
            dropped += 1
            continue
        boxes, valid = _e2e_region(parts[-1])
        preds.append(_Pred(" | ".join(parts[:-2]), parts[-2], boxes, valid))
    return preds, dropped


def _gold(records: Iterable[EntityRecord]) -> list[_Pred]:
    return [_Pred(normalize_mention(r.mention), r.type, r.boxes) for r in records]


def _e2e_usable(image_size: tuple[int, int]) -> bool:
    w, h = image_size
    return min(w, h) >= E2E_MIN_SIDE and max(w, h) / min(w, h) <= E2E_MAX_ASPECT


def _e2e_scale(box: Box, sx: float, sy: float, size: tuple[int, int]) -> list[int]:
    """The reference's ``scale_box_xyxy``: round, clamp to the image, order."""
    mw, mh = size
    x1, y1, x2, y2 = (
        min(max(int(round(v * s)), 0), lim)
        for v, s, lim in zip(box, (sx, sy, sx, sy), (mw, mh, mw, mh), strict=True)
    )
    return [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]


def e2e_gold_text(
    records: Sequence[EntityRecord], image_size: tuple[int, int], model_size: tuple[int, int]
) -> str:
    """Gold records as the reference's answer text in model pixels (its SFT answer rescaled
    by its collator: one box as ``[x1,y1,x2,y2]``, several as ``[[..],[..]]``)."""
    sx, sy = model_size[0] / image_size[0], model_size[1] / image_size[1]
    segments = []
    for r in records:
        if r.boxes is None:
            region = "None"
        else:
            boxes = [_e2e_scale(b, sx, sy, model_size) for b in r.boxes]
            region = json.dumps(boxes[0] if len(boxes) == 1 else boxes, separators=(",", ":"))
        segments.append(f"{r.mention}|{r.type}|{region}")
    return "; ".join(segments) if segments else "None"


def _e2e_gold(records: Sequence[EntityRecord], text: ModelText | None) -> list[_Pred] | None:
    """The gold as the reference reads it, or None when the reference drops the tweet."""
    # its collator resizes (and so refuses too small an image) only when the gold answer
    # holds entities: a tweet without any is kept whatever its image
    if records and text is not None and not _e2e_usable(text.image_size):
        return None
    if text is None:  # no prediction: the gold count alone matters, boxes are unscaled
        sizes = ((1, 1), (1, 1))
    else:
        sizes = (text.image_size, text.model_size)
    gold_text = e2e_gold_text(records, *sizes)
    golds, _ = _read_e2e(gold_text)
    if not golds and gold_text.lower() != "none":
        return None  # its collator skips an example whose gold answer does not parse
    return golds


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


def _edges(
    preds: Sequence[_Pred], golds: Sequence[_Pred], *, typed: bool, regional: bool, rule: str
) -> dict[int, list[int]]:
    edges: dict[int, list[int]] = {}
    for i, p in enumerate(preds):
        if not p.parsed:
            continue
        for j, g in enumerate(golds):
            if p.mention != g.mention or (typed and p.type != g.type):
                continue
            if regional and not (p.region_ok and region_correct(p.boxes, g.boxes, rule=rule)):
                continue
            edges.setdefault(i, []).append(j)
    return edges


def _score(preds: Sequence[_Pred], golds: Sequence[_Pred], protocol: str, totals: _Totals) -> None:
    def count(ps: Sequence[_Pred], gs: Sequence[_Pred], task: str) -> Counts:
        typed, regional = task != "eeg", task != "mner"
        edges = _edges(ps, gs, typed=typed, regional=regional, rule=protocol)
        greedy = protocol == "e2e" and task == "mner"
        correct = (_greedy_matching if greedy else max_matching)(len(ps), edges)
        return Counts(correct, len(ps), len(gs))

    totals.gmner += count(preds, golds, "gmner")
    totals.mner += count(preds, golds, "mner")
    totals.eeg += count(preds, golds, "eeg")
    # Edges need equal types, so the typed matchings split exactly by type.
    for etype in {p.type for p in preds if p.type is not None} | {g.type for g in golds}:
        ps = [p for p in preds if p.type == etype]
        gs = [g for g in golds if g.type == etype]
        for task in ("gmner", "mner"):
            totals.add_type(etype, task, count(ps, gs, task))


def evaluate(
    gold: Mapping[str, Sequence[EntityRecord]],
    outputs: Mapping[str, str],
    *,
    protocol: str = "hindex",
    model_texts: Mapping[str, ModelText] | None = None,
) -> EvalReport:
    """Score model outputs against gold records, tweet by tweet.

    Args:
        gold: gold records per image id, boxes in original pixels.
        outputs: model text per image id, boxes in original pixels (``hindex``); a tweet
            missing here has no prediction.
        protocol: ``hindex`` (default) or ``e2e``.
        model_texts: the generated texts in model pixels with their sizes, per image id:
            what ``e2e`` scores (required for it, and for every id in ``outputs``).

    Raises:
        ValueError: for an unknown protocol, an output id that is not in ``gold``, or
            ``e2e`` without the model texts.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    unknown = sorted(set(outputs) - set(gold))
    if unknown:
        raise ValueError(f"predictions for unknown image ids: {', '.join(unknown[:5])}")
    if protocol == "e2e":
        lacking = sorted(set(outputs) - set(model_texts or {}))
        if lacking:
            raise ValueError(
                "protocol e2e scores the text as the model generated it, in model pixels, "
                f"and {len(lacking)} prediction(s) lack it (e.g. {', '.join(lacking[:3])}); "
                "predictions written by gmner eval --bundle/--model or by training carry it"
            )
    totals = _Totals()
    malformed = missing = dropped = 0
    for img_id, records in gold.items():
        text = outputs.get(img_id)
        missing += text is None
        if protocol == "hindex":
            preds, bad = _read_hindex(text or "")
            golds = _gold(records)
        else:
            model_text = (model_texts or {}).get(img_id) if text is not None else None
            golds = _e2e_gold(records, model_text)
            if golds is None:
                dropped += 1
                continue
            preds, bad = _read_e2e(model_text.raw.strip() if model_text else "")
        malformed += bad
        _score(preds, golds, protocol, totals)
    return EvalReport(
        gmner=totals.gmner,
        mner=totals.mner,
        eeg=totals.eeg,
        by_type=totals.by_type,
        malformed=malformed,
        tweets=len(gold),
        missing=missing,
        protocol=protocol,
        dropped=dropped,
    )


# ---------------------------------------------------------------------------------------------
# Reward of one completion (reinforcement learning after SFT)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RewardWeights:
    """How one completion is rewarded against its gold records (issue #26's reward).

    Each gold entity earns ``full`` when a prediction matches it on mention, type and region
    (the protocol's GMNER matching), else ``partial`` when one matches it on mention and type
    only (the box wrong or missing). Each prediction that matches no gold entity on mention and
    type costs ``spurious``; each segment that does not parse costs ``malformed``; an answer
    that is missing or not closed (``</answer>``) costs ``unclosed``. The sum is divided by
    the larger of the gold count and the segments written (records and malformed ones; at
    least 1), so a perfect answer scores ``full`` whatever the tweet, and a tweet without
    entities answered ``None`` scores ``full``. This is the one definition of the reward; a
    reinforcement stage takes it from here.

    Attributes:
        full: credit per gold entity found with its region (> 0).
        partial: credit per gold entity found with mention and type only (0 <= partial <= full).
        spurious: penalty per prediction that names no gold entity (>= 0).
        malformed: penalty per answer segment that does not parse (>= 0).
        unclosed: penalty when the answer is missing or not closed (>= 0).
        protocol: the matching rules, ``hindex`` (default) or ``e2e``.
    """

    full: float = 1.0
    partial: float = 0.5
    spurious: float = 0.5
    malformed: float = 0.5
    unclosed: float = 1.0
    protocol: str = "hindex"

    def __post_init__(self) -> None:
        def real(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
                raise ValueError(f"reward.{name}: expected a number, got {value!r}")
            return float(value)

        if real("full") <= 0:
            raise ValueError(f"reward.full: must be > 0, got {self.full!r}")
        if not 0 <= real("partial") <= self.full:
            raise ValueError(f"reward.partial: must be in [0, full], got {self.partial!r}")
        for name in ("spurious", "malformed", "unclosed"):
            if real(name) < 0:
                raise ValueError(f"reward.{name}: must be >= 0, got {getattr(self, name)!r}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(
                f"reward.protocol: expected one of {', '.join(PROTOCOLS)}, got {self.protocol!r}"
            )


def reward(
    text: str, gold: Sequence[EntityRecord], weights: RewardWeights = RewardWeights()
) -> float:
    """The reward of one generated ``text`` against ``gold`` (boxes in the text's space: a
    completion in model pixels is scored against gold mapped to model pixels). Never raises
    on what a model writes."""
    parsed = parse_output(text or "")
    if weights.protocol == "hindex":
        preds, bad = _read_hindex(text or "")
        golds = _gold(gold)
    else:
        preds, bad = _read_e2e((text or "").strip())
        golds = [_Pred(r.mention.strip(), r.type, r.boxes) for r in gold]
    rule = weights.protocol
    found = max_matching(len(preds), _edges(preds, golds, typed=True, regional=True, rule=rule))
    named = max_matching(len(preds), _edges(preds, golds, typed=True, regional=False, rule=rule))
    parsed_preds = sum(p.parsed for p in preds)
    score = weights.full * found + weights.partial * (named - found)
    if not golds and not parsed_preds:  # nothing to find, and nothing claimed: right
        score = weights.full
    score -= weights.spurious * (parsed_preds - named) + weights.malformed * bad
    if not parsed.answer_closed:
        score -= weights.unclosed
    return score / max(1, len(golds), parsed_preds + bad)
