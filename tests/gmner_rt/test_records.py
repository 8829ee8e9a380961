"""The record format: writing, reading what models really emit, and round trips."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gmner_rt.records import (
    EntityRecord,
    ParsedOutput,
    escape_mention,
    format_answer,
    format_record,
    format_records,
    parse_answer,
    parse_output,
)

R = EntityRecord

# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------

_SPECIAL = list(";|｜；\\│￨∣ []<>/,\t") + ["None", "PER", "&amp", "\U0001f600", "\u0130", "\u212a"]
_mention_text = st.lists(
    st.one_of(st.characters(), st.sampled_from(_SPECIAL)), min_size=1, max_size=14
).map("".join)


def _valid_mention(text: str) -> bool:
    try:
        R(text, "PER")
    except ValueError:
        return False
    return True


mentions = _mention_text.filter(_valid_mention)
types = st.one_of(
    st.sampled_from(["PER", "LOC", "ORG", "OTHER"]),
    st.from_regex(r"\w[\w\-.]{0,8}", fullmatch=True),
)
coords = st.one_of(st.integers(min_value=-2000, max_value=5000), st.integers())
box = st.tuples(coords, coords, coords, coords)
regions = st.one_of(st.none(), st.lists(box, min_size=1, max_size=3).map(tuple))
records = st.builds(EntityRecord, mentions, types, regions)
thinks = st.text(max_size=40).filter(
    lambda t: not any(tag in t.lower() for tag in ("<think>", "</think>", "<answer>", "</answer>"))
)

_GRAMMAR = ["<think>", "</think>", "<answer>", "</answer>", "None", "PER"]
_GRAMMAR += list("|;[],0123456789 \n｜；")
grammar_text = st.lists(st.sampled_from(_GRAMMAR), max_size=40).map("".join)


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(st.lists(records, max_size=5))
def test_round_trip_any_records(recs):
    parsed = parse_output(format_answer(recs))
    assert parsed.records == tuple(recs)
    assert parsed.malformed == ()
    assert parsed.think is None
    assert parsed.answer_found and parsed.answer_closed


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(st.lists(records, max_size=4), thinks)
def test_round_trip_with_think(recs, think):
    parsed = parse_output(format_answer(recs, think=think))
    assert parsed.records == tuple(recs)
    assert parsed.malformed == ()
    assert parsed.think == think.strip()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(records)
def test_escaped_mention_has_no_bare_separator(rec):
    # Every separator character in the written mention is preceded by an odd run of backslashes.
    written = escape_mention(rec.mention)
    for i, ch in enumerate(written):
        if ch in ";；|｜│￨∣":
            run = len(written[:i]) - len(written[:i].rstrip("\\"))
            assert run % 2 == 1, written


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_text_never_raises(text):
    assert isinstance(parse_output(text), ParsedOutput)


@settings(max_examples=400, deadline=None)
@given(grammar_text)
def test_grammar_soup_never_raises(text):
    out = parse_output(text)
    assert isinstance(out, ParsedOutput)
    assert all(isinstance(r, EntityRecord) for r in out.records)
    assert all(isinstance(m, str) and m == m.strip() and m for m in out.malformed)


def test_non_string_input_does_not_raise():
    assert parse_output(None).records == ()
    assert isinstance(parse_output(123), ParsedOutput)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def test_format_shapes():
    assert format_record(R("Obama", "PER", ((1, 2, 3, 4),))) == "Obama|PER|[1,2,3,4]"
    assert (
        format_record(R("Obama", "PER", ((1, 2, 3, 4), (5, 6, 7, 8))))
        == "Obama|PER|[[1,2,3,4],[5,6,7,8]]"
    )
    assert format_record(R("Paris", "LOC")) == "Paris|LOC|None"
    assert format_records([]) == "None"
    assert format_answer([]) == "<answer>None</answer>"
    assert (
        format_answer([R("A", "PER"), R("B", "ORG", ((0, 0, 5, 5),))], think=" why ")
        == "<think>why</think><answer>A|PER|None; B|ORG|[0,0,5,5]</answer>"
    )


def test_semicolon_mention_is_escaped_and_round_trips():
    rec = R("Fox & ; Fin Financial Group", "ORG", ((265, 52, 399, 89),))
    written = format_answer([rec, R("Fin", "ORG")])
    assert written == (
        "<answer>Fox & \\; Fin Financial Group|ORG|[265,52,399,89]; Fin|ORG|None</answer>"
    )
    assert parse_output(written).records == (rec, R("Fin", "ORG"))


def test_format_answer_rejects_tags_in_think():
    with pytest.raises(ValueError):
        format_answer([], think="a </answer> b")


# ---------------------------------------------------------------------------------------------
# Reading what models emit
# ---------------------------------------------------------------------------------------------


def _recs(text: str) -> tuple[EntityRecord, ...]:
    return parse_output(text).records


def test_plain_answer():
    out = parse_output("<think>a man</think><answer>Obama|PER|[1,2,3,4]; Paris|LOC|None</answer>")
    assert out.think == "a man"
    assert out.records == (R("Obama", "PER", ((1, 2, 3, 4),)), R("Paris", "LOC"))
    assert out.malformed == ()
    assert out.answer_found and out.answer_closed


@pytest.mark.parametrize("bar", ["｜", "│", "￨", "∣"])
def test_look_alike_bars(bar):
    assert _recs(f"<answer>Obama{bar}PER{bar}[1,2,3,4]</answer>") == (
        R("Obama", "PER", ((1, 2, 3, 4),)),
    )


@pytest.mark.parametrize("sep", ["；", "\n", ";", " ; ", ";\n", "\r\n"])
def test_record_separators(sep):
    assert _recs(f"<answer>A|PER|None{sep}B|ORG|[0,0,1,1]</answer>") == (
        R("A", "PER"),
        R("B", "ORG", ((0, 0, 1, 1),)),
    )


def test_several_boxes_and_spaces():
    text = "<answer> Obama | PER | [[1, 2, 3, 4], [ 5,6 ,7,8 ]] </answer>"
    assert _recs(text) == (R("Obama", "PER", ((1, 2, 3, 4), (5, 6, 7, 8))),)


def test_float_coordinates_round():
    assert _recs("<answer>A|PER|[10.6, 20.4, 30, 40]</answer>") == (
        R("A", "PER", ((11, 20, 30, 40),)),
    )


def test_large_integer_coordinates_are_exact():
    big = 2**60 + 1  # not representable as a float
    assert _recs(f"<answer>A|PER|[{big},0,{-big},1]</answer>") == (
        R("A", "PER", ((big, 0, -big, 1),)),
    )


def test_overflowing_coordinate_is_malformed_not_raised():
    out = parse_output("<answer>A|PER|[" + "9" * 400 + ".5,1,2,3]; B|ORG|None</answer>")
    assert out.records == (R("B", "ORG"),)
    assert len(out.malformed) == 1 and out.malformed[0].startswith("A|PER|[999")


def test_missing_closing_answer():
    out = parse_output("<answer>A|PER|None; B|LOC|[1,2,3,4]")
    assert out.records == (R("A", "PER"), R("B", "LOC", ((1, 2, 3, 4),)))
    assert out.answer_found and not out.answer_closed


def test_only_closing_think():
    out = parse_output("I see a man.</think>Obama|PER|[1,2,3,4]")
    assert out.think == "I see a man."
    assert out.records == (R("Obama", "PER", ((1, 2, 3, 4),)),)


def test_no_tags_at_all():
    out = parse_output("Obama|PER|None; Paris|LOC|None")
    assert out.think is None
    assert out.records == (R("Obama", "PER"), R("Paris", "LOC"))
    assert out.answer_found and not out.answer_closed


@pytest.mark.parametrize("text", ["None", "<answer>None</answer>", "<answer> none </answer>", ""])
def test_none_means_no_records(text):
    out = parse_output(text)
    assert out.records == () and out.malformed == ()
    assert out.answer_found


def test_upper_case_tags():
    out = parse_output("<THINK>x</THINK><Answer>A|PER|None</Answer>")
    assert out.think == "x" and out.records == (R("A", "PER"),) and out.answer_closed


def test_dotted_capital_i_does_not_shift_the_tags():
    # "\u0130".lower() is two characters long; the tags must still be found in the right place.
    out = parse_output("<think>\u0130\u0130</think><answer>\u0130stanbul|LOC|None</answer>")
    assert out.think == "\u0130\u0130"
    assert out.records == (R("\u0130stanbul", "LOC"),)
    assert out.malformed == ()


def test_truncated_mid_box_is_malformed():
    out = parse_output("<answer>Obama|PER|[1,2,3,4]; Biden|PER|[10,20,3")
    assert out.records == (R("Obama", "PER", ((1, 2, 3, 4),)),)
    assert out.malformed == ("Biden|PER|[10,20,3",)
    assert not out.answer_closed


def test_truncated_mid_think():
    out = parse_output("<think>The image shows Obama|PER|[1,2,3,4]")
    assert out.answer_found is False and out.answer_closed is False
    assert out.records == () and out.malformed == ()
    assert out.think == "The image shows Obama|PER|[1,2,3,4]"


def test_unescaped_bar_inside_mention_joins_into_the_mention():
    assert _recs("<answer>AC|DC|ORG|None</answer>") == (R("AC|DC", "ORG"),)
    assert _recs("<answer>AC\\|DC|ORG|None</answer>") == (R("AC|DC", "ORG"),)


def test_backslash_before_other_characters_is_kept():
    assert _recs("<answer>a\\b|PER|None</answer>") == (R("a\\b", "PER"),)


@pytest.mark.parametrize(
    "segment",
    [
        "Obama|PER",  # too few fields
        "Obama",
        "Obama|P E R|None",  # bad type
        "Obama||None",
        "|PER|None",  # empty mention
        "Obama|PER|[1,2,3]",  # 3 coordinates
        "Obama|PER|[1,2,3,4",  # unbalanced
        "Obama|PER|[[[1,2,3,4]]]",  # too deep
        "Obama|PER|somewhere",
        "Obama|PER|[]",
    ],
)
def test_malformed_segment_reported_as_written(segment):
    out = parse_output(f"<answer>{segment}; Paris|LOC|None</answer>")
    assert out.records == (R("Paris", "LOC"),)
    assert out.malformed == (segment,)


def test_repeats_are_kept():
    assert _recs("<answer>A|PER|None; A|PER|None</answer>") == (R("A", "PER"), R("A", "PER"))


def test_parse_answer_body():
    recs, bad = parse_answer("A|PER|None; oops")
    assert recs == (R("A", "PER"),) and bad == ("oops",)


# ---------------------------------------------------------------------------------------------
# EntityRecord validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(mention="", type="PER"),
        dict(mention=" Obama", type="PER"),
        dict(mention="Obama ", type="PER"),
        dict(mention="Ob\nama", type="PER"),
        dict(mention="a</answer>b", type="PER"),
        dict(mention=3, type="PER"),
        dict(mention="Obama", type=""),
        dict(mention="Obama", type="P R"),
        dict(mention="Obama", type="PER\n"),
        dict(mention="Obama", type="-PER"),
        dict(mention="Obama", type="PER", boxes=()),
        dict(mention="Obama", type="PER", boxes=((1, 2, 3),)),
        dict(mention="Obama", type="PER", boxes=((1, 2, 3, 4, 5),)),
        dict(mention="Obama", type="PER", boxes=((1.0, 2, 3, 4),)),
        dict(mention="Obama", type="PER", boxes=((True, 2, 3, 4),)),
        dict(mention="Obama", type="PER", boxes=(1, 2, 3, 4)),
        dict(mention="Obama", type="PER", boxes="[1,2,3,4]"),
    ],
)
def test_entity_record_validation(kwargs):
    with pytest.raises(ValueError):
        EntityRecord(**kwargs)


def test_entity_record_normalises_boxes_to_tuples():
    rec = EntityRecord("Obama", "PER", [[1, 2, 3, 4]])  # type: ignore[arg-type]
    assert rec.boxes == ((1, 2, 3, 4),)
    assert rec == EntityRecord("Obama", "PER", ((1, 2, 3, 4),))
