"""The Twitter-GMNER reader: the fixture subset, the quirks folder, bad files, the full data."""

from __future__ import annotations

import html
import re
from collections import Counter
from pathlib import Path
from xml.sax.saxutils import unescape as xml_unescape

import pytest

from gmner_rt.data import available_splits, load_split, read_conll, read_voc, split_stats
from gmner_rt.errors import DataError
from gmner_rt.records import format_answer, parse_output

# ---------------------------------------------------------------------------------------------
# An independent reading of the fixture files with plain string processing
# ---------------------------------------------------------------------------------------------


def _plain_tweets(root: Path, split: str) -> list[tuple[str, list[str], list[str]]]:
    text = (root / "txt" / f"{split}.txt").read_text(encoding="utf-8")
    out = []
    for block in text.split("\n\n"):
        lines = [line for line in block.split("\n") if line]
        if lines:
            rows = [line.split("\t") for line in lines[1:]]
            out.append((lines[0][len("IMGID:") :], [r[0] for r in rows], [r[1] for r in rows]))
    return out


def _plain_objects(root: Path, img_id: str) -> list[tuple[str, tuple[int, ...]]]:
    path = root / "xml" / f"{img_id}.xml"
    if not path.exists():
        return []
    objs = []
    for chunk in path.read_text(encoding="utf-8").split("<object>")[1:]:
        name = xml_unescape(re.search(r"<name>(.*?)</name>", chunk).group(1))
        box = tuple(
            int(re.search(f"<{k}>(.*?)</{k}>", chunk).group(1))
            for k in ("xmin", "ymin", "xmax", "ymax")
        )
        objs.append((name, box))
    return objs


def _plain_entities(tokens, tags):
    """(type, surface) per B- tag (the real data has no I- without a B- before it)."""
    ents = []
    for tok, tag in zip(tokens, tags, strict=True):
        if tag.startswith("B-"):
            ents.append([tag[2:], [tok]])
        elif tag.startswith("I-"):
            assert ents and ents[-1][0] == tag[2:]
            ents[-1][1].append(tok)
    return [(t, " ".join(toks)) for t, toks in ents]


def _plain_stats(root: Path, split: str) -> dict:
    c: Counter = Counter()
    by_type: dict[str, Counter] = {}
    for img_id, tokens, tags in _plain_tweets(root, split):
        objs = _plain_objects(root, img_id)
        c["tweets"] += 1
        c["xml_objects"] += len(objs)
        for etype, surface in _plain_entities(tokens, tags):
            n = sum(1 for name, _ in objs if name == surface)
            for counter in (c, by_type.setdefault(etype, Counter())):
                counter["entities"] += 1
                counter["groundable"] += n > 0
                counter["boxes"] += n
    return {**c, "by_type": {t: dict(v) for t, v in sorted(by_type.items())}}


# ---------------------------------------------------------------------------------------------
# The v2.0 fixture subset
# ---------------------------------------------------------------------------------------------

# Counted by a throwaway script when the subset was chosen (see fixtures/README.md).
EXPECTED = {
    "train": dict(tweets=40, entities=86, groundable=39, boxes=56, xml_objects=50),
    "dev": dict(tweets=30, entities=58, groundable=22, boxes=37, xml_objects=34),
}


@pytest.fixture(scope="module")
def splits(v2_subset):
    return {s: load_split(v2_subset, s) for s in ("train", "dev")}


def _tweet(tweets, img_id):
    (t,) = [t for t in tweets if t.img_id == img_id]
    return t


@pytest.mark.parametrize("split", ["train", "dev"])
def test_split_stats_match_an_independent_count(splits, v2_subset, split):
    stats = split_stats(splits[split])
    plain = _plain_stats(v2_subset, split)
    for key, value in EXPECTED[split].items():
        assert stats[key] == value == plain[key], key
    for etype, counts in plain["by_type"].items():
        assert stats["by_type"][etype] == {
            k: counts.get(k, 0) for k in ("entities", "groundable", "boxes")
        }
    assert set(stats["by_type"]) == {"PER", "LOC", "ORG", "OTHER"}


@pytest.mark.parametrize("split", ["train", "dev"])
def test_tokens_tags_and_text(splits, v2_subset, split):
    tweets = splits[split]
    plain = _plain_tweets(v2_subset, split)
    assert [t.img_id for t in tweets] == [p[0] for p in plain]
    for tweet, (_, tokens, tags) in zip(tweets, plain, strict=True):
        assert list(tweet.tokens) == tokens
        assert list(tweet.tags) == tags
        assert tweet.text == " ".join(html.unescape(tok) for tok in tokens)
        assert tweet.xml_objects == len(_plain_objects(v2_subset, tweet.img_id))


