"""``gmner data sft``: training JSONL from the fixture subset and images made here with PIL."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from gmner.runtime import cli
from PIL import Image

from gmner_rt.data import load_split
from gmner_rt.errors import InputError
from gmner_rt.geometry import ImageGeometry, smart_resize
from gmner_rt.images import image_size
from gmner_rt.prompt import SYSTEM_PROMPT
from gmner_rt.records import parse_output

MIN_PIXELS = 256 * 28 * 28
MAX_PIXELS = 1024 * 28 * 28
DEFAULT_SIZE = (320, 240)
SPLITS = ("train", "dev")


def _errors(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


def _size(tweet) -> tuple[int, int]:
    return tweet.image_size or DEFAULT_SIZE


def _make_images(folder: Path, tweets, skip: tuple[str, ...] = ()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k, tweet in enumerate(tweets):
        if tweet.img_id not in skip:
            colour = (40 * k % 256, 90, 160)
            Image.new("RGB", _size(tweet), colour).save(folder / f"{tweet.img_id}.jpg")
    return folder


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def tweets(v2_subset) -> dict[str, list]:
    return {s: load_split(v2_subset, s) for s in SPLITS}


@pytest.fixture(scope="module")
def images(tmp_path_factory, tweets) -> Path:
    return _make_images(tmp_path_factory.mktemp("images"), tweets["train"] + tweets["dev"])


def _sft(data: Path, images: Path | list[Path], out: Path, *extra: str) -> int:
    folders = images if isinstance(images, list) else [images]
    image_args = [a for f in folders for a in ("--images", str(f))]
    return cli.main(["data", "sft", str(data), *image_args, "--out", str(out), *extra])


@pytest.fixture(scope="module")
def plain_out(tmp_path_factory, v2_subset, images) -> Path:
    out = tmp_path_factory.mktemp("sft")
    assert _sft(v2_subset, images, out) == 0
    return out


def _user_parts(row: dict) -> tuple[dict, dict]:
    system, user = row["messages"][:2]
    assert system == {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]}
    assert user["role"] == "user"
    image_part = next(p for p in user["content"] if p["type"] == "image")
    text_part = next(p for p in user["content"] if p["type"] == "text")
    return image_part, text_part


def _target(row: dict) -> str:
    assistant = row["messages"][2]
    assert assistant["role"] == "assistant"
    (part,) = assistant["content"]
    assert part["type"] == "text"
    return part["text"]


def _check_row(row, tweet, image_path: Path, size, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
    assert row["id"] == tweet.img_id
    assert len(row["messages"]) == 3
    image_part, text_part = _user_parts(row)
    assert image_part["image"] == str(image_path.resolve())
    assert row["images"] == [str(image_path.resolve())]
    assert text_part["text"].endswith("Text: " + tweet.text)
    assert row["text"] == tweet.text

    geo = ImageGeometry.for_image(*size, min_pixels=min_pixels, max_pixels=max_pixels)
    model_h, model_w = smart_resize(size[1], size[0], min_pixels=min_pixels, max_pixels=max_pixels)
    assert row["image_size"] == list(size)
    assert row["model_size"] == [model_w, model_h] == list(geo.model_size)
    assert model_w % 28 == 0 and model_h % 28 == 0
    assert min_pixels <= model_w * model_h <= max_pixels

    parsed = parse_output(_target(row))
    assert parsed.malformed == ()
    assert parsed.answer_closed
    assert [(r.mention, r.type) for r in parsed.records] == [
        (e.mention, e.type) for e in tweet.entities
    ]
    assert parsed.records == tuple(r.map_boxes(geo.to_model) for r in tweet.records())
    assert row["records"] == [
        {
            "mention": e.mention,
            "type": e.type,
            "boxes": [list(b) for b in e.boxes] if e.boxes else None,
        }
        for e in tweet.entities
    ]
    assert row["box_space"] == "model"
    assert row["min_pixels"] == min_pixels
    assert row["max_pixels"] == max_pixels
    return parsed


# ---------------------------------------------------------------------------------------------
# Rows without reasoning
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", SPLITS)
def test_one_row_per_tweet_with_model_space_targets(plain_out, images, tweets, split):
    rows = _rows(plain_out / f"{split}.jsonl")
    assert [r["id"] for r in rows] == [t.img_id for t in tweets[split]]
    boxes_seen = 0
    for row, tweet in zip(rows, tweets[split], strict=True):
        parsed = _check_row(row, tweet, images / f"{tweet.img_id}.jpg", _size(tweet))
        assert parsed.think is None
        assert row["think"] is None
        assert _target(row).startswith("<answer>")
        assert "<think>" not in _user_parts(row)[1]["text"]
        boxes_seen += sum(len(r.boxes) for r in parsed.records if r.boxes)
    assert boxes_seen == {"train": 56, "dev": 37}[split]


def test_boxes_really_move_to_model_space(plain_out, tweets):
    """A 600 x 800 image is seen at 588 x 812: boxes scale by 588/600 and 812/800."""
    row = next(r for r in _rows(plain_out / "train.jsonl") if r["image_size"] == [600, 800])
    assert row["model_size"] == [588, 812]
    original = [b for r in row["records"] if r["boxes"] for b in r["boxes"]]
    model = [b for r in parse_output(_target(row)).records if r.boxes for b in r.boxes]
    assert original and len(original) == len(model)
    for (x1, y1, x2, y2), got in zip(original, model, strict=True):
        want = (x1 * 588 / 600, y1 * 812 / 800, x2 * 588 / 600, y2 * 812 / 800)
        assert all(abs(g - w) <= 0.5 for g, w in zip(got, want, strict=True))


def test_small_images_are_scaled_up_to_min_pixels(plain_out):
    row = next(r for r in _rows(plain_out / "train.jsonl") if r["image_size"] == [320, 240])
    assert row["model_size"] == [532, 392]  # 320 x 240 is below 256 tokens of 28 x 28


def test_entity_free_tweet_has_a_none_answer(plain_out, tweets):
    rows = {r["id"]: r for r in _rows(plain_out / "train.jsonl")}
    assert _target(rows["16_05_20_112"]) == "<answer>None</answer>"
    assert rows["16_05_20_112"]["records"] == []


def test_escaped_mention_round_trips(plain_out):
    rows = {r["id"]: r for r in _rows(plain_out / "train.jsonl")}
    target = _target(rows["593767"])
    assert "Fox & \\; Fin Financial Group|ORG|" in target
    assert parse_output(target).records[0].mention == "Fox & ; Fin Financial Group"


def test_sft_meta(plain_out, v2_subset):
    meta = json.loads((plain_out / "sft_meta.json").read_text(encoding="utf-8"))
    assert meta["data"] == str(v2_subset)
    assert meta["min_pixels"] == MIN_PIXELS
    assert meta["max_pixels"] == MAX_PIXELS
    assert meta["cot"] is None
    assert set(meta["splits"]) == set(SPLITS)
    for split, n in (("train", 40), ("dev", 30)):
        s = meta["splits"][split]
        assert s["rows"] == n
        assert s["missing_images"] == 0
        assert s["missing_image_ids"] == []
        assert s["with_think"] == 0
        assert s["size_mismatch"] == 0


def test_pixel_flags_change_the_model_space(v2_subset, images, tweets, tmp_path):
    lo, hi = 56 * 56, 128 * 28 * 28
    out = tmp_path / "out"
    args = ("--split", "dev", "--min-pixels", str(lo), "--max-pixels", str(hi))
    assert _sft(v2_subset, images, out, *args) == 0
    assert not (out / "train.jsonl").exists()
    rows = _rows(out / "dev.jsonl")
    assert len(rows) == 30
    for row, tweet in zip(rows, tweets["dev"], strict=True):
        _check_row(row, tweet, images / f"{tweet.img_id}.jpg", _size(tweet), lo, hi)
    meta = json.loads((out / "sft_meta.json").read_text(encoding="utf-8"))
    assert (meta["min_pixels"], meta["max_pixels"]) == (lo, hi)
    assert list(meta["splits"]) == ["dev"]


def test_second_image_folder_is_searched(v2_subset, tweets, tmp_path):
    first_ids = tuple(t.img_id for t in tweets["dev"][:10])
    rest_ids = tuple(t.img_id for t in tweets["dev"][10:])
    a = _make_images(tmp_path / "a", tweets["dev"], skip=rest_ids)
    b = _make_images(tmp_path / "b", tweets["dev"], skip=first_ids)
    assert _sft(v2_subset, [a, b], tmp_path / "out", "--split", "dev") == 0
    rows = _rows(tmp_path / "out" / "dev.jsonl")
    assert [Path(r["images"][0]).parent.name for r in rows] == ["a"] * 10 + ["b"] * 20


@pytest.mark.parametrize(
    ("flags", "flag"),
    [
        (("--min-pixels", "0"), "--min-pixels"),
        (("--min-pixels", "-5"), "--min-pixels"),
        (("--min-pixels", "5000", "--max-pixels", "4000"), "--max-pixels"),
    ],
)
def test_bad_pixel_bounds_are_an_error_naming_the_flag(
    v2_subset, images, tmp_path, caplog, flags, flag
):
    assert _sft(v2_subset, images, tmp_path / "out", *flags) == 2
    assert flag in _errors(caplog)
    assert not (tmp_path / "out" / "train.jsonl").exists()


def test_non_integer_pixel_flag_is_rejected_by_the_parser(v2_subset, images, tmp_path):
    with pytest.raises(SystemExit) as exc:
        _sft(v2_subset, images, tmp_path / "out", "--min-pixels", "lots")
    assert exc.value.code == 2


# ---------------------------------------------------------------------------------------------
# Reasoning (--cot)
# ---------------------------------------------------------------------------------------------


def _cot_for_every_other(train) -> dict[str, str]:
    """Reasoning for every other train tweet."""
    return {t.img_id: f"The image shows something about {t.img_id}." for t in train[::2]}


def _write_cot(path: Path, cot: dict[str, str], fmt: str, extra: list[dict]) -> Path:
    """A CoT JSONL in the E2E-GMNER reference format (``e2e``) or gmner's own."""
    lines = []
    for img_id, think in cot.items():
        if fmt == "e2e":
            lines.append({"image_path": f"/somewhere/else/{img_id}.jpg", "cot": f"  {think}\n"})
        else:
            lines.append({"img_id": img_id, "image_path": f"imgs/{img_id}.jpg", "think": think})
    lines += extra
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt", ["e2e", "gmner"])
def test_cot_targets_have_think_for_tweets_with_reasoning(v2_subset, images, tweets, tmp_path, fmt):
    cot = _cot_for_every_other(tweets["train"])
    no_think = [{"img_id": tweets["train"][1].img_id, "think": ""}]  # an empty reply: no think
    if fmt == "e2e":
        no_think = [{"image_path": f"/x/{tweets['train'][1].img_id}.jpg", "cot": "  "}]
    cot_file = _write_cot(tmp_path / "cot.jsonl", cot, fmt, no_think)
    out = tmp_path / "out"
    assert _sft(v2_subset, images, out, "--cot", str(cot_file)) == 0

    for split in SPLITS:
        rows = _rows(out / f"{split}.jsonl")
        assert len(rows) == len(tweets[split])
        for row, tweet in zip(rows, tweets[split], strict=True):
            parsed = _check_row(row, tweet, images / f"{tweet.img_id}.jpg", _size(tweet))
            prompt = _user_parts(row)[1]["text"]
            assert "<think></think>" in prompt and "reason" in prompt
            target = _target(row)
            think = cot.get(tweet.img_id)
            if think is not None:
                assert target.startswith(f"<think>{think}</think><answer>")
                assert parsed.think == think
                assert row["think"] == think
            else:  # the prompt asks for reasoning: an empty think block, as the reference
                assert target.startswith("<think></think><answer>")
                assert not parsed.think
                assert row["think"] is None
            assert target.endswith("</answer>")

    meta = json.loads((out / "sft_meta.json").read_text(encoding="utf-8"))
    assert meta["cot"] == str(cot_file)
    assert meta["splits"]["train"]["with_think"] == len(cot) == 20
    assert meta["splits"]["dev"]["with_think"] == 0


