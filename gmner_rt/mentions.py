"""Where a mention may begin and end in a text: the one rule, shared by the record grammar
(which lets the model write only such mentions) and by the spans the extractor reports.

A mention is whole words: it begins at a character after a space (or the text's start), or at
a word character after a non-word one, and ends likewise before a space, the text's end, or a
non-word character after a word one. So ``Paris`` is found in ``Paris, France`` and in
``#Paris``, never inside ``Parisians``. Newlines, and the answer's tags where the text holds
them, are barriers: no mention spans one, and as boundaries they count as spaces.

This module knows characters only: the grammar maps these offsets to UTF-8 bytes itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .records import ASCII_LOWER

__all__ = ["WordBounds", "find_spans", "word_bounds"]


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


@dataclass(frozen=True)
class WordBounds:
    """Character offsets of a text where mentions may begin and end.

    Attributes:
        starts: offsets where a mention may begin.
        ends: offsets where a mention may end (exclusive).
        barrier: per character, whether no mention may hold it.
    """

    starts: frozenset[int]
    ends: frozenset[int]
    barrier: tuple[bool, ...]

    def spans(self, text: str, mention: str) -> tuple[tuple[int, int], ...]:
        """Non-overlapping whole-word occurrences of ``mention`` in ``text``, in order."""
        out: list[tuple[int, int]] = []
        if not mention:
            return ()
        size, start = len(mention), text.find(mention)
        while start >= 0:
            end = start + size
            if start in self.starts and end in self.ends and not any(self.barrier[start:end]):
                out.append((start, end))
                start = text.find(mention, end)
            else:
                start = text.find(mention, start + 1)
        return tuple(out)


def word_bounds(text: str, tags: Sequence[str] = ()) -> WordBounds:
    """The :class:`WordBounds` of ``text``; ``tags``: the answer's tags (a ``<`` that begins
    one, in any case, is a barrier)."""
    low = text.translate(ASCII_LOWER)
    barrier = tuple(
        ch in "\r\n" or (ch == "<" and any(low.startswith(t.lower(), i) for t in tags))
        for i, ch in enumerate(text)
    )

    def space(i: int) -> bool:
        return i < 0 or i >= len(text) or text[i].isspace() or barrier[i]

    starts, ends = set(), set()
    for i, ch in enumerate(text):
        if space(i):
            continue
        word = _is_word_char(ch)
        if space(i - 1) or (word and not _is_word_char(text[i - 1])):
            starts.add(i)
        if space(i + 1) or (word and not _is_word_char(text[i + 1])):
            ends.add(i + 1)
    return WordBounds(frozenset(starts), frozenset(ends), barrier)


def find_spans(text: str, mention: str, tags: Sequence[str] = ()) -> tuple[tuple[int, int], ...]:
    """``(start, end)`` of the whole-word occurrences of ``mention`` in ``text``
    (``text[start:end] == mention``); case-insensitive where there is no exact one and
    case-folding keeps the offsets; empty when the text does not hold it as whole words."""
    bounds = word_bounds(text, tags)
    spans = bounds.spans(text, mention)
    if spans or not mention:
        return spans
    folded = text.casefold()
    if len(folded) != len(text):  # casefold changed lengths: offsets would be wrong
        return ()
    return bounds.spans(folded, mention.casefold())
