"""``Extractor.extract_batch(batch_size=N)``: a long list runs as consecutive batches of at
most N pairs, and every pair's result equals its own ``extract`` whatever the chunking."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import gmner_rt
from gmner_rt.errors import InputError

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo"


@pytest.fixture(scope="module")
def extractor():
    return gmner_rt.load(provider="cpu")


@pytest.fixture(scope="module")
def pairs():
    rows = [json.loads(line) for line in (DEMO / "examples.jsonl").read_text().splitlines()]
    # five pairs: the four examples and the first again with another text
    return [(DEMO / r["image"], r["text"]) for r in rows] + [
        (DEMO / rows[0]["image"], "Ivy Calder in Sunvale")
    ]


def _answer(extraction) -> dict:
    data = extraction.to_dict()
    del data["timings"]  # seconds, and decoder calls of the whole batch
    return data


def test_batch_size_chunks_a_long_list_and_keeps_each_answer(extractor, pairs, monkeypatch):
    single = [_answer(extractor.extract(image, text, max_new_tokens=60)) for image, text in pairs]
    seen = []
    chunk = extractor._extract_chunk

    def spy(chunk_pairs, *args):
        seen.append(len(chunk_pairs))
        return chunk(chunk_pairs, *args)

    monkeypatch.setattr(extractor, "_extract_chunk", spy)
    batched = extractor.extract_batch(pairs, max_new_tokens=60, batch_size=2)
    assert seen == [2, 2, 1]
    assert [_answer(x) for x in batched] == single
    seen.clear()
    extractor.extract_batch(pairs, max_new_tokens=60)
    assert seen == [5]  # no batch_size: one batch
    seen.clear()
    extractor.extract_batch(pairs[:2], max_new_tokens=60, batch_size=np.int64(8))
    assert seen == [2]


@pytest.mark.parametrize("bad", [0, -1, 2.0, "4", True])
def test_a_bad_batch_size_is_named(extractor, pairs, bad):
    with pytest.raises(InputError, match=r"batch_size: expected an integer >= 1, got"):
        extractor.extract_batch(pairs[:1], batch_size=bad)
