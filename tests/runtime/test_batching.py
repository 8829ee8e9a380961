"""The dynamic batcher (gmner.runtime.batching): how requests are gathered, refused, drained
and answered, on a recording fake extractor (timing-free where it matters), then on the
embedded default model (each batched answer equals its own extract)."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import CancelledError
from pathlib import Path

import pytest
from gmner.runtime.batching import BatchConfig, Batcher, QueueFull, extract_each

import gmner_rt
from gmner_rt.errors import InputError

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo"


class FakeExtractor:
    """Answers ``(text, options)`` per pair; a text "bad" is an InputError; each
    ``extract_batch`` call is recorded, and waits for ``gate`` when one is set."""

    def __init__(self, gate: threading.Event | None = None):
        self.gate = gate
        self.calls: list[list[str]] = []
        self.entered = threading.Event()

    def extract_batch(self, pairs, **options):
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        self.calls.append([text for _, text in pairs])
        if any(text == "bad" for _, text in pairs):
            raise InputError("text 'bad' refused")
        return [(text, options) for _, text in pairs]

    def extract(self, image, text, **options):
        return self.extract_batch([(image, text)], **options)[0]


def _filled(gate_first: bool = True, **config):
    """A batcher whose worker is held inside its first batch (the request "first")."""
    gate = threading.Event()
    fake = FakeExtractor(gate)
    batcher = Batcher(fake, BatchConfig(**config))
    first = batcher.submit(None, "first", {})
    assert fake.entered.wait(5)
    return fake, gate, batcher, first


def test_waiting_requests_with_the_same_options_run_as_one_batch():
    fake, gate, batcher, first = _filled(max_batch=3, max_wait_ms=0)
    a = [batcher.submit(None, f"a{i}", {"think": "on"}) for i in range(4)]
    b = batcher.submit(None, "b", {"think": "off"})
    gate.set()
    assert first.result(5).batch_size == 1
    assert [f.result(5).extraction for f in a] == [(f"a{i}", {"think": "on"}) for i in range(4)]
    assert b.result(5).extraction == ("b", {"think": "off"})
    batcher.close(5)
    # a full batch of three, then the oldest waiting ("a3") alone: "off" never joins it
    assert fake.calls == [["first"], ["a0", "a1", "a2"], ["a3"], ["b"]]
    assert [f.result().batch_size for f in a] == [3, 3, 3, 1]
    assert batcher.stats()["largest_batch"] == 3


def test_the_oldest_request_waits_max_wait_ms_for_others():
    fake = FakeExtractor()
    batcher = Batcher(fake, BatchConfig(max_batch=4, max_wait_ms=300))
    started = time.monotonic()
    first = batcher.submit(None, "x", {})
    time.sleep(0.05)
    second = batcher.submit(None, "y", {})
    assert first.result(5).batch_size == 2 and second.result(5).batch_size == 2
    assert time.monotonic() - started >= 0.29  # nobody filled the batch: it waited
    batcher.close(5)
    assert fake.calls == [["x", "y"]]


def test_a_full_queue_is_refused_and_the_accepted_are_answered():
    fake, gate, batcher, first = _filled(max_batch=2, max_wait_ms=0, max_queue=2)
    accepted = [batcher.submit(None, f"r{i}", {}) for i in range(2)]
    with pytest.raises(QueueFull, match=r"2 requests are waiting \(--max-queue 2\)"):
        batcher.submit(None, "one too many", {})
    gate.set()
    assert [f.result(5).extraction[0] for f in accepted] == ["r0", "r1"]
    batcher.close(5)


def test_close_finishes_every_accepted_request_then_refuses():
    fake, gate, batcher, first = _filled(max_batch=2, max_wait_ms=0)
    waiting = [batcher.submit(None, f"w{i}", {}) for i in range(5)]
    closer = threading.Thread(target=batcher.close)
    closer.start()
    time.sleep(0.05)
    with pytest.raises(QueueFull, match="shutting down"):
        batcher.submit(None, "late", {})
    gate.set()
    closer.join(5)
    assert not closer.is_alive()
    assert [f.result(0).extraction[0] for f in waiting] == [f"w{i}" for i in range(5)]
    assert batcher.stats()["requests"] == 6


def test_a_bad_request_fails_alone_and_its_batch_mates_are_answered():
    fake, gate, batcher, first = _filled(max_batch=4, max_wait_ms=0)
    futures = [batcher.submit(None, text, {}) for text in ("ok1", "bad", "ok2")]
    gate.set()
    assert futures[0].result(5).extraction[0] == "ok1"
    with pytest.raises(InputError, match="text 'bad' refused"):
        futures[1].result(5)
    assert futures[2].result(5).extraction[0] == "ok2"
    assert futures[2].result().batch_size == 1  # answered alone, after the batch failed
    batcher.close(5)
    assert fake.calls[1:] == [["ok1", "bad", "ok2"], ["ok1"], ["bad"], ["ok2"]]


def test_a_cancelled_request_is_not_run():
    fake, gate, batcher, first = _filled(max_batch=4, max_wait_ms=0)
    gone = batcher.submit(None, "gone", {})
    kept = batcher.submit(None, "kept", {})
    assert gone.cancel()
    gate.set()
    assert kept.result(5).extraction[0] == "kept"
    with pytest.raises(CancelledError):
        gone.result(0)
    batcher.close(5)
    assert ["gone"] not in fake.calls and all("gone" not in call for call in fake.calls)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"max_batch": 0}, "--max-batch: expected an integer >= 1, got 0"),
        ({"max_queue": True}, "--max-queue: expected an integer >= 1, got True"),
        ({"max_wait_ms": -1}, r"--max-wait-ms: expected a number of ms in \[0, 60000\], got -1"),
    ],
)
def test_bad_batch_settings_name_the_flag(config, message):
    with pytest.raises(InputError, match=message):
        BatchConfig(**config)


def test_extract_each_runs_alone_only_after_a_batch_failed():
    fake = FakeExtractor()
    assert extract_each(fake, [(None, "a"), (None, "b")], {}) == [("a", {}), ("b", {})]
    out = extract_each(fake, [(None, "a"), (None, "bad")], {})
    assert out[0] == ("a", {}) and isinstance(out[1], InputError)
    assert fake.calls == [["a", "b"], ["a", "bad"], ["a"], ["bad"]]


def test_batched_answers_equal_their_own_extract_on_the_default_model():
    extractor = gmner_rt.load(provider="cpu")
    rows = [json.loads(line) for line in (DEMO / "examples.jsonl").read_text().splitlines()]
    pairs = [(DEMO / r["image"], r["text"]) for r in rows]
    options = {"max_new_tokens": 80, "think": "auto"}
    alone = [extractor.extract(image, text, **options).to_dict() for image, text in pairs]
    batcher = Batcher(extractor, BatchConfig(max_batch=4, max_wait_ms=2000))
    futures = [batcher.submit(image, text, options) for image, text in pairs]
    answers = [f.result(60) for f in futures]
    batcher.close(30)
    assert [a.batch_size for a in answers] == [4, 4, 4, 4]
    for answer, own in zip(answers, alone, strict=True):
        got = answer.extraction.to_dict()
        del got["timings"], own["timings"]
        assert got == own
