"""Speculative decoding over a model-free backend: same tokens as plain decoding, masking of
rejected drafts, grammar-checked drafts, and the drafter's lookup and adaptive length.

:class:`CopyLM` computes each position's logits from the tokens it can see (cache entries
whose attention mask is 1, and earlier tokens of the same call) and from the position id, with
a bias towards copying (the token that followed the latest earlier occurrence of the last
token): drafts are often right and sometimes wrong, and a rejected position that leaked into a
later call, or a position not rolled back, changes the logits and so the tokens.
"""

from __future__ import annotations

import numpy as np
import pytest

from gmner_rt.generate import PromptBatch, VisionSpec, generate
from gmner_rt.speculate import Drafter, SpeculationSettings

VOCAB = 40
EOS = 39
PAD = 0
IMAGE = 7
VISION = VisionSpec(image_token_id=IMAGE, merge_size=2, window_size=112, patch_size=14)
SPEC = SpeculationSettings()


class CopyLM:
    """A deterministic toy language model whose cache holds (token, position) pairs."""

    verifies_drafts = True

    def __init__(self, seed: int, copy_bias: float = 3.0):
        self.seed, self.copy_bias = seed, copy_bias
        self.calls: list[dict] = []

    def encode_images(self, pixel_values, indices):
        return np.full((len(indices.window_index), 1), -1.0, dtype=np.float32)

    def embed(self, input_ids):
        return input_ids[..., None].astype(np.float32)

    def empty_cache(self, batch):
        return [np.zeros((batch, 1, 0, 2), dtype=np.float32)]

    def decode(self, inputs_embeds, attention_mask, position_ids, past):
        logits, present = self.decode_last(inputs_embeds, attention_mask, position_ids, past, 1)
        return logits[:, -1], present

    def decode_last(self, inputs_embeds, attention_mask, position_ids, past, last):
        rows, length = inputs_embeds.shape[:2]
        new = np.stack([inputs_embeds[..., 0], position_ids[0].astype(np.float32)], axis=-1)
        cache = np.concatenate([past[0], new[:, None]], axis=2)  # [B, 1, P+T, 2]
        total = cache.shape[2]
        assert attention_mask.shape == (rows, total)
        self.calls.append({"mask": attention_mask.copy(), "tokens": new[..., 0].copy()})
        logits = np.zeros((rows, last, VOCAB), dtype=np.float32)
        for row in range(rows):
            for k in range(last):
                query = total - last + k
                seen = [
                    int(cache[row, 0, j, 0])
                    for j in range(query + 1)
                    if attention_mask[row, j] and cache[row, 0, j, 0] >= 0
                ]
                logits[row, k] = self._logits(seen, int(cache[row, 0, query, 1]))
        return logits, [cache]

    def _logits(self, seen: list[int], position: int) -> np.ndarray:
        key = hash((self.seed, position, *seen[-3:], len(seen))) % 2**32
        out = np.random.default_rng(key).normal(size=VOCAB).astype(np.float32)
        last = seen[-1]
        for j in range(len(seen) - 2, -1, -1):
            if seen[j] == last:
                out[seen[j + 1]] += self.copy_bias
                break
        return out


class PlainLM(CopyLM):
    """The same model with a decoder that returns the last position only (format 1)."""

    verifies_drafts = False


class NoSevens:
    """A small draftable grammar: multiples of 7 are masked; after 10 come 11, 12 (forced);
    the request is done after ``length`` tokens."""

    def __init__(self, length: int):
        self.length, self.taken, self.queue = length, 0, []

    @property
    def done(self) -> bool:
        return self.taken >= self.length

    def mask(self, remaining):
        return _Mask()

    def advance(self, token_id):
        assert token_id % 7, f"masked token {token_id} taken"
        self.taken += 1
        if token_id == 10:
            self.queue = [11, 12]

    def forced(self, remaining):
        out, self.queue = self.queue[: self.length - self.taken], []
        self.taken += len(out)
        return out

    def snapshot(self):
        return (self.taken, list(self.queue))

    def restore(self, snapshot):
        self.taken, self.queue = snapshot[0], list(snapshot[1])


class _Mask:
    def apply(self, logits):
        out = logits.copy()
        out[::7] = -np.inf
        return out

    def allows(self, token_id):
        return token_id % 7 != 0


