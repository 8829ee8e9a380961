"""Fuzzing ``extract`` on the embedded default bundle: random images (sizes from 1 pixel,
modes, arrays), random texts (any Unicode, tags, control characters) and forced random model
outputs (noise on the logits, constrained and not). Whatever comes in and whatever the model
writes, ``extract`` returns a well-formed result or raises an InputError that names the
problem; nothing else escapes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import gmner_rt
from gmner_rt.errors import InputError

pytestmark = pytest.mark.slow

TEXT_PIECES = st.sampled_from(
    ["Zentro", "Velmora", "Quillon", "Alice", " ", "|", ";", "\\", "[1,2,3,4]", "<think>",
     "</answer>", "\n", "\t", "é", "東京", "😀", "&amp;", "{text}", "None", "PER"]
)  # fmt: skip
TEXTS = st.one_of(
    st.lists(TEXT_PIECES, min_size=1, max_size=12).map("".join),
    st.text(min_size=1, max_size=40),
)


@st.composite
def images(draw):
    w, h = draw(st.integers(1, 300)), draw(st.integers(1, 300))
    seed = draw(st.integers(0, 2**16))
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 4), dtype=np.uint8)
    kind = draw(st.sampled_from(["RGB", "L", "RGBA", "P", "array3", "array4", "array2"]))
    if kind == "array3":
        return pixels[..., :3]
    if kind == "array4":
        return pixels
    if kind == "array2":
        return pixels[..., 0]
    base = Image.fromarray(pixels, "RGBA")
    return base.convert("RGB").convert("P") if kind == "P" else base.convert(kind)


@pytest.fixture(scope="module")
def extractor():
    return gmner_rt.load(provider="cpu")


def _check(result, image, text: str, constrained: bool) -> None:
    width, height = (
        (image.shape[1], image.shape[0]) if isinstance(image, np.ndarray) else image.size
    )
    assert result.image_size == (width, height)
    for entity in result.records:
        for x1, y1, x2, y2 in entity.boxes or ():
            assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height, (entity, image)
        for start, end in entity.spans:
            assert text[start:end].casefold() == entity.mention.casefold()
        if constrained:
            assert entity.type in ("PER", "LOC", "ORG", "OTHER")
    if constrained:
        assert result.malformed == ()
    assert all(isinstance(result.timings[k], int) for k in ("tokens", "steps", "forced_tokens"))


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    image=images(),
    text=TEXTS,
    constrained=st.booleans(),
    think=st.sampled_from(["on", "off", "auto"]),
    noise=st.sampled_from([0.0, 5.0, 50.0]),
    seed=st.integers(0, 2**16),
    new=st.one_of(st.integers(0, 8), st.integers(20, 80)),
)
def test_extract_returns_or_names_the_problem(
    extractor, image, text, constrained, think, noise, seed, new
):
    rng = np.random.default_rng(seed)

    def hook(logits, _state):
        return logits + rng.normal(size=logits.shape).astype(logits.dtype) * noise

    try:
        result = extractor.extract(
            image,
            text,
            think=think,
            constrained=constrained,
            max_new_tokens=new,
            logits_hook=hook if noise else None,
        )
    except InputError as exc:
        assert str(exc)  # a message that says what is wrong
        OUTCOMES["refused"] += 1
        return
    OUTCOMES["extracted"] += 1
    _check(result, image, text, constrained)


OUTCOMES = {"refused": 0, "extracted": 0}


def test_the_fuzzing_reached_extraction():
    """The run above is not all refusals (it runs after it, in file order)."""
    if not sum(OUTCOMES.values()):
        pytest.skip("the fuzz test did not run in this session")
    assert OUTCOMES["extracted"] >= 50, OUTCOMES