@pytest.mark.parametrize("split", ["train", "dev"])
def test_entities_against_the_text_and_the_xml(splits, v2_subset, split):
    for tweet in splits[split]:
        objs = _plain_objects(v2_subset, tweet.img_id)
        plain = _plain_entities(tweet.tokens, tweet.tags)
        assert [(e.type, e.surface) for e in tweet.entities] == plain
        for e in tweet.entities:
            assert tweet.text[e.char_span[0] : e.char_span[1]] == e.mention
            assert e.mention == html.unescape(e.surface)
            assert e.surface == " ".join(tweet.tokens[e.token_span[0] : e.token_span[1]])
            expected = tuple(box for name, box in objs if name == e.surface) or None
            assert e.boxes == expected, (tweet.img_id, e)
            assert e.record().boxes == e.boxes


def test_html_entities_in_text(splits):
    train = splits["train"]
    assert _tweet(train, "1058383").text.endswith("JANI-KING OF BRAZIL > ;")
    assert _tweet(train, "70242").text == "Me going past KFC without getting food < ; /3"
    dev_texts = " ".join(t.text for t in splits["dev"])
    assert "&gt" not in dev_texts and "&lt" not in dev_texts and "&amp" not in dev_texts


@pytest.mark.parametrize(
    "img_id,mention,etype,box,size",
    [
        ("593767", "Fox & ; Fin Financial Group", "ORG", (265, 52, 399, 89), (600, 381)),
        ("110081", "Data Science & ; Big Data Analytics", "OTHER", (374, 27, 556, 272), None),
        ("799159", "Neil Gaiman Reimagines Hansel & ; Gretel", "OTHER", (2, 1, 599, 414), None),
    ],
)
def test_amp_semicolon_mentions(splits, img_id, mention, etype, box, size):
    tweet = _tweet(splits["train"], img_id)
    (e,) = [e for e in tweet.entities if ";" in e.mention]
    assert e.mention == mention
    assert e.surface == mention.replace("&", "&amp")
    assert e.boxes == (box,)
    if size:
        assert tweet.image_size == size
    assert tweet.text[e.char_span[0] : e.char_span[1]] == mention
    # The record format writes and reads it back.
    assert parse_output(format_answer([e.record()])).records == (e.record(),)


def test_amp_mention_without_box(splits):
    tweet = _tweet(splits["train"], "121503")
    assert [(e.type, e.mention, e.boxes) for e in tweet.entities] == [
        ("ORG", "NOFA-NY", None),
        ("OTHER", "Glens Falls Food & ; Farm Fest", None),
    ]
    assert tweet.image_size is None and tweet.xml_objects == 0


def test_several_boxes(splits):
    bills = _tweet(splits["train"], "70291").entities
    assert [(e.mention, e.boxes) for e in bills] == [
        ("Buffalo Bills", ((275, 545, 317, 573), (194, 126, 213, 157), (284, 108, 302, 120)))
    ]
    oscars = _tweet(splits["train"], "227313")
    by_mention = {e.mention: e for e in oscars.entities}
    assert len(by_mention["Oscars"].boxes) == 3
    assert by_mention["Gandhi"].boxes is None
    assert by_mention["Ben Kingsley"].boxes == ((279, 58, 538, 412),)


def test_same_name_entities_share_all_boxes(splits):
    ravens = _tweet(splits["train"], "13866")
    assert [(e.mention, e.token_span, e.boxes) for e in ravens.entities] == [
        ("Ravens", (0, 1), ((217, 210, 269, 274), (254, 476, 296, 518))),
        ("Ravens", (8, 9), ((217, 210, 269, 274), (254, 476, 296, 518))),
        ("Steelers", (10, 11), ((463, 212, 499, 252),)),
    ]
    nba = _tweet(splits["train"], "17_06_6636")
    assert [e.boxes for e in nba.entities if e.mention == "NBA"] == [None, None, None]
    coco = _tweet(splits["dev"], "72982")
    cocos = [e for e in coco.entities if e.mention == "Coco"]
    assert len(cocos) == 2 and cocos[0].char_span != cocos[1].char_span
    assert cocos[0].boxes == cocos[1].boxes == ((2, 1, 468, 400), (1, 1, 470, 400))


