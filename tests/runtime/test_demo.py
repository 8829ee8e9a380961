"""The embedded default model and ``gmner demo``: shipped bundle, examples, retraining."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gmner.runtime.cli import main as gmner_main
from gmner.runtime.demo import EXAMPLES, _matches

import gmner_rt
from gmner_rt.extractor import DEFAULT_BUNDLE
from gmner_rt.predictions import iter_json_objects

SHIPPED = (DEFAULT_BUNDLE / "manifest.json").is_file()
needs_bundle = pytest.mark.skipif(not SHIPPED, reason="no default bundle shipped")


def _examples() -> list[dict]:
    return [row for _, row in iter_json_objects(EXAMPLES / "examples.jsonl", "an example")]


@needs_bundle
def test_default_bundle_loads_and_validates():
    extractor = gmner_rt.load()
    manifest = extractor.bundle.manifest
    assert manifest.model.name == "gmner-demo-tiny"
    assert manifest.parity["passed"]
    size = sum(p.stat().st_size for p in DEFAULT_BUNDLE.iterdir())
    assert size < 8 * 2**20  # a few MB, committed to the repository


@needs_bundle
def test_shipped_bundle_finds_the_known_entities_of_an_example():
    """The first shipped example: every gold entity found, with type and region right."""
    example = _examples()[0]
    result = gmner_rt.load().extract(EXAMPLES / example["image"], example["text"])
    assert len(result.records) == len(example["gold"])
    for gold in example["gold"]:
        assert any(_matches(entity, gold) for entity in result.records), (gold, result.records)
    for entity in result.records:
        assert entity.spans and example["text"][slice(*entity.spans[0])] == entity.mention


@needs_bundle
def test_gmner_demo_writes_annotated_images_and_json(tmp_path, capsys):
    assert gmner_main(["demo", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == len(_examples())
    for row in results:
        assert Path(row["annotated"]).is_file()
        assert {"records", "gold", "correct", "timings"} <= set(row)
    printed = capsys.readouterr().out
    assert "mention" in printed and '"records"' in printed


def test_demo_without_examples_says_what_to_do(tmp_path, caplog):
    assert gmner_main(["demo", "--examples", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "gmner demo --retrain --install" in caplog.text


@pytest.mark.slow
def test_retrain_runs_the_whole_pipeline_on_a_small_task(tmp_path):
    pytest.importorskip("torch")
    from gmner.runtime.demo_retrain import retrain

    result = retrain(
        tmp_path / "work",
        seed=1,
        epochs=1,
        sizes={"train": 16, "dev": 8, "test": 8},
        examples=tmp_path / "examples",
    )
    manifest = gmner_rt.load(result.bundle).bundle.manifest
    assert manifest.parity["passed"] and manifest.parity["merge"]["kind"] == "full"
    assert set(result.scores) >= {"gmner", "mner", "eeg"}
    assert result.scores["gmner"]["gold"] > 0
    assert (tmp_path / "work" / "test_pred.jsonl").is_file()
    rows = [
        row for _, row in iter_json_objects(tmp_path / "examples" / "examples.jsonl", "an example")
    ]
    assert len(rows) == 4 and all((tmp_path / "examples" / r["image"]).is_file() for r in rows)