def _batch(lengths: list[int], seed: int = 0) -> PromptBatch:
    """Left-padded prompts with one 4-token image and a repetitive text (something to copy)."""
    rng = np.random.default_rng(seed)
    width = max(lengths) + 6
    ids = np.full((len(lengths), width), PAD, dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        words = rng.integers(8, 30, size=4)
        prompt = [3] + [IMAGE] * 4 + [4] + [int(words[i % 4]) for i in range(n)]
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    pixels = np.zeros((len(lengths) * 16, 1176), dtype=np.float32)
    return PromptBatch(ids, mask, pixels, tuple([(1, 4, 4)] * len(lengths)))


def _both(backend_cls, batch, seed, **kwargs):
    plain = generate(backend_cls(seed), batch, VISION, eos_ids=[EOS], pad_id=PAD, **kwargs)
    spec_backend = backend_cls(seed)
    fast = generate(
        spec_backend, batch, VISION, eos_ids=[EOS], pad_id=PAD, speculation=SPEC, **kwargs
    )
    return plain, fast, spec_backend


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("lengths", [[9], [12, 5, 9]])
def test_speculation_gives_the_tokens_of_plain_decoding(seed, lengths):
    plain, fast, _ = _both(CopyLM, _batch(lengths, seed), seed, max_new_tokens=40)
    assert fast.tokens == plain.tokens
    assert fast.drafted > 0
    assert 0 < fast.accepted < fast.drafted  # some drafts right, some wrong: both paths ran
    assert fast.steps < plain.steps


@pytest.mark.parametrize("seed", range(4))
def test_speculation_under_a_grammar_gives_the_same_tokens_and_never_drafts_a_masked_one(seed):
    batch = _batch([10, 7], seed)

    def run(speculation):
        backend = CopyLM(seed)
        result = generate(
            backend,
            batch,
            VISION,
            max_new_tokens=30,
            eos_ids=[EOS],
            pad_id=PAD,
            constraints=[NoSevens(25), NoSevens(18)],
            speculation=speculation,
        )
        return result, backend

    (plain, _), (fast, backend) = run(None), run(SPEC)
    assert fast.tokens == plain.tokens
    assert [len(t) for t in fast.tokens] == [25, 18]
    fed = {int(t) for call in backend.calls[1:] for t in call["tokens"].ravel()}
    assert not {t for t in fed if t % 7 == 0} - {PAD}, "a masked token was fed"
    assert fast.accepted > 0


def test_stop_callback_and_eos_end_rows_as_without_speculation():
    def stop(row, tokens):
        return row == 1 and len(tokens) >= 7

    for seed in range(4):
        batch = _batch([8, 8, 11], seed)
        plain, fast, _ = _both(CopyLM, batch, seed, max_new_tokens=60, stop=stop)
        assert fast.tokens == plain.tokens
        assert len(fast.tokens[1]) == len(plain.tokens[1]) <= 7 + 2


def test_rejected_drafts_are_masked_out_of_later_calls():
    backend = CopyLM(3)
    generate(
        backend, _batch([12], 3), VISION, max_new_tokens=40, eos_ids=[EOS], pad_id=PAD,
        speculation=SPEC,
    )  # fmt: skip
    masks = [call["mask"][0] for call in backend.calls]
    # a call feeding n tokens grows the mask by n; a later call hides the rejected ones
    rejected = 0
    for before, after in zip(masks, masks[1:], strict=False):
        shared = after[: len(before)]
        assert not (shared > before).any(), "a masked position came back"
        rejected += int((before - shared).sum())
    assert rejected > 0


def test_a_decoder_without_multi_position_logits_decodes_plainly():
    batch = _batch([9, 6], 1)
    plain, fast, _ = _both(PlainLM, batch, 1, max_new_tokens=30)
    assert fast.tokens == plain.tokens
    assert fast.steps == plain.steps and fast.drafted == 0


def test_a_logits_hook_turns_speculation_off():
    def hook(logits, _state):
        return logits

    plain, fast, _ = _both(CopyLM, _batch([9], 2), 2, max_new_tokens=30, logits_hook=hook)
    assert fast.tokens == plain.tokens and fast.drafted == 0


# -- the drafter ---------------------------------------------------------------------------


def test_drafter_continues_the_latest_earlier_occurrence_of_the_longest_suffix():
    drafter = Drafter([1, 2, 3, 4, 9, 2, 3, 5, 6, 7], SpeculationSettings(initial_draft=3))
    drafter.extend([1, 2, 3])  # suffix 1 2 3 occurred at the start (then 4 9 2)
    assert drafter.propose() == [4, 9, 2]
    drafter.extend([8, 2, 3])  # 8 2 3 is new; 2 3 last occurred in "1 2 3" just before
    assert drafter.propose() == [8, 2, 3]
    assert Drafter([5, 6], SpeculationSettings()).propose() == []  # 6 never seen before


def test_draft_length_grows_on_success_shrinks_on_failure_and_pauses_after_misses():
    settings = SpeculationSettings(initial_draft=4, max_draft=8, max_cooldown=4)
    drafter = Drafter([1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2], settings)
    assert len(drafter.propose()) == 4
    drafter.record(4, 4)
    drafter.record(6, 6)
    assert drafter.length == 8
    drafter.record(8, 8)
    assert drafter.length == 8  # capped
    drafter.record(8, 2)
    assert drafter.length == 3
    pauses = []
    for _ in range(4):
        drafter.record(1, 0)
        skipped = 0
        while not drafter.propose():
            skipped += 1
        pauses.append(skipped)
    assert pauses == [1, 2, 4, 4]  # doubling, capped at max_cooldown
    drafter.record(1, 1)
    assert drafter.propose()  # a success resets the pause


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_draft": 0}, "speculation.max_draft: expected an integer >= 1, got 0"),
        ({"max_draft": 16}, "speculation.max_draft: at most 15"),
        ({"min_ngram": 4}, "speculation.min_ngram: must be <= max_ngram (3), got 4"),
        ({"initial_draft": 9}, "speculation.initial_draft: must be <= max_draft (8), got 9"),
        ({"max_cooldown": -1}, "speculation.max_cooldown: expected an integer >= 0, got -1"),
    ],
)
def test_settings_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SpeculationSettings(**kwargs)
