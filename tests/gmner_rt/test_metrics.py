"""GMNER / MNER / EEG scoring: one hand-computed case per rule, both protocols."""

from __future__ import annotations

import pytest

from gmner_rt.answers import answer_to_original
from gmner_rt.data import load_split
from gmner_rt.geometry import ImageGeometry
from gmner_rt.metrics import Counts, evaluate, max_matching, region_correct
from gmner_rt.predictions import ModelText
from gmner_rt.records import EntityRecord, format_answer

A = (0, 0, 100, 100)
FAR = (500, 500, 600, 600)


def rec(mention, etype="PER", *boxes):
    return EntityRecord(mention, etype, tuple(boxes) if boxes else None)


def answer(*records):
    return format_answer(records)


SAME = (1000, 1000)  # model space = original pixels: e2e's scaling is the identity


def score(gold, output, protocol="hindex"):
    """(gmner, mner, eeg) as (correct, predicted, gold) triples for one tweet."""
    texts = {"t": ModelText(output, SAME, SAME)}
    r = evaluate({"t": gold}, {"t": output}, protocol=protocol, model_texts=texts)
    return tuple((c.correct, c.predicted, c.gold) for c in (r.gmner, r.mner, r.eeg))


def test_none_region_matches_only_none():
    gold = [rec("Obama")]
    assert score(gold, answer(rec("Obama"))) == ((1, 1, 1),) * 3
    assert score(gold, answer(rec("Obama", "PER", A))) == ((0, 1, 1), (1, 1, 1), (0, 1, 1))
    assert score([rec("Obama", "PER", A)], answer(rec("Obama"))) == (
        (0, 1, 1),
        (1, 1, 1),
        (0, 1, 1),
    )


@pytest.mark.parametrize(
    ("pred_box", "hindex_ok", "e2e_ok"),
    [
        ((0, 0, 100, 51), True, True),  # IoU 5100 / 10000 = 0.51
        ((0, 0, 100, 50), False, True),  # IoU exactly 0.5: > 0.5 fails, >= 0.5 passes
        ((0, 0, 100, 49), False, False),  # IoU 0.49
    ],
)
def test_iou_threshold_is_strict_for_hindex_and_inclusive_for_e2e(pred_box, hindex_ok, e2e_ok):
    gold = [rec("Obama", "PER", A)]
    out = answer(rec("Obama", "PER", pred_box))
    assert score(gold, out)[0][0] == int(hindex_ok)
    assert score(gold, out, "e2e")[0][0] == int(e2e_ok)


def test_one_predicted_box_may_match_any_of_several_gold_boxes():
    gold = [rec("Bulls", "ORG", (0, 0, 10, 10), FAR)]
    assert score(gold, answer(rec("Bulls", "ORG", FAR)))[0] == (1, 1, 1)


def test_every_predicted_box_must_match_in_hindex_but_one_pair_suffices_in_e2e():
    gold = [rec("Bulls", "ORG", A)]
    out = answer(rec("Bulls", "ORG", A, FAR))
    assert score(gold, out)[0] == (0, 1, 1)
    assert score(gold, out, "e2e")[0] == (1, 1, 1)
    assert score([rec("Bulls", "ORG", A, FAR)], out)[0] == (1, 1, 1)


def test_a_needless_repeat_is_a_false_positive():
    gold = [rec("Obama")]
    assert score(gold, answer(rec("Obama"), rec("Obama"))) == ((1, 2, 1),) * 3


def test_a_mention_written_twice_can_be_found_twice():
    gold = [rec("NBA", "ORG"), rec("NBA", "ORG")]
    assert score(gold, answer(rec("NBA", "ORG")))[0] == (1, 1, 2)
    assert score(gold, answer(rec("NBA", "ORG"), rec("NBA", "ORG")))[0] == (2, 2, 2)


def test_wrong_type_fails_gmner_and_mner_but_not_eeg():
    gold = [rec("Jordan", "PER", A)]
    assert score(gold, answer(rec("Jordan", "LOC", A))) == ((0, 1, 1), (0, 1, 1), (1, 1, 1))


def test_unparseable_segment_is_a_wrong_prediction_in_hindex_and_dropped_in_e2e():
    gold = [rec("Obama")]
    out = "<answer>Obama|PER|None; Biden|PER</answer>"
    assert score(gold, out) == ((1, 2, 1),) * 3
    assert score(gold, out, "e2e") == ((1, 1, 1),) * 3
    report = evaluate({"t": gold}, {"t": out})
    assert report.malformed == 1


