"""Prompt-lookup drafting for speculative decoding: what to propose, and how much.

A GMNER output copies its input: mentions are words of the tweet, and the reasoning repeats
mention names and the record scaffolding. :class:`Drafter` keeps, per row, an index of every
n-gram (``min_ngram`` to ``max_ngram`` tokens) of the prompt's text tokens and of the tokens
generated so far, mapped to where it last occurred; the draft is what followed the latest
earlier occurrence of the longest suffix of the row that occurred before (continued into the
draft itself when that occurrence is close to the end: a repeated span is drafted whole).
Indexing a token costs ``max_ngram`` dictionary writes, a lookup as many reads: nothing grows
with the text.

How many tokens to draft adapts per row (:meth:`Drafter.record`): +2 after a draft was wholly
accepted (up to ``max_draft``), down to what was accepted plus one after a partial one, and
after a draft of which nothing was accepted the row drafts nothing for 1, 2, 4, ... decoder
calls (at most ``max_cooldown``), so text that does not copy is decoded as without speculation.

This module knows nothing about backends, grammars or the decode loop
(:func:`gmner_rt.generate.generate` checks each drafted token against the row's grammar and
verifies the draft); it works on token ids only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Drafter", "SpeculationSettings"]


@dataclass(frozen=True)
class SpeculationSettings:
    """Prompt-lookup speculation.

    Attributes:
        max_ngram: the longest suffix of a row looked up (tokens); longer matches first.
        min_ngram: the shortest suffix looked up.
        max_draft: the most tokens drafted for one decoder call (the call verifies them all,
            and returns ``max_draft + 1`` logit rows at most).
        initial_draft: tokens drafted at the first try of a request.
        max_cooldown: the most decoder calls a row skips drafting after drafts of which
            nothing was accepted (the pause doubles with each such draft in a row).
    """

    max_ngram: int = 3
    min_ngram: int = 1
    max_draft: int = 8
    initial_draft: int = 4
    max_cooldown: int = 16

    def __post_init__(self) -> None:
        for name in ("max_ngram", "min_ngram", "max_draft", "initial_draft"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"speculation.{name}: expected an integer >= 1, got {value!r}")
        if self.min_ngram > self.max_ngram:
            raise ValueError(
                f"speculation.min_ngram: must be <= max_ngram ({self.max_ngram}), "
                f"got {self.min_ngram}"
            )
        if self.initial_draft > self.max_draft:
            raise ValueError(
                f"speculation.initial_draft: must be <= max_draft ({self.max_draft}), "
                f"got {self.initial_draft}"
            )
        if self.max_draft > 15:
            raise ValueError(
                f"speculation.max_draft: at most 15 (a call verifies at most 16 positions), "
                f"got {self.max_draft}"
            )
        if not isinstance(self.max_cooldown, int) or self.max_cooldown < 0:
            raise ValueError(
                f"speculation.max_cooldown: expected an integer >= 0, got {self.max_cooldown!r}"
            )


class Drafter:
    """One row's n-gram index over its context (prompt text tokens, then generated tokens)
    and its adaptive draft length."""

    def __init__(self, context: Sequence[int], settings: SpeculationSettings):
        self.settings = settings
        self.tokens: list[int] = []
        #: n-gram -> position of its last token, for occurrences that a token follows
        self._index: dict[tuple[int, ...], int] = {}
        self.length = settings.initial_draft
        self._cooldown = 0
        self._misses = 0
        self.extend(context)
        #: how many of :attr:`tokens` are the prompt's
        self.context = len(self.tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        """Append tokens to the row (prompt first, then each committed token)."""
        seq, low, high = self.tokens, self.settings.min_ngram, self.settings.max_ngram
        for token in tokens:
            end = len(seq)  # the n-grams ending at end - 1 are now followed by ``token``
            for n in range(low, min(high, end) + 1):
                self._index[tuple(seq[end - n : end])] = end - 1
            seq.append(int(token))

    def propose(self) -> list[int]:
        """Up to :attr:`length` tokens that followed the latest earlier occurrence of the
        longest suffix found, or none (no match, or pausing after failed drafts)."""
        if self._cooldown:
            self._cooldown -= 1
            return []
        seq = self.tokens
        for n in range(min(self.settings.max_ngram, len(seq)), self.settings.min_ngram - 1, -1):
            end = self._index.get(tuple(seq[len(seq) - n :]))
            if end is not None:
                # copy what followed; a match close to the end continues into the draft
                # itself (a repeated span is drafted whole)
                draft: list[int] = []
                for at in range(end + 1, end + 1 + self.length):
                    draft.append(seq[at] if at < len(seq) else draft[at - len(seq)])
                return draft
        return []

    def record(self, drafted: int, accepted: int) -> None:
        """Adapt the draft length to how a draft of ``drafted`` tokens fared."""
        if drafted <= 0:
            return
        top = self.settings.max_draft
        if accepted >= drafted:
            self.length = min(top, self.length + 2)
            self._misses = 0
        elif accepted > 0:
            self.length = min(top, accepted + 1)
            self._misses = 0
        else:
            self.length = 1
            self._misses += 1
            self._cooldown = min(self.settings.max_cooldown, 2 ** (self._misses - 1))
