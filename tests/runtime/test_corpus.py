"""Corpus runs (gmner.runtime.corpus, ``gmner extract --batch --out [--ray]``) over a small
synthetic split with the embedded default model: predictions ``gmner eval --pred`` reads,
error records for unusable rows, resumption, and Ray Data (a local 2-CPU instance) giving the
same predictions as one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gmner.runtime.cli import main as cli_main
from gmner.runtime.corpus import done_ids, extract_corpus, read_rows
from gmner.runtime.evaluate import prediction_output, score_file
from gmner.train.demo_recipe import demo_synth
from gmner.train.synth import write_synth

import gmner_rt
from gmner_rt.data import load_split
from gmner_rt.errors import InputError
from gmner_rt.predictions import read_predictions

DECODING = {"max_new_tokens": 160}


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    """Ten synthetic test tweets in the demo model's style, and pairs.jsonl over them plus
    two unusable rows: a missing image and a file that is no image."""
    root = tmp_path_factory.mktemp("synth")
    write_synth(root, demo_synth(seed=7, train=0, dev=0, test=10))
    rows = [
        {"id": t.img_id, "image": f"images/{t.img_id}.png", "text": t.text}
        for t in load_split(root, "test")
    ]
    (root / "broken.png").write_bytes(b"not a png at all")
    rows.insert(3, {"id": "missing", "image": "images/none.png", "text": "Ivy Calder"})
    rows.append({"id": "broken", "image": "broken.png", "text": "Ivy Calder"})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def single(split, tmp_path_factory) -> Path:
    """The single-process run's predictions."""
    out = tmp_path_factory.mktemp("single") / "preds.jsonl"
    report = extract_corpus(split / "pairs.jsonl", out, decoding=DECODING, batch_size=4)
    assert (report.rows, report.skipped, report.written, report.errors) == (12, 0, 10, 2)
    return out


def _records(path: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    by_id = {r["img_id"]: r for r in rows}
    assert len(by_id) == len(rows)  # each id once
    return by_id


def test_each_prediction_is_its_pairs_own_extract_and_bad_rows_are_error_records(split, single):
    records = _records(single)
    extractor = gmner_rt.load(provider="cpu")
    for row in read_rows(split / "pairs.jsonl"):
        if row["id"] in ("missing", "broken"):
            continue
        own = extractor.extract(Path(row["image"]), row["text"], **DECODING)
        assert records[row["id"]] == {
            "img_id": row["id"],
            "output": prediction_output(own),
            "raw": own.raw,  # the text as generated, for the e2e protocol
            "image_size": list(own.image_size),
            "model_size": list(own.model_size),
        }
    assert "not found" in records["missing"]["error"]
    assert "not a readable image" in records["broken"]["error"]


def test_gmner_eval_reads_the_predictions(split, single):
    report = score_file(split, "test", single)
    assert report.tweets == 10 and report.missing == 0
    assert report.gmner.predicted > 0 and report.mner.f1 > 0.5  # the demo model's own domain
    e2e = score_file(split, "test", single, "e2e")  # the raw texts are there for it too
    assert e2e.protocol == "e2e" and e2e.gmner.predicted == report.gmner.predicted


def test_a_rerun_skips_written_ids_and_a_torn_line_is_cut(split, single, tmp_path):
    out = tmp_path / "preds.jsonl"
    lines = single.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:5]) + lines[5][:20])  # a run killed while writing line 6
    written = [json.loads(line) for line in lines[:5]]
    predicted = {r["img_id"] for r in written if "output" in r}  # error rows are retried
    assert done_ids(out) == predicted and out.read_text() == "".join(lines[:5])
    report = extract_corpus(split / "pairs.jsonl", out, decoding=DECODING, batch_size=4)
    assert (report.skipped, report.written + report.errors) == (len(predicted), 12 - len(predicted))
    assert _last_records(out) == _records(single)
    again = extract_corpus(split / "pairs.jsonl", out, decoding=DECODING)
    # the two rows with an error record are tried again (still unusable here)
    assert (again.skipped, again.written, again.errors) == (10, 0, 2)
    expected = {k for k, r in _records(single).items() if "output" in r}
    assert read_predictions(out).keys() == expected


