"""Greedy generation over a :class:`Backend`: ``prefill``, ``step``, ``generate``.

The engine works on token ids, pixel arrays and host-computed vision indices; it knows nothing
about text, prompts or records: stop strings arrive as a callback over token ids, a grammar as a
per-row :class:`TokenConstraint` (a token mask, and the tokens it forces, which are fed to the
decoder in one call: jump-forward). Batches are left padded; a step feeds each row its own
number of tokens, left padded within the step. M-RoPE positions are computed here, on the host:
``rope_index`` for the prompt, then every row's next position is one more than its last.

Speculation (``speculation=``, a backend whose decoder returns several positions' logits):
each call feeds a row's committed tokens plus a draft (:mod:`gmner_rt.speculate`), each drafted
token first checked against the row's grammar (never one it masks; the draft stops where the
grammar forces tokens or ends); the choice at every verified position is made exactly as
without speculation, and the draft is kept up to the first token that differs from it, so the
tokens are the same. Rejected positions stay in the KV cache but are masked out of every later
call (``attention_mask`` 0, positions rolled back): cropping would copy the device-resident
cache, and in a batch each row keeps a different number of tokens of one rectangular cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .speculate import Drafter, SpeculationSettings
from .vision import VisionIndices, rope_index, vision_indices

__all__ = [
    "Backend",
    "DecodeState",
    "TokenConstraint",
    "GenerationResult",
    "PromptBatch",
    "VisionSpec",
    "generate",
    "prefill",
    "step",
    "step_logits",
    "discard",
]

#: ``hook(logits [B, vocab] float32, state) -> logits``: masks tokens (constrained decoding).
LogitsHook = Callable[[np.ndarray, "DecodeState"], np.ndarray]
#: ``stop(row, token_ids_so_far) -> bool``: a row is done (stop strings, grammar end).
StopCheck = Callable[[int, Sequence[int]], bool]


class Backend(Protocol):
    """What the engine needs from an inference backend (see ``backends/``)."""

    def encode_images(self, pixel_values: np.ndarray, indices: VisionIndices) -> np.ndarray: ...

    def embed(self, input_ids: np.ndarray) -> np.ndarray: ...

    def empty_cache(self, batch: int) -> list: ...

    def decode(
        self,
        inputs_embeds: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: list,
    ) -> tuple[np.ndarray, list]: ...


class TokenConstraint(Protocol):
    """A grammar over one row's token ids (see :class:`gmner_rt.constraints.RequestConstraint`).

    ``remaining`` is how many tokens the row may still generate; a constraint that must end
    within it forces its completion in time.
    """

    @property
    def done(self) -> bool: ...

    def mask(self, remaining: int): ...  # has ``apply(logits [vocab]) -> logits``

    def advance(self, token_id: int) -> None: ...

    def forced(self, remaining: int) -> list[int]: ...  # already taken by the constraint


class DraftableConstraint(TokenConstraint, Protocol):
    """A constraint that drafting can try tokens on and then put back as it was."""

    def snapshot(self) -> object: ...

    def restore(self, snapshot: object) -> None: ...


@dataclass(frozen=True)
class VisionSpec:
    """The vision tower's shape facts the host needs for its indices."""

    image_token_id: int
    merge_size: int
    window_size: int
    patch_size: int


