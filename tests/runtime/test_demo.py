"""The embedded default model and ``gmner demo``: shipped bundle, examples, retraining."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gmner.runtime.cli import main as gmner_main
from gmner.runtime.demo import EXAMPLES, judge, score_line

import gmner_rt
from gmner_rt.extractor import DEFAULT_BUNDLE
from gmner_rt.predictions import iter_json_objects
from gmner_rt.records import EntityRecord

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
def test_shipped_bundle_names_every_entity_of_the_examples():
    """The shipped examples (drawn by seed, not chosen): every gold mention found with its
    type (the default model's MNER is near 100 %), with its span in the tweet."""
    extractor = gmner_rt.load()
    for example in _examples():
        result = extractor.extract(EXAMPLES / example["image"], example["text"])
        found = {(e.mention, e.type) for e in result.records}
        assert {(g["mention"], g["type"]) for g in example["gold"]} <= found, example["id"]
        for entity in result.records:
            assert entity.spans and example["text"][slice(*entity.spans[0])] == entity.mention


def _entity(mention, etype, *boxes):
    return gmner_rt.Entity(mention, etype, tuple(boxes) or None, ())


def test_judge_marks_each_prediction_and_says_why():
    a, b, far = (0, 0, 100, 100), (200, 0, 300, 100), (500, 500, 600, 600)
    golds = [
        EntityRecord("Ivy", "PER", (a,)),
        EntityRecord("Zentro", "ORG", (b,)),
        EntityRecord("Paris", "LOC", None),
        EntityRecord("Glow", "OTHER", (far,)),
    ]
    extraction = gmner_rt.Extraction(
        records=(
            _entity("Ivy", "PER", a),  # right
            _entity("Zentro", "ORG", far),  # wrong box
            _entity("Paris", "PER"),  # wrong type
            _entity("Nike", "ORG"),  # not in the tweet's gold
            _entity("Ivy", "PER", a),  # again
        ),
        think=None,
        raw="",
        malformed=(),
        token_ids=(),
        image_size=(640, 640),
    )
    verdicts, missed = judge(extraction, golds)
    assert [(v.right, v.reason) for v in verdicts] == [
        (True, ""),
        (False, "the box is in another place (gold: the dashed one)"),
        (False, "the type is LOC"),
        (False, "not an entity of the tweet"),
        (False, "said twice"),
    ]
    assert missed == [golds[3]]  # Zentro and Paris are told by their wrong lines
    line = score_line({"id": "t1", "gold": [{}] * 4}, verdicts, missed)
    assert line == "t1: 1 of 5 predictions right, 1 of 4 gold entities found"


def test_shipped_examples_are_drawn_by_seed_from_the_test_split(tmp_path):
    """The examples do not depend on any model: the fixed-seed draw over the synthetic test
    split (seed 0) gives exactly the shipped ones."""
    pytest.importorskip("torch")
    from gmner.train.demo_recipe import demo_synth, pick_examples
    from gmner.train.synth import write_synth

    from gmner_rt.data import load_split

    write_synth(tmp_path, demo_synth(0, train=0, dev=0))
    picked = [t.img_id for t in pick_examples(load_split(tmp_path, "test"))]
    assert picked == [row["id"] for row in _examples()]
    assert picked == [t.img_id for t in pick_examples(load_split(tmp_path, "test"))]


@needs_bundle
def test_gmner_demo_writes_annotated_images_and_json(tmp_path, capsys):
    assert gmner_main(["demo", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == len(_examples())
    for row in results:
        assert Path(row["annotated"]).is_file()
        assert {"records", "gold", "correct", "wrong", "missed", "timings"} <= set(row)
    printed = capsys.readouterr().out
    assert "mention" in printed and '"records"' in printed
    for row in results:  # a score line per example, as judged
        assert (
            f"{row['id']}: {row['correct']} of {len(row['records'])} predictions right" in printed
        )
    assert (tmp_path / "overview.png").is_file()


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
