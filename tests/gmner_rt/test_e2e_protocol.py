"""The ``e2e`` protocol against hand-made cases written from the reference's evaluator
(Finch-coder/E2E-GMNER: engine/evaluator.py, evaluation/parsing.py, geometry.py, metrics.py).

Each case: the model's raw text (boxes in MODEL pixels), gold records (ORIGINAL pixels), the
image's original and model sizes, and what the reference counts: (correct, predicted, gold)
for GMNER, MNER and EEG, and whether it drops the tweet.
"""

from __future__ import annotations

import pytest

from gmner_rt.metrics import e2e_gold_text, evaluate
from gmner_rt.predictions import ModelText
from gmner_rt.records import EntityRecord


def rec(mention, etype="PER", *boxes):
    return EntityRecord(mention, etype, tuple(boxes) if boxes else None)


HALF = ((1000, 500), (500, 250))  # the model sees the image at half size
SAME = ((1000, 1000), (1000, 1000))
OBAMA = [rec("Obama", "PER", (100, 100, 300, 300))]  # (50,50,150,150) at half size

# (case, raw text, gold, sizes, gmner, mner, eeg, dropped)
CASES = [
    (
        "boxes are scored in model pixels",
        "<think>x</think><answer>Obama|PER|[50,50,150,150]</answer>",
        OBAMA,
        HALF,
        (1, 1, 1),
        (1, 1, 1),
        (1, 1, 1),
        False,
    ),
    (
        "a box in original pixels is wrong",
        "<answer>Obama|PER|[100,100,300,300]</answer>",
        OBAMA,
        HALF,
        (0, 1, 1),
        (1, 1, 1),
        (0, 1, 1),
        False,
    ),
    (
        "gold scaled with Python's round (half to even) and clamped to the model image",
        "<answer>Obama|PER|[50,0,150,250]</answer>",
        [rec("Obama", "PER", (101, -40, 301, 620))],
        HALF,
        (1, 1, 1),
        (1, 1, 1),
        (1, 1, 1),
        False,
    ),
    (
        "an image side under 28 pixels drops the tweet",
        "<answer>Obama|PER|None</answer>",
        [rec("Obama")],
        ((27, 300), (28, 308)),
        (0, 0, 0),
        (0, 0, 0),
        (0, 0, 0),
        True,
    ),
    (
        "an aspect ratio over 200 drops the tweet",
        "<answer>Obama|PER|None</answer>",
        [rec("Obama")],
        ((9000, 40), (8988, 28)),
        (0, 0, 0),
        (0, 0, 0),
        (0, 0, 0),
        True,
    ),
    (
        "Unicode bars read as |, full-width semicolons and newlines split",
        "<answer>Obama｜PER｜None；Paris丨LOC丨None\nNBA∣ORG∣None</answer>",
        [rec("Obama"), rec("Paris", "LOC"), rec("NBA", "ORG")],
        SAME,
        (3, 3, 3),
        (3, 3, 3),
        (3, 3, 3),
        False,
    ),
    (
        "a segment with fewer than three fields is dropped, not counted",
        "<answer>Obama|PER; Biden|PER|None</answer>",
        [rec("Obama"), rec("Biden")],
        SAME,
        (1, 1, 2),
        (1, 1, 2),
        (1, 1, 2),
        False,
    ),
    (
        "no <answer>: what follows </think> is read",
        "<think>a name</think> Obama|PER|None",
        [rec("Obama")],
        SAME,
        (1, 1, 1),
        (1, 1, 1),
        (1, 1, 1),
        False,
    ),
    (
        "an unclosed answer keeps its tag in the first mention",
        "<think>a name</think><answer>Obama|PER|None",
        [rec("Obama")],
        SAME,
        (0, 1, 1),
        (0, 1, 1),
        (0, 1, 1),
        False,
    ),
    (
        "bad JSON elements fall back to reading the numbers four by four",
        "<answer>Obama|PER|[[50,50],[150,150]]</answer>",
        OBAMA,
        HALF,
        (1, 1, 1),
        (1, 1, 1),
        (1, 1, 1),
        False,
    ),
    (
        "numbers not in fours: the region never matches, the mention still does",
        "<answer>Obama|PER|[50,50,150]</answer>",
        OBAMA,
        HALF,
        (0, 1, 1),
        (1, 1, 1),
        (0, 1, 1),
        False,
    ),
    (
        "a region that is not a box or None never matches",
        "<answer>Obama|PER|somewhere</answer>",
        [rec("Obama")],
        SAME,
        (0, 1, 1),
        (1, 1, 1),
        (0, 1, 1),
        False,
    ),
    (
        "NONE and n/a are None regions, tags are case-insensitive",
        "<ANSWER>Obama|PER|NONE; Paris|LOC|n/a</ANSWER>",
        [rec("Obama"), rec("Paris", "LOC")],
        SAME,
        (2, 2, 2),
        (2, 2, 2),
        (2, 2, 2),
        False,
    ),
    (
        "IoU exactly 0.5 is right (>=)",
        "<answer>Obama|PER|[0,0,100,50]</answer>",
        [rec("Obama", "PER", (0, 0, 100, 100))],
        SAME,
        (1, 1, 1),
        (1, 1, 1),
        (1, 1, 1),
        False,
    ),
    (
        "one predicted box of several matching one gold box suffices",
        "<answer>Bulls|ORG|[[0,0,100,100],[500,500,600,600]]</answer>",
        [rec("Bulls", "ORG", (0, 0, 100, 100))],
        SAME,
        (1, 1, 1),
        (1, 1, 1),
        (1, 1, 1),
        False,
    ),
    (
        "a mention holding bars: fields but the last two joined by ' | ', both sides",
        "<answer>New|York|LOC|None</answer>",
        [rec("New|York", "LOC")],
        SAME,
        (1, 1, 1),
        (1, 1, 1),
        (1, 1, 1),
        False,
    ),
    (
        "mentions compare as written: no unescaping, no whitespace collapse",
        "<answer>AT&amp;T|ORG|None; Tom  Hanks|PER|None</answer>",
        [rec("AT&T", "ORG"), rec("Tom Hanks")],
        SAME,
        (0, 2, 2),
        (0, 2, 2),
        (0, 2, 2),
        False,
    ),
    (
        "a gold mention holding ';' splits as the reference's gold parser splits it",
        "<answer>B|PER|None</answer>",
        [rec("A;B")],
        SAME,
        (1, 1, 1),
        (1, 1, 1),
        (1, 1, 1),
        False,
    ),
    (
        "GMNER counts a maximum matching",
        "<answer>Ravens|ORG|[0,0,100,100]; Ravens|ORG|[500,500,600,600]</answer>",
        [
            rec("Ravens", "ORG", (0, 0, 100, 100), (500, 500, 600, 600)),
            rec("Ravens", "ORG", (0, 0, 100, 100)),
        ],
        SAME,
        (2, 2, 2),
        (2, 2, 2),
        (2, 2, 2),
        False,
    ),
    (
        "None for a tweet without entities counts nothing",
        "<think></think><answer>None</answer>",
        [],
        SAME,
        (0, 0, 0),
        (0, 0, 0),
        (0, 0, 0),
        False,
    ),
    (
        "an integer too large for a float reads as inf: no match, no crash",
        "<answer>Obama|PER|["
        + "1" * 400
        + ",0,10,10]; Paris|LOC|[["
        + "9" * 400
        + ",0,1,1]]</answer>",
        [rec("Obama", "PER", (0, 0, 10, 10)), rec("Paris", "LOC", (0, 0, 1, 1))],
        SAME,
        (0, 2, 2),
        (2, 2, 2),
        (0, 2, 2),
        False,
    ),
    (
        "a tweet without entities is kept whatever its image (the reference resizes only gold "
        "with entities)",
        "<answer>Obama|PER|None</answer>",
        [],
        ((20, 300), (28, 308)),
        (0, 1, 0),
        (0, 1, 0),
        (0, 1, 0),
        False,
    ),
    (
        "text after </answer> is ignored",
        "<answer>Obama|PER|None</answer> Paris|LOC|None",
        [rec("Obama")],
        SAME,
        (1, 1, 1),
        (1, 1, 1),
        (1, 1, 1),
        False,
    ),
]