@dataclass(frozen=True)
class PromptBatch:
    """Left-padded prompts with their images, packed in row order.

    Attributes:
        input_ids: ``[B, T]`` int64, image-pad tokens expanded, left padded.
        attention_mask: ``[B, T]`` int64, 1 for real tokens.
        pixel_values: ``[patches, C*T*p*p]`` float32 of every image, in row order.
        grids: ``(t, h, w)`` patch grid of each image, in row order.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    pixel_values: np.ndarray
    grids: tuple[tuple[int, int, int], ...]


@dataclass
class DecodeState:
    """Everything a decode step needs; one per batch, mutated by :func:`step`."""

    past: list
    attention_mask: np.ndarray  # [B, P] over the cache
    next_positions: np.ndarray  # [B] M-RoPE position of each row's next token
    tokens: list[list[int]]  # generated ids per row
    finished: np.ndarray  # [B] bool
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class GenerationResult:
    """Generated ids per row (stop token included when one stopped it), timings (s), the
    number of steps (each one decoder call, the prefill's included: fewer than the tokens when
    forced tokens were fed together or drafts accepted), and the tokens drafted and accepted
    by speculation (0 without)."""

    tokens: list[list[int]]
    timings: dict[str, float]
    steps: int
    drafted: int = 0
    accepted: int = 0


def _add_time(timings: dict[str, float], key: str, start: float) -> None:
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


def prefill(
    backend: Backend, batch: PromptBatch, vision: VisionSpec
) -> tuple[np.ndarray, DecodeState]:
    """Run vision and the prompt through the decoder: ``(logits [B, vocab], state)``."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    # first, so that image tokens that do not match the grids fail with a clear InputError
    positions, _ = rope_index(
        batch.input_ids,
        batch.attention_mask,
        batch.grids,
        image_token_id=vision.image_token_id,
        merge_size=vision.merge_size,
    )
    embeds = backend.embed(batch.input_ids)
    if batch.grids:
        indices = vision_indices(
            batch.grids,
            merge_size=vision.merge_size,
            window_size=vision.window_size,
            patch_size=vision.patch_size,
        )
        image_embeds = backend.encode_images(batch.pixel_values, indices)
        embeds[batch.input_ids == vision.image_token_id] = image_embeds.astype(embeds.dtype)
    _add_time(timings, "vision", start)
    start = time.perf_counter()
    logits, past = backend.decode(
        embeds, batch.attention_mask, positions, backend.empty_cache(len(batch.input_ids))
    )
    _add_time(timings, "prefill", start)
    rows = len(batch.input_ids)
    state = DecodeState(
        past=past,
        attention_mask=batch.attention_mask.astype(np.int64),
        next_positions=positions.max(axis=(0, 2)) + 1,
        tokens=[[] for _ in range(rows)],
        finished=np.zeros(rows, dtype=bool),
        timings=timings,
    )
    return logits, state


def step_logits(
    backend: Backend,
    state: DecodeState,
    tokens: np.ndarray | Sequence[Sequence[int]],
    *,
    pad_id: int = 0,
    last: int = 1,
) -> np.ndarray:
    """Feed the next tokens: one per row (``[B]``), or per row a list of any length (empty for
    a finished row), left padded with ``pad_id`` to the longest. Returns the logits after each
    of the last ``last`` positions, ``[B, last, vocab]`` (rows end together: a row of n tokens
    has its own in the last n); ``last > 1`` needs a backend with ``decode_last``."""
    start = time.perf_counter()
    if isinstance(tokens, np.ndarray):
        chunks = [[int(t)] for t in tokens.reshape(-1)]
    else:
        chunks = [list(chunk) for chunk in tokens]
    rows = len(chunks)
    width = max(1, *(len(chunk) for chunk in chunks))
    ids = np.full((rows, width), pad_id, dtype=np.int64)
    mask = np.zeros((rows, width), dtype=np.int64)
    for row, chunk in enumerate(chunks):
        ids[row, width - len(chunk) :] = chunk
        mask[row, width - len(chunk) :] = 1
    lengths = mask.sum(axis=1)
    # real tokens continue each row's positions; the padding before them is masked out
    positions = (
        state.next_positions[:, None] + np.arange(width)[None, :] - (width - lengths)[:, None]
    )
    positions = np.maximum(positions, 0)
    state.attention_mask = np.concatenate([state.attention_mask, mask], axis=1)
    args = (
        backend.embed(ids),
        state.attention_mask,
        np.broadcast_to(positions[None], (3, rows, width)),
        state.past,
    )
    if last == 1:
        logits, state.past = backend.decode(*args)
        logits = logits[:, None, :]
    else:
        logits, state.past = backend.decode_last(*args, last)  # type: ignore[attr-defined]
    state.next_positions = state.next_positions + lengths
    _add_time(state.timings, "decode", start)
    return logits