def test_mentions_compare_after_unescape_and_whitespace_collapse_in_hindex_only():
    gold = [rec("AT&T", "ORG"), rec("Tom Hanks")]
    # The entity's ';' is escaped, as the record format requires for a ';' in a mention.
    out = "<answer>AT&amp\\;T|ORG|None; Tom   Hanks|PER|None</answer>"
    assert score(gold, out)[1] == (2, 2, 2)
    assert score(gold, out, "e2e")[1] == (0, 2, 2)


def test_maximum_matching_beats_greedy_assignment():
    # p0 fits both golds, p1 fits only g0: greedy p0->g0 leaves p1 unmatched (1), the
    # maximum matching p0->g1, p1->g0 finds 2.
    gold = [rec("Ravens", "ORG", A, FAR), rec("Ravens", "ORG", A)]
    out = answer(rec("Ravens", "ORG", A), rec("Ravens", "ORG", FAR))
    assert score(gold, out)[0] == (2, 2, 2)
    assert max_matching(2, {0: [0, 1], 1: [0]}) == 2


def test_missing_tweets_count_their_gold_and_unknown_ids_are_refused():
    gold = {"a": [rec("Obama")], "b": [rec("Paris", "LOC"), rec("NBA", "ORG")], "c": []}
    report = evaluate(gold, {"a": answer(rec("Obama"))})
    assert (report.gmner.correct, report.gmner.predicted, report.gmner.gold) == (1, 1, 3)
    assert report.missing == 2 and report.tweets == 3
    assert report.gmner.precision == 1.0 and report.gmner.recall == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="zzz"):
        evaluate(gold, {"zzz": "None"})
    with pytest.raises(ValueError, match="protocol"):
        evaluate(gold, {}, protocol="nope")


def test_by_type_splits_the_typed_tasks():
    gold = {"t": [rec("Obama", "PER", A), rec("Paris", "LOC")]}
    out = {"t": answer(rec("Obama", "PER", FAR), rec("Paris", "LOC"), rec("Nike", "ORG"))}
    by_type = evaluate(gold, out).by_type
    assert (by_type["PER"]["gmner"].correct, by_type["PER"]["mner"].correct) == (0, 1)
    assert (by_type["LOC"]["gmner"].correct, by_type["LOC"]["gmner"].gold) == (1, 1)
    assert (by_type["ORG"]["mner"].predicted, by_type["ORG"]["mner"].gold) == (1, 0)


def test_counts_give_micro_precision_recall_f1():
    c = Counts(3, 4, 6) + Counts(1, 1, 0)
    assert (c.correct, c.predicted, c.gold) == (4, 5, 6)
    assert c.f1 == pytest.approx(2 * 0.8 * (4 / 6) / (0.8 + 4 / 6))
    assert Counts().f1 == 0.0
    assert region_correct(None, None) and not region_correct(None, (A,))


@pytest.mark.parametrize("protocol", ["hindex", "e2e"])
def test_gold_as_prediction_scores_one_on_the_real_dev_split(shared_data, protocol):
    """A perfect model: its text in model pixels (e2e) or mapped back (hindex)."""
    tweets = load_split(shared_data, "dev")
    gold = {t.img_id: t.records() for t in tweets}
    outputs, texts = {}, {}
    for t in tweets:
        size = t.image_size or SAME
        geo = ImageGeometry.for_image(*size, min_pixels=256 * 784, max_pixels=1024 * 784)
        raw = format_answer([r.map_boxes(geo.to_model) for r in t.records()], think="why")
        texts[t.img_id] = ModelText(raw, size, geo.model_size)
        outputs[t.img_id] = answer_to_original(raw, geo)
    report = evaluate(gold, outputs, protocol=protocol, model_texts=texts)
    assert (report.gmner.f1, report.mner.f1, report.eeg.f1) == (1.0, 1.0, 1.0)
    assert report.gmner.gold == 2450 and report.malformed == 0 and report.dropped == 0


def test_gold_through_model_space_and_back_still_scores_one(shared_data):
    """Boxes written in model space by a perfect model, mapped back, keep IoU > 0.5."""
    tweets = [t for t in load_split(shared_data, "dev") if t.image_size][:300]
    gold = {t.img_id: t.records() for t in tweets}
    outputs = {}
    for t in tweets:
        geo = ImageGeometry.for_image(*t.image_size, min_pixels=256 * 784, max_pixels=1024 * 784)
        model_space = format_answer([r.map_boxes(geo.to_model) for r in t.records()])
        outputs[t.img_id] = answer_to_original(model_space, geo)
    assert evaluate(gold, outputs).gmner.f1 == 1.0
