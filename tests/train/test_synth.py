"""``gmner data synth``: the synthetic dataset, read back with the real Twitter-GMNER reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gmner.runtime import cli
from gmner.train.synth import (
    NAMES,
    SPLITS,
    SynthConfig,
    SynthTweet,
    cell_words,
    plan_tweet,
    render,
    think_text,
    write_synth,
)
from PIL import Image

from gmner_rt.data import available_splits, find_image, load_split
from gmner_rt.errors import InputError

#: 300 tweets; small images keep the test fast.
SAMPLE = SynthConfig(seed=7, train=240, dev=30, test=30, min_side=96, max_side=192)
TOLERANCE = 12  # the per-glyph colour jitter is at most 10 per channel


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "data"
    return out, write_synth(out, SAMPLE)


@pytest.fixture(scope="module")
def tweets(sample) -> dict[str, list]:
    return {split: load_split(sample[0], split) for split in available_splits(sample[0])}


def _pixels(folder: Path, img_id: str) -> np.ndarray:
    with Image.open(find_image([folder / "images"], img_id)) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def _colour_mask(pixels: np.ndarray, name: str) -> np.ndarray:
    rgb = np.array(NAMES[name][1].rgb)
    return (np.abs(pixels - rgb) <= TOLERANCE).all(axis=-1)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_every_name_has_its_own_glyph():
    assert len(NAMES) == 24
    assert len({glyph for _, glyph in NAMES.values()}) == 24
    tokens = [t for name in NAMES for t in name.split()]
    assert len(tokens) == len(set(tokens))


def test_reader_loads_every_split(sample, tweets):
    folder, counts = sample
    assert available_splits(folder) == list(SPLITS)
    ids = [t.img_id for split in SPLITS for t in tweets[split]]
    assert len(ids) == len(set(ids)) == 300 and all(i.isdigit() for i in ids)
    for split in SPLITS:
        assert len(tweets[split]) == counts[split]["tweets"]
        assert sum(len(t.entities) for t in tweets[split]) == counts[split]["entities"]
        for tweet in tweets[split]:
            with Image.open(find_image([folder / "images"], tweet.img_id)) as im:
                assert tweet.image_size in (None, im.size)
                assert SAMPLE.min_side <= min(im.size) <= max(im.size) <= SAMPLE.max_side


def test_mentions_are_whole_token_spans_of_known_names(tweets):
    for tweet in (t for split in tweets.values() for t in split):
        assert len(tweet.entities) <= 4
        for e in tweet.entities:
            start, end = e.token_span
            assert e.mention == " ".join(tweet.tokens[start:end])
            assert e.type == NAMES[e.mention][0]
        assert len({e.mention for e in tweet.entities}) == len(tweet.entities)


def test_boxes_are_tight_around_the_glyph_colour(sample, tweets):
    folder = sample[0]
    for tweet in tweets["dev"] + tweets["test"]:
        pixels = _pixels(folder, tweet.img_id)
        h, w = pixels.shape[:2]
        for e in (e for e in tweet.entities if e.boxes):
            mask = _colour_mask(pixels, e.mention)
            for x1, y1, x2, y2 in e.boxes:
                assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
                near = np.zeros_like(mask)
                near[max(0, y1 - 2) : y2 + 2, max(0, x1 - 2) : x2 + 2] = True
                ys, xs = np.nonzero(mask & near)
                assert len(xs) > 0.4 * (x2 - x1) * (y2 - y1)  # a triangle fills half its box
                found = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
                assert np.abs(np.subtract(found, (x1, y1, x2, y2))).max() <= 1


def test_none_entities_are_not_drawn(sample, tweets):
    folder = sample[0]
    nones = [(t, e) for t in tweets["train"] for e in t.entities if e.boxes is None]
    assert nones
    for tweet, e in nones:
        assert not _colour_mask(_pixels(folder, tweet.img_id), e.mention).any()


def test_distractors_are_drawn_but_never_mentioned():
    planned = [plan_tweet(np.random.default_rng(k), SAMPLE, str(k)) for k in range(300)]
    assert sum(len(p.distractors) for p in planned) > 100
    for p in planned:
        drawn = {name for name, *_ in p.glyphs}
        assert set(p.distractors) <= drawn
        assert drawn - set(p.mentions) == set(p.distractors)
        text = " ".join(p.tokens)
        assert not any(name in text for name in p.distractors)


def test_some_entity_has_two_boxes(tweets):
    doubled = [e for split in tweets.values() for t in split for e in t.entities if e.boxes]
    doubled = [e for e in doubled if len(e.boxes) == 2]
    assert doubled
    for e in doubled:
        (a1, b1, a2, b2), (c1, d1, c2, d2) = e.boxes
        assert a2 <= c1 or c2 <= a1 or b2 <= d1 or d2 <= b1  # the two glyphs do not overlap


def test_reasoning_is_short_and_names_every_mention(sample, tweets):
    rows = [json.loads(line) for line in (sample[0] / "cot.jsonl").read_text().splitlines()]
    by_id = {row["img_id"]: row["think"] for row in rows}
    assert len(by_id) == 300
    for tweet in (t for split in tweets.values() for t in split):
        think = by_id[tweet.img_id]
        assert len(think.split()) < 60
        for e in tweet.entities:
            region = think.split(f"{e.mention} (")[1].split(".")[0]
            assert ("nowhere" in region) == (e.boxes is None)
            # the colour is named either way: the name tells the model what to look for
            assert NAMES[e.mention][1].colour in region


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    cfg = SynthConfig(seed=3, train=6, dev=2, test=2)
    write_synth(tmp_path / "a", cfg)
    write_synth(tmp_path / "b", cfg)
    write_synth(tmp_path / "c", SynthConfig(seed=4, train=6, dev=2, test=2))
    a, b, c = (_files(tmp_path / k) for k in "abc")
    assert a == b
    assert a["txt/train.txt"] != c["txt/train.txt"]
    assert a["images/1000000.png"] != c["images/1000000.png"]


def test_a_split_does_not_depend_on_the_others_sizes(tmp_path):
    write_synth(tmp_path / "a", SynthConfig(train=3, dev=2, test=2))
    write_synth(tmp_path / "b", SynthConfig(train=5, dev=1, test=2))
    assert (tmp_path / "a/txt/test.txt").read_bytes() == (tmp_path / "b/txt/test.txt").read_bytes()


def test_refuses_a_non_empty_out_dir(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        write_synth(tmp_path, SynthConfig(train=1, dev=0, test=0))


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"train": -1}, "--train"),
        ({"train": 0, "dev": 0, "test": 0}, "--train/--dev/--test"),
        ({"seed": -1}, "--seed"),
        ({"min_side": 300, "max_side": 200}, "min_side"),
        ({"glyph_max": 0.9}, "glyph_max"),
        ({"mention_probs": (0.5, 0.4)}, "mention_probs"),
        ({"not_drawn": 1.5}, "not_drawn"),
        ({"grid": 2}, "grid"),
        ({"grid": -1}, "grid"),
        ({"glyph_alpha": 0.3}, "glyph_alpha"),
    ],
)
def test_config_errors_name_the_field(kwargs, flag):
    with pytest.raises(InputError, match=flag):
        SynthConfig(**kwargs)


def test_cli_synth_then_stats_and_sft_with_cot(tmp_path, capsys):
    data = tmp_path / "data"
    argv = ["data", "synth", "--out", str(data), "--seed", "1"]
    assert cli.main([*argv, "--train", "6", "--dev", "2", "--test", "2"]) == 0
    assert cli.main(["data", "stats", str(data), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert [stats[s]["tweets"] for s in SPLITS] == [6, 2, 2]
    out = tmp_path / "sft"
    sft = ["data", "sft", str(data), "--images", str(data / "images"), "--out", str(out)]
    assert cli.main([*sft, "--cot", str(data / "cot.jsonl")]) == 0
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(row["think"] for row in rows)
    assert cli.main(argv) == 2  # the folder is no longer empty


def test_cli_synth_demo_writes_the_demo_models_data(tmp_path):
    data = tmp_path / "demo"
    argv = ["data", "synth", "--demo", "--out", str(data), "--train", "3", "--dev", "1"]
    assert cli.main([*argv, "--test", "1"]) == 0
    readme = (data / "README.md").read_text()
    assert "`grid`: 3" in readme and "`wash_cells`: True" in readme
    assert Image.open(next((data / "images").iterdir())).size == (336, 336)
    assert [t.img_id for t in load_split(data, "test")] == ["3000000"]
    other = ["data", "synth", "--demo", "--grid", "4", "--out", str(tmp_path / "other")]
    assert cli.main(other) == 2  # --demo fixes the grid
    assert not (tmp_path / "other").exists()


def test_position_wash_shows_where_each_pixel_is(sample, tweets):
    """Background red rises left to right, blue top to bottom (glyph pixels aside)."""
    tweet = tweets["train"][0]
    rgb = _pixels(sample[0], tweet.img_id).astype(np.float64)
    h, w, _ = rgb.shape
    background = (np.abs(rgb[..., 1] - 235) < 12) & (rgb.min(axis=-1) > 150)
    rows, cols = np.nonzero(background)
    red_by_x = np.polyfit(cols / (w - 1), rgb[rows, cols, 0], 1)[0]
    blue_by_y = np.polyfit(rows / (h - 1), rgb[rows, cols, 2], 1)[0]
    assert red_by_x > 60 and blue_by_y > 60


def test_grid_puts_each_glyph_in_its_own_cell_and_the_reasoning_names_it():
    cfg = SynthConfig(seed=5, min_side=300, max_side=300, grid=3)
    for i in range(200):
        tweet = plan_tweet(np.random.default_rng([5, i]), cfg, str(i))
        cells = []
        for _name, x, y, side in tweet.glyphs:
            col, row = int((x + side / 2) // 100), int((y + side / 2) // 100)
            assert x >= col * 100 - 5 and x + side <= (col + 1) * 100 + 5  # inside its cell
            assert 0.75 * 100 - 1 <= side <= 0.9 * 100
            cells.append((row, col))
        assert len(set(cells)) == len(cells)
        boxes = [(n, (x, y, x + s, y + s)) for n, x, y, s in tweet.glyphs]
        think = think_text(tweet, boxes, grid=3)
        for name, box in boxes:
            if name in tweet.mentions:
                assert cell_words(box, tweet.size, 3) in think


def test_cell_wash_is_one_tint_per_cell_and_nine_tints():
    cfg = SynthConfig(seed=1, min_side=300, max_side=300, grid=3, wash_cells=True, speckle=0)
    tweets = (plan_tweet(np.random.default_rng([1, i]), cfg, str(i)) for i in range(100))
    tweet = next(t for t in tweets if len(t.glyphs) >= 2)
    image, boxes = render(tweet, np.random.default_rng(0), cfg)
    pixels = np.asarray(image).astype(int)
    background = np.ones(pixels.shape[:2], dtype=bool)
    for _, (x1, y1, x2, y2) in boxes:
        background[y1:y2, x1:x2] = False
    tints = set()
    for row in range(3):
        for col in range(3):
            cell = pixels[row * 100 : (row + 1) * 100, col * 100 : (col + 1) * 100]
            seen = {
                tuple(p)
                for p in cell[background[row * 100 : (row + 1) * 100, col * 100 : (col + 1) * 100]]
            }
            assert len(seen) == 1, (row, col, len(seen))
            tints |= seen
    assert len(tints) == 9


def test_cell_wash_needs_a_grid_and_the_wash():
    with pytest.raises(InputError, match="wash_cells"):
        SynthConfig(wash_cells=True)
    with pytest.raises(InputError, match="wash_cells"):
        SynthConfig(grid=3, position_wash=False, wash_cells=True)


def test_reasoning_lists_the_glyphs_by_colour_then_places_each_mention():
    tweet = SynthTweet(
        img_id="1",
        size=(300, 300),
        tokens=("Theo", "Brandt", "meets", "Sunvale", "and", "Zentro"),
        tags=("B-PER", "I-PER", "O", "B-LOC", "O", "B-ORG"),
        mentions=("Theo Brandt", "Sunvale", "Zentro"),
        glyphs=(),
        distractors=("Pixel Quest",),
    )
    # Theo Brandt orange (drawn twice), Sunvale cyan (not drawn), Zentro red, Pixel Quest
    # green (a distractor): listed red, orange, green, each colour's places top to bottom
    boxes = [
        ("Theo Brandt", (10, 110, 90, 190)),
        ("Zentro", (210, 210, 290, 290)),
        ("Pixel Quest", (10, 10, 90, 90)),
        ("Theo Brandt", (110, 10, 190, 90)),
    ]
    assert think_text(tweet, boxes, grid=3) == (
        "Glyphs: red southeast, orange north west, green northwest. "
        "Theo Brandt (person): orange north west, Theo Brandt|PER| north west. "
        "Sunvale (place): cyan nowhere, Sunvale|LOC| nowhere. "
        "Zentro (organisation): red southeast, Zentro|ORG| southeast."
    )
    assert think_text(tweet, [], grid=3).startswith("Glyphs: none. Theo Brandt (person): orange")


def test_cell_words():
    size = (300, 300)
    assert cell_words((0, 0, 90, 90), size, 3) == "northwest"
    assert cell_words((110, 110, 190, 190), size, 3) == "centre"
    assert cell_words((210, 110, 290, 190), size, 3) == "east"
    assert cell_words((110, 210, 190, 299), size, 3) == "south"
    assert cell_words((0, 0, 60, 60), size, 5) == "row 1 column 1"


def test_translucent_glyphs_let_the_position_wash_through():
    cfg = SynthConfig(seed=2, min_side=200, max_side=200, grid=3, glyph_alpha=0.7)
    tweets = (plan_tweet(np.random.default_rng([2, i]), cfg, str(i)) for i in range(100))
    tweet = next(t for t in tweets if t.glyphs)
    image, boxes = render(tweet, np.random.default_rng(0), cfg)
    pixels = np.asarray(image).astype(int)
    for name, (x1, y1, x2, y2) in boxes:
        centre = pixels[(y1 + y2) // 2, (x1 + x2) // 2]
        solid = np.array(NAMES[name][1].rgb)
        # 30 % of a pastel background (170..255) shows through: not the solid colour
        assert np.abs(centre - solid).max() > 12
        assert np.abs(centre - solid).max() < 0.3 * 255 + 12
