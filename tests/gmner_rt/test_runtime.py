"""gmner_rt.load / extract: token ids equal HF greedy, prompts equal training's, errors.

The bundles come from the session fixtures (tests/conftest.py): the tiny random model with a
trained LoRA adapter (exported, parity-checked) and, here, the tiny base model alone, whose
random weights generate long token sequences (a stronger parity check than an answer that
closes after three tokens).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import gmner_rt
from gmner_rt.errors import BundleError, InputError
from gmner_rt.extractor import find_spans

PAIR_SIZES = [
    (224, 160),
    (56, 56),
    (300, 100),
    (90, 260),
    (500, 40),
    (28, 28),
    (640, 480),
    (133, 77),
    (1000, 60),
    (200, 200),
]
PAIR_TEXTS = [
    "Alice Smith visits the Louvre in Paris",
    "RT @bob : Manchester United beat Chelsea",
    "Nothing to see here",
    "NASA and SpaceX launch from Florida",
    "Tokyo",
    "café in São Paulo 東京 😀",
    "Fox &amp; Friends host { braces } and {instruction} slots",
    "Kevin Durant &amp; Stephen Curry lead the Warriors",
    "Breaking : quake near Los Angeles , California",
    "Happy birthday Queen Elizabeth !",
]


def _image(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _hf_generate(model, processor, pairs, max_new_tokens, think=True) -> list[list[int]]:
    """HF greedy ids for (image, text) pairs, prompts built by the training code."""
    import torch
    from gmner.train.dataset import prompt_messages

    texts = [
        processor.apply_chat_template(
            prompt_messages({"text": text}, image, think),
            tokenize=False,
            add_generation_prompt=True,
        )
        for image, text in pairs
    ]
    processor.tokenizer.padding_side = "left"
    enc = processor(text=texts, images=[im for im, _ in pairs], return_tensors="pt", padding=True)
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            stop_strings=["</answer>"],
            tokenizer=processor.tokenizer,
            eos_token_id=eos,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
    return out[:, enc["input_ids"].shape[1] :].tolist()


def _same_greedy(ours: tuple[int, ...], theirs: list[int], pad: int, limit: int) -> bool:
    """HF pads a row that stopped early; ours stops. The ids must agree up to our stop."""
    n = len(ours)
    return list(ours) == theirs[:n] and (n == limit or all(t == pad for t in theirs[n:]))


@pytest.mark.parametrize("which", ["base", "adapter"])
def test_extract_ids_equal_hf_greedy_batch_1_and_3(which, base_bundle, tiny_bundle, tiny, adapter):
    from gmner.export.merge import load_merged

    bundle = base_bundle if which == "base" else tiny_bundle
    model, processor, _ = load_merged(tiny, None if which == "base" else adapter)
    extractor = gmner_rt.load(bundle)
    pad = extractor.bundle.manifest.tokens.pad_id
    pairs = [
        (_image(size, i), text)
        for i, (size, text) in enumerate(zip(PAIR_SIZES, PAIR_TEXTS, strict=True))
    ]
    limit = 24
    single = [
        extractor.extract(im, text, max_new_tokens=limit, constrained=False) for im, text in pairs
    ]
    reference = [_hf_generate(model, processor, [pair], limit)[0] for pair in pairs]
    for ours, theirs in zip(single, reference, strict=True):
        assert _same_greedy(ours.token_ids, theirs, pad, limit), (ours.token_ids, theirs)
    batch = pairs[:3]
    ours = extractor.extract_batch(batch, max_new_tokens=limit, constrained=False)
    theirs = _hf_generate(model, processor, batch, limit)
    for o, t in zip(ours, theirs, strict=True):
        assert _same_greedy(o.token_ids, t, pad, limit), (o.token_ids, t)
    # batching does not change a row's result
    assert [o.token_ids for o in ours] == [s.token_ids for s in single[:3]]
    if which == "base":
        assert sum(len(s.token_ids) for s in single) > 100  # long random outputs compared


@pytest.mark.parametrize("think", [True, False])
def test_prompt_ids_equal_the_training_prompt(tiny_bundle, adapter, tiny, think):
    from gmner.export.merge import load_merged
    from gmner.train.dataset import encode_prompt

    _, processor, _ = load_merged(tiny, adapter)
    extractor = gmner_rt.load(tiny_bundle)
    for i, text in enumerate(PAIR_TEXTS):
        image = _image(PAIR_SIZES[i], i)
        expected = encode_prompt(processor, {"text": text}, image, think)
        grid = tuple(int(v) for v in expected["image_grid_thw"][0])
        assert extractor.prompt_ids(text, grid, think=think) == expected["input_ids"][0].tolist()


@pytest.mark.parametrize("think", [True, False])
def test_plain_text_tweets_keep_the_one_piece_ids(tiny_bundle, adapter, tiny, think):
    """The tweet spliced in as plain text gives, for text without control tokens, the ids the
    processor gives the whole prompt in one piece (what the model was trained on before)."""
    from gmner.export.merge import load_merged
    from gmner.train.dataset import prompt_messages

    _, processor, _ = load_merged(tiny, adapter)
    extractor = gmner_rt.load(tiny_bundle)
    texts = [*PAIR_TEXTS, " leading space", "trailing space ", "tabs\tand\nnewlines\n", "!?"]
    for i, text in enumerate(texts):
        image = _image(PAIR_SIZES[i % len(PAIR_SIZES)], i)
        rendered = processor.apply_chat_template(
            prompt_messages({"text": text}, image, think),
            tokenize=False,
            add_generation_prompt=True,
        )
        whole = processor(text=[rendered], images=[image], return_tensors="np")
        grid = tuple(int(v) for v in whole["image_grid_thw"][0])
        assert extractor.prompt_ids(text, grid, think=think) == whole["input_ids"][0].tolist(), text


def test_control_tokens_typed_in_a_tweet_stay_text(tiny_bundle, adapter, tiny):
    """Every added token of the tokenizer in one tweet: the prompt holds each control id as
    often as with a plain tweet, runtime and training agree, and extraction runs."""
    from gmner.export.merge import load_merged
    from gmner.train.dataset import encode_prompt

    _, processor, _ = load_merged(tiny, adapter)
    extractor = gmner_rt.load(tiny_bundle)
    added = [t.content for t in extractor.tokenizer.get_added_tokens_decoder().values()]
    assert {"<|im_end|>", "<|image_pad|>", "<|im_start|>"} <= set(added)
    text = "Alice " + " ".join(added) + " Paris"
    image = _image((224, 160), 0)
    trained = encode_prompt(processor, {"text": text}, image, True)["input_ids"][0].tolist()
    grid = (1, 12, 16)
    ids = extractor.prompt_ids(text, grid, think=True)
    plain = extractor.prompt_ids("Alice Paris", grid, think=True)
    assert trained == ids
    for token in added:
        tid = extractor.tokenizer.token_to_id(token)
        assert ids.count(tid) == plain.count(tid), token
    result = extractor.extract(image, text, max_new_tokens=24)
    assert result.image_size == (224, 160)


class OneAnswer:
    """A backend whose greedy output is a fixed token sequence (for mapping tests)."""

    def __init__(self, ids: list[int], vocab: int):
        self.ids, self.vocab, self.calls = ids, vocab, 0

    def encode_images(self, pixel_values, indices):
        return np.zeros((len(indices.window_index), 1), dtype=np.float32)

    def embed(self, input_ids):
        return np.zeros((*input_ids.shape, 1), dtype=np.float32)

    def empty_cache(self, batch):
        return []

    def decode(self, inputs_embeds, attention_mask, position_ids, past):
        logits = np.zeros((inputs_embeds.shape[0], self.vocab), dtype=np.float32)
        logits[:, self.ids[min(self.calls, len(self.ids) - 1)]] = 1
        self.calls += 1
        return logits, []


def _scripted(bundle: Path, answer: str) -> gmner_rt.Extractor:
    from gmner_rt.bundle import load_bundle

    extractor = gmner_rt.load(bundle)
    ids = extractor.tokenizer.encode(answer, add_special_tokens=False).ids
    vocab = extractor.bundle.manifest.model.text.vocab_size
    return gmner_rt.Extractor(load_bundle(bundle), OneAnswer(ids + [ids[-1]] * 5, vocab))


def test_boxes_map_to_original_pixels_and_mentions_get_spans(tiny_bundle):
    # 448 x 224 with max_pixels 224*224 -> model image 308 x 140 (smart_resize)
    extractor = _scripted(
        tiny_bundle,
        "<think>Two people.</think><answer>Alice|PER|[0,0,154,70]; Paris|LOC|None; "
        "bad record; Alice|PER|[[154,70,308,140],[0,0,28,28]]</answer> trailing junk",
    )
    result = extractor.extract(
        Image.new("RGB", (448, 224)), "Alice met alice in Paris", constrained=False
    )
    assert result.think == "Two people."
    assert result.malformed == ("bad record",)
    alice, paris, again = result.records
    assert (alice.mention, alice.type) == ("Alice", "PER")
    assert alice.boxes == ((0, 0, 224, 112),)
    assert again.boxes == ((224, 112, 448, 224), (0, 0, 41, 45))
    assert paris.boxes is None and paris.spans == ((19, 24),)
    assert alice.spans == ((0, 5),)
    assert "trailing" not in result.raw  # stopped at </answer>
    assert result.image_size == (448, 224)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["records"][0]["boxes"] == [[0, 0, 224, 112]]
    assert set(result.timings) >= {"preprocess", "vision", "prefill", "decode", "total", "tokens"}


def test_unparseable_output_is_reported_not_raised(tiny_bundle):
    extractor = _scripted(tiny_bundle, "|||[[[ ;;; <answer>")
    result = extractor.extract(
        Image.new("RGB", (64, 64)), "Alice", max_new_tokens=12, constrained=False
    )
    assert result.records == ()
    assert len(result.token_ids) == 12


def test_find_spans():
    assert find_spans("Alice and ALICE", "Alice") == ((0, 5),)
    assert find_spans("alice and ALICE", "Alice") == ((0, 5), (10, 15))
    assert find_spans("no match", "Bob") == ()


def _bundle_copy(bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    return copy


def test_input_errors_name_the_problem(tiny_bundle, tmp_path):
    extractor = gmner_rt.load(tiny_bundle)
    image = Image.new("RGB", (64, 64))
    (tmp_path / "empty.jpg").write_bytes(b"")
    buffer = tmp_path / "full.jpg"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buffer)
    (tmp_path / "cut.jpg").write_bytes(buffer.read_bytes()[:100])
    cases = [
        (str(tmp_path / "missing.jpg"), "Alice", "missing.jpg: image not found"),
        (str(tmp_path / "empty.jpg"), "Alice", "empty.jpg: not a readable image"),
        (str(tmp_path / "cut.jpg"), "Alice", "cut.jpg: not a readable image"),
        (b"not an image", "Alice", "image bytes (12 bytes)"),
        (np.zeros((4, 4), dtype=np.float64), "Alice", "uint8"),
        (image, "", "text must be a non-empty string"),
        (image, "   ", "text must be a non-empty string"),
        (image, "word " * 3000, "the limit is 2048"),
    ]
    for img, text, message in cases:
        with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            extractor.extract(img, text)
    with pytest.raises(InputError, match="think"):
        extractor.extract(image, "Alice", think="maybe")


def test_decompression_bomb_is_refused_before_decoding(tiny_bundle, tmp_path, monkeypatch):
    import gmner_rt.images

    path = tmp_path / "big.png"
    Image.new("L", (3000, 2000)).save(path)
    monkeypatch.setattr(gmner_rt.images, "MAX_IMAGE_PIXELS", 5_000_000)
    with pytest.raises(InputError, match=r"big.png: 3000x2000 is 6000000 pixels, over the limit"):
        gmner_rt.load(tiny_bundle).extract(path, "Alice")


def test_bundle_of_another_format_version_is_refused(tiny_bundle, tmp_path):
    copy = _bundle_copy(tiny_bundle, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 3
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format_version 3 is not supported"):
        gmner_rt.load(copy)
    with pytest.raises(BundleError, match="is not a gmner bundle"):
        gmner_rt.load(tmp_path / "nowhere")


def test_module_level_extract_caches_the_extractor(tiny_bundle):
    gmner_rt._EXTRACTORS.clear()
    first = gmner_rt.extract(
        Image.new("RGB", (64, 64)), "Alice", bundle=tiny_bundle, max_new_tokens=4
    )
    second = gmner_rt.extract(
        Image.new("RGB", (64, 64)), "Alice", bundle=tiny_bundle, max_new_tokens=4
    )
    assert len(gmner_rt._EXTRACTORS) == 1
    assert first.token_ids == second.token_ids


def test_extract_never_imports_torch_or_transformers(tiny_bundle):
    code = textwrap.dedent(f"""
        import sys
        import gmner_rt
        from PIL import Image
        r = gmner_rt.load({str(tiny_bundle)!r}).extract(Image.new("RGB", (80, 60)), "Alice",
                                                       max_new_tokens=8)
        assert isinstance(r.raw, str)
        bad = [m for m in ("torch", "transformers", "gmner.train", "gmner.export")
               if m in sys.modules]
        assert not bad, bad
    """)
    subprocess.run([sys.executable, "-c", code], check=True)
