"""``gmner extract``, ``gmner eval --bundle`` and ``gmner_rt.draw`` on the tiny exported bundle.

The tiny model's outputs are junk or empty answers, so these tests check the plumbing (exit
codes, JSON shape, the predictions format, errors); records are hand-made where the content
matters (the table, drawing, the predictions' round trip).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from gmner.runtime import cli
from gmner.runtime.evaluate import prediction_output
from gmner.runtime.extract import format_table
from PIL import Image, ImageChops

from gmner_rt.data import load_split
from gmner_rt.draw import TYPE_COLOURS, draw_entities, type_colour
from gmner_rt.extractor import Entity, Extraction
from gmner_rt.metrics import evaluate
from gmner_rt.records import EntityRecord, parse_output
from gmner_rt.vision import to_rgb

REPO = Path(__file__).resolve().parents[2]
TEXT = "Alice Smith visits Paris with Acme"
KEYS = {"records", "think", "raw", "malformed", "token_ids", "image_size", "model_size", "timings"}
GREY = (128, 128, 128)


def _errors(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


@pytest.fixture(scope="module")
def rotated_jpg(tmp_path_factory) -> Path:
    """A 120x80 JPEG whose EXIF orientation (6) shows it as 80x120."""
    path = tmp_path_factory.mktemp("img") / "rotated.jpg"
    image = Image.new("RGB", (120, 80), (200, 60, 40))
    image.paste((20, 160, 90), (0, 0, 60, 80))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, exif=exif)
    return path


@pytest.fixture(scope="module")
def dev_images(tmp_path_factory, v2_subset) -> Path:
    """Images for the first 4 dev tweets, of the sizes their XML gives."""
    folder = tmp_path_factory.mktemp("dev-images")
    for t in load_split(v2_subset, "dev")[:4]:
        w, h = t.image_size or (320, 240)
        Image.new("RGB", (w, h), (30 + len(t.text) % 200, 90, 150)).save(folder / f"{t.img_id}.jpg")
    return folder


def _extract(bundle: Path, image: Path, *extra: str) -> int:
    argv = ["extract", "--bundle", str(bundle), "--image", str(image), "--max-new-tokens", "6"]
    return cli.main([*argv, *extra])


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------


def test_type_colours_are_fixed_or_a_stable_hash():
    assert type_colour("PER") == TYPE_COLOURS["PER"] == (230, 25, 75)
    assert type_colour("BRAND") == (57, 80, 230)  # crc32: the same in every process
    assert type_colour("BRAND") not in TYPE_COLOURS.values()


def test_draw_entities_changes_pixels_only_on_boxes_and_labels(tmp_path):
    image = Image.new("RGB", (300, 200), GREY)
    inner = (40, 60, 120, 150)  # room above for its label
    top = (180, 0, 260, 80)  # touches the top: label inside the box
    entities = [
        EntityRecord("Alice", "PER", (inner,)),
        EntityRecord("Acme", "BRAND", (top,)),
        EntityRecord("Paris", "LOC", None),  # nothing to draw
    ]
    out = tmp_path / "drawn.png"
    drawn = draw_entities(image, entities, out=out)

    assert drawn.size == image.size and image.getpixel((40, 60)) == GREY  # input untouched
    assert ImageChops.difference(Image.open(out).convert("RGB"), drawn).getbbox() is None
    diff = ImageChops.difference(drawn, image).convert("L").point(lambda v: 255 * (v > 0))
    assert drawn.getpixel(inner[:2]) == TYPE_COLOURS["PER"]
    assert drawn.getpixel((inner[0] + 2, inner[1] - 3)) == TYPE_COLOURS["PER"]  # label above
    assert drawn.getpixel(top[:2]) == type_colour("BRAND")
    # Inside the inner box nothing changed; inside the top box only its label's rows did.
    assert diff.crop((inner[0] + 3, inner[1] + 3, inner[2] - 2, inner[3] - 2)).getbbox() is None
    assert diff.crop((top[0] + 3, top[1] + 3, top[2] - 2, top[1] + 8)).getbbox() is not None
    assert diff.crop((top[0] + 3, top[1] + 30, top[2] - 2, top[3] - 2)).getbbox() is None
    # Outside the boxes and the bands their labels can take, nothing changed.
    mask = Image.new("L", image.size, 0)
    mask.paste(255, (inner[0], inner[1] - 30, image.width, inner[3] + 1))
    mask.paste(255, (top[0], 0, image.width, top[3] + 1))
    assert ImageChops.subtract(diff, mask).getbbox() is None


def test_draw_entities_clips_boxes_and_converts_modes(tmp_path):
    image = Image.new("L", (64, 48), 100)
    drawn = draw_entities(image, [EntityRecord("x", "ORG", ((-10, -10, 500, 500),))])
    assert drawn.mode == "RGB" and drawn.size == (64, 48)
    assert drawn.getpixel((63, 47)) == TYPE_COLOURS["ORG"]


# ---------------------------------------------------------------------------------------------
# Output formats (hand-made extractions)
# ---------------------------------------------------------------------------------------------


def _extraction() -> Extraction:
    return Extraction(
        records=(
            Entity("Alice Smith", "PER", ((10, 20, 110, 220),), ((0, 11),)),
            Entity("Paris", "LOC", None, ((19, 24),)),
            Entity("A; B", "ORG", ((1, 2, 3, 4), (5, 6, 7, 8)), ()),
        ),
        think="A woman in front of a tower.",
        raw="...",
        malformed=("junk|PER|[1,2",),
        token_ids=(1, 2, 3),
        image_size=(640, 480),
        timings={
            "preprocess": 0.01,
            "vision": 0.1,
            "prefill": 0.2,
            "decode": 0.3,
            "total": 0.6,
            "tokens": 3.0,
        },
    )


def test_format_table_lists_entities_think_malformed_and_timings():
    lines = format_table(_extraction()).splitlines()
    assert lines[0].split() == ["mention", "type", "boxes", "spans"]
    assert lines[1].split() == ["Alice", "Smith", "PER", "[10,20,110,220]", "0-11"]
    assert lines[2].split() == ["Paris", "LOC", "None", "19-24"]
    assert lines[3].split() == ["A;", "B", "ORG", "[1,2,3,4]", "[5,6,7,8]", "-"]
    assert lines[4] == "think: A woman in front of a tower."
    assert lines[5] == "malformed: junk|PER|[1,2"
    assert lines[6] == "image: 640x480"
    assert lines[7].startswith("timings: preprocess 0.010 s") and lines[7].endswith("3 tokens")


def test_prediction_output_round_trips_records_and_keeps_malformed():
    extraction = _extraction()
    parsed = parse_output(prediction_output(extraction))
    expected = tuple(EntityRecord(e.mention, e.type, e.boxes) for e in extraction.records)
    assert parsed.records == expected
    assert parsed.malformed == extraction.malformed
    assert parsed.think == extraction.think
    report = evaluate({"t": expected}, {"t": prediction_output(extraction)})
    assert (report.gmner.correct, report.gmner.predicted, report.malformed) == (3, 4, 1)
    empty = Extraction((), None, "", (), (), (1, 1))
    assert prediction_output(empty) == "<answer>None</answer>"


# ---------------------------------------------------------------------------------------------
# gmner extract
# ---------------------------------------------------------------------------------------------


def test_extract_json_and_drawing_use_the_oriented_image(
    tiny_bundle, rotated_jpg, tmp_path, capsys
):
    out = tmp_path / "drawn.png"
    assert _extract(tiny_bundle, rotated_jpg, "--text", TEXT, "--json", "--draw", str(out)) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == KEYS
    assert data["image_size"] == [80, 120]
    assert len(data["model_size"]) == 2 and all(v % 28 == 0 for v in data["model_size"])
    assert isinstance(data["records"], list) and isinstance(data["raw"], str)
    assert 1 <= len(data["token_ids"]) <= 6 and data["timings"]["total"] > 0
    drawn = Image.open(out)
    assert drawn.size == (80, 120)
    records = [
        EntityRecord(r["mention"], r["type"], tuple(map(tuple, r["boxes"])) if r["boxes"] else None)
        for r in data["records"]
    ]
    expected = draw_entities(to_rgb(rotated_jpg), records)
    assert ImageChops.difference(drawn.convert("RGB"), expected).getbbox() is None


def test_extract_prints_a_table_from_a_text_file(tiny_bundle, rotated_jpg, tmp_path, capsys):
    text_file = tmp_path / "tweet.txt"
    text_file.write_text(TEXT + "\n", encoding="utf-8")
    assert _extract(tiny_bundle, rotated_jpg, "--text-file", str(text_file), "--think", "off") == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["mention", "type", "boxes", "spans"]
    assert "image: 80x120" in out and "timings: preprocess" in out


def test_extract_batch_prints_one_json_line_per_pair_in_order(tiny_bundle, tmp_path, capsys):
    sizes = [(64, 48), (50, 70), (90, 40)]
    lines = []
    for k, size in enumerate(sizes):
        Image.new("RGB", size, GREY).save(tmp_path / f"{k}.png")
        lines.append(json.dumps({"id": k, "image": f"{k}.png", "text": f"{TEXT} {k}"}))
    batch = tmp_path / "pairs.jsonl"
    batch.write_text("\n".join(lines) + "\n", encoding="utf-8")
    argv = ["extract", "--bundle", str(tiny_bundle), "--batch", str(batch), "--batch-size", "2"]
    assert cli.main([*argv, "--max-new-tokens", "4"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2]
    assert [tuple(r["image_size"]) for r in rows] == sizes
    assert all(KEYS | {"id", "image", "text"} == set(r) for r in rows)


def test_extract_errors_exit_2_and_name_the_problem(
    tiny_bundle, rotated_jpg, tmp_path, caplog, monkeypatch
):
    missing = tmp_path / "nope.jpg"
    assert _extract(tiny_bundle, missing, "--text", TEXT) == 2
    assert str(missing) in _errors(caplog)
    caplog.clear()
    assert _extract(tiny_bundle, rotated_jpg, "--text", "   ") == 2
    assert "text is empty" in _errors(caplog)
    caplog.clear()
    assert _extract(tmp_path / "no-bundle", rotated_jpg, "--text", TEXT) == 2
    assert f"{tmp_path / 'no-bundle'}: folder not found" in _errors(caplog)
    caplog.clear()
    monkeypatch.setattr("gmner_rt.extractor.DEFAULT_BUNDLE", tmp_path / "default")
    assert cli.main(["extract", "--image", str(rotated_jpg), "--text", TEXT]) == 2
    assert "no default bundle" in _errors(caplog)
    caplog.clear()
    batch = tmp_path / "b.jsonl"
    batch.write_text(json.dumps({"image": "gone.png", "text": TEXT}) + "\n", encoding="utf-8")
    assert cli.main(["extract", "--bundle", str(tiny_bundle), "--batch", str(batch)]) == 2
    assert f"{batch}:1: {tmp_path / 'gone.png'}: image not found" in _errors(caplog)
    with pytest.raises(SystemExit) as exc:
        _extract(tiny_bundle, rotated_jpg, "--text", TEXT, "--max-new-tokens", "0")
    assert exc.value.code == 2


def test_extract_and_eval_bundle_import_no_torch(
    tiny_bundle, rotated_jpg, v2_subset, dev_images, tmp_path
):
    code = f"""
        import sys
        from gmner.runtime.cli import main
        assert main(["extract", "--bundle", {str(tiny_bundle)!r}, "--image",
                     {str(rotated_jpg)!r}, "--text", "Alice visits Paris", "--json",
                     "--max-new-tokens", "4"]) == 0
        assert main(["eval", "--bundle", {str(tiny_bundle)!r}, "--data", {str(v2_subset)!r},
                     "--split", "dev", "--images", {str(dev_images)!r}, "--limit", "2",
                     "--max-new-tokens", "4", "--out", {str(tmp_path / "p.jsonl")!r}]) == 0
        heavy = [m for m in ("torch", "transformers", "gmner.train", "gmner.export")
                 if m in sys.modules]
        assert not heavy, heavy
        """
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout[: proc.stdout.index("\n}") + 2])["image_size"] == [80, 120]


# ---------------------------------------------------------------------------------------------
# gmner eval --bundle
# ---------------------------------------------------------------------------------------------


def _eval_bundle(bundle: Path, data: Path, images: Path, *extra: str) -> int:
    argv = ["eval", "--bundle", str(bundle), "--data", str(data), "--split", "dev"]
    return cli.main([*argv, "--images", str(images), "--max-new-tokens", "6", *extra])


def test_eval_bundle_writes_pred_format_and_scores(
    tiny_bundle, v2_subset, dev_images, tmp_path, capsys
):
    pred, scores = tmp_path / "pred.jsonl", tmp_path / "scores.json"
    extra = ("--limit", "4", "--batch-size", "3", "--out", str(pred), "--json", str(scores))
    assert _eval_bundle(tiny_bundle, v2_subset, dev_images, *extra) == 0
    assert "GMNER" in capsys.readouterr().out
    dev = load_split(v2_subset, "dev")
    rows = [json.loads(x) for x in pred.read_text(encoding="utf-8").splitlines()]
    assert [r["img_id"] for r in rows] == [t.img_id for t in dev[:4]]
    report = json.loads(scores.read_text())
    assert report["tweets"] == 4 and report["missing"] == 0
    assert report["gmner"]["gold"] == sum(len(t.entities) for t in dev[:4]) > 0
    # `gmner eval --pred` reads the file and counts the same predictions (gold: all dev).
    again = tmp_path / "again.json"
    argv = ["eval", "--data", str(v2_subset), "--split", "dev", "--pred", str(pred)]
    assert cli.main([*argv, "--json", str(again)]) == 0
    rescored = json.loads(again.read_text())
    for task in ("gmner", "mner", "eeg"):
        for k in ("correct", "predicted"):
            assert rescored[task][k] == report[task][k]
    assert rescored["malformed"] == report["malformed"]


def test_eval_bundle_missing_image_is_an_error_or_skipped(
    tiny_bundle, v2_subset, dev_images, tmp_path, caplog
):
    images = tmp_path / "images"
    images.mkdir()
    dev = load_split(v2_subset, "dev")[:3]
    for t in dev[1:]:
        (images / f"{t.img_id}.jpg").write_bytes((dev_images / f"{t.img_id}.jpg").read_bytes())
    pred = tmp_path / "pred.jsonl"
    extra = ("--limit", "3", "--out", str(pred))
    assert _eval_bundle(tiny_bundle, v2_subset, images, *extra) == 2
    assert f"tweet {dev[0].img_id}" in _errors(caplog) and str(images) in _errors(caplog)
    assert not pred.exists()
    assert _eval_bundle(tiny_bundle, v2_subset, images, *extra, "--skip-missing-images") == 0
    assert len(pred.read_text().splitlines()) == 2


def test_eval_modes_are_exclusive(tiny_bundle, v2_subset, dev_images, tmp_path, caplog):
    pred = tmp_path / "pred.jsonl"
    pred.write_text("", encoding="utf-8")
    assert _eval_bundle(tiny_bundle, v2_subset, dev_images, "--pred", str(pred)) == 2
    assert "exactly one of --pred" in _errors(caplog) and "--pred, --bundle" in _errors(caplog)
    caplog.clear()
    argv = ["eval", "--data", str(v2_subset), "--split", "dev", "--bundle", str(tiny_bundle)]
    assert cli.main(argv) == 2
    assert "--bundle needs --images" in _errors(caplog)
    caplog.clear()
    assert _eval_bundle(tmp_path / "none", v2_subset, dev_images, "--limit", "1") == 2
    assert "folder not found" in _errors(caplog)


def test_speculate_flags_turn_speculation_on_and_off():
    import argparse

    from gmner.runtime.extract import add_decoding_arguments, decoding_options

    parser = argparse.ArgumentParser()
    add_decoding_arguments(parser)
    assert decoding_options(parser.parse_args([]))["speculate"] is False
    assert decoding_options(parser.parse_args(["--speculate"]))["speculate"] is True
    assert decoding_options(parser.parse_args(["--no-speculate"]))["speculate"] is False