def test_ungroundable_and_empty(splits):
    train = splits["train"]
    no_entity = _tweet(train, "16_05_20_112")
    assert no_entity.entities == () and no_entity.records() == ()
    # An XML file, but one entity has no box.
    prado = _tweet(train, "20175")
    assert [(e.type, e.mention, e.boxes) for e in prado.entities] == [
        ("LOC", "Museo del Prado", ((1, 88, 598, 688),)),
        ("LOC", "madrid", None),
    ]
    # Long OTHER spans keep all their tokens.
    longest = max(
        (e for t in train for e in t.entities if e.type == "OTHER"),
        key=lambda e: e.token_span[1] - e.token_span[0],
    )
    assert longest.token_span[1] - longest.token_span[0] >= 7


@pytest.mark.parametrize("split", ["train", "dev"])
def test_gold_records_round_trip_through_the_format(splits, split):
    for tweet in splits[split]:
        recs = tweet.records()
        assert parse_output(format_answer(recs)).records == recs


def test_available_splits(v2_subset, v1_quirks):
    assert available_splits(v2_subset) == ["train", "dev"]
    assert available_splits(v1_quirks) == ["train"]


# ---------------------------------------------------------------------------------------------
# The v1-quirks folder
# ---------------------------------------------------------------------------------------------


def test_quirks_files_really_have_the_quirks(v1_quirks):
    raw = (v1_quirks / "train.txt").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbfIMGID:q1\r\n")
    assert b"\r\n" in raw and b"Obama S-PER" in raw


def test_quirks_folder(v1_quirks):
    tweets = load_split(v1_quirks, "train")
    assert [t.img_id for t in tweets] == ["q1", "q2", "q3", "q4"]
    q1, q2, q3, q4 = tweets

    # BOM stripped, CRLF gone, E- read as I-.
    assert q1.tokens[0] == "RT" and all("\r" not in tok for t in tweets for tok in t.tokens)
    assert q1.tags == ("O", "B-ORG", "I-ORG", "I-ORG", "I-ORG", "I-ORG", "I-ORG", "O")
    assert q1.text == "RT Fox & ; Fin Financial Group rocks"
    (fox,) = q1.entities
    assert fox.mention == "Fox & ; Fin Financial Group"
    assert fox.surface == "Fox &amp ; Fin Financial Group"
    assert fox.char_span == (3, 30) and fox.token_span == (1, 7)
    # The XML name is written unescaped; float coordinates are rounded.
    assert fox.boxes == ((10, 21, 50, 60),)
    assert q1.image_size == (200, 100)

    # Space-separated columns, S- tags, an orphan I- starts an entity, the box is clipped.
    assert q2.tokens == ("Obama", "met", "Merkel", "in", "Paris", "&lt", "3")
    assert q2.text == "Obama met Merkel in Paris < 3"
    assert [(e.type, e.mention, e.boxes) for e in q2.entities] == [
        ("PER", "Obama", ((0, 10, 100, 80),)),
        ("PER", "Merkel", ((30, 5, 60, 40),)),
        ("LOC", "Paris", None),
    ]
    assert q2.xml_objects == 2

    # An I- of another type starts a new entity; no XML file.
    assert [(e.type, e.mention, e.token_span) for e in q3.entities] == [
        ("ORG", "New", (0, 1)),
        ("LOC", "York", (1, 2)),
    ]
    assert q3.image_size is None and q3.xml_objects == 0
    assert q4.entities == () and q4.text == "nothing here"


def test_clipping_is_logged(v1_quirks, caplog):
    with caplog.at_level("WARNING", logger="gmner_rt.data"):
        voc = read_voc(v1_quirks / "xml" / "q2.xml")
    assert voc.objects[0] == ("Obama", (0, 10, 100, 80))
    assert "clipped" in caplog.text


# ---------------------------------------------------------------------------------------------
# Errors name the file (and the line)
# ---------------------------------------------------------------------------------------------


def _folder(tmp_path: Path, text: str, xml: dict[str, str] | None = None) -> Path:
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "train.txt").write_text(text, encoding="utf-8")
    if xml:
        (tmp_path / "xml").mkdir()
        for img_id, body in xml.items():
            (tmp_path / "xml" / f"{img_id}.xml").write_text(body, encoding="utf-8")
    return tmp_path


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        load_split(tmp_path / "nowhere", "train")


def test_missing_split_file(tmp_path):
    root = _folder(tmp_path, "IMGID:1\nA\tO\n")
    with pytest.raises(DataError) as err:
        load_split(root, "dev")
    assert str(root) in str(err.value) and "dev.txt" in str(err.value)
    with pytest.raises(DataError, match="no such file"):
        read_conll(root / "txt" / "test.txt")


