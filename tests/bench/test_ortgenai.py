"""onnxruntime-genai as a peer system (gmner.bench.ortgenai), on the tiny preset.

Its model builder's decoder, driven by our generation loop with the bundle's vision and
embedding graphs, must produce the same greedy tokens as our own decoder graph; its own
``og.Generator`` must too on a text-only prompt. Builds on the tiny preset take seconds.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

try:  # importorskip skips only a missing module; a broken install must skip cleanly too
    import onnxruntime_genai  # noqa: F401
except ImportError as exc:
    pytest.skip(f"onnxruntime-genai is not importable ({exc})", allow_module_level=True)
pytest.importorskip("torch", reason="the builder and the tiny model need torch")
pytest.importorskip("gmner.bench.ortgenai", reason="the gmner-bench package (./bench)")

from PIL import Image, ImageDraw  # noqa: E402

from gmner_rt.errors import BackendError, InputError  # noqa: E402

NEW_TOKENS = 32


@pytest.fixture(scope="module")
def plain_bundle(tiny, tmp_path_factory):
    """The tiny model exported without an adapter (the builder reads the same weights)."""
    pytest.importorskip("onnx")
    from gmner.export.build import BundleOptions, export_bundle

    out = tmp_path_factory.mktemp("ortgenai") / "bundle"
    return export_bundle(BundleOptions(model=tiny, adapter=None, out=out, verify=False))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ortgenai-cache")


@pytest.fixture(scope="module")
def embeds_build(tiny, cache):
    from gmner.bench.ortgenai import build_decoder

    return build_decoder(tiny, cache, threads=2)


@pytest.fixture(scope="module")
def ids_build(tiny, cache):
    from gmner.bench.ortgenai import build_decoder

    return build_decoder(tiny, cache, exclude_embeds=False, threads=2)


@pytest.fixture(scope="module")
def backends(plain_bundle, embeds_build):
    from gmner.bench.ortgenai import OrtGenaiDecoder

    from gmner_rt.backends.onnxruntime import OrtGraphs
    from gmner_rt.bundle import load_bundle
    from gmner_rt.extractor import Extractor

    bundle = load_bundle(plain_bundle)
    ours = OrtGraphs.from_bundle(bundle, threads=2)  # the CPU
    theirs = OrtGenaiDecoder.from_bundle(bundle, embeds_build, threads=2)
    return Extractor(bundle, ours), Extractor(bundle, theirs)


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (224, 168), tuple(int(v) for v in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = int(rng.integers(0, 200)), int(rng.integers(0, 150))
        draw.rectangle((x, y, x + 30, y + 20), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return image


def _greedy(extractor, batch, new_tokens=NEW_TOKENS, **kwargs):
    from gmner_rt.generate import generate

    m = extractor.bundle.manifest
    return generate(
        extractor.backend,
        batch,
        extractor.vision,
        max_new_tokens=new_tokens,
        eos_ids=[],
        pad_id=m.tokens.pad_id,
        **kwargs,
    ).tokens


def _batch(extractor, texts):
    requests = [extractor._prepare(_image(i), text, True) for i, text in enumerate(texts)]
    return extractor._batch(requests)


def test_build_is_cached_and_stamped(tiny, cache, embeds_build, monkeypatch):
    from gmner.bench import ortgenai

    stamp = json.loads((embeds_build / ortgenai.STAMP_NAME).read_text())
    assert stamp["precision"] == "fp32" and stamp["exclude_embeds"] is True
    assert (embeds_build / "model.onnx").is_file()
    config = json.loads((embeds_build / "genai_config.json").read_text())
    assert config["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 2

    def no_builder(*args, **kwargs):
        raise AssertionError("a finished build was built again")

    monkeypatch.setattr(ortgenai.subprocess, "run", no_builder)
    again = ortgenai.build_decoder(tiny, cache, threads=None)
    assert again == embeds_build
    config = json.loads((embeds_build / "genai_config.json").read_text())
    assert "intra_op_num_threads" not in config["model"]["decoder"]["session_options"]
    ortgenai.build_decoder(tiny, cache, threads=2)  # restored for the other tests


def test_greedy_tokens_equal_batch1(backends):
    from gmner_rt.generate import prefill

    ours, theirs = backends
    batch = _batch(ours, ["Kevin Durant visits Oklahoma City with the Thunder"])
    assert batch.grids  # an image prompt
    expected = _greedy(ours, batch)
    assert _greedy(theirs, batch) == expected
    assert len(expected[0]) == NEW_TOKENS
    ours_logits, _ = prefill(ours.backend, batch, ours.vision)
    theirs_logits, _ = prefill(theirs.backend, batch, theirs.vision)
    assert theirs_logits.dtype == np.float32
    np.testing.assert_allclose(theirs_logits, ours_logits, atol=1e-4)


def test_greedy_tokens_equal_batch4_equal_lengths(backends):
    ours, theirs = backends
    batch = _batch(ours, ["Messi arrives in Miami"] * 4)  # four images, one length
    assert batch.attention_mask.all()
    expected = _greedy(ours, batch)
    assert _greedy(theirs, batch) == expected


def test_greedy_tokens_equal_batch4_left_padded(backends):
    ours, theirs = backends
    texts = [
        "Lionel Messi arrives in Miami ahead of the Inter Miami match on Saturday",
        "Great night at Madison Square Garden",
        "Apple CEO Tim Cook visits London",
        "Rain in Paris",
    ]
    batch = _batch(ours, texts)
    assert len(set(batch.attention_mask.sum(axis=1).tolist())) == 4  # all lengths differ
    expected = _greedy(ours, batch)
    assert _greedy(theirs, batch) == expected


def test_constrained_extract_equal_batch1(backends):
    """Jump-forward feeds several tokens per step (GQA with a past and T > 1)."""
    ours, theirs = backends
    image, text = _image(7), "Obama meets Merkel in Berlin"
    expected = ours.extract(image, text, think="off", max_new_tokens=48)
    got = theirs.extract(image, text, think="off", max_new_tokens=48)
    assert got.token_ids == expected.token_ids
    assert got.timings["steps"] == expected.timings["steps"]


def test_uneven_step_in_a_batch_is_refused(backends):
    from gmner_rt.generate import prefill, step

    ours, theirs = backends
    batch = _batch(ours, ["Rain in Paris", "Sun in Rome"])
    _, state = prefill(theirs.backend, batch, theirs.vision)
    with pytest.raises(BackendError, match="same number of tokens"):
        step(theirs.backend, state, [[5, 6], [7]])


def test_text_only_generate_agrees(backends, ids_build):
    from gmner.bench.ortgenai import text_only_generate

    from gmner_rt.generate import PromptBatch

    ours, _ = backends
    ids = ours.tokenizer.encode("Kevin Durant visits Oklahoma City", add_special_tokens=False).ids
    batch = PromptBatch(
        input_ids=np.asarray([ids], dtype=np.int64),
        attention_mask=np.ones((1, len(ids)), dtype=np.int64),
        pixel_values=np.zeros((0, 1), dtype=np.float32),
        grids=(),
    )
    plain = _greedy(ours, batch)[0]
    # suppress the first greedy token too: og's min_length must mask what eos_ids names
    suppressed = [*ours.bundle.manifest.tokens.eos_ids, plain[0]]

    def hook(logits, _state):
        logits = logits.copy()
        logits[:, suppressed] = -np.inf
        return logits

    expected = _greedy(ours, batch, logits_hook=hook)[0]
    assert expected[0] != plain[0]
    result = text_only_generate(ids_build, ids, NEW_TOKENS, threads=2, eos_ids=suppressed)
    assert result["tokens"] == expected
    assert len(result["token_times_s"]) == NEW_TOKENS - 1
    assert result["ttft_s"] > 0 and result["decode_tokens_per_s"] > 0
    assert result["prompt_tokens"] == len(ids)


def test_wrong_build_kinds_are_refused(plain_bundle, embeds_build, ids_build):
    from gmner.bench.ortgenai import OrtGenaiDecoder, text_only_generate

    from gmner_rt.bundle import load_bundle

    with pytest.raises(BackendError, match="exclude_embeds build"):
        OrtGenaiDecoder.from_bundle(load_bundle(plain_bundle), ids_build)
    with pytest.raises(InputError, match="exclude_embeds=False"):
        text_only_generate(embeds_build, [1, 2, 3], 4)


def test_bad_model_dir(tiny, tmp_path):
    from gmner.bench.ortgenai import build_decoder

    with pytest.raises(InputError, match="model directory not found"):
        build_decoder(tmp_path / "missing", tmp_path / "cache")
    with pytest.raises(InputError, match="precision"):
        build_decoder(tiny, tmp_path / "cache", precision="int3")
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    config = json.loads((broken / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(BackendError) as failure:
        build_decoder(broken, tmp_path / "cache")
    message = str(failure.value)
    assert str(broken) in message and "builder failed" in message
    assert "NoSuchModelForCausalLM" in message or "not currently supported" in message
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]  # nothing half-built


def test_int4_build_decodes(tiny, cache, plain_bundle):
    """Quantized builds (for later benchmarks) load and decode; their tokens may differ."""
    from gmner.bench.ortgenai import OrtGenaiDecoder, build_decoder

    from gmner_rt.bundle import load_bundle
    from gmner_rt.extractor import Extractor
    from gmner_rt.generate import prefill

    path = build_decoder(tiny, cache, precision="int4", threads=2)
    assert path.name.startswith(f"{tiny.name}-int4-cpu-embeds-")
    bundle = load_bundle(plain_bundle)
    extractor = Extractor(bundle, OrtGenaiDecoder.from_bundle(bundle, path, threads=2))
    batch = _batch(extractor, ["Rain in Paris", "Sun over Rome and Milan"])
    logits, _ = prefill(extractor.backend, batch, extractor.vision)
    assert logits.shape == (2, bundle.manifest.model.text.vocab_size)
    assert np.isfinite(logits).all()
    assert len(_greedy(extractor, batch, new_tokens=4)[1]) == 4
