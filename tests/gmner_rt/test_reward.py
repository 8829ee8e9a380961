"""The reward of one completion (gmner_rt.metrics.reward): hand-made completions."""

from __future__ import annotations

import pytest

from gmner_rt.metrics import RewardWeights, reward
from gmner_rt.records import EntityRecord

A, FAR = (0, 0, 100, 100), (500, 500, 600, 600)
GOLD = [EntityRecord("Obama", "PER", (A,)), EntityRecord("Paris", "LOC", None)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>r</think><answer>Obama|PER|[0,0,100,100]; Paris|LOC|None</answer>", 1.0),
        ("<answer>Obama|PER|[500,500,600,600]; Paris|LOC|None</answer>", (0.5 + 1) / 2),
        ("<answer>Obama|PER|[0,0,100,100]</answer>", 1 / 2),  # Paris missed
        ("<answer>Obama|LOC|[0,0,100,100]; Paris|LOC|None</answer>", (1 - 0.5) / 2),  # type
        ("<answer>Obama|PER|[0,0,100,100]; Paris|LOC|None; Nike|ORG|None</answer>", 1.5 / 3),
        ("<answer>Obama|PER|[0,0,100,100]; Paris|LOC|None; not a record</answer>", 1.5 / 3),
        ("<answer>Obama|PER|[0,0,100,100]; Paris|LOC|None", (2 - 1) / 2),  # not closed
        ("<think>only thinking", -1 / 2),  # no answer at all
        ("", -1 / 2),
    ],
)
def test_reward_of_hand_made_completions(text, expected):
    assert reward(text, GOLD) == pytest.approx(expected)


def test_a_tweet_without_entities():
    assert reward("<answer>None</answer>", []) == 1.0
    assert reward("<answer>Nike|ORG|None</answer>", []) == -0.5
    assert reward("<answer>None", []) == 0.0  # right, but not closed


def test_weights_and_protocol_change_the_reward():
    text = "<answer>Obama|PER|[0,0,100,50]; Paris|LOC|None</answer>"  # IoU exactly 0.5
    assert reward(text, GOLD) == pytest.approx((0.5 + 1) / 2)  # hindex: IoU > 0.5
    assert reward(text, GOLD, RewardWeights(protocol="e2e")) == 1.0  # e2e: IoU >= 0.5
    strict = RewardWeights(partial=0.0, spurious=1.0)
    assert reward(text, GOLD, strict) == pytest.approx(1 / 2)


@pytest.mark.parametrize(
    ("field", "value"),
    [("full", 0), ("partial", 2.0), ("spurious", -1), ("malformed", float("nan")),
     ("unclosed", True), ("protocol", "strict")],
)  # fmt: skip
def test_bad_weights_are_named(field, value):
    with pytest.raises(ValueError, match=rf"^reward\.{field}"):
        RewardWeights(**{field: value})
