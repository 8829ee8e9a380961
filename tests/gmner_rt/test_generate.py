"""The generation engine over a scripted backend: stopping, limits, hooks, positions, masks.

The backend's logits make the greedy choice the next token of a per-row script, so every
behaviour of ``prefill`` / ``step`` / ``generate`` is checked without a model.
"""

from __future__ import annotations

import numpy as np
import pytest

from gmner_rt.generate import PromptBatch, VisionSpec, generate, prefill, step

VOCAB = 50
EOS = 49
PAD = 0
IMAGE = 7
VISION = VisionSpec(image_token_id=IMAGE, merge_size=2, window_size=112, patch_size=14)


class ScriptedBackend:
    """Greedy decoding with this backend yields ``scripts[row]``, one token per decoder call."""

    def __init__(self, scripts: list[list[int]]):
        self.scripts = scripts
        self.calls: list[dict] = []

    def encode_images(self, pixel_values, indices):
        return np.ones((len(indices.window_index), 4), dtype=np.float32)

    def embed(self, input_ids):
        return np.zeros((*input_ids.shape, 4), dtype=np.float32)

    def empty_cache(self, batch):
        return [np.zeros((batch, 1, 0, 2), dtype=np.float32)]

    def decode(self, inputs_embeds, attention_mask, position_ids, past):
        rows, length = inputs_embeds.shape[:2]
        total = past[0].shape[2] + length
        assert attention_mask.shape == (rows, total)
        index = len(self.calls)
        self.calls.append(
            {
                "positions": position_ids.copy(),
                "mask": attention_mask.copy(),
                "embeds": inputs_embeds.copy(),
            }
        )
        logits = np.zeros((rows, VOCAB), dtype=np.float32)
        for row in range(rows):
            script = self.scripts[row]
            logits[row, script[index] if index < len(script) else 1] = 1.0
        return logits, [np.zeros((rows, 1, total, 2), dtype=np.float32)]


def _batch(lengths: list[int], grid=(1, 4, 4)) -> PromptBatch:
    """Left-padded prompts, each with one image of ``grid`` (4 image tokens for 4x4)."""
    image_tokens = grid[1] * grid[2] // 4
    width = max(lengths) + image_tokens + 2
    ids = np.full((len(lengths), width), PAD, dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        prompt = [3] + [IMAGE] * image_tokens + [4] + [20 + (i % 3) for i in range(n)]
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    pixels = np.zeros((len(lengths) * grid[0] * grid[1] * grid[2], 1176), dtype=np.float32)
    return PromptBatch(ids, mask, pixels, tuple([grid] * len(lengths)))


def test_each_row_stops_at_its_own_eos_and_finished_rows_get_padding():
    backend = ScriptedBackend([[10, 11, EOS, 12, 13], [20, 21, 22, 23, EOS]])
    result = generate(backend, _batch([3, 5]), VISION, max_new_tokens=10, eos_ids=[EOS], pad_id=PAD)
    assert result.tokens == [[10, 11, EOS], [20, 21, 22, 23, EOS]]
    assert result.steps == 5
    assert len(backend.calls) == 5  # prefill + 4 steps; no call after the last token


def test_max_new_tokens_is_respected():
    backend = ScriptedBackend([[10] * 100])
    result = generate(backend, _batch([2]), VISION, max_new_tokens=6, eos_ids=[EOS], pad_id=PAD)
    assert result.tokens == [[10] * 6]
    assert len(backend.calls) == 6
    assert generate(
        ScriptedBackend([[10]]), _batch([2]), VISION, max_new_tokens=0, eos_ids=[EOS], pad_id=PAD
    ).tokens == [[]]
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(backend, _batch([2]), VISION, max_new_tokens=-1, eos_ids=[EOS], pad_id=PAD)


def test_stop_callback_ends_a_row():
    backend = ScriptedBackend([[10, 11, 12, 13, 14]])
    result = generate(
        backend,
        _batch([2]),
        VISION,
        max_new_tokens=10,
        eos_ids=[EOS],
        pad_id=PAD,
        stop=lambda row, tokens: tokens[-2:] == [11, 12],
    )
    assert result.tokens == [[10, 11, 12]]


def test_logits_hook_sees_every_step_and_can_veto_a_token():
    seen = []

    def hook(logits, state):
        seen.append(len(state.tokens[0]))
        logits = logits.copy()
        logits[:, 11] = -np.inf  # veto 11: the runner-up (token 0, zero logit) wins instead
        return logits

    backend = ScriptedBackend([[10, 11, EOS]])
    result = generate(
        backend, _batch([2]), VISION, max_new_tokens=3, eos_ids=[EOS], pad_id=PAD, logits_hook=hook
    )
    assert seen == [0, 1, 2]
    assert result.tokens == [[10, 0, EOS]]


def test_decode_positions_continue_from_each_rows_prompt():
    backend = ScriptedBackend([[10, 11, 12], [20, 21, 22]])
    batch = _batch([2, 6])
    generate(backend, batch, VISION, max_new_tokens=3, eos_ids=[EOS], pad_id=PAD)
    prompt_positions = backend.calls[0]["positions"]
    assert prompt_positions.shape == (3, 2, batch.input_ids.shape[1])
    # image of 4x4 patches = 2x2 merged tokens: text after it restarts at start + max(2, 2)
    last = prompt_positions.max(axis=(0, 2))
    for offset, call in enumerate(backend.calls[1:], start=1):
        assert call["positions"].shape == (3, 2, 1)
        assert (call["positions"][:, :, 0] == last + offset).all()


def test_attention_mask_grows_by_one_real_token_per_step():
    backend = ScriptedBackend([[10, 11, 12], [20, 21, 22]])
    batch = _batch([1, 4])
    generate(backend, batch, VISION, max_new_tokens=3, eos_ids=[EOS], pad_id=PAD)
    for index, call in enumerate(backend.calls):
        assert call["mask"].shape[1] == batch.input_ids.shape[1] + index
        assert (call["mask"][:, batch.input_ids.shape[1] :] == 1).all()
        assert (call["mask"][:, : batch.input_ids.shape[1]] == batch.attention_mask).all()


def test_image_embeddings_replace_the_image_pad_positions():
    backend = ScriptedBackend([[EOS]])
    batch = _batch([2])
    prefill(backend, batch, VISION)
    embeds = backend.calls[0]["embeds"]
    image_rows = batch.input_ids == IMAGE
    assert (embeds[image_rows] == 1).all() and (embeds[~image_rows] == 0).all()


def test_step_feeds_one_token_per_row():
    backend = ScriptedBackend([[10, 11], [20, 21]])
    logits, state = prefill(backend, _batch([2, 2]), VISION)
    assert logits.shape == (2, VOCAB)
    step(backend, state, np.array([10, 20]))
    assert backend.calls[1]["embeds"].shape == (2, 1, 4)
    assert state.timings["prefill"] >= 0 and state.timings["decode"] >= 0
