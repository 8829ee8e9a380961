"""The record grammar of one request as a deterministic automaton over UTF-8 bytes.

:class:`AnswerGrammar` accepts what a model may write for one request: an optional reasoning
part, then ``<answer>``, then ``None`` or records ``mention|TYPE|REGION`` joined by ``"; "``
(the format of :mod:`.records`, whose constants it uses), then ``</answer>``. Mentions are
whole-word substrings of the request's text, escaped as :func:`.records.escape_mention`
writes them, each at most as often as the text holds it (entities are spans); the type is
one of the labels; a box's integers lie in the resized image with ``x1 < x2`` and ``y1 < y2``.
Besides stepping, it tells the bytes allowed next, the bytes every continuation starts with
(for jump-forward), and a shortest completion.

Bytes, not characters: a byte-level BPE token may end inside a character. This module knows
nothing about tokens (see :mod:`.constraints`), models or images beyond the resized size.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import astuple, dataclass
from functools import cache
from itertools import accumulate, islice
from typing import Literal

from .errors import InputError
from .mentions import word_bounds
from .records import (
    BAR,
    BOX_CLOSE,
    BOX_OPEN,
    COORDINATE_SEPARATOR,
    ESCAPE,
    ESCAPED_CHARACTERS,
    NO_ENTITY,
    RECORD_SEPARATOR,
)

__all__ = [
    "MAX_BOXES_PER_RECORD",
    "MAX_FORCED_BYTES",
    "AnswerGrammar",
    "GrammarTags",
    "State",
]

#: Boxes one record may list (Twitter-GMNER's most is well below).
MAX_BOXES_PER_RECORD = 10
#: Longest jump-forward, in bytes (longer forced text is taken in several steps).
MAX_FORCED_BYTES = 64

ThinkMode = Literal["on", "off", "auto"]

_BAR = ord(BAR)
_ESC = ord(ESCAPE)
_DIGITS = b"0123456789"


# A state is a hashable tuple whose first item names its kind:
#   ("done",)
#   ("lits", alts, k)          alts: ((literal bytes, next state), ...), k bytes matched
#   ("think", k)               free text; k bytes of the closing tag matched
#   ("union", a, b)            both automata run; a is preferred when closing
#   ("mention", positions, pending_escape, nonempty, length, used)
#                              positions: text offsets after the bytes typed; length: text
#                              bytes typed (escapes not counted)
#   ("open", used)             after a region's "[": a second "[" (several boxes) or a digit
#   ("num", field, digits, values, boxes_done, used)   boxes_done -1: a single box
#   ("more", boxes_done, used) after a box of a list: "," and the next box, or the list's "]"
# used: the mentions of the records written so far (sorted bytes), so that a mention is
# written at most as often as the text holds it.
State = tuple
DONE: State = ("done",)


def _lits(*alts: tuple[bytes, State]) -> State:
    return ("lits", tuple(alts), 0)


@dataclass(frozen=True)
class GrammarTags:
    """The answer's tags, as the bundle's manifest names them."""

    think_open: str = "<think>"
    think_close: str = "</think>"
    answer_open: str = "<answer>"
    answer_close: str = "</answer>"


# ---------------------------------------------------------------------------------------------
# Numbers: decimal integers in [lo, hi], no leading zeros
# ---------------------------------------------------------------------------------------------


def _number_prefix_ok(digits: bytes, lo: int, hi: int) -> bool:
    """Whether some integer in [lo, hi] is written with ``digits`` as its first digits."""
    if not digits:
        return lo <= hi
    if digits[0] == ord("0"):
        return len(digits) == 1 and lo == 0
    value = int(digits)
    for extra in range(len(str(hi)) - len(digits) + 1):
        scale = 10**extra
        if max(lo, value * scale) <= min(hi, (value + 1) * scale - 1):
            return True
    return False


def _number_completion(digits: bytes, lo: int, hi: int) -> bytes:
    """The shortest digits to append to ``digits`` for a number in [lo, hi]."""
    if not digits:
        return str(lo).encode()
    value = int(digits)
    if digits[0] == ord("0"):
        return b""
    for extra in range(len(str(hi)) - len(digits) + 1):
        scale = 10**extra
        start = max(lo, value * scale)
        if start <= min(hi, (value + 1) * scale - 1):
            return str(start).encode()[len(digits) :]
    raise AssertionError("number prefix outside its range")  # states never hold one


# ---------------------------------------------------------------------------------------------
# The request's text: where mentions may start and end
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _MentionText:
    """The text as UTF-8 bytes with, per byte offset, what a mention may do there."""

    data: bytes
    starts: tuple[int, ...]  # offsets where a mention may begin
    ends: frozenset[int]  # offsets where a mention may end (exclusive)
    escaped: tuple[bool, ...]  # a character written with ESCAPE before it starts here
    live: tuple[bool, ...]  # a mention may take this byte: an end can still be reached
    to_end: tuple[float, ...]  # bytes written from here to the nearest end past here
    cost: tuple[int, ...]  # bytes written for the text before each offset (escapes count)

    @classmethod
    def of(cls, text: str, tags: Sequence[str]) -> _MentionText:
        """``tags``: the answer's tags; a mention may not hold one (any case)."""
        offsets, data = [], bytearray()
        for ch in text:
            offsets.append(len(data))
            data.extend(ch.encode("utf-8"))
        offsets.append(len(data))
        n = len(data)
        escaped = [False] * n
        blocked = [False] * n
        bounds = word_bounds(text, tags)  # the one mention rule (gmner_rt.mentions)
        starts = [offsets[i] for i in sorted(bounds.starts)]
        ends = {offsets[i] for i in bounds.ends}
        for i, ch in enumerate(text):
            blocked[offsets[i]] = bounds.barrier[i]
            escaped[offsets[i]] = ch in ESCAPED_CHARACTERS
        to_end = [float("inf")] * (n + 1)
        for p in range(n - 1, -1, -1):
            if blocked[p]:
                continue
            rest = 0 if p + 1 in ends else to_end[p + 1]
            to_end[p] = 1 + escaped[p] + rest
        starts = [p for p in starts if to_end[p] != float("inf")]
        return cls(
            bytes(data),
            tuple(starts),
            frozenset(ends),
            tuple(escaped),
            tuple(d != float("inf") for d in to_end),
            tuple(to_end),
            tuple(accumulate((1 + e for e in escaped), initial=0)),
        )

    def ends_from(self, p: int, strict: bool, reach: float) -> Iterator[tuple[int, int]]:
        """``(end, bytes to write)`` of the ends a mention at offset ``p`` can reach, nearest
        first, up to ``reach`` bytes; ``strict``: not ``p`` itself."""
        q = p
        while True:
            cost = self.cost[q] - self.cost[p]
            if cost > reach:
                return
            if q in self.ends and (q > p or not strict):
                yield q, cost
            if q >= len(self.data) or not self.live[q]:
                return
            q += 1

    def second_end_reach(self) -> int:
        """The most bytes from any offset to its second-nearest end (its nearest when it has
        one only): a completion may skip one used-up mention."""
        reach = 0
        for p in range(len(self.data)):
            costs = [cost for _, cost in islice(self.ends_from(p, True, float("inf")), 2)]
            if costs:
                reach = max(reach, costs[-1])
        return reach

    def occurrences(self, mention: bytes) -> int:
        """How many whole-word spans of the text are ``mention``."""
        count = 0
        for s in self.starts:
            e = s + len(mention)
            if self.data.startswith(mention, s) and e in self.ends:
                count += all(self.live[s:e])
        return count


