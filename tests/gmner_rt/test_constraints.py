"""Constrained decoding: the record grammar's automaton, token masks, jump-forward, budgets.

The property test drives the real engine (:func:`gmner_rt.generate.generate`) with a backend
whose logits are random, over 10,000 requests with random texts (escapes, multi-byte
characters, tags and newlines inside), labels, image sizes, think modes, budgets and token
limits; every output must be a complete answer that obeys every rule, checked here
independently of the automaton.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
from tokenizers import Tokenizer

from gmner_rt.constraints import RequestConstraint, TokenMask, TokenTable
from gmner_rt.errors import InputError
from gmner_rt.extractor import DEFAULT_BUNDLE
from gmner_rt.generate import PromptBatch, VisionSpec, generate
from gmner_rt.grammar import MAX_BOXES_PER_RECORD, AnswerGrammar, GrammarTags
from gmner_rt.records import escape_mention, format_records, parse_output

LABELS = ("PER", "LOC", "ORG", "OTHER")
#: Requests of the property test.
REQUESTS = 10_000
VISION = VisionSpec(image_token_id=7, merge_size=2, window_size=112, patch_size=14)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(DEFAULT_BUNDLE / "tokenizer.json"))


@pytest.fixture(scope="module")
def table(tokenizer) -> TokenTable:
    return TokenTable.from_tokenizer(tokenizer, tokenizer.get_vocab_size() + 46)


def _accepts(grammar: AnswerGrammar, text: str) -> bool:
    state = grammar.advance(grammar.initial, text.encode())
    return state is not None and grammar.is_done(state)


def _prefix_ok(grammar: AnswerGrammar, text: str) -> bool:
    return grammar.advance(grammar.initial, text.encode()) is not None


# ---------------------------------------------------------------------------------------------
# The automaton
# ---------------------------------------------------------------------------------------------


def test_grammar_accepts_the_record_format_and_nothing_else():
    g = AnswerGrammar("RT @jo : Barack Obama in New York", LABELS, 448, 336, think="auto")
    good = [
        "<answer>None</answer>",
        "<answer>Barack Obama|PER|[0,0,448,336]</answer>",
        "<think>a man.</think><answer>Obama|PER|None; New York|LOC|[[1,2,3,4],[5,6,7,8]]</answer>",
        "<answer>jo|PER|None</answer>",
        "<answer>York|LOC|[447,335,448,336]</answer>",
    ]
    bad = [
        "<answer>none</answer>",  # case
        "<answer>Bar|PER|None</answer>",  # not a whole word
        "<answer>Obama |PER|None</answer>",  # trailing space
        "<answer>Obama|PERSON|None</answer>",  # not a label
        "<answer>Obama|PER|[0,0,449,10]</answer>",  # outside the image
        "<answer>Obama|PER|[5,0,5,10]</answer>",  # x1 == x2
        "<answer>Obama|PER|[0,9,5,3]</answer>",  # y2 < y1
        "<answer>Obama|PER|[01,0,5,3]</answer>",  # leading zero
        "<answer>Obama|PER|[[1,2,3,4]]</answer>",  # a list needs two boxes
        "<answer>Obama|PER|[1, 2, 3, 4]</answer>",  # spaces
        "<answer>Obama|PER|None;Obama|PER|None</answer>",  # separator
        "<answer>Obama|PER|None; </answer>",
        "<answer>Michelle|PER|None</answer>",  # not in the text
        "<answer>None</answer>x",
        "<think>x</think>junk<answer>None</answer>",
    ]
    for text in good:
        assert _accepts(g, text), text
    for text in bad:
        assert not _accepts(g, text), text


def test_think_modes():
    text = "Alice"
    on = AnswerGrammar(text, LABELS, 100, 100, think="on")
    off = AnswerGrammar(text, LABELS, 100, 100, think="off")
    assert _accepts(on, "<think>hm</think><answer>None</answer>")
    assert not _accepts(on, "<answer>None</answer>")
    assert _accepts(off, "<answer>None</answer>")
    assert not _prefix_ok(off, "<think>")
    with pytest.raises(InputError, match="think"):
        AnswerGrammar(text, LABELS, 100, 100, think="maybe")


def test_mentions_are_escaped_and_may_hold_multibyte_characters():
    text = "Fox & ; Fin | Café 東京 a\\b"
    g = AnswerGrammar(text, LABELS, 50, 50, think="off")
    for mention in ("Fox & ; Fin", "Café 東京", "a\\b", "Fin | Café"):
        answer = f"<answer>{escape_mention(mention)}|ORG|None</answer>"
        assert _accepts(g, answer), answer
        assert parse_output(answer).records[0].mention == mention
    assert not _accepts(g, "<answer>Fox & ; Fin|ORG|None</answer>")  # unescaped ;
    assert not _accepts(g, "<answer>Caf|ORG|None</answer>")
    # a token may end inside a character: the automaton takes bytes one by one
    state = g.advance(g.initial, b"<answer>Caf" + "é".encode()[:1])
    assert state is not None and g.allowed_bytes(state) == "é".encode()[1:]


def test_mentions_cannot_hold_tags_or_newlines():
    text = "Bob <answer> Ann\nLee x</ANSWER>y"
    g = AnswerGrammar(text, LABELS, 50, 50, think="off")
    assert _accepts(g, "<answer>Bob|PER|None</answer>")
    assert _accepts(g, "<answer>answer> Ann|PER|None</answer>")
    assert not _prefix_ok(g, "<answer>Bob <")
    assert not _prefix_ok(g, "<answer>Ann\n")
    assert not _prefix_ok(g, "<answer>x<")
    assert _accepts(g, "<answer>y|PER|None</answer>")


def test_word_boundaries_allow_hashtag_words_and_punctuated_tokens():
    g = AnswerGrammar("Go #Cavs ! U.S. (NBA)", LABELS, 50, 50, think="off")
    for mention in ("Cavs", "#Cavs", "U.S.", "U.S", "NBA", "(NBA)", "Go #Cavs"):
        assert _accepts(g, f"<answer>{mention}|ORG|None</answer>"), mention
    for mention in ("avs", "Cav", ".S.", "Go #Ca", "Go #", "(NBA"[1:] + " x"):
        assert not _accepts(g, f"<answer>{mention}|ORG|None</answer>"), mention


def test_box_limits_and_lists():
    g = AnswerGrammar("Ann", LABELS, 10, 1000, think="off")
    boxes = ",".join(["[0,0,1,1]"] * MAX_BOXES_PER_RECORD)
    assert _accepts(g, f"<answer>Ann|PER|[{boxes}]</answer>")
    assert not _prefix_ok(g, f"<answer>Ann|PER|[{boxes},")
    assert _accepts(g, "<answer>Ann|PER|[9,999,10,1000]</answer>")
    assert not _prefix_ok(g, "<answer>Ann|PER|[10")  # x1 <= 9
    assert not _prefix_ok(g, "<answer>Ann|PER|[3,5,3")  # x2 > 3 needs two digits: none
    assert _prefix_ok(g, "<answer>Ann|PER|[3,5,4")


def test_a_mention_is_written_at_most_as_often_as_the_text_holds_it():
    g = AnswerGrammar("Obama met Obama and Ann", LABELS, 50, 50, think="off")
    assert _accepts(g, "<answer>Obama|PER|None; Obama|PER|[0,0,5,5]</answer>")
    assert not _prefix_ok(g, "<answer>Obama|PER|None; Obama|PER|None; Obama|")
    assert _accepts(g, "<answer>Ann|PER|None; Obama met Obama|OTHER|None; Obama|PER|None</answer>")
    # once every mention is used up, the answer can only end
    one = AnswerGrammar("Ann", LABELS, 50, 50, think="off")
    assert one.forced(one.advance(one.initial, b"<answer>Ann|PER|None")) == b"</answer>"
    # a used-up word may still start a longer mention, but not end one
    two = AnswerGrammar("Ann Lee", LABELS, 50, 50, think="off")
    state = two.advance(two.initial, b"<answer>Ann|PER|None; Ann")
    assert two.allowed_bytes(state) == b" "


def test_text_without_words_allows_only_none():
    g = AnswerGrammar("  ", LABELS, 50, 50, think="off")
    assert _accepts(g, "<answer>None</answer>")
    assert g.forced(g.initial) == b"<answer>None</answer>"


def test_closing_finishes_every_reachable_state_within_the_bound():
    rng = np.random.default_rng(3)
    g = AnswerGrammar("Ann Lee visits Paris ; Zürich", LABELS, 640, 480, think="auto")
    for _ in range(300):
        state = g.initial
        for _ in range(200):  # a walk through free text may never close it
            closing = g.closing(state)
            assert len(closing) <= g.max_closing
            assert g.is_done(g.advance(state, closing))
            allowed = g.allowed_bytes(state)
            allowed = b"</>abc" if allowed is None else allowed
            assert allowed, state
            state = g.step(state, int(rng.choice(list(allowed))))
            if g.is_done(state):
                break


def test_forced_text():
    g = AnswerGrammar("Barack Obama", LABELS, 50, 50, think="off")
    assert g.forced(g.initial) == b"<answer>"
    state = g.advance(g.initial, b"<answer>Ba")
    assert g.forced(state) == b"rack"  # then " Obama" or "|"
    state = g.advance(g.initial, b"<answer>Obama|P")
    assert g.forced(state) == b"ER|"
    state = g.advance(g.initial, b"<answer>Obama|PER|None")
    assert g.forced(state) == b""  # "; " or "</answer>"
    state = g.advance(g.initial, b"<answer>Obama|PER|None;")
    assert g.forced(state) == b" Barack"  # Obama is used up: Barack or Barack Obama
    state = g.advance(g.initial, b"<answer>Obama|PER|[[1,2,3,4]")
    assert g.forced(state) == b",["


# ---------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------


def test_token_table_holds_byte_level_bytes_and_no_special_tokens(tokenizer, table):
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    assert table.token_bytes[vocab["<|im_end|>"]] is None
    assert table.token_bytes[vocab["<answer>"]] == b"<answer>"
    spaced = min(t for t in vocab if t[:1] == "\u0120" and t[1:].isascii() and t[1:].isalpha())
    assert table.token_bytes[vocab[spaced]] == b" " + spaced[1:].encode()
    assert all(b is None for b in table.token_bytes[tokenizer.get_vocab_size() :])
    for text in ("<answer>Obama|PER|[1,2,3,4]; x</answer>", "Café 東京"):
        ids = table.encode(text.encode())
        assert b"".join(table.token_bytes[i] for i in ids) == text.encode()


def test_masks_allow_exactly_the_tokens_the_automaton_accepts(table):
    g = AnswerGrammar("RT Barack Obama ; Café in New York", LABELS, 448, 336, think="auto")
    prefixes = ["", "<answer>", "<answer>Ba", "<answer>Obama|", "<answer>Obama|PER|[12", "<think>x"]
    for prefix in prefixes:
        rc = RequestConstraint(g, table)
        rc.state = g.advance(g.initial, prefix.encode())
        mask = rc.mask(10_000)
        for token_id, data in enumerate(table.token_bytes):
            expected = data is not None and g.advance(rc.state, data) is not None
            assert mask.allows(token_id) == expected, (prefix, data)


def test_mask_apply():
    logits = np.arange(5, dtype=np.float32)
    allow = TokenMask(np.array([1, 3])).apply(logits)
    deny = TokenMask(np.array([4]), allow=False).apply(logits)
    assert np.isneginf(allow[[0, 2, 4]]).all() and allow[3] == 3
    assert int(np.argmax(deny)) == 3 and logits[4] == 4  # input untouched


def test_jump_forward_feeds_only_tokens_no_longer_token_could_span(table):
    g = AnswerGrammar("Barack Obama", LABELS, 50, 50, think="auto")
    rc = RequestConstraint(g, table)
    # "<" is forced, but "<answer>" and "<think>" are tokens: the model picks one itself
    assert rc.forced(512) == []
    rc.advance(table.encode(b"<answer>")[0])
    for token_id in table.encode(b"None"):
        rc.advance(token_id)
    forced = rc.forced(512)
    assert b"".join(table.token_bytes[i] for i in forced) == b"</answer>"
    assert rc.done and rc.forced_tokens == len(forced)


def test_budget_closes_the_answer_in_time(table):
    g = AnswerGrammar("Barack Obama", LABELS, 500, 500, think="on")
    rc = RequestConstraint(g, table)
    needed = rc.min_tokens()
    assert 0 < needed <= len(b"<think></think><answer>None</answer>")
    forced = rc.forced(needed)
    text = b"".join(table.token_bytes[i] for i in forced).decode()
    assert text == "<think></think><answer>None</answer>" and rc.done


def test_think_budget_closes_the_reasoning(table):
    g = AnswerGrammar("Ann", LABELS, 50, 50, think="on")
    rc = RequestConstraint(g, table, think_budget=2)
    rc.advance(table.encode(b"<think>")[0])
    for token_id in table.encode(b"ab")[:1] * 2:
        assert rc.forced(512) == []
        rc.advance(token_id)
    exit_ids = rc.forced(512)
    assert b"".join(table.token_bytes[i] for i in exit_ids) == b"</think><answer>"
    assert not g.in_think(rc.state)


def test_advance_refuses_a_token_outside_the_grammar(table):
    rc = RequestConstraint(AnswerGrammar("Ann", LABELS, 50, 50, think="off"), table)
    with pytest.raises(InputError, match="not allowed"):
        rc.advance(table.encode(b"Ann")[0])


# ---------------------------------------------------------------------------------------------
# The property test
# ---------------------------------------------------------------------------------------------

WORDS = (
    "Barack Obama New York #Cavs @jo U.S. Café 東京 Zürich (NBA) FC-Bayern a\\b x|y ; ｜ "
    "http://t.co/x1 RT : the of and 2016 <answer> </think> Ann"
).split()


class RandomLogits:
    """A backend whose logits are random: what a model may write, at its worst."""

    def __init__(self, vocab: int, rng: np.random.Generator):
        self.vocab, self.rng = vocab, rng

    def encode_images(self, pixel_values, indices):
        return np.zeros((len(indices.window_index), 2), dtype=np.float32)

    def embed(self, input_ids):
        return np.zeros((*input_ids.shape, 2), dtype=np.float32)

    def empty_cache(self, batch):
        return []

    def decode(self, inputs_embeds, attention_mask, position_ids, past):
        rows = inputs_embeds.shape[0]
        return self.rng.standard_normal((rows, self.vocab)).astype(np.float32), []


def _random_text(rng: np.random.Generator) -> str:
    words = [str(rng.choice(WORDS)) for _ in range(int(rng.integers(1, 9)))]
    glue = [str(rng.choice([" ", " ", " ", "\n", ", "])) for _ in words]
    return "".join(w + g for w, g in zip(words, glue, strict=True)).strip() or "x"


def _whole_word_spans(text: str) -> Counter:
    """Every mention the rules allow, with how many spans of the text it is, found here
    without the automaton."""
    barrier = [
        ch in "\r\n" or (ch == "<" and re.match(r"</?(think|answer)>", text[i:].lower()))
        for i, ch in enumerate(text)
    ]

    def space(i):
        return i < 0 or i >= len(text) or text[i].isspace() or barrier[i]

    def word(i):
        return 0 <= i < len(text) and (text[i].isalnum() or text[i] == "_")

    starts = [
        i for i in range(len(text)) if not space(i) and (space(i - 1) or word(i) > word(i - 1))
    ]
    ends = [
        i + 1 for i in range(len(text)) if not space(i) and (space(i + 1) or word(i) > word(i + 1))
    ]
    return Counter(text[s:e] for s in starts for e in ends if e > s and not any(barrier[s:e]))


def _check_output(text, labels, size, think, data, budget_tokens, limit):
    assert len(budget_tokens) <= limit
    # free reasoning may hold any bytes; the answer is whole characters
    data[data.rindex(b"<answer>") :].decode("utf-8")
    raw = data.decode("utf-8", errors="replace")
    parsed = parse_output(raw)
    assert parsed.answer_found and parsed.answer_closed and not parsed.malformed, raw
    assert raw.endswith("</answer>")
    if think == "off":
        assert raw.startswith("<answer>")
    if think == "on":
        assert raw.startswith("<think>")
    answer = raw[raw.index("<answer>", raw.index("</think>") if "</think>" in raw else 0) :]
    assert answer == f"<answer>{format_records(parsed.records)}</answer>", raw
    allowed = _whole_word_spans(text)
    written = Counter(record.mention for record in parsed.records)
    for record in parsed.records:
        assert record.mention in allowed, (record.mention, text)
        assert written[record.mention] <= allowed[record.mention], (raw, text)
        assert record.type in labels
        if record.boxes is not None:
            assert 1 <= len(record.boxes) <= MAX_BOXES_PER_RECORD
            for x1, y1, x2, y2 in record.boxes:
                assert 0 <= x1 < x2 <= size[0] and 0 <= y1 < y2 <= size[1], raw


@pytest.mark.slow
def test_random_logits_always_give_valid_complete_answers(table):
    """10,000 requests, batches of 16, random everything: every answer is valid."""
    rng = np.random.default_rng(20261124)
    backend = RandomLogits(table.vocab_size, rng)
    batch = PromptBatch(
        input_ids=np.ones((16, 3), dtype=np.int64),
        attention_mask=np.ones((16, 3), dtype=np.int64),
        pixel_values=np.zeros((0, 1176), dtype=np.float32),
        grids=(),
    )
    requests = 0
    while requests < REQUESTS:
        cases = []
        for _ in range(16):
            labels = tuple(rng.choice(LABELS, size=int(rng.integers(1, 5)), replace=False))
            size = (int(rng.integers(2, 2000)), int(rng.integers(2, 2000)))
            think = str(rng.choice(["on", "off", "auto"]))
            grammar = AnswerGrammar(_random_text(rng), labels, *size, think=think)
            rc = RequestConstraint(
                grammar,
                table,
                think_budget=int(rng.integers(0, 12)),
                jump_forward=bool(rng.random() < 0.8),
            )
            cases.append((grammar, rc))
        limit = int(rng.integers(max(rc.min_tokens() for _, rc in cases), 120))
        result = generate(
            backend,
            batch,
            VISION,
            max_new_tokens=limit,
            eos_ids=[],
            pad_id=0,
            constraints=[rc for _, rc in cases],
        )
        for (grammar, rc), tokens in zip(cases, result.tokens, strict=True):
            data = b"".join(table.token_bytes[t] for t in tokens)
            text = grammar.text.data.decode()
            size = (grammar.width, grammar.height)
            _check_output(text, grammar.labels, size, grammar.think, data, tokens, limit)
            assert rc.done
        requests += len(cases)


def test_grammar_tags_come_from_the_bundle():
    tags = GrammarTags("<r>", "</r>", "<a>", "</a>")
    g = AnswerGrammar("Ann", LABELS, 50, 50, think="auto", tags=tags)
    assert _accepts(g, "<r>x</r><a>Ann|PER|None</a>")
    assert not _prefix_ok(g, "<answer>")
