"""Grammar-constrained decoding: the record grammar (:mod:`.grammar`) as token masks.

:class:`TokenTable` holds every token's bytes, sorted, once per tokenizer. A token is allowed
when the text so far plus its bytes is still a prefix of some valid answer, so BPE tokens that
end inside a character or span a field boundary (``|PER``, ``];``) are handled exactly. The
mask of a state is found by a depth-first walk of the automaton over the sorted table (each
byte narrows the range of strings sharing the prefix with two bisections), so its cost grows
with the number of allowed tokens, not with the vocabulary; masks are cached per state. Free
reasoning text allows every token that cannot close it, a mask computed once per request.

:class:`RequestConstraint` is what the engine sees (token ids only, see
:class:`gmner_rt.generate.TokenConstraint`): the mask of the next token; the tokens the grammar
forces (jump-forward: ``</answer>``, the rest of a word), fed only where no allowed token could
have spanned past them, so the text is split as in training; and, when the token budget runs
short, the shortest completion, so that a constrained answer is always complete.

This module knows nothing about models or backends.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError
from .grammar import MAX_FORCED_BYTES, AnswerGrammar, State

__all__ = ["RequestConstraint", "TokenMask", "TokenTable"]

#: Forced texts whose token ids a table remembers.
_ENCODED_CACHE = 4096


# ---------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return {ch: b for b, ch in enumerate(chars)}


@dataclass
class TokenTable:
    """Every token's bytes, sorted for prefix search; built once per tokenizer.

    Attributes:
        vocab_size: the width of the model's logits (ids past the tokenizer are never allowed).
        strings: the distinct token byte strings, sorted.
        ids: per entry of ``strings``, the token ids with those bytes.
        token_bytes: per token id, its bytes (None for special tokens and unused ids).
        free_text_ids: the tokens free reasoning text may take without a check (no ``>``, so
            they cannot close a tag), sorted.
        tag_end_ids: the other non-special tokens (their bytes hold ``>``), checked one by one.
    """

    vocab_size: int
    strings: list[bytes]
    ids: list[tuple[int, ...]]
    token_bytes: list[bytes | None]
    free_text_ids: np.ndarray
    tag_end_ids: np.ndarray
    _tokenizer: object = field(repr=False, default=None)
    _encoded: dict[bytes, tuple[int, ...] | None] = field(repr=False, default_factory=dict)

    @classmethod
    def from_tokenizer(cls, tokenizer, vocab_size: int) -> TokenTable:
        """Token bytes of a ``tokenizers.Tokenizer`` (byte-level BPE exactly; other models by
        decoding each token alone, leaving out tokens that decode to partial characters)."""
        specials = {i for i, tok in tokenizer.get_added_tokens_decoder().items() if tok.special}
        added = {i: tok.content for i, tok in tokenizer.get_added_tokens_decoder().items()}
        byte_level = type(tokenizer.decoder).__name__ == "ByteLevel"
        alphabet = _byte_decoder()
        token_bytes: list[bytes | None] = [None] * vocab_size
        for token, i in tokenizer.get_vocab(with_added_tokens=True).items():
            if i >= vocab_size or i in specials:
                continue
            if i in added:
                data = added[i].encode("utf-8")
            elif byte_level and all(ch in alphabet for ch in token):
                data = bytes(alphabet[ch] for ch in token)
            else:
                text = tokenizer.decode([i], skip_special_tokens=False)
                data = None if "\ufffd" in text else text.encode("utf-8")
            if data:
                token_bytes[i] = data
        return cls.from_bytes(token_bytes, tokenizer=tokenizer)

    @classmethod
    def from_bytes(cls, token_bytes: Sequence[bytes | None], tokenizer=None) -> TokenTable:
        """A table from each token id's bytes (None: never allowed)."""
        groups: dict[bytes, list[int]] = {}
        for i, data in enumerate(token_bytes):
            if data:
                groups.setdefault(data, []).append(i)
        strings = sorted(groups)
        free = [i for i, d in enumerate(token_bytes) if d and b">" not in d]
        tag_end = [i for i, d in enumerate(token_bytes) if d and b">" in d]
        return cls(
            vocab_size=len(token_bytes),
            strings=strings,
            ids=[tuple(groups[s]) for s in strings],
            token_bytes=list(token_bytes),
            free_text_ids=np.asarray(free, dtype=np.int64),
            tag_end_ids=np.asarray(tag_end, dtype=np.int64),
            _tokenizer=tokenizer,
        )

    def encode(self, data: bytes) -> tuple[int, ...] | None:
        """Token ids whose bytes are exactly ``data`` (the tokenizer's own split, falling back
        to the longest known token at each point), or None when there are none."""
        if data in self._encoded:
            return self._encoded[data]
        ids = None
        text = _utf8_or_none(data)
        if self._tokenizer is not None and text is not None:
            found = tuple(self._tokenizer.encode(text, add_special_tokens=False).ids)
            if b"".join(self.token_bytes[i] or b"\0\0" for i in found) == data:
                ids = found
        if ids is None:
            ids = self._greedy_split(data)
        if len(self._encoded) >= _ENCODED_CACHE:  # forced texts differ per request
            self._encoded.clear()
        self._encoded[data] = ids
        return ids

    def _greedy_split(self, data: bytes) -> tuple[int, ...] | None:
        out, at = [], 0
        while at < len(data):
            for end in range(len(data), at, -1):
                i = bisect.bisect_left(self.strings, data[at:end])
                if i < len(self.strings) and self.strings[i] == data[at:end]:
                    out.append(self.ids[i][0])
                    at = end
                    break
            else:
                return None
        return tuple(out)

    def walk(self, grammar: AnswerGrammar, state: State) -> list[int]:
        """Ids of the tokens whose bytes the automaton accepts from ``state`` (depth first over
        the sorted strings: each byte narrows the range of strings sharing the prefix)."""
        out: list[int] = []
        self._walk(grammar, state, b"", 0, len(self.strings), out)
        return out

    def _walk(
        self, grammar: AnswerGrammar, state: State, prefix: bytes, lo: int, hi: int, out: list
    ) -> None:
        strings, depth = self.strings, len(prefix)
        allowed = grammar.allowed_bytes(state)
        if allowed is None:  # free text: the next bytes the strings in range hold
            allowed = self._next_bytes(depth, lo, hi)
        for byte in allowed:
            longer = prefix + bytes((byte,))
            start = bisect.bisect_left(strings, longer, lo, hi)
            stop = hi
            if byte < 255:
                stop = bisect.bisect_left(strings, prefix + bytes((byte + 1,)), start, hi)
            if start == stop:
                continue
            nxt = grammar.step(state, byte)
            if strings[start] == longer:
                out.extend(self.ids[start])
                start += 1
            if start < stop:
                self._walk(grammar, nxt, longer, start, stop, out)

    def _next_bytes(self, depth: int, lo: int, hi: int) -> bytes:
        """The distinct bytes at ``depth`` of ``strings[lo:hi]`` (which share a prefix)."""
        strings, found = self.strings, bytearray()
        at = lo + (lo < hi and len(strings[lo]) == depth)
        while at < hi:
            byte = strings[at][depth]
            found.append(byte)
            if byte == 255:
                break
            at = bisect.bisect_left(strings, strings[at][:depth] + bytes((byte + 1,)), at, hi)
        return bytes(found)


