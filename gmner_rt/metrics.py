"""GMNER, MNER and EEG micro precision / recall / F1 for generated answers.

Two protocols:

``hindex`` (default; design.md "Evaluation protocol"): answers are read with
:func:`gmner_rt.records.parse_output`. Mentions compare after HTML-unescape and whitespace
collapse. A region is right when both are None, or every predicted box has IoU > 0.5 with some
gold box. Repeated identical records stay separate predictions; a record that cannot be parsed
is a prediction and wrong. Correct = size of a maximum matching between predictions and gold
entities (each used once), for all three tasks. MNER ignores regions, EEG ignores types.

``e2e``: the E2E-GMNER reference's scoring, to compare with its numbers. Answers are read the
way its parser reads them (split on ``;``/``；``/newlines and bars, no escapes); unparseable
segments are dropped; mentions compare as written; a region is right when both are None or the
best IoU between any predicted and any gold box is >= 0.5; GMNER and EEG take a maximum
matching, MNER a greedy one. (The reference scores in model space; here every protocol scores
boxes in the space the caller gives, normally original pixels.)

This module knows nothing about models, images or files.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .geometry import Box, iou
from .records import EntityRecord, parse_output

__all__ = [
    "PROTOCOLS",
    "Counts",
    "EvalReport",
    "evaluate",
    "max_matching",
    "normalize_mention",
    "region_correct",
]

PROTOCOLS = ("hindex", "e2e")
IOU_THRESHOLD = 0.5


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
    """

    gmner: Counts
    mner: Counts
    eeg: Counts
    by_type: dict[str, dict[str, Counts]]
    malformed: int
    tweets: int
    missing: int
    protocol: str

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
    if region.lower() in ("none", "n/a"):
        return None, True
    try:
        value = json.loads(region)
    except ValueError:
        value = None
    if isinstance(value, list):
        if len(value) == 4 and all(isinstance(v, int | float) for v in value):
            return (_box(value),), True
        if value and all(isinstance(b, list) for b in value):
            if all(len(b) == 4 and all(isinstance(v, int | float) for v in b) for b in value):
                return tuple(_box(b) for b in value), True
            return None, False
        if not value:
            return None, False
    numbers = [float(v) for v in _E2E_NUMBER.findall(region)]
    if not numbers or len(numbers) % 4:
        return None, False
    return tuple(_box(numbers[k : k + 4]) for k in range(0, len(numbers), 4)), True


def _box(values: Sequence[float]) -> Box:
    return tuple(float(v) for v in values)  # type: ignore[return-value]


def _read_e2e(text: str) -> tuple[list[_Pred], int]:
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


_READERS: dict[str, Callable[[str], tuple[list[_Pred], int]]] = {
    "hindex": _read_hindex,
    "e2e": _read_e2e,
}


def _gold(records: Iterable[EntityRecord], protocol: str) -> list[_Pred]:
    norm = normalize_mention if protocol == "hindex" else str.strip
    return [_Pred(norm(r.mention), r.type, r.boxes) for r in records]


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
) -> EvalReport:
    """Score model outputs against gold records, tweet by tweet.

    Args:
        gold: gold records per image id (boxes in the same space as the predictions).
        outputs: raw model text per image id; a tweet missing here has no prediction.
        protocol: ``hindex`` (default) or ``e2e``.

    Raises:
        ValueError: for an unknown protocol or an output id that is not in ``gold``.
    """
    if protocol not in _READERS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    unknown = sorted(set(outputs) - set(gold))
    if unknown:
        raise ValueError(f"predictions for unknown image ids: {', '.join(unknown[:5])}")
    totals = _Totals()
    malformed = missing = 0
    for img_id, records in gold.items():
        text = outputs.get(img_id)
        missing += text is None
        preds, bad = _READERS[protocol](text or "")
        malformed += bad
        _score(preds, _gold(records, protocol), protocol, totals)
    return EvalReport(
        gmner=totals.gmner,
        mner=totals.mner,
        eeg=totals.eeg,
        by_type=totals.by_type,
        malformed=malformed,
        tweets=len(gold),
        missing=missing,
        protocol=protocol,
    )
