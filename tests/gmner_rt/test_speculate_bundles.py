"""Speculation on exported bundles: the same token ids as decoding without it, on random tiny
models and on the shipped examples, batch 1 and 3, constrained and not, reasoning on and off;
and a format-1 bundle (no multi-position logits) loads and decodes without speculation.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import gmner_rt
from gmner_rt.extractor import DEFAULT_BUNDLE

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "demo"


def _pairs() -> list[tuple[Path, str]]:
    rows = [json.loads(line) for line in (EXAMPLES / "examples.jsonl").read_text().splitlines()]
    return [(EXAMPLES / row["image"], row["text"]) for row in rows if row]


def _compare(extractor, pairs, *, think, constrained, max_new_tokens=None) -> tuple[int, int]:
    """Extract ``pairs`` one by one and as one batch, with and without speculation; assert the
    ids are equal; return (decoder calls without, with) summed over the runs."""
    calls = [0, 0]
    runs = [[pair] for pair in pairs] + [pairs]
    for run in runs:
        results = []
        for index, speculate in enumerate((False, True)):
            out = extractor.extract_batch(
                run,
                think=think,
                constrained=constrained,
                max_new_tokens=max_new_tokens,
                speculate=speculate,
            )
            calls[index] += out[0].timings["steps"]
            results.append([r.token_ids for r in out])
        assert results[0] == results[1], f"think={think} constrained={constrained} {len(run)}"
    return calls[0], calls[1]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["tiny_bundle", "base_bundle"])
def test_speculation_gives_the_ids_of_plain_decoding_on_random_tiny_models(which, request):
    extractor = gmner_rt.load(request.getfixturevalue(which))
    assert extractor.backend.verifies_drafts
    pairs = _pairs()[:2]
    plain = fast = 0
    for think in ("on", "off"):
        for constrained in (True, False):
            a, b = _compare(extractor, pairs, think=think, constrained=constrained,
                            max_new_tokens=64)  # fmt: skip
            plain, fast = plain + a, fast + b
    assert fast < plain  # random models repeat themselves: drafts were accepted


@pytest.mark.slow
def test_speculation_gives_the_ids_of_plain_decoding_on_the_shipped_examples():
    """Every shipped example with the default bundle. Skipped while that bundle is format 1
    (it then decodes without speculation); runs once it is re-exported as format 2."""
    extractor = gmner_rt.load(DEFAULT_BUNDLE)
    if not extractor.bundle.verifies_drafts:
        pytest.skip(
            "the shipped default bundle is format 1 (no multi-position logits): it decodes "
            "without speculation; re-exporting it with this gmner turns this test on"
        )
    for think in ("on", "off"):
        for constrained in (True, False):
            _compare(extractor, _pairs(), think=think, constrained=constrained)


def _as_format_1(bundle: Path, out: Path, rewrite_manifest) -> Path:
    """``bundle`` rewritten as a format-1 bundle: the decoder takes no ``logits_index`` and
    returns the last position's logits (as exporters before format 2 wrote it)."""
    import onnx
    from onnx import TensorProto, helper

    shutil.copytree(bundle, out)
    model = onnx.load(str(out / "decoder.onnx"))
    graph = model.graph
    graph.input.remove(next(i for i in graph.input if i.name == "logits_index"))
    graph.initializer.append(helper.make_tensor("v1_one", TensorProto.INT64, [1], [1]))
    graph.node.insert(0, helper.make_node("Sub", ["v1_length", "v1_one"], ["logits_index"]))
    graph.node.insert(0, helper.make_node("Shape", ["inputs_embeds"], ["v1_length"], start=1,
                                          end=2))  # fmt: skip
    logits = next(o for o in graph.output if o.name == "logits")
    logits.type.tensor_type.shape.dim[1].Clear()
    logits.type.tensor_type.shape.dim[1].dim_value = 1
    onnx.save(model, str(out / "decoder.onnx"))
    rewrite_manifest(out)
    return out


def test_a_format_1_bundle_loads_and_decodes_without_speculation(
    tiny_bundle, tmp_path, manifest_as_format_1
):
    v1 = gmner_rt.load(_as_format_1(tiny_bundle, tmp_path / "v1", manifest_as_format_1))
    v2 = gmner_rt.load(tiny_bundle)
    assert v1.bundle.manifest.format_version == 1
    assert not v1.bundle.verifies_drafts and not v1.backend.verifies_drafts
    image, text = _pairs()[0]
    old = v1.extract(image, text, think="on", constrained=False, max_new_tokens=64,
                     speculate=True)  # fmt: skip
    new = v2.extract(image, text, think="on", constrained=False, max_new_tokens=64,
                     speculate=True)  # fmt: skip
    plain = v2.extract(image, text, think="on", constrained=False, max_new_tokens=64,
                       speculate=False)  # fmt: skip
    assert old.token_ids == new.token_ids == plain.token_ids
    assert old.timings["drafted_tokens"] == 0 and old.timings["steps"] == plain.timings["steps"]
    assert new.timings["accepted_tokens"] > 0 and new.timings["steps"] < plain.timings["steps"]
    with pytest.raises(gmner_rt.errors.BackendError, match="bundle format 1"):
        v1.backend.decode_last(
            np.zeros((1, 2, v1.bundle.manifest.model.text.hidden_size), np.float32),
            np.ones((1, 2), np.int64),
            np.zeros((3, 1, 2), np.int64),
            v1.backend.empty_cache(1),
            2,
        )