# ---------------------------------------------------------------------------------------------
# The automaton
# ---------------------------------------------------------------------------------------------


class AnswerGrammar:
    """The byte automaton of valid answers for one request.

    Args:
        text: the request's text; mentions are whole-word substrings of it.
        labels: the entity types allowed.
        width, height: the resized image size the model's boxes refer to.
        think: "on" (the answer must start with reasoning), "off" (with ``<answer>``), or
            "auto" (either).
        tags: the think/answer tags.
    """

    def __init__(
        self,
        text: str,
        labels: Sequence[str],
        width: int,
        height: int,
        *,
        think: ThinkMode = "auto",
        tags: GrammarTags = GrammarTags(),
    ) -> None:
        if think not in ("on", "off", "auto"):
            raise InputError(f"think: expected 'on', 'off' or 'auto', got {think!r}")
        if not labels or any(not label or BAR in label for label in labels):
            raise InputError(f"labels: expected non-empty labels without {BAR!r}, got {labels!r}")
        if width < 2 or height < 2:
            raise InputError(f"image size: expected at least 2x2, got {width}x{height}")
        self.labels = tuple(labels)
        self.think = think
        self.text = _MentionText.of(text, [t.lower() for t in astuple(tags)])
        self.width, self.height = width, height
        self.tags = tags
        self._think_close = tags.think_close.encode()
        self._answer_close = _lits((tags.answer_close.encode(), DONE))
        #: how far a mention's completion may reach (bytes): past one used-up end at most
        self.reach = self.text.second_end_reach()
        self._label_alts = sorted(
            {label.encode() + BAR.encode() for label in labels}, key=lambda lit: (len(lit), lit)
        )
        self._after_record = cache(self._after_record_uncached)
        self._types = cache(self._types_uncached)
        self._occurrences = cache(self.text.occurrences)
        start = self._mention_start(())
        none = _lits((NO_ENTITY.encode(), self._answer_close))
        self.body = none if start is None else ("union", none, start)
        answer = (tags.answer_open.encode(), self.body)
        reasoning = (tags.think_open.encode(), ("think", 0))
        self.initial: State = {
            "on": _lits(reasoning),
            "off": _lits(answer),
            "auto": _lits(answer, reasoning),
        }[think]
        self.max_closing = self._closing_bound()

    # -- states ----------------------------------------------------------------------------

    def _mention_start(self, used: tuple[bytes, ...]) -> State | None:
        """A new mention's state, or None when every mention the text allows is used up."""
        state = ("mention", self.text.starts, False, False, 0, used)
        return state if self._mention_target(state) is not None else None

    def _after_record_uncached(self, used: tuple[bytes, ...]) -> State:
        close = (self.tags.answer_close.encode(), DONE)
        start = self._mention_start(used)
        return _lits(close) if start is None else _lits(close, (RECORD_SEPARATOR.encode(), start))

    def _types_uncached(self, used: tuple[bytes, ...]) -> State:
        region = _lits(
            (NO_ENTITY.encode(), self._after_record(used)), (BOX_OPEN.encode(), ("open", used))
        )
        return _lits(*((lit, region) for lit in self._label_alts))

    def _used_up(self, mention: bytes, used: tuple[bytes, ...]) -> bool:
        return used.count(mention) >= self._occurrences(mention)

    def _mention_target(self, state: State) -> tuple[int, int] | None:
        """``(offset, end)`` of the cheapest completion of a mention that is not used up and
        lies within :attr:`reach`, or None."""
        _, positions, pending, nonempty, length, used = state
        data, best = self.text.data, None
        for p in positions:
            for end, cost in self.text.ends_from(p, not nonempty or pending, self.reach):
                if not used or not self._used_up(data[p - length : end], used):
                    if best is None or cost < best[2]:
                        best = (p, end, cost)
                    break
        return None if best is None else best[:2]

    def after_think(self) -> State:
        """The state right after the reasoning's closing tag."""
        return _lits((self.tags.answer_open.encode(), self.body))

    def _bounds(self, fld: int, values: tuple[int, ...]) -> tuple[int, int]:
        if fld == 0:
            return 0, self.width - 1
        if fld == 1:
            return 0, self.height - 1
        if fld == 2:
            return values[0] + 1, self.width
        return values[1] + 1, self.height

    # -- transitions -----------------------------------------------------------------------

    def allowed_bytes(self, state: State) -> bytes | None:
        """The bytes that may come next (None: any byte)."""
        kind = state[0]
        if kind == "lits":
            _, alts, k = state
            return bytes(sorted({lit[k] for lit, _ in alts}))
        if kind == "think":
            return None
        if kind == "union":
            a, b = self.allowed_bytes(state[1]), self.allowed_bytes(state[2])
            return None if a is None or b is None else bytes(sorted(set(a) | set(b)))
        if kind == "mention":
            return self._mention_bytes(state)
        if kind == "open":
            return BOX_OPEN.encode() + self._digits(0, (), b"")
        if kind == "num":
            _, fld, digits, values, _done, _used = state
            lo, hi = self._bounds(fld, values)
            out = self._digits(fld, values, digits)
            if digits and lo <= int(digits) <= hi:
                out += (BOX_CLOSE if fld == 3 else COORDINATE_SEPARATOR).encode()
            return out
        if kind == "more":
            out = b""
            if state[1] < MAX_BOXES_PER_RECORD:
                out += COORDINATE_SEPARATOR.encode()
            if state[1] >= 2:
                out += BOX_CLOSE.encode()
            return out
        return b""  # done

    def _digits(self, fld: int, values: tuple[int, ...], digits: bytes) -> bytes:
        lo, hi = self._bounds(fld, values)
        return bytes(d for d in _DIGITS if _number_prefix_ok(digits + bytes((d,)), lo, hi))

    def _mention_bytes(self, state: State) -> bytes:
        _, positions, pending, nonempty, _length, used = state
        t = self.text
        out = set()
        for p in positions:
            if p >= len(t.data) or not t.live[p]:
                continue
            if pending or not t.escaped[p]:
                out.add(t.data[p])
            else:
                out.add(_ESC)
        if nonempty and not pending and any(p in t.ends for p in positions):
            out.add(_BAR)
        if used:  # some bytes lead only to used-up mentions
            out = {b for b in out if self._mention_step(state, b) is not None}
        return bytes(sorted(out))

    def step(self, state: State, byte: int) -> State | None:
        """The state after ``byte``, or None when the byte is not allowed."""
        kind = state[0]
        if kind == "lits":
            _, alts, k = state
            alive = tuple(alt for alt in alts if alt[0][k] == byte)
            if not alive:
                return None
            if len(alive[0][0]) == k + 1:  # literals are prefix-free: this one is complete
                return alive[0][1]
            return ("lits", alive, k + 1)
        if kind == "think":
            k = state[1]
            close = self._think_close
            if byte == close[k]:
                return self.after_think() if k + 1 == len(close) else ("think", k + 1)
            return ("think", 1 if byte == close[0] else 0)
        if kind == "union":
            a, b = self.step(state[1], byte), self.step(state[2], byte)
            if a is None or b is None:
                return a if b is None else b
            return ("union", a, b)
        if kind == "mention":
            return self._mention_step(state, byte)
        if kind == "open":
            if byte == ord(BOX_OPEN):
                return ("num", 0, b"", (), 0, state[1])
            return self._num_step(("num", 0, b"", (), -1, state[1]), byte)
        if kind == "num":
            return self._num_step(state, byte)
        if kind == "more":
            _, done, used = state
            if byte == ord(COORDINATE_SEPARATOR) and done < MAX_BOXES_PER_RECORD:
                return _lits((BOX_OPEN.encode(), ("num", 0, b"", (), done, used)))
            if byte == ord(BOX_CLOSE) and done >= 2:
                return self._after_record(used)
        return None

    def _mention_step(self, state: State, byte: int) -> State | None:
        _, positions, pending, nonempty, length, used = state
        t = self.text
        if byte == _BAR and not pending:
            ends = [p for p in positions if p in t.ends]
            if not nonempty or not ends:
                return None
            mention = t.data[ends[0] - length : ends[0]]  # every offset follows the same text
            if used and self._used_up(mention, used):
                return None
            return self._types(tuple(sorted((*used, mention))))
        if byte == _ESC and not pending:
            kept = tuple(p for p in positions if p < len(t.data) and t.escaped[p] and t.live[p])
            after = ("mention", kept, True, True, length, used)
        else:
            kept = tuple(
                p + 1
                for p in positions
                if p < len(t.data)
                and t.live[p]
                and t.data[p] == byte
                and (pending or not t.escaped[p])
            )
            after = ("mention", kept, False, True, length + 1, used)
        if not kept or (used and self._mention_target(after) is None):
            return None
        return after

    def _num_step(self, state: State, byte: int) -> State | None:
        _, fld, digits, values, done, used = state
        lo, hi = self._bounds(fld, values)
        if byte in _DIGITS:
            longer = digits + bytes((byte,))
            if not _number_prefix_ok(longer, lo, hi):
                return None
            return ("num", fld, longer, values, done, used)
        end = ord(BOX_CLOSE if fld == 3 else COORDINATE_SEPARATOR)
        if byte != end or not digits or not lo <= int(digits) <= hi:
            return None
        if fld < 3:
            return ("num", fld + 1, b"", (*values, int(digits)), done, used)
        return self._after_record(used) if done < 0 else ("more", done + 1, used)

    def advance(self, state: State, data: bytes) -> State | None:
        """The state after every byte of ``data`` (None when one is not allowed)."""
        for byte in data:
            state = self.step(state, byte)
            if state is None:
                return None
        return state

    @staticmethod
    def is_done(state: State) -> bool:
        return state[0] == "done"

    @staticmethod
    def in_think(state: State) -> bool:
        return state[0] == "think"

    # -- forced text and the shortest completion ---------------------------------------------

    def forced(self, state: State) -> bytes:
        """The bytes every continuation of ``state`` starts with (jump-forward)."""
        out = bytearray()
        while len(out) < MAX_FORCED_BYTES:
            allowed = self.allowed_bytes(state)
            if allowed is None or len(allowed) != 1:
                break
            out.append(allowed[0])
            state = self.step(state, allowed[0])
        return bytes(out)

    def closing(self, state: State) -> bytes:
        """A shortest way to finish the answer from ``state`` (a None region, the nearest word
        end, the shortest label, the smallest numbers)."""
        out = bytearray()
        while state[0] != "done":
            byte = self._closing_byte(state)
            out.append(byte)
            state = self.step(state, byte)
        return bytes(out)

    def _closing_byte(self, state: State) -> int:
        kind = state[0]
        if kind == "lits":
            return state[1][0][0][state[2]]
        if kind == "think":
            return self._think_close[state[1]]
        if kind == "union":
            return self._closing_byte(state[1])
        if kind == "mention":
            pending = state[2]
            p, end = self._mention_target(state)
            if p == end:
                return _BAR
            t = self.text
            return t.data[p] if pending or not t.escaped[p] else _ESC
        if kind == "open":
            return ord("0")
        if kind == "num":
            _, fld, digits, values, _done, _used = state
            lo, hi = self._bounds(fld, values)
            if digits and lo <= int(digits) <= hi:
                return ord(BOX_CLOSE if fld == 3 else COORDINATE_SEPARATOR)
            return _number_completion(digits, lo, hi)[0]
        if kind == "more":
            return ord(BOX_CLOSE if state[1] >= 2 else COORDINATE_SEPARATOR)
        raise AssertionError(f"no closing from {kind}")

    def _closing_bound(self) -> int:
        """An upper bound of ``len(closing(s))`` over every state of this grammar."""
        tags = self.tags
        none_answer = len(NO_ENTITY) + len(tags.answer_close)
        think = len(tags.think_open) + len(tags.think_close) + len(tags.answer_open) + none_answer
        record_tail = 1 + max(len(x) for x in self.labels) + 1 + none_answer
        mention = len(RECORD_SEPARATOR) + self.reach + record_tail
        box = 4 * (len(str(max(self.width, self.height))) + 1)
        region = 2 * box + 3 + len(tags.answer_close)
        answer = len(tags.answer_open) + max(none_answer, mention, region)
        return max(think, answer)
