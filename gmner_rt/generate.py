"""Greedy generation over a :class:`Backend`: ``prefill``, ``step``, ``generate``.

The engine works on token ids, pixel arrays and host-computed vision indices; it knows nothing
about text, prompts or records: stop strings arrive as a callback over token ids, a grammar as a
per-row :class:`TokenConstraint` (a token mask, and the tokens it forces, which are fed to the
decoder in one call: jump-forward). Batches are left padded; a step feeds each row its own
number of tokens, left padded within the step. M-RoPE positions are computed here, on the host:
``rope_index`` for the prompt, then every row's next position is one more than its last.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

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
    """Generated ids per row (stop token included when one stopped it), timings (s), and the
    number of steps (each one decoder call, the prefill's included: fewer than the tokens when
    forced tokens were fed together)."""

    tokens: list[list[int]]
    timings: dict[str, float]
    steps: int


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


def step(
    backend: Backend,
    state: DecodeState,
    tokens: np.ndarray | Sequence[Sequence[int]],
    *,
    pad_id: int = 0,
) -> np.ndarray:
    """Feed the next tokens: one per row (``[B]``), or per row a list of any length (empty for
    a finished row), left padded with ``pad_id`` to the longest. Returns the logits after each
    row's last token, ``[B, vocab]``."""
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
    logits, state.past = backend.decode(
        backend.embed(ids),
        state.attention_mask,
        np.broadcast_to(positions[None], (3, rows, width)),
        state.past,
    )
    state.next_positions = state.next_positions + lengths
    _add_time(state.timings, "decode", start)
    return logits


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
) -> GenerationResult:
    """Greedy decoding until every row hit an eos id, ``stop`` said so, its constraint is
    done, or the token limit. ``constraints``: one per row (None: unconstrained)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: must be >= 0, got {max_new_tokens}")
    rows = len(batch.input_ids)
    if constraints is not None and len(constraints) != rows:
        raise ValueError(f"constraints: expected {rows} (one per row), got {len(constraints)}")
    eos = set(eos_ids)
    logits, state = prefill(backend, batch, vision)
    steps = 1
    if max_new_tokens == 0:
        state.finished[:] = True
    while not state.finished.all():
        if logits_hook is not None:
            logits = logits_hook(logits, state)
        chunks: list[list[int]] = [[] for _ in range(rows)]
        start = time.perf_counter()
        for row in np.flatnonzero(~state.finished):
            constraint = constraints[row] if constraints is not None else None
            made = state.tokens[row]
            chunk = _choose(logits[row], constraint, max_new_tokens - len(made))
            chunk = chunk[: max_new_tokens - len(made)]
            made.extend(chunk)
            chunks[row] = chunk
            if (
                len(made) >= max_new_tokens
                or (constraint is not None and constraint.done)
                or (constraint is None and chunk[-1] in eos)
                or (stop is not None and stop(int(row), made))
            ):
                state.finished[row] = True
        _add_time(state.timings, "choose", start)
        if state.finished.all():
            break
        logits = step(backend, state, chunks, pad_id=pad_id)
        steps += 1
    return GenerationResult(tokens=state.tokens, timings=dict(state.timings), steps=steps)