def _utf8_or_none(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


@dataclass(frozen=True)
class TokenMask:
    """The tokens allowed next: ``ids`` is the allowed set, or, when ``allow`` is False, the
    set that is forbidden (free text forbids few tokens of a large vocabulary)."""

    ids: np.ndarray
    allow: bool = True

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """``logits`` ``[vocab]`` with the disallowed tokens at -inf (a new array)."""
        if self.allow:
            out = np.full_like(logits, -np.inf)
            out[self.ids] = logits[self.ids]
        else:
            out = logits.copy()
            out[self.ids] = -np.inf
        return out

    def allows(self, token_id: int) -> bool:
        return bool(np.isin(token_id, self.ids)) == self.allow


# ---------------------------------------------------------------------------------------------
# One request
# ---------------------------------------------------------------------------------------------


class RequestConstraint:
    """The grammar of one request, driven by token ids (the engine's side).

    Args:
        grammar: the request's automaton.
        table: the tokenizer's token table.
        think_budget: reasoning tokens after which the reasoning is closed (None: no limit).
        jump_forward: whether :meth:`forced` returns the text the grammar forces; when False it
            still returns the completion that the token budget forces.
    """

    def __init__(
        self,
        grammar: AnswerGrammar,
        table: TokenTable,
        *,
        think_budget: int | None = None,
        jump_forward: bool = True,
    ) -> None:
        if think_budget is not None and think_budget < 0:
            raise InputError(f"think_budget: must be >= 0 or None, got {think_budget}")
        self.grammar = grammar
        self.table = table
        self.think_budget = think_budget
        self.jump_forward = jump_forward
        self.state: State = grammar.initial
        self.think_tokens = 0
        self.forced_tokens = 0
        #: the token budget narrowed a choice (to close the answer in time): the output may
        #: be shorter than the model would have written
        self.budget_limited = False
        self._masks: dict[State, TokenMask] = {}
        self._closings: dict[State, bytes] = {}
        self._longest: dict[State, int] = {}
        #: (state, remaining, reasoning tokens) of the last call of forced() that forced
        #: nothing: the engine asks again at the start of the next step
        self._unforced: tuple | None = None

    @property
    def done(self) -> bool:
        return self.grammar.is_done(self.state)

    def min_tokens(self) -> int:
        """Tokens of the shortest complete answer, as forced when the budget is short."""
        closing = self._closing(self.grammar.initial)
        ids = self.table.encode(closing)
        return len(closing) if ids is None else len(ids)

    def _closing(self, state: State) -> bytes:
        if state not in self._closings:
            self._closings[state] = self.grammar.closing(state)
        return self._closings[state]

    def snapshot(self) -> tuple:
        """Where the request stands, for :meth:`restore` (drafting tries tokens, then puts
        the constraint back)."""
        return (
            self.state,
            self.think_tokens,
            self.forced_tokens,
            self._unforced,
            self.budget_limited,
        )

    def restore(self, snapshot: tuple) -> None:
        """Go back to a :meth:`snapshot` of this constraint."""
        (
            self.state,
            self.think_tokens,
            self.forced_tokens,
            self._unforced,
            self.budget_limited,
        ) = snapshot

    # -- masks -----------------------------------------------------------------------------

    def mask(self, remaining: int) -> TokenMask:
        """The tokens allowed next when ``remaining`` tokens may still be generated."""
        state = self.state
        mask = self._masks.get(state)
        if mask is None:
            mask = self._state_mask(state)
            self._masks[state] = mask
        if remaining - 1 < self.grammar.max_closing:
            fitted = self._fitting(mask, remaining - 1)
            if fitted.allow != mask.allow or not np.array_equal(fitted.ids, mask.ids):
                self.budget_limited = True
            mask = fitted
        return mask

    def _state_mask(self, state: State) -> TokenMask:
        if not self.grammar.in_think(state):
            ids = np.asarray(sorted(self.table.walk(self.grammar, state)), dtype=np.int64)
            return TokenMask(ids)
        banned = np.ones(self.table.vocab_size, dtype=bool)
        banned[self.table.free_text_ids] = False
        for token_id in self.table.tag_end_ids.tolist():
            banned[token_id] = self._after(state, token_id) is None
        return TokenMask(np.flatnonzero(banned), allow=False)

    def _after(self, state: State, token_id: int) -> State | None:
        data = self.table.token_bytes[token_id]
        return None if data is None else self.grammar.advance(state, data)

    def _fitting(self, mask: TokenMask, budget: int) -> TokenMask:
        """``mask`` narrowed to tokens after which the answer can still be closed within
        ``budget`` tokens (each token holds at least one byte, so bytes bound tokens)."""
        if mask.allow:
            return TokenMask(self._fits(mask.ids, budget))
        # free text: a token without ">" stays in it, so fits when the longest way out does
        allowed_tag_ends = self.table.tag_end_ids[~np.isin(self.table.tag_end_ids, mask.ids)]
        fitting = self._fits(allowed_tag_ends, budget)
        tags = self.grammar.tags
        longest_exit = len(tags.think_close) + len(self._closing(self.grammar.after_think()))
        if budget >= longest_exit:
            unfit = allowed_tag_ends[~np.isin(allowed_tag_ends, fitting)]
            return TokenMask(np.concatenate([mask.ids, unfit]), allow=False)
        return TokenMask(fitting)

    def _fits(self, candidates: np.ndarray, budget: int) -> np.ndarray:
        keep = []
        for token_id in candidates.tolist():
            after = self._after(self.state, token_id)
            if after is not None and len(self._closing(after)) <= budget:
                keep.append(token_id)
        return np.asarray(keep, dtype=np.int64)

    # -- advancing -------------------------------------------------------------------------

    def advance(self, token_id: int) -> None:
        """Take one token; raises InputError when the grammar does not allow it."""
        after = self._after(self.state, token_id)
        if after is None:
            raise InputError(f"token {token_id} is not allowed here by the answer grammar")
        if self.grammar.in_think(self.state):
            self.think_tokens += 1
        self.state = after

    def forced(self, remaining: int) -> list[int]:
        """Tokens that must come next, already taken: the shortest completion when the budget
        (``remaining`` tokens) is down to it, the way out of the reasoning when its budget is
        spent, else the text the grammar forces (with jump-forward), else none."""
        key = (self.state, remaining, self.think_tokens)
        if self.done or key == self._unforced:
            return []
        ids = self._forced(remaining)
        if not ids:
            self._unforced = key
        return ids

    def _forced(self, remaining: int) -> list[int]:
        if remaining <= self.grammar.max_closing + 1:  # no closing is longer than that
            closing = self._closing(self.state)
            if len(closing) >= remaining or self._nothing_fits(remaining):
                self.budget_limited = self.budget_limited or bool(closing)
                return self._take(closing, all_of_it=True)
        if self.think_budget_spent():
            return self._take(self._think_exit(), all_of_it=True)
        if self.jump_forward:
            return self._take(self.grammar.forced(self.state), all_of_it=False)
        return []

    def _nothing_fits(self, remaining: int) -> bool:
        mask = self.mask(remaining)
        return mask.allow and not len(mask.ids)

    def think_budget_spent(self) -> bool:
        return (
            self.think_budget is not None
            and self.grammar.in_think(self.state)
            and self.think_tokens >= self.think_budget
        )

    def _think_exit(self) -> bytes:
        k = self.state[1]
        return self.grammar.tags.think_close.encode()[k:] + self.grammar.tags.answer_open.encode()

    def _take(self, data: bytes, *, all_of_it: bool) -> list[int]:
        """Take the tokens of the longest prefix of ``data`` that ends on a character and
        encodes; unless ``all_of_it``, only those no allowed token could have spanned past."""
        while data and (_utf8_or_none(data) is None or self.table.encode(data) is None):
            data = data[:-1]
        if not data:
            return []
        ids = list(self.table.encode(data))
        if not all_of_it:
            ids = self._unspanned(ids)
        for token_id in ids:
            self.state = self._after(self.state, token_id)
        self.forced_tokens += len(ids)
        return ids

    def _unspanned(self, ids: list[int]) -> list[int]:
        """The longest prefix of forced ``ids`` after which no allowed token starting at one
        of them could have gone on: feeding "<" where the model would write "<answer>" as one
        token, or "|" where it writes "|None", would split the text unlike its training."""
        states = [self.state]
        for token_id in ids[:-1]:
            states.append(self._after(states[-1], token_id))
        longest = [self._longest_token(state) for state in states]
        sizes = [len(self.table.token_bytes[i]) for i in ids]
        for end in range(len(ids), 0, -1):
            span = 0
            for j in range(end - 1, -1, -1):
                span += sizes[j]
                if longest[j] > span:
                    break
            else:
                return ids[:end]
        return []

    def _longest_token(self, state: State) -> int:
        """Bytes of the longest token allowed from ``state``."""
        if state not in self._longest:
            mask = self._masks.get(state) or self._state_mask(state)
            self._masks[state] = mask
            sizes = [len(self.table.token_bytes[i]) for i in mask.ids.tolist()]
            self._longest[state] = max(sizes, default=0) if mask.allow else MAX_FORCED_BYTES
        return self._longest[state]
