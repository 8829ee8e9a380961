"""Constrained extraction end to end on an exported tiny bundle: think control, budgets,
jump-forward through the real decoder graph, and the CLI's decoding flags."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import gmner_rt
from gmner_rt.errors import InputError
from gmner_rt.generate import prefill, step
from gmner_rt.records import parse_output

TEXT = "Alice Smith met Bob in Paris | today"


@pytest.fixture(scope="module")
def extractor(tiny_bundle):
    return gmner_rt.load(tiny_bundle)


def _image(i: int = 0) -> Image.Image:
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8))


def _valid(extraction, text: str, size) -> None:
    parsed = parse_output(extraction.raw)
    assert parsed.answer_closed and not parsed.malformed and not extraction.malformed
    for record in extraction.records:
        assert record.mention in text and record.spans
        assert record.type in ("PER", "LOC", "ORG", "OTHER")
        for x1, y1, x2, y2 in record.boxes or ():
            assert 0 <= x1 < x2 <= size[0] and 0 <= y1 < y2 <= size[1]


def test_multi_token_steps_equal_single_token_steps_on_the_decoder_graph(extractor):
    """Jump-forward feeds rows different numbers of tokens in one call (left padded within
    the step); the logits after each row's last token must equal feeding them one by one."""
    batch = extractor._batch(
        [extractor._prepare(_image(i), t, True) for i, t in enumerate(["Alice", "Bob in Paris"])]
    )
    vision = extractor.vision
    chunks = [[40, 41, 42], [43]]
    _, together = prefill(extractor.backend, batch, vision)
    start = together.next_positions.copy()
    logits = step(extractor.backend, together, chunks, pad_id=0)
    assert (together.next_positions - start).tolist() == [3, 1]
    for row, chunk in enumerate(chunks):
        _, alone = prefill(extractor.backend, batch, vision)
        for token in chunk:
            ones = np.array([token, token])
            row_logits = step(extractor.backend, alone, ones)[row]
        np.testing.assert_allclose(logits[row], row_logits, rtol=1e-4, atol=1e-4)


def test_constrained_is_the_default_and_every_record_is_valid(extractor):
    for i in range(3):
        result = extractor.extract(_image(i), TEXT, max_new_tokens=96)
        assert len(result.token_ids) <= 96
        _valid(result, TEXT, result.image_size)
        assert result.timings["steps"] <= result.timings["tokens"] + 1


def test_think_off_answers_at_once_and_on_reasons_first(extractor):
    off = extractor.extract(_image(), TEXT, think="off", max_new_tokens=64)
    assert off.raw.startswith("<answer>") and off.think is None
    on = extractor.extract(_image(), TEXT, think="on", think_budget=5, max_new_tokens=64)
    assert on.raw.startswith("<think>") and on.think is not None
    _valid(on, TEXT, on.image_size)


def test_think_budget_closes_the_reasoning(extractor):
    result = extractor.extract(_image(), TEXT, think="on", think_budget=3, max_new_tokens=200)
    table = extractor.token_table
    ids = list(result.token_ids)
    text = b""
    count = 0
    while b"</think>" not in text:
        text += table.token_bytes[ids[count]]
        count += 1
    assert count <= 1 + 3 + len(b"</think>")  # <think>, 3 reasoning tokens, the way out
    assert parse_output(result.raw).answer_closed


def test_a_short_budget_still_gives_a_complete_answer(extractor):
    result = extractor.extract(_image(), TEXT, think="on", max_new_tokens=12)
    assert len(result.token_ids) <= 12
    assert parse_output(result.raw).answer_closed


def test_bad_decoding_options_are_refused(extractor):
    with pytest.raises(InputError, match="max_new_tokens: 1 is too few"):
        extractor.extract(_image(), TEXT, max_new_tokens=1)
    with pytest.raises(InputError, match="think_budget: needs constrained=True"):
        extractor.extract(_image(), TEXT, constrained=False, think_budget=3)
    with pytest.raises(InputError, match="think_budget"):
        extractor.extract(_image(), TEXT, think_budget=-1)


def test_jump_forward_saves_steps_without_changing_the_text(extractor):
    results = {
        jump: extractor.extract(_image(1), TEXT, think="off", jump_forward=jump, max_new_tokens=80)
        for jump in (True, False)
    }
    assert results[True].timings["steps"] <= results[False].timings["steps"]
    assert results[False].timings["forced_tokens"] == 0
    _valid(results[True], TEXT, results[True].image_size)


def test_cli_decoding_flags(tiny_bundle, tmp_path, capsys, caplog):
    from gmner.runtime.cli import main

    image = tmp_path / "a.png"
    _image().save(image)
    args = ["extract", "--bundle", str(tiny_bundle), "--image", str(image), "--text", TEXT]
    assert main([*args, "--think", "off", "--json", "--max-new-tokens", "40"]) == 0
    out = capsys.readouterr().out
    assert '"raw": "<answer>' in out
    assert main([*args, "--unconstrained", "--think-budget", "4"]) == 2
    assert "--think-budget needs the grammar" in caplog.text
