"""Greedy generation over a :class:`Backend`: ``prefill``, ``step``, ``generate``.

The engine works on token ids, pixel arrays and host-computed vision indices; it knows nothing
about text, prompts or records (stop strings arrive as a callback over token ids). Batches are
left padded. M-RoPE positions are computed here, on the host: ``rope_index`` for the prompt,
then every row's next position is one more than its last.
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
    """Generated ids per row (stop token included when one stopped it) and timings (s)."""

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


def step(backend: Backend, state: DecodeState, token_ids: np.ndarray) -> np.ndarray:
    """Feed one token per row (``[B]``); return the next logits ``[B, vocab]``."""
    start = time.perf_counter()
    rows = len(token_ids)
    embeds = backend.embed(token_ids.reshape(rows, 1))
    state.attention_mask = np.concatenate(
        [state.attention_mask, np.ones((rows, 1), dtype=np.int64)], axis=1
    )
    positions = np.broadcast_to(state.next_positions.reshape(1, rows, 1), (3, rows, 1))
    logits, state.past = backend.decode(embeds, state.attention_mask, positions, state.past)
    state.next_positions = state.next_positions + 1
    _add_time(state.timings, "decode", start)
    return logits


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
) -> GenerationResult:
    """Greedy decoding until every row hit an eos id, ``stop`` said so, or the token limit."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: must be >= 0, got {max_new_tokens}")
    eos = np.asarray(sorted(set(eos_ids)), dtype=np.int64)
    logits, state = prefill(backend, batch, vision)
    steps = 0
    while steps < max_new_tokens:
        if logits_hook is not None:
            logits = logits_hook(logits, state)
        chosen = np.argmax(logits, axis=-1).astype(np.int64)
        chosen[state.finished] = pad_id
        for row in np.flatnonzero(~state.finished):
            state.tokens[row].append(int(chosen[row]))
            if chosen[row] in eos or (stop is not None and stop(int(row), state.tokens[row])):
                state.finished[row] = True
        steps += 1
        if state.finished.all() or steps == max_new_tokens:
            break
        logits = step(backend, state, chosen)
    return GenerationResult(tokens=state.tokens, timings=dict(state.timings), steps=steps)