def _last_records(path: Path) -> dict[str, dict]:
    return {r["img_id"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_a_rerun_predicts_a_row_whose_image_was_fixed(tmp_path):
    image = next((Path(__file__).parents[2] / "examples" / "demo").glob("*.png"))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"id": "late", "image": "late.png", "text": "Ivy Calder"}) + "\n")
    out = tmp_path / "preds.jsonl"
    first = extract_corpus(pairs, out, decoding=DECODING)
    assert (first.written, first.errors) == (0, 1) and read_predictions(out) == {}
    (tmp_path / "late.png").write_bytes(image.read_bytes())  # the user fixes the image
    second = extract_corpus(pairs, out, decoding=DECODING)
    assert (second.skipped, second.written, second.errors) == (0, 1, 0)
    assert list(read_predictions(out)) == ["late"]


def test_the_command_line_writes_the_same_predictions(split, single, tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    args = ["extract", "--batch", str(split / "pairs.jsonl"), "--out", str(out)]
    assert cli_main([*args, "--max-new-tokens", "160", "--batch-size", "3"]) == 0
    assert "10 predictions, 2 error records written" in capsys.readouterr().out
    assert _records(out) == _records(single)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ray"], "--ray writes predictions: add --out FILE"),
        (["--workers", "2"], "--workers writes predictions: add --out FILE"),
        (["--out", "{tmp}/p.jsonl", "--workers", "2"], "--workers / --ray-address apply to --ray"),
    ],
)
def test_corpus_flags_out_of_place_are_named(split, tmp_path, extra, message, caplog):
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    assert cli_main(["extract", "--batch", str(split / "pairs.jsonl"), *extra]) == 2
    assert message in caplog.text


def test_bad_input_rows_are_named_with_their_line(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        '{"id": "a", "image": "a.png", "text": "x"}\n{"id": "a", "image": "b.png", "text": "y"}\n'
    )
    with pytest.raises(
        InputError, match=r"pairs.jsonl:2: id 'a' appears twice \(first at line 1\)"
    ):
        read_rows(pairs)
    pairs.write_text('{"image": "a.png", "text": "x"}\n')
    with pytest.raises(InputError, match=r"pairs.jsonl:1: field id must be a non-empty string"):
        read_rows(pairs)


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_data_gives_the_single_process_predictions(split, single, local_ray, tmp_path):
    out = tmp_path / "ray.jsonl"
    report = extract_corpus(
        split / "pairs.jsonl", out, decoding=DECODING, batch_size=3, ray=True, workers=2
    )
    assert (report.rows, report.skipped, report.written, report.errors) == (12, 0, 10, 2), (
        out.read_text()
    )
    assert _records(out) == _records(single)


def test_error_records_are_read_as_no_prediction(tmp_path, caplog):
    pred = tmp_path / "pred.jsonl"
    ok = {"img_id": "a", "output": "<answer>None</answer>"}
    failed = {"img_id": "b", "error": "images/b.png: image not found"}
    pred.write_text(json.dumps(ok) + "\n" + json.dumps(failed) + "\n")
    assert read_predictions(pred) == {"a": "<answer>None</answer>"}
    assert "1 error record(s)" in caplog.text
    # a rerun's prediction for a row that had failed supersedes its error record
    pred.write_text(json.dumps(failed) + "\n" + json.dumps({**ok, "img_id": "b"}) + "\n")
    assert read_predictions(pred) == {"b": "<answer>None</answer>"}
    pred.write_text(json.dumps({**ok, "img_id": "b"}) + "\n" + json.dumps(failed) + "\n")
    with pytest.raises(InputError, match=r"pred.jsonl:2: img_id 'b' appears twice"):
        read_predictions(pred)