@pytest.mark.parametrize(
    "text,line,what",
    [
        ("A\tO\nIMGID:1\nB\tO\n", 1, "before any IMGID"),
        ("IMGID:1\nA\tO\nB\n", 3, "token<TAB>tag"),
        ("IMGID:1\nA\tO\nB\tX-PER\n", 3, "unknown tag"),
        ("IMGID:1\nA\tO\nB\tB-\n", 3, "unknown tag"),
        ("IMGID:1\nA\tO\nB\tBPER\n", 3, "unknown tag"),
        ("IMGID:1\nA\tO\nB\tO\tO\n", 3, "token<TAB>tag"),
        ("IMGID:1\nA\tO\n\nIMGID:1\nB\tO\n", 4, "repeats"),
        ("IMGID:1\nA\tO\n\nIMGID:\nB\tO\n", 4, "empty IMGID"),
        ("IMGID:1\nA\tO\n\nIMGID:2\n\n", 4, "no tokens"),
    ],
)
def test_bad_conll_rows(tmp_path, text, line, what):
    root = _folder(tmp_path, text)
    with pytest.raises(DataError) as err:
        load_split(root, "train")
    msg = str(err.value)
    assert f"{root / 'txt' / 'train.txt'}:{line}:" in msg
    assert what in msg


def test_not_utf8(tmp_path):
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "train.txt").write_bytes(b"IMGID:1\n\xff\xfe\tO\n")
    with pytest.raises(DataError, match="train.txt"):
        load_split(tmp_path, "train")


_VOC = """<annotation><size><width>100</width><height>50</height></size>
<object><name>{name}</name><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax>
<ymax>{y2}</ymax></bndbox></object></annotation>"""


def test_malformed_xml(tmp_path):
    root = _folder(tmp_path, "IMGID:7\nObama\tB-PER\n", {"7": "<annotation><object>"})
    with pytest.raises(DataError) as err:
        load_split(root, "train")
    msg = str(err.value)
    assert str(root / "xml" / "7.xml") in msg and "malformed XML" in msg and "line" in msg


@pytest.mark.parametrize(
    "coords",
    [
        dict(x1=10, y1=10, x2=10, y2=20),  # zero width
        dict(x1=10, y1=30, x2=20, y2=30),  # zero height
        dict(x1=150, y1=10, x2=200, y2=20),  # entirely right of the 100 px wide image
    ],
)
def test_empty_box(tmp_path, coords):
    root = _folder(tmp_path, "IMGID:7\nObama\tB-PER\n", {"7": _VOC.format(name="Obama", **coords)})
    with pytest.raises(DataError) as err:
        load_split(root, "train")
    msg = str(err.value)
    assert str(root / "xml" / "7.xml") in msg and "empty box" in msg and "Obama" in msg


@pytest.mark.parametrize(
    "body,what",
    [
        (_VOC.format(name="", x1=1, y1=1, x2=5, y2=5), "empty <name>"),
        (_VOC.format(name="A", x1="left", y1=1, x2=5, y2=5), "<xmin> is not a number"),
        ("<annotation><object><name>A</name></object></annotation>", "missing <xmin>"),
    ],
)
def test_bad_voc_object(tmp_path, body, what):
    path = tmp_path / "x.xml"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_voc(path)
    assert str(path) in str(err.value) and what in str(err.value)


def test_voc_reversed_corners_and_no_size(tmp_path):
    path = tmp_path / "x.xml"
    path.write_text(
        "<annotation><object><name>A &amp;amp; B</name><bndbox><xmin>50</xmin><ymin>40</ymin>"
        "<xmax>10</xmax><ymax>5</ymax></bndbox></object></annotation>",
        encoding="utf-8",
    )
    voc = read_voc(path)
    assert voc.size is None
    assert voc.objects == (("A &amp; B", (10, 5, 50, 40)),)


# ---------------------------------------------------------------------------------------------
# The full shared data (skipped when absent)
# ---------------------------------------------------------------------------------------------

# Given by the project's issue, independently of the code.
FULL = {
    "train": dict(tweets=7000, entities=11779, groundable=4733, boxes=5723, xml_objects=5652),
    "dev": dict(tweets=1500, entities=2450, groundable=991, boxes=1171, xml_objects=1164),
}


@pytest.mark.parametrize("split", ["train", "dev"])
def test_full_data_counts(shared_data, split):
    tweets = load_split(shared_data, split)
    stats = split_stats(tweets)
    assert {k: stats[k] for k in FULL[split]} == FULL[split]
    for tweet in tweets:
        for e in tweet.entities:
            assert tweet.text[e.char_span[0] : e.char_span[1]] == e.mention