def test_cot_reasoning_key_is_read(v2_subset, images, tweets, tmp_path):
    tweet = tweets["train"][2]
    cot_file = tmp_path / "cot.jsonl"
    cot_file.write_text(
        json.dumps({"image_path": f"/d/{tweet.img_id}.png", "reasoning": "Why."}) + "\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    assert _sft(v2_subset, images, out, "--cot", str(cot_file), "--split", "train") == 0
    rows = {r["id"]: r for r in _rows(out / "train.jsonl")}
    assert _target(rows[tweet.img_id]).startswith("<think>Why.</think><answer>")
    assert sum(r["think"] is not None for r in rows.values()) == 1


def test_missing_cot_file_is_an_error_naming_the_flag(v2_subset, images, tmp_path, caplog):
    missing = tmp_path / "nope.jsonl"
    assert _sft(v2_subset, images, tmp_path / "out", "--cot", str(missing)) == 2
    error = _errors(caplog)
    assert "--cot" in error
    assert str(missing) in error


def test_bad_cot_line_is_an_error_naming_file_and_line(v2_subset, images, tmp_path, caplog):
    cot_file = tmp_path / "cot.jsonl"
    cot_file.write_text('{"img_id": "797970", "think": "ok"}\n{"img_id": \n', encoding="utf-8")
    assert _sft(v2_subset, images, tmp_path / "out", "--cot", str(cot_file)) == 2
    assert f"{cot_file}:2" in _errors(caplog)


def test_cot_line_without_an_id_is_an_error_naming_the_line(v2_subset, images, tmp_path, caplog):
    cot_file = tmp_path / "cot.jsonl"
    cot_file.write_text('{"think": "orphan"}\n', encoding="utf-8")
    assert _sft(v2_subset, images, tmp_path / "out", "--cot", str(cot_file)) == 2
    error = _errors(caplog)
    assert f"{cot_file}:1" in error
    assert "img_id" in error


def test_cot_text_with_answer_tags_is_an_error_not_a_traceback(v2_subset, images, tmp_path, caplog):
    cot_file = tmp_path / "cot.jsonl"
    cot_file.write_text(
        json.dumps({"img_id": "575705", "think": "x</think><answer>y"}) + "\n", encoding="utf-8"
    )
    assert _sft(v2_subset, images, tmp_path / "out", "--cot", str(cot_file)) == 2
    assert "575705" in _errors(caplog)


def test_cot_line_that_is_not_an_object_is_an_error(v2_subset, images, tmp_path, caplog):
    cot_file = tmp_path / "cot.jsonl"
    cot_file.write_text('["797970", "think"]\n', encoding="utf-8")
    assert _sft(v2_subset, images, tmp_path / "out", "--cot", str(cot_file)) == 2
    assert f"{cot_file}:1" in _errors(caplog)


# ---------------------------------------------------------------------------------------------
# Images: missing, unreadable, rotated, wrong size
# ---------------------------------------------------------------------------------------------


def test_missing_image_is_an_error_naming_tweet_and_path(v2_subset, tweets, tmp_path, caplog):
    gone = tweets["train"][5].img_id
    folder = _make_images(tmp_path / "imgs", tweets["train"], skip=(gone,))
    out = tmp_path / "out"
    assert _sft(v2_subset, folder, out, "--split", "train") == 2
    error = _errors(caplog)
    assert f"tweet {gone}" in error
    assert str(folder / f"{gone}.jpg") in error
    assert "--skip-missing-images" in error
    assert not (out / "train.jsonl").exists()


def test_skip_missing_images_leaves_the_row_out_and_counts_it(v2_subset, tweets, tmp_path):
    gone = (tweets["train"][5].img_id, tweets["train"][30].img_id)
    folder = _make_images(tmp_path / "imgs", tweets["train"], skip=gone)
    out = tmp_path / "out"
    assert _sft(v2_subset, folder, out, "--split", "train", "--skip-missing-images") == 0
    rows = _rows(out / "train.jsonl")
    assert [r["id"] for r in rows] == [t.img_id for t in tweets["train"] if t.img_id not in gone]
    meta = json.loads((out / "sft_meta.json").read_text(encoding="utf-8"))
    s = meta["splits"]["train"]
    assert s["rows"] == 38
    assert s["missing_images"] == 2
    assert s["missing_image_ids"] == list(gone)


def test_other_image_extensions_are_found(v2_subset, tweets, tmp_path):
    folder = _make_images(tmp_path / "imgs", tweets["dev"])
    tweet = tweets["dev"][3]
    jpg = folder / f"{tweet.img_id}.jpg"
    png = jpg.with_suffix(".png")
    Image.open(jpg).save(png)
    jpg.unlink()
    assert _sft(v2_subset, folder, tmp_path / "out", "--split", "dev") == 0
    row = _rows(tmp_path / "out" / "dev.jsonl")[3]
    assert row["images"] == [str(png.resolve())]


def test_unreadable_image_is_an_error_naming_the_path(v2_subset, tweets, tmp_path, caplog):
    folder = _make_images(tmp_path / "imgs", tweets["dev"])
    bad = folder / f"{tweets['dev'][0].img_id}.jpg"
    bad.write_bytes(b"this is not a jpeg")
    assert _sft(v2_subset, folder, tmp_path / "out", "--split", "dev") == 2
    assert str(bad) in _errors(caplog)


def _jpeg(path: Path, size: tuple[int, int], orientation: int | None) -> Path:
    im = Image.new("RGB", size, (10, 200, 30))
    if orientation is None:
        im.save(path)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        im.save(path, exif=exif)
    return path


@pytest.mark.parametrize(
    ("orientation", "expected"),
    [
        (None, (320, 240)),
        (1, (320, 240)),
        (3, (320, 240)),
        (5, (240, 320)),
        (6, (240, 320)),
        (8, (240, 320)),
    ],
)
def test_image_size_applies_exif_orientation(tmp_path, orientation, expected):
    assert image_size(_jpeg(tmp_path / "x.jpg", (320, 240), orientation)) == expected


def test_image_size_errors_name_the_path(tmp_path):
    with pytest.raises(InputError, match="nope.jpg"):
        image_size(tmp_path / "nope.jpg")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\x00" * 10)
    with pytest.raises(InputError, match="junk.jpg"):
        image_size(junk)


def test_rotated_image_reports_the_transposed_size(v2_subset, tweets, tmp_path):
    folder = _make_images(tmp_path / "imgs", tweets["train"])
    # 797970 has no XML (no size): the file decides. Stored 320 x 240, displayed 240 x 320.
    plain = next(t for t in tweets["train"] if t.img_id == "797970")
    assert plain.image_size is None
    _jpeg(folder / "797970.jpg", (320, 240), 6)
    # 575705's XML says 600 x 800: a phone photo stored 800 x 600 with orientation 6 matches.
    rotated = next(t for t in tweets["train"] if t.img_id == "575705")
    assert rotated.image_size == (600, 800)
    _jpeg(folder / "575705.jpg", (800, 600), 6)
    out = tmp_path / "out"
    assert _sft(v2_subset, folder, out, "--split", "train") == 0
    rows = {r["id"]: r for r in _rows(out / "train.jsonl")}
    assert rows["797970"]["image_size"] == [240, 320]
    model_h, model_w = smart_resize(320, 240, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    assert rows["797970"]["model_size"] == [model_w, model_h]
    _check_row(rows["575705"], rotated, folder / "575705.jpg", (600, 800))
    meta = json.loads((out / "sft_meta.json").read_text(encoding="utf-8"))
    assert meta["splits"]["train"]["size_mismatch"] == 0


def test_size_mismatch_is_counted_and_boxes_use_the_file_size(v2_subset, tweets, tmp_path):
    folder = _make_images(tmp_path / "imgs", tweets["train"])
    tweet = next(t for t in tweets["train"] if t.img_id == "575705")
    _jpeg(folder / "575705.jpg", (800, 600), None)  # XML says 600 x 800
    out = tmp_path / "out"
    assert _sft(v2_subset, folder, out, "--split", "train") == 0
    rows = {r["id"]: r for r in _rows(out / "train.jsonl")}
    _check_row(rows["575705"], tweet, folder / "575705.jpg", (800, 600))
    meta = json.loads((out / "sft_meta.json").read_text(encoding="utf-8"))
    assert meta["splits"]["train"]["size_mismatch"] == 1


# ---------------------------------------------------------------------------------------------
# Data folder
# ---------------------------------------------------------------------------------------------


def test_missing_split_is_an_error_naming_it(v2_subset, images, tmp_path, caplog):
    assert _sft(v2_subset, images, tmp_path / "out", "--split", "test") == 2
    assert "'test'" in _errors(caplog)


def test_missing_data_folder_with_split_is_an_error(images, tmp_path, caplog):
    missing = tmp_path / "no-data"
    assert _sft(missing, images, tmp_path / "out", "--split", "train") == 2
    assert str(missing) in _errors(caplog)


def test_missing_data_folder_is_an_error_naming_it(images, tmp_path, caplog):
    missing = tmp_path / "no-data"
    assert _sft(missing, images, tmp_path / "out") == 2
    assert str(missing) in _errors(caplog)


def test_output_folder_is_created_and_reruns_overwrite(v2_subset, images, tmp_path):
    out = tmp_path / "deep" / "er" / "out"
    assert _sft(v2_subset, images, out, "--split", "dev") == 0
    first = (out / "dev.jsonl").read_bytes()
    assert _sft(v2_subset, images, out, "--split", "dev") == 0
    assert (out / "dev.jsonl").read_bytes() == first
    assert sorted(p.name for p in out.iterdir()) == ["dev.jsonl", "sft_meta.json"]


def test_fixture_is_not_modified(v2_subset, tmp_path):
    # The command only reads the data folder: a copy compares equal afterwards.
    copy = tmp_path / "data"
    shutil.copytree(v2_subset, copy)
    before = {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    imgs = _make_images(tmp_path / "imgs", load_split(copy, "dev"))
    assert _sft(copy, imgs, tmp_path / "out", "--split", "dev") == 0
    after = {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    assert after == before


def test_gold_boxes_with_no_area_in_the_image_are_left_out_of_targets():
    pytest.importorskip("torch")
    from gmner.train.augment import GRBPConfig
    from gmner.train.dataset import ExampleSettings, target_text

    row = {
        "image_size": (100, 50),
        "records": [
            {"mention": "Alice", "type": "PER", "boxes": [[10, 10, 20, 20], [150, 10, 160, 20]]},
            {"mention": "Paris", "type": "LOC", "boxes": [[30, 50, 40, 60]]},  # below the image
        ],
    }
    settings = ExampleSettings(
        min_pixels=56 * 56, max_pixels=112 * 112, use_cot=False, max_length=512,
        grbp=GRBPConfig(enabled=False), seed=0, prompt="full",
    )  # fmt: skip
    target = target_text(row, settings, None, 0)
    assert "Alice|PER|[" in target and target.count("[") == 1  # one box kept
    assert "Paris|LOC|None" in target