def step(
    backend: Backend,
    state: DecodeState,
    tokens: np.ndarray | Sequence[Sequence[int]],
    *,
    pad_id: int = 0,
) -> np.ndarray:
    """:func:`step_logits` of the last position only: ``[B, vocab]``."""
    return step_logits(backend, state, tokens, pad_id=pad_id)[:, -1, :]


def discard(state: DecodeState, counts: Sequence[int]) -> None:
    """Take back each row's last ``counts[row]`` fed tokens (rejected drafts): their cache
    entries are masked out of every later call and the row's positions continue as if they
    had never been fed."""
    for row, count in enumerate(counts):
        if count:
            state.attention_mask[row, -count:] = 0
            state.next_positions[row] -= count


def _choose(logits: np.ndarray, constraint: TokenConstraint | None, remaining: int) -> list[int]:
    """One row's next tokens: the forced ones, else the greedy choice and what it forces."""
    if constraint is None:
        return [int(np.argmax(logits))]
    forced = constraint.forced(remaining)
    if forced:
        return forced
    chosen = int(np.argmax(constraint.mask(remaining).apply(logits)))
    constraint.advance(chosen)
    return [chosen, *constraint.forced(remaining - 1)]


class _Rows:
    """The choice and the stopping rules of every row, shared by plain and speculative
    decoding so that both make the same choices."""

    def __init__(self, state, constraints, eos_ids, stop, max_new_tokens):
        self.state, self.constraints = state, constraints
        self.eos, self.stop, self.limit = set(eos_ids), stop, max_new_tokens

    def constraint(self, row: int) -> TokenConstraint | None:
        return self.constraints[row] if self.constraints is not None else None

    def remaining(self, row: int) -> int:
        return self.limit - len(self.state.tokens[row])

    def commit(self, row: int, logits: np.ndarray) -> list[int]:
        """Choose the row's next tokens from ``logits [vocab]``, take them, and finish the
        row when a stopping rule says so. Returns the tokens (to be fed, unless finished)."""
        constraint, made = self.constraint(row), self.state.tokens[row]
        chunk = _choose(logits, constraint, self.remaining(row))[: self.remaining(row)]
        made.extend(chunk)
        if (
            len(made) >= self.limit
            or (constraint is not None and constraint.done)
            or (constraint is None and chunk[-1] in self.eos)
            or (self.stop is not None and self.stop(int(row), made))
        ):
            self.state.finished[row] = True
        return chunk

    def draft(self, row: int, proposal: Sequence[int]) -> list[int]:
        """The longest prefix of ``proposal`` the row's grammar allows token by token, cut
        where the grammar forces tokens or ends (the constraint is left as it was)."""
        proposal = list(proposal[: self.remaining(row)])
        constraint = self.constraint(row)
        if constraint is None:
            for i, token in enumerate(proposal):
                if token in self.eos:
                    return proposal[: i + 1]
            return proposal
        saved = constraint.snapshot()  # type: ignore[attr-defined]
        out: list[int] = []
        try:
            for token in proposal:
                remaining = self.remaining(row) - len(out)
                if constraint.done or constraint.forced(remaining):
                    break
                if not constraint.mask(remaining).allows(token):
                    break
                constraint.advance(token)
                out.append(token)
        finally:
            constraint.restore(saved)  # type: ignore[attr-defined]
        return out


def _can_speculate(backend, constraints, logits_hook, speculation) -> bool:
    if speculation is None or logits_hook is not None:
        return False  # a hook sees one [B, vocab] array per step: not per verified position
    if not getattr(backend, "verifies_drafts", False):
        return False
    return constraints is None or all(
        c is None or (hasattr(c, "snapshot") and hasattr(c, "restore")) for c in constraints
    )


