"""``gmner.bench.grammar_engines`` on the tiny tokenizer: the walk, the checks, the table.

Our engine always runs; llguidance and xgrammar (bench-only dependencies, not installed in CI)
are skipped when absent.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

cb = pytest.importorskip("gmner.bench.grammar_engines", reason="gmner-bench (./bench)")

#: What an external grammar may let through: the box order is a relation between two numbers,
#: which the per-request context-free grammars do not state.
EXTERNAL_GAPS = {"", "box with x1>=x2 or y1>=y2"}


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("transformers")
    from gmner.train.tiny_model import build_tokenizer

    return build_tokenizer().backend_tokenizer


@pytest.fixture(scope="module")
def cases() -> list[cb.Case]:
    texts = [
        "Alice Smith visits Paris with Acme | Fox & ; Fin \\ Group <3 #NBA @user_1 :)",
        "RT @NBA: LeBron James scores 40 points as the Lakers beat the Celtics",
        "Kevin Durant & Stephen Curry lead the Golden State Warriors past the Spurs",
    ]
    return [
        cb.Case(t, cb.LABELS, *cb.IMAGE_SIZES[k], cb.whole_word_mentions(t))
        for k, t in enumerate(texts)
    ]


def test_ours_outputs_are_valid(tokenizer, cases):
    (result,) = cb.run_bench(tokenizer, cases, ["ours"], seed=0)
    assert not result.error
    assert len(result.walks) == len(cases)
    for walk in result.walks:
        assert walk.problem == "", (walk.problem, walk.text)
        assert walk.text.endswith("</answer>")
        assert walk.mask_s and walk.compile_s > 0
    table = cb.format_table([result])
    assert "3/3" in table and "ours" in table


@pytest.mark.parametrize("engine", ["llguidance", "xgrammar"])
def test_external_engine(tokenizer, cases, engine):
    pytest.importorskip(engine)
    ours, other = cb.run_bench(tokenizer, cases, ["ours", engine], seed=0)
    assert not other.error, other.error
    assert {w.problem for w in other.walks} <= EXTERNAL_GAPS
    assert other.same_as_ours is not None


def test_missing_engine_is_reported(tokenizer, cases, monkeypatch):
    def broken(self, tokenizer, vocab_size):
        raise ImportError("No module named 'xgrammar'")

    monkeypatch.setattr(cb.XGrammarEngine, "setup", broken)
    (result,) = cb.run_bench(tokenizer, cases[:1], ["xgrammar"], seed=0)
    assert "No module named" in result.error
    assert "failed" in cb.format_table([result])


def test_check_output_rejects_each_kind_of_error():
    case = cb.Case(
        "Alice Smith in Paris", cb.LABELS, 448, 336, cb.whole_word_mentions("Alice Smith in Paris")
    )
    ok = "<answer>Alice Smith|PER|[0,0,447,336]; Paris|LOC|None</answer>"
    assert cb.check_output(ok, case) == ""
    assert cb.check_output("<think>x</think><answer>None</answer>", case) == ""
    assert cb.check_output("<answer>Alice|PER|None", case) == "answer not closed"
    assert "whole-word" in cb.check_output("<answer>lice|PER|None</answer>", case)
    assert cb.check_output("<answer>Alice|FOO|None</answer>", case) == "unknown type"
    assert "outside" in cb.check_output("<answer>Alice|PER|[0,0,449,1]</answer>", case)
    assert "x1>=x2" in cb.check_output("<answer>Alice|PER|[5,0,5,1]</answer>", case)


def test_build_cases_draws_sizes_and_mentions():
    rng = np.random.default_rng(0)
    cases = cb.build_cases(rng, 4, words=["alpha", "beta", "gamma", "delta"])
    assert len(cases) == 4
    for case in cases:
        assert (case.width, case.height) in cb.IMAGE_SIZES
        assert case.mentions == cb.whole_word_mentions(case.text)
        assert all(m in case.text for m in case.mentions)


def test_whole_word_mentions():
    spans = cb.whole_word_mentions("@NBA: Lakers win!")
    assert {"@NBA", "NBA", "@NBA:", "Lakers", "Lakers win", "win!", "NBA: Lakers win!"} <= set(
        spans
    )
    assert "Lak" not in spans and "akers" not in spans
    assert "a\nb" not in cb.whole_word_mentions("a\nb")


@pytest.mark.parametrize("lo,hi", [(0, 447), (1, 448), (0, 9), (1, 1288), (7, 7), (95, 1003)])
def test_int_range_alternatives_match_exactly_the_range(lo, hi):
    pattern = re.compile("|".join("".join(a) for a in cb.int_range_alternatives(lo, hi)))
    for n in range(0, 1400):
        assert bool(pattern.fullmatch(str(n))) == (lo <= n <= hi), n
    assert not pattern.fullmatch("007")
