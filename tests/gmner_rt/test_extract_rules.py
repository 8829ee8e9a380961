"""Rules of gmner_rt's extraction that a careless change would break silently, on the embedded
default bundle (no torch: these run on the Python 3.10 runtime-only job too): the pixel limit
for every kind of image input, malformed segments kept when mapping an answer, a stop string
that spans several tokens, one mention rule for the grammar and the spans, one tokenization
of the text, integer counts in timings, and README's Python snippet."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import gmner_rt
from gmner_rt import images
from gmner_rt.answers import answer_to_original
from gmner_rt.errors import InputError
from gmner_rt.extractor import DEFAULT_BUNDLE
from gmner_rt.geometry import ImageGeometry
from gmner_rt.grammar import _MentionText
from gmner_rt.mentions import find_spans, word_bounds
from gmner_rt.vision import to_rgb

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "demo" / "3000020.png"


@pytest.fixture(scope="module")
def extractor():
    return gmner_rt.load(provider="cpu")


# --- the pixel limit ----------------------------------------------------------------------------


def test_the_pixel_limit_holds_for_arrays_before_any_copy(monkeypatch):
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 399)
    with pytest.raises(InputError, match=r"image array \(20, 20, 3\): 20x20 is 400 pixels"):
        to_rgb(np.zeros((20, 20, 3), dtype=np.uint8))
    to_rgb(np.zeros((19, 21, 3), dtype=np.uint8))  # 399: allowed


@pytest.mark.parametrize("kind", ["array", "pil", "bytes"])
def test_extract_refuses_an_image_over_the_limit_whatever_its_kind(extractor, monkeypatch, kind):
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 30 * 30)
    array = np.full((31, 31, 3), 128, dtype=np.uint8)
    image = {"array": array, "pil": Image.fromarray(array)}.get(kind)
    if kind == "bytes":
        import io

        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        image = buffer.getvalue()
    with pytest.raises(InputError, match="31x31 is 961 pixels, over the limit of 900"):
        extractor.extract(image, "Zentro")


# --- answers mapped to original pixels ---------------------------------------------------


def test_answer_to_original_keeps_malformed_segments():
    geometry = ImageGeometry(width=200, height=100, model_width=56, model_height=28)
    text = "<think>r</think><answer>Paris|LOC|[0,0,28,14]; not a record; Bob|PER|None</answer>"
    mapped = answer_to_original(text, geometry)
    assert mapped == (
        "<think>r</think><answer>Paris|LOC|[0,0,100,50]; Bob|PER|None; not a record</answer>"
    )


# --- stopping on a stop string that spans several tokens -----------------------------------------


def test_a_stop_string_split_over_tokens_still_stops(extractor):
    tok = extractor.tokenizer
    assert tok.encode("</answer>", add_special_tokens=False).ids != [tok.token_to_id("</")]
    pieces = [tok.token_to_id(p) for p in ("</", "answer", ">")]
    assert None not in pieces  # "</answer>" written as three tokens
    head = tok.encode("<think>x</think><answer>None", add_special_tokens=False).ids
    tail = tok.encode(" Paris Paris Paris Paris", add_special_tokens=False).ids
    script = head + pieces + tail

    def force(logits, state):
        out = np.full_like(logits, -1e9)
        out[0, script[len(state.tokens[0])]] = 0.0
        return out

    result = extractor.extract(
        EXAMPLE, "Zentro", constrained=False, max_new_tokens=len(script), logits_hook=force
    )
    assert list(result.token_ids) == head + pieces
    assert result.raw.endswith("None</answer>")


# --- one mention rule ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "mention", "spans"),
    [
        ("Parisians love Paris", "Paris", ((15, 20),)),
        ("#Paris, France", "Paris", ((1, 6),)),
        ("Fox&Friends", "Fox", ((0, 3),)),
        ("the foxes", "fox", ()),
        ("Alice and ALICE", "Alice", ((0, 5),)),
        ("alice and ALICE", "Alice", ((0, 5), (10, 15))),
        ("Los\nAngeles", "Los\nAngeles", ()),  # a newline is a barrier
        ("New York City", "York", ((4, 8),)),
    ],
)
def test_spans_follow_the_grammars_whole_word_rule(text, mention, spans):
    assert find_spans(text, mention) == spans


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet="ab .,#\n-é<", min_size=1, max_size=16),
    st.integers(0, 15),
    st.integers(1, 6),
)
def test_the_grammar_and_the_spans_agree_on_every_mention(text, start, size):
    """Whatever the text, a mention the grammar lets the model write is one the spans find."""
    mention = text[start : start + size]
    tags = ["<a"]
    allowed = _MentionText.of(text, tags).occurrences(mention.encode()) > 0
    assert bool(word_bounds(text, tags).spans(text, mention)) == allowed


# --- one tokenization, integer counts -----------------------------------------------------------


def test_the_text_is_tokenized_once_per_request(extractor, monkeypatch):
    extractor.extract(EXAMPLE, "warm up", max_new_tokens=40)  # the template's length, cached
    calls = []
    real = extractor.tokenizer.encode

    class Spy:
        def __getattr__(self, name):
            return getattr(extractor_tokenizer, name)

        def encode(self, text, **kw):
            calls.append(text)
            return real(text, **kw)

    extractor_tokenizer = extractor.tokenizer
    monkeypatch.setattr(extractor, "tokenizer", Spy())
    extractor.extract(EXAMPLE, "Zentro meets Velmora", max_new_tokens=40)
    assert sum("Zentro meets Velmora" in c for c in calls) == 1


def test_an_over_long_text_is_refused_with_its_length(monkeypatch):
    short = gmner_rt.load(provider="cpu", max_text_tokens=5)
    with pytest.raises(InputError, match=r"text is (\d+) tokens long; the limit is 5"):
        short.extract(EXAMPLE, "Zentro " * 8)
    short.extract(EXAMPLE, "Zentro", max_new_tokens=40)


def test_timings_count_with_ints(extractor):
    t = extractor.extract(EXAMPLE, "Zentro", max_new_tokens=60).timings
    assert all(isinstance(t[k], int) for k in ("tokens", "steps", "forced_tokens"))
    assert all(isinstance(t[k], float) for k in ("preprocess", "total"))


# --- README --------------------------------------------------------------------------------


def test_readmes_python_snippet_runs(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    heading = readme.index("In Python, with the runtime alone")
    snippet = re.search(r"```python\n(.*?)```", readme[heading:], re.S).group(1)
    (tmp_path / "bundles").mkdir()
    (tmp_path / "bundles" / "e1").symlink_to(DEFAULT_BUNDLE)
    for name in ("photo.jpg", "a.jpg", "b.jpg"):
        Image.open(EXAMPLE).convert("RGB").save(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["extractor"].provider in ("cpu", "cuda")
    assert len(namespace["results"]) == 2