@pytest.mark.parametrize(
    ("raw", "gold", "sizes", "gmner", "mner", "eeg", "dropped"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_reference_evaluator_cases(raw, gold, sizes, gmner, mner, eeg, dropped):
    texts = {"t": ModelText(raw, *sizes)}
    report = evaluate({"t": gold}, {"t": "unused"}, protocol="e2e", model_texts=texts)
    got = [(c.correct, c.predicted, c.gold) for c in (report.gmner, report.mner, report.eeg)]
    assert got == [gmner, mner, eeg]
    assert report.dropped == int(dropped)


def test_gold_text_is_the_references_rescaled_answer():
    gold = [
        rec("Obama", "PER", (100, 100, 300, 300)),
        rec("Bulls", "ORG", (0, 0, 10, 10), (500, 200, 1000, 500)),
        rec("Paris", "LOC"),
    ]
    assert e2e_gold_text(gold, *HALF) == (
        "Obama|PER|[50,50,150,150]; Bulls|ORG|[[0,0,5,5],[250,100,500,250]]; Paris|LOC|None"
    )
    assert e2e_gold_text([], *HALF) == "None"


def test_e2e_needs_the_model_texts():
    with pytest.raises(ValueError, match="protocol e2e scores the text as the model generated"):
        evaluate({"t": [rec("Obama")]}, {"t": "<answer>Obama|PER|None</answer>"}, protocol="e2e")
    # a tweet without a prediction still counts its gold
    report = evaluate({"t": [rec("Obama")]}, {}, protocol="e2e", model_texts={})
    assert (report.gmner.gold, report.missing, report.dropped) == (1, 1, 0)