def generate(
    backend: Backend,
    batch: PromptBatch,
    vision: VisionSpec,
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    stop: StopCheck | None = None,
    logits_hook: LogitsHook | None = None,
    constraints: Sequence[TokenConstraint | None] | None = None,
    speculation: SpeculationSettings | None = None,
) -> GenerationResult:
    """Greedy decoding until every row hit an eos id, ``stop`` said so, its constraint is
    done, or the token limit. ``constraints``: one per row (None: unconstrained).
    ``speculation``: draft and verify (same tokens, fewer decoder calls) where the backend
    can verify (``verifies_drafts``), no ``logits_hook`` is given and every constraint is a
    :class:`DraftableConstraint`; else ignored."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: must be >= 0, got {max_new_tokens}")
    rows = len(batch.input_ids)
    if constraints is not None and len(constraints) != rows:
        raise ValueError(f"constraints: expected {rows} (one per row), got {len(constraints)}")
    logits, state = prefill(backend, batch, vision)
    rules = _Rows(state, constraints, eos_ids, stop, max_new_tokens)
    if max_new_tokens == 0:
        state.finished[:] = True
    if _can_speculate(backend, constraints, logits_hook, speculation):
        return _speculate(backend, batch, vision, logits, rules, speculation, pad_id)
    steps = 1
    while not state.finished.all():
        if logits_hook is not None:
            logits = logits_hook(logits, state)
        chunks: list[list[int]] = [[] for _ in range(rows)]
        start = time.perf_counter()
        for row in np.flatnonzero(~state.finished):
            chunks[row] = rules.commit(row, logits[row])
        _add_time(state.timings, "choose", start)
        if state.finished.all():
            break
        logits = step(backend, state, chunks, pad_id=pad_id)
        steps += 1
    return GenerationResult(tokens=state.tokens, timings=dict(state.timings), steps=steps)


def _speculate(backend, batch, vision, logits, rules: _Rows, settings, pad_id):
    """The decode loop with prompt-lookup drafts: each call feeds a row's committed tokens
    (``pending``, not yet fed) and its draft, then commits the choice at every verified
    position as the plain loop would, up to the first that differs from the draft."""
    state = rules.state
    rows = len(state.tokens)
    start = time.perf_counter()
    drafters = []
    for row in range(rows):
        prompt = batch.input_ids[row][batch.attention_mask[row] != 0]
        drafters.append(Drafter(prompt[prompt != vision.image_token_id].tolist(), settings))
    pending: list[list[int]] = [[] for _ in range(rows)]
    for row in np.flatnonzero(~state.finished):
        pending[row] = rules.commit(row, logits[row])
    steps, drafted, accepted = 1, 0, 0
    _add_time(state.timings, "choose", start)
    while not state.finished.all():
        start = time.perf_counter()
        drafts: list[list[int]] = [[] for _ in range(rows)]
        for row in np.flatnonzero(~state.finished):
            drafter = drafters[row]
            drafter.extend(state.tokens[row][len(drafter.tokens) - drafter.context :])
            drafts[row] = rules.draft(row, drafter.propose())
        feeds = [pending[row] + drafts[row] for row in range(rows)]
        last = 1 + max(len(d) for d in drafts)
        _add_time(state.timings, "draft", start)
        logits = step_logits(backend, state, feeds, pad_id=pad_id, last=last)
        steps += 1
        start = time.perf_counter()
        rejected = [0] * rows
        for row in np.flatnonzero(~state.finished):
            draft = drafts[row]
            verified = logits[row, last - len(draft) - 1 :]  # after pending, then each draft
            kept, pending[row] = _verify(rules, row, draft, verified)
            rejected[row] = len(draft) - kept
            drafters[row].record(len(draft), kept)
            drafted, accepted = drafted + len(draft), accepted + kept
        discard(state, rejected)
        _add_time(state.timings, "choose", start)
    return GenerationResult(
        tokens=state.tokens,
        timings=dict(state.timings),
        steps=steps,
        drafted=drafted,
        accepted=accepted,
    )


def _verify(rules: _Rows, row: int, draft: list[int], verified: np.ndarray):
    """Commit the row's choices at the verified positions (``verified [len(draft)+1, vocab]``)
    while they equal the draft: ``(drafted tokens kept, committed tokens not yet fed)``."""
    for i, token in enumerate(draft):
        chunk = rules.commit(row, verified[i])
        if chunk[0] != token:
            return i, chunk
        if rules.state.finished[row] or len(chunk) > 1:
            return i + 1, chunk[1:]
    return len(draft), rules.commit(row, verified[len(draft)])
