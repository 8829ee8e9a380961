"""Benchmark: our answer-grammar automaton against llguidance and xgrammar.

``python -m gmner.bench.grammar_engines [--vocab N] [--requests R] [--seed S] [--data DIR]``

A developer tool, not part of the runtime: it builds a large byte-level BPE tokenizer (Qwen2's
pre-tokenizer and special tokens, ~151k tokens by default, cached under ``out/bench``),
tweet-like requests, and a per-request grammar for each engine, then drives every engine
through the same seeded random walk (random logits, argmax among the allowed tokens) and
prints one table: grammar compile time per request, mask time per step, valid outputs, and what
each grammar enforces. Progress goes to the log; the table is the program's output.

The engines: ours (the automaton of :mod:`gmner_rt.grammar`, token masks by
:mod:`gmner_rt.constraints`), llguidance (a Lark grammar) and xgrammar (an EBNF grammar).
llguidance and xgrammar are optional bench-only dependencies, imported here only; gmner_rt
never imports them. An engine that cannot be imported or fails is reported with its error text
instead of failing the run.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import inspect
import json
import logging
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)

from gmner_rt import constraints, grammar
from gmner_rt.constraints import RequestConstraint, TokenTable
from gmner_rt.geometry import smart_resize
from gmner_rt.grammar import AnswerGrammar
from gmner_rt.records import escape_mention, parse_output

log = logging.getLogger(__name__)

__all__ = [
    "ENGINES",
    "Case",
    "EngineResult",
    "add_arguments",
    "build_cases",
    "build_tokenizer",
    "check_output",
    "ebnf_grammar",
    "format_table",
    "int_range_alternatives",
    "lark_grammar",
    "load_or_build_tokenizer",
    "main",
    "run",
    "run_bench",
    "whole_word_mentions",
]

#: Qwen2.5's BPE vocabulary size (its special tokens come after).
DEFAULT_VOCAB = 151_643
LABELS = ("PER", "LOC", "ORG", "OTHER")
#: (width, height) as smart_resize gives them for common photo sizes (multiples of 28).
IMAGE_SIZES = ((448, 336), (644, 476), (812, 616), (1288, 952), (952, 1288), (1148, 644))
#: Largest image the bundles resize to (Qwen2.5-VL's 1280 patches of 28x28).
MAX_PIXELS = 1280 * 28 * 28
#: Tokens a walk may take; the reasoning is closed (by the walk's logits) after THINK_TOKENS.
MAX_TOKENS = 256
THINK_TOKENS = 24
#: Added to the logit of ``</answer>``, so that walks end after a few records.
ANSWER_CLOSE_BIAS = 2.0
THINK, THINK_END, ANSWER, ANSWER_END = "<think>", "</think>", "<answer>", "</answer>"
#: Version of the generated corpus; bump it to rebuild cached tokenizers.
CORPUS_VERSION = 2

# ---------------------------------------------------------------------------------------------
# A large byte-level BPE tokenizer on a generated corpus
# ---------------------------------------------------------------------------------------------

_ONSETS = tuple(
    "||b|c|d|f|g|h|j|k|l|m|n|p|r|s|t|v|w|y|z|br|ch|cl|cr|dr|fl|gr|kn|ph|pl|pr|qu|sh|sk"
    "|sl|sp|st|str|th|tr|wh".split("|")
)
_VOWELS = tuple("a|e|i|o|u|a|e|i|o|y|ai|ea|ee|ie|oa|oo|ou|au|é|è|ö|ü|à|á|í|ñ".split("|"))
_CODAS = tuple("||||n|r|s|t|l|m|ck|ng|nd|st|rk|x|th|sh|ll|ss|rt|z".split("|"))
#: Other scripts, as (first, last) code points: Cyrillic, Greek, Arabic, CJK, Hangul, kana.
_SCRIPTS = (
    (0x430, 0x44F),
    (0x3B1, 0x3C9),
    (0x627, 0x64A),
    (0x4E00, 0x9FFF),
    (0xAC00, 0xD7A3),
    (0x3041, 0x3096),
)
_EMOJI = (0x1F300, 0x1F64F)
#: Punctuation items, space-separated ("|", ";" and "\\" among them: mentions escape those).
_PUNCT = tuple("! !! ? ... . , : :) & - ( ) 's \" | ; \\ / * ~ <3 = + % $".split(" "))


def _syllable_word(rng: np.random.Generator) -> str:
    parts = []
    for _ in range(int(rng.integers(1, 5))):
        parts.append(_ONSETS[rng.integers(len(_ONSETS))])
        parts.append(_VOWELS[rng.integers(len(_VOWELS))])
        parts.append(_CODAS[rng.integers(len(_CODAS))])
    return "".join(parts)


def _script_word(rng: np.random.Generator) -> str:
    lo, hi = _SCRIPTS[rng.integers(len(_SCRIPTS))]
    size = int(rng.integers(1, 4)) if hi - lo > 1000 else int(rng.integers(2, 9))
    return "".join(chr(int(c)) for c in rng.integers(lo, hi + 1, size=size))


def _word_types(rng: np.random.Generator, count: int) -> list[str]:
    """``count`` distinct pseudo-words: mostly syllables, a fifth in other scripts."""
    words: dict[str, None] = {}
    while len(words) < count:
        word = _syllable_word(rng) if rng.random() < 0.8 else _script_word(rng)
        words.setdefault(word)
    return list(words)


def _item(rng: np.random.Generator, words: Sequence[str]) -> str:
    """One whitespace-separated item of a generated tweet."""
    roll = rng.random()
    # common words follow a Zipf law: low ranks make the frequent merges
    word = words[min(int(rng.zipf(1.3)) - 1, len(words) - 1)]
    if roll < 0.55:
        return word
    if roll < 0.75:
        return word.capitalize()
    if roll < 0.78:
        return word.upper()
    if roll < 0.83:
        return "@" + word + (str(int(rng.integers(100))) if rng.random() < 0.3 else "")
    if roll < 0.87:
        return "#" + word.capitalize() + words[int(rng.integers(len(words)))].capitalize()
    if roll < 0.91:
        return str(int(rng.integers(0, 10 ** int(rng.integers(1, 7)))))
    if roll < 0.93:
        alnum = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
        return "https://t.co/" + "".join(alnum[i] for i in rng.integers(len(alnum), size=10))
    if roll < 0.97:
        return _PUNCT[rng.integers(len(_PUNCT))]
    return chr(int(rng.integers(*_EMOJI)))


def generated_tweet(
    rng: np.random.Generator, words: Sequence[str], rare: Iterable[str] = ()
) -> str:
    """A tweet-like line: Zipf-sampled words, names, handles, hashtags, numbers, URLs, emoji,
    punctuation (``|``, ``;`` and ``\\`` included, which mentions escape)."""
    items = [_item(rng, words) for _ in range(int(rng.integers(6, 28)))]
    for word in rare:  # rare words spread over the lines give BPE its long tail
        items.insert(int(rng.integers(len(items) + 1)), word)
    return " ".join(items)


def _markup_line(rng: np.random.Generator, words: Sequence[str]) -> str:
    """A line of HTML or code: a real vocabulary has many tokens holding ``>``, which free
    reasoning must check one by one (they could close it)."""

    def w() -> str:
        return words[min(int(rng.zipf(1.3)) - 1, len(words) - 1)]

    n = int(rng.integers(1000))
    forms = (
        f'<div class="{w()}">{w()} {w()}</div>',
        f'<a href="https://{w()}.com/{w()}">{w().capitalize()}</a>',
        f"<{w()}>{w()}</{w()}><br/>",
        f"{w()} -> {w()}({n})",
        f"if ({w()} >= {n}) {{ return {w()} => {w()}; }}",
        f">>> {w()}.{w()}({n})",
        f"{w()}<{w()}> >> {n} > {w()}",
    )
    return forms[rng.integers(len(forms))]


def corpus_lines(rng: np.random.Generator, vocab: int, extra: Sequence[str] = ()) -> list[str]:
    """Training lines for a ``vocab``-token BPE: every pseudo-word type at least once, common
    ones often, then ``extra`` (real tweets)."""
    types = _word_types(rng, max(2_000, 2 * vocab))
    lines = []
    for start in range(0, len(types), 6):
        lines.append(generated_tweet(rng, types, types[start : start + 6]))
        if start % 60 == 0:
            lines.append(_markup_line(rng, types))
    return lines + list(extra)


def build_tokenizer(lines: Iterable[str], vocab: int) -> Tokenizer:
    """A Qwen2-style byte-level BPE (as :func:`gmner.train.tiny_model.build_tokenizer`): NFC,
    Qwen2's pre-tokenizer regex, ``vocab`` BPE tokens, then Qwen's special tokens and the
    ``<think>``/``<answer>`` tags as added non-special tokens."""
    from gmner.train.tiny_model import QWEN_SPECIAL_TOKENS, REASONING_TOKENS
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(lines, trainer)
    tok.add_special_tokens([AddedToken(t, special=True) for t in QWEN_SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in REASONING_TOKENS])
    return tok


def _data_tweets(data: Path | None) -> tuple[list[str], list[object]]:
    """(training texts, request tweets) of a Twitter-GMNER folder: train for the corpus, dev
    (else test, else train) for the requests."""
    if data is None:
        return [], []
    from gmner_rt.data import available_splits, load_split

    splits = available_splits(data)
    train = load_split(data, "train") if "train" in splits else []
    held = next((s for s in ("dev", "test") if s in splits), "train")
    return [t.text for t in train], load_split(data, held)


def load_or_build_tokenizer(
    cache: Path, vocab: int, seed: int, data: Path | None
) -> tuple[Tokenizer, float, bool]:
    """The cached tokenizer when it was built with the same settings, else a new one (saved).
    Returns (tokenizer, seconds, whether it came from the cache)."""
    meta = {"vocab": vocab, "seed": seed, "data": str(data), "corpus_version": CORPUS_VERSION}
    meta_path = cache.with_suffix(".meta.json")
    start = time.perf_counter()
    if cache.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()) == meta:
        return Tokenizer.from_file(str(cache)), time.perf_counter() - start, True
    texts, _ = _data_tweets(data)
    lines = corpus_lines(np.random.default_rng([seed, 1]), vocab, texts)
    log.info(
        "training a %d-token BPE on %d lines (%.1f MB)",
        vocab,
        len(lines),
        sum(map(len, lines)) / 1e6,
    )
    tok = build_tokenizer(lines, vocab)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(cache))
    meta_path.write_text(json.dumps(meta))
    return tok, time.perf_counter() - start, False


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character standing for each byte, inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = (b for b in range(256) if b not in printable)
    chars = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}
    return {ch: b for b, ch in chars.items()}


def vocab_bytes(tokenizer: Tokenizer) -> tuple[list[bytes], list[int]]:
    """Every token's bytes (a special token's as its text; unused ids empty) and the special
    tokens' ids: the vocabulary the external engines are given."""
    alphabet = _byte_level_alphabet()
    added = tokenizer.get_added_tokens_decoder()
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    out = [b""] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        out[i] = added[i].content.encode() if i in added else bytes(alphabet[c] for c in token)
    return out, sorted(i for i, t in added.items() if t.special)


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One request: its text, labels, resized image size, and the mentions it allows."""

    text: str
    labels: tuple[str, ...]
    width: int
    height: int
    mentions: tuple[str, ...]


def whole_word_mentions(text: str) -> tuple[str, ...]:
    """Every whole-word substring of ``text``, as :class:`gmner_rt.grammar.AnswerGrammar`
    allows them: spans from a word start to a word end (a word ends at whitespace or where
    word characters meet others), without newlines or a think/answer tag's ``<``."""
    low = text.lower()
    tags = ("<think>", "</think>", "<answer>", "</answer>")
    barrier = [
        c in "\r\n" or (c == "<" and any(low.startswith(t, i) for t in tags))
        for i, c in enumerate(text)
    ]

    def space(i: int) -> bool:
        return i < 0 or i >= len(text) or text[i].isspace() or barrier[i]

    def word(i: int) -> bool:
        return text[i].isalnum() or text[i] == "_"

    starts, ends = [], []
    for i in range(len(text)):
        if space(i):
            continue
        if space(i - 1) or (word(i) and not word(i - 1)):
            starts.append(i)
        if space(i + 1) or (word(i) and not word(i + 1)):
            ends.append(i + 1)
    found: dict[str, None] = {}
    for s in starts:
        for e in ends:
            if e > s and not any(barrier[s:e]):
                found.setdefault(text[s:e])
    return tuple(found)


def build_cases(
    rng: np.random.Generator, count: int, tweets: Sequence[object] = (), words: Sequence[str] = ()
) -> list[Case]:
    """``count`` requests: texts of ``tweets`` (Twitter-GMNER, sizes from their images) when
    given, else generated from ``words``; image sizes from :data:`IMAGE_SIZES` when unknown."""
    cases = []
    picks = rng.permutation(len(tweets))[:count] if tweets else []
    words = words or _word_types(rng, 2_000)
    for k in range(count):
        size = IMAGE_SIZES[rng.integers(len(IMAGE_SIZES))]
        if k < len(picks):
            tweet = tweets[picks[k]]
            text = tweet.text
            if tweet.image_size:
                h, w = smart_resize(tweet.image_size[1], tweet.image_size[0], max_pixels=MAX_PIXELS)
                size = (w, h)
        else:
            text = generated_tweet(rng, words)
        cases.append(Case(text, LABELS, size[0], size[1], whole_word_mentions(text)))
    return cases


# ---------------------------------------------------------------------------------------------
# Integer ranges as regular expressions (for the external grammars)
# ---------------------------------------------------------------------------------------------


def int_range_alternatives(lo: int, hi: int) -> list[list[str]]:
    """Alternatives matching exactly the decimal integers in [lo, hi] (no leading zeros), each
    a list of single-character patterns: ``"4"`` or a class ``"[0-7]"``."""
    out: list[list[str]] = []
    for n in range(len(str(lo)), len(str(hi)) + 1):
        a, b = max(lo, 10 ** (n - 1) if n > 1 else 0), min(hi, 10**n - 1)
        if a <= b:
            out += _same_length(str(a), str(b))
    return out


def _same_length(a: str, b: str) -> list[list[str]]:
    if not a:
        return [[]]
    if a[0] == b[0]:
        return [[a[0], *rest] for rest in _same_length(a[1:], b[1:])]
    n = len(a) - 1
    low_full, high_full = a[1:] == "0" * n, b[1:] == "9" * n
    first, last = int(a[0]) + (not low_full), int(b[0]) - (not high_full)
    out = [] if low_full else [[a[0], *rest] for rest in _same_length(a[1:], "9" * n)]
    if first <= last:
        out.append([str(first) if first == last else f"[{first}-{last}]"] + ["[0-9]"] * n)
    if not high_full:
        out += [[b[0], *rest] for rest in _same_length("0" * n, b[1:])]
    return out


def _range_regex(lo: int, hi: int) -> str:
    return "|".join("".join(alt) for alt in int_range_alternatives(lo, hi))


def _range_ebnf(lo: int, hi: int) -> str:
    def item(p: str) -> str:
        return p if p.startswith("[") else f'"{p}"'

    return "(" + " | ".join(" ".join(map(item, a)) for a in int_range_alternatives(lo, hi)) + ")"


def _literal(text: str) -> str:
    """A double-quoted literal for Lark and GBNF (JSON escapes are valid in both)."""
    return json.dumps(text, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------


class Session:
    """One request's constraint as the walk drives it."""

    def mask(self, remaining: int) -> object:  # timed
        raise NotImplementedError

    def allowed(self, mask: object, vocab_size: int) -> np.ndarray:  # untimed: a bool vector
        raise NotImplementedError

    def advance(self, token_id: int) -> None:
        raise NotImplementedError

    def done(self) -> bool:
        raise NotImplementedError


def _unpack(bitmask: np.ndarray, vocab_size: int) -> np.ndarray:
    return np.unpackbits(bitmask.view(np.uint8), bitorder="little")[:vocab_size].astype(bool)


class OursEngine:
    """:mod:`gmner_rt.grammar` and :mod:`gmner_rt.constraints`: a byte automaton per request,
    masks computed lazily by walking the sorted token table, cached per state."""

    name = "ours (gmner_rt)"
    module = "gmner_rt.constraints"
    enforces = (
        "all: whole-word mentions, labels, 0<=x1<x2<=W and 0<=y1<y2<=H, 2-10 boxes a list, "
        "free reasoning up to </think>; the answer always closes within the token budget"
    )
    notes = (
        "forced text in any tokenization; reasoning may be any bytes (invalid UTF-8 too); "
        "tokenizer: TokenTable.from_tokenizer"
    )

    def setup(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.table = TokenTable.from_tokenizer(tokenizer, vocab_size)

    def start(self, case: Case) -> Session:
        automaton = AnswerGrammar(case.text, case.labels, case.width, case.height, think="auto")
        return _OursSession(RequestConstraint(automaton, self.table, jump_forward=False))


class _OursSession(Session):
    def __init__(self, rc: RequestConstraint) -> None:
        self.rc = rc

    def mask(self, remaining: int) -> object:
        return self.rc.mask(remaining)

    def allowed(self, mask, vocab_size: int) -> np.ndarray:
        out = np.full(vocab_size, not mask.allow)
        out[mask.ids] = mask.allow
        return out

    def advance(self, token_id: int) -> None:
        self.rc.advance(token_id)

    def done(self) -> bool:
        return self.rc.done


def lark_grammar(case: Case) -> str:
    """The request's grammar in llguidance's Lark syntax."""
    w, h = case.width, case.height
    mentions = " | ".join(_literal(escape_mention(m)) for m in case.mentions) or '"None"'
    body = '"None" | record ("; " record)*' if case.mentions else '"None"'
    close = re.escape(THINK_END).replace("/", "\\/")
    return "\n".join(
        [
            "%llguidance {}",
            f"start: think? {_literal(ANSWER)} body {_literal(ANSWER_END)}",
            f"think: {_literal(THINK)} THINK",
            # free text up to the first closing tag: a lexeme must end where the tag does
            f"THINK: /(?s:.*{close})/ & ~/(?s:.*{close}.+)/",
            f"body: {body}",
            'record: MENTION "|" TYPE "|" region',
            f"MENTION: {mentions}",
            "TYPE: " + " | ".join(_literal(label) for label in case.labels),
            'region: "None" | box | "[" box ("," box){1,9} "]"',
            'box: "[" X1 "," Y1 "," X2 "," Y2 "]"',
            f"X1: /{_range_regex(0, w - 1)}/",
            f"Y1: /{_range_regex(0, h - 1)}/",
            f"X2: /{_range_regex(1, w)}/",
            f"Y2: /{_range_regex(1, h)}/",
        ]
    )


class LLGuidanceEngine:
    """llguidance: a Lark grammar per request, an Earley parser over a lexer (derivre)."""

    name = "llguidance (Lark)"
    distribution = module = "llguidance"
    enforces = (
        "whole-word mentions, labels, each coordinate in [0,W-1]/[0,H-1] (x1,y1) or [1,W]/[1,H] "
        "(x2,y2), 2-10 boxes a list, reasoning up to </think>; NOT x1<x2, y1<y2 (a pair "
        "relation, outside a context-free grammar unless every pair is listed), NOT closing "
        "within the token budget"
    )
    notes = (
        "text the grammar forces is allowed only in its canonical tokenization (default "
        'forcing; %llguidance {"no_forcing": true} lifts it), reasoning must be valid UTF-8: '
        "walks differ from ours there; tokenizer: LLTokenizer(TokenizerWrapper) over the token "
        "bytes, because the tokenizer-JSON route makes every added token (<think> too) special"
    )

    def setup(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        import llguidance

        tokens, specials = vocab_bytes(tokenizer)
        tokens += [b""] * (vocab_size - len(tokens))  # the wrapper route ignores n_vocab
        eos = tokenizer.token_to_id("<|im_end|>")

        class _Wrapped:  # LLTokenizer's tokenizer interface
            eos_token_id, bos_token_id, special_token_ids = eos, None, specials

            def __init__(self) -> None:
                self.tokens = tokens

            def __call__(self, text: str) -> list[int]:
                if not isinstance(text, str):
                    raise TypeError("text only")
                return tokenizer.encode(text, add_special_tokens=False).ids

        # The tokenizer-JSON route (LLTokenizer(tokenizer.to_str())) makes every added token
        # special, <think> included, so the grammar would have to name each tag twice; the
        # wrapper marks only the real special tokens special.
        self.llg = llguidance
        self.tok = llguidance.LLTokenizer(
            llguidance.TokenizerWrapper(_Wrapped()), n_vocab=vocab_size
        )
        self.words = (vocab_size + 31) // 32

    def start(self, case: Case) -> Session:
        llg = self.llg
        matcher = llg.LLMatcher(self.tok, llg.LLMatcher.grammar_from_lark(lark_grammar(case)))
        if matcher.is_error():
            raise RuntimeError(matcher.get_error())
        return _LLGuidanceSession(matcher, np.zeros((1, self.words), dtype=np.int32))


class _LLGuidanceSession(Session):
    def __init__(self, matcher, bitmask: np.ndarray) -> None:
        from llguidance.numpy import fill_next_token_bitmask

        self.matcher, self.bitmask, self.fill = matcher, bitmask, fill_next_token_bitmask

    def mask(self, remaining: int) -> object:
        self.fill(self.matcher, self.bitmask)
        return self.bitmask

    def allowed(self, mask, vocab_size: int) -> np.ndarray:
        return _unpack(mask, vocab_size)

    def advance(self, token_id: int) -> None:
        if not self.matcher.consume_token(token_id):
            raise RuntimeError(self.matcher.get_error())

    def done(self) -> bool:
        return self.matcher.is_accepting()


def ebnf_grammar(case: Case) -> str:
    """The request's grammar in xgrammar's EBNF (GBNF with xgrammar's TagDispatch)."""
    w, h = case.width, case.height
    mentions = " | ".join(_literal(escape_mention(m)) for m in case.mentions) or '"None"'
    body = '"None" | record ("; " record)*' if case.mentions else '"None"'
    close = _literal(THINK_END)
    return "\n".join(
        [
            f"root ::= think? {_literal(ANSWER)} body {_literal(ANSWER_END)}",
            f"think ::= {_literal(THINK)} think_text {close}",
            # free text without the closing tag (the form xgrammar's structural tags compile to)
            f"think_text ::= TagDispatch(loop_after_dispatch=false, excludes=({close})) "
            f"(=({close}))",
            f"body ::= {body}",
            'record ::= mention "|" type "|" region',
            f"mention ::= {mentions}",
            "type ::= " + " | ".join(_literal(label) for label in case.labels),
            'region ::= "None" | box | "[" box ("," box){1,9} "]"',
            'box ::= "[" x1 "," y1 "," x2 "," y2 "]"',
            f"x1 ::= {_range_ebnf(0, w - 1)}",
            f"y1 ::= {_range_ebnf(0, h - 1)}",
            f"x2 ::= {_range_ebnf(1, w)}",
            f"y2 ::= {_range_ebnf(1, h)}",
        ]
    )


class XGrammarEngine:
    """xgrammar: an EBNF grammar per request compiled against the vocabulary (a pushdown
    automaton with precomputed per-state token masks)."""

    name = "xgrammar (EBNF)"
    distribution = module = "xgrammar"
    enforces = LLGuidanceEngine.enforces
    notes = (
        "tokenizer: TokenizerInfo over the token bytes with special tokens as empty strings "
        "(TokenizerInfo.from_huggingface finds no special token here and lets <|endoftext|> "
        "or <|vision_pad|> into the reasoning as text); compile uses 2 threads, no cache"
    )

    def setup(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        import xgrammar

        tokens, specials = vocab_bytes(tokenizer)
        for i in specials:  # an empty token is special to xgrammar, never text
            tokens[i] = b""
        eos = tokenizer.token_to_id("<|im_end|>")
        info = xgrammar.TokenizerInfo(
            tokens, xgrammar.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=[eos]
        )
        self.xgr = xgrammar
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        self.shape = xgrammar.get_bitmask_shape(1, vocab_size)

    def start(self, case: Case) -> Session:
        compiled = self.compiler.compile_grammar(ebnf_grammar(case))
        matcher = self.xgr.GrammarMatcher(compiled)
        return _XGrammarSession(matcher, np.zeros(self.shape, dtype=np.int32))


class _XGrammarSession(Session):
    def __init__(self, matcher, bitmask: np.ndarray) -> None:
        self.matcher, self.bitmask = matcher, bitmask

    def mask(self, remaining: int) -> object:
        self.matcher.fill_next_token_bitmask(self.bitmask)
        return self.bitmask

    def allowed(self, mask, vocab_size: int) -> np.ndarray:
        return _unpack(mask, vocab_size)

    def advance(self, token_id: int) -> None:
        if not self.matcher.accept_token(token_id):
            raise RuntimeError(f"xgrammar rejected token {token_id}")

    def done(self) -> bool:
        return self.matcher.is_completed()


#: Bench code both external engines need: mention spans, integer ranges, the vocabulary.
_EXTERNAL_SHARED = (whole_word_mentions, int_range_alternatives, _same_length, _literal)
_EXTERNAL_SHARED += (vocab_bytes, _byte_level_alphabet, _unpack)

#: name -> (engine class, the bench code it needs besides the shared walk and checks)
ENGINES: dict[str, tuple[type, tuple[Callable | type, ...]]] = {
    "ours": (OursEngine, (OursEngine, _OursSession)),
    "llguidance": (
        LLGuidanceEngine,
        (LLGuidanceEngine, _LLGuidanceSession, lark_grammar, _range_regex, *_EXTERNAL_SHARED),
    ),
    "xgrammar": (
        XGrammarEngine,
        (XGrammarEngine, _XGrammarSession, ebnf_grammar, _range_ebnf, *_EXTERNAL_SHARED),
    ),
}


def _count_code(lines: Iterable[str]) -> int:
    """Non-blank lines that are not comments or docstrings."""
    count, in_doc = 0, False
    for line in lines:
        s = line.strip()
        quotes = s.count('"""')
        if in_doc or quotes:
            in_doc = in_doc != (quotes % 2 == 1)
            continue
        count += bool(s) and not s.startswith("#")
    return count


def _code_lines(objects: Iterable[Callable | type]) -> int:
    """Code lines of the objects' source (as :func:`_count_code`)."""
    return sum(_count_code(inspect.getsource(obj).splitlines()) for obj in objects)


def _module_code_lines(path: str) -> int:
    """Code lines of a module (as :func:`_count_code`)."""
    return _count_code(Path(path).read_text(encoding="utf-8").splitlines())


# ---------------------------------------------------------------------------------------------
# The walk and the checks
# ---------------------------------------------------------------------------------------------


def check_output(text: str, case: Case) -> str:
    """Why ``text`` is not a valid answer for ``case`` (empty when it is)."""
    parsed = parse_output(text)
    if not parsed.answer_found or not parsed.answer_closed or not text.endswith(ANSWER_END):
        return "answer not closed"
    if parsed.malformed:
        return "malformed record"
    allowed = set(case.mentions)
    for record in parsed.records:
        if record.mention not in allowed:
            return "mention not a whole-word span of the text"
        if record.type not in case.labels:
            return "unknown type"
        for x1, y1, x2, y2 in record.boxes or ():
            if not (0 <= x1 and x2 <= case.width and 0 <= y1 and y2 <= case.height):
                return "box outside the image"
            if not (x1 < x2 and y1 < y2):
                return "box with x1>=x2 or y1>=y2"
    return ""


@dataclass
class Walk:
    """One request's walk: its output and timings (seconds)."""

    text: str = ""
    compile_s: float = 0.0
    mask_s: list[float] = field(default_factory=list)
    advance_s: float = 0.0
    problem: str = ""  # why the output is not valid, or the engine's error


def walk(
    engine, case: Case, rng: np.random.Generator, token_bytes: Sequence[bytes], ids: dict
) -> Walk:
    """Drive one request: random logits (``</answer>`` favoured, ``</think>`` forced after
    :data:`THINK_TOKENS` reasoning tokens), argmax among the allowed tokens, until done or
    :data:`MAX_TOKENS`."""
    out = Walk()
    vocab_size = len(token_bytes)
    t0 = time.perf_counter()
    try:
        session = engine.start(case)
    except Exception as exc:  # an engine's failure is a result
        out.problem = f"compile error: {type(exc).__name__}: {exc}"[:300]
        return out
    out.compile_s = time.perf_counter() - t0
    generated: list[int] = []
    think_steps = -1
    for step in range(MAX_TOKENS):
        if session.done():
            break
        t0 = time.perf_counter()
        try:
            mask = session.mask(MAX_TOKENS - step)
        except Exception as exc:
            out.problem = f"mask error: {type(exc).__name__}: {exc}"[:300]
            break
        out.mask_s.append(time.perf_counter() - t0)
        allowed = session.allowed(mask, vocab_size)
        logits = rng.standard_normal(vocab_size, dtype=np.float32)
        logits[ids[ANSWER_END]] += ANSWER_CLOSE_BIAS
        if think_steps >= THINK_TOKENS:
            logits[ids[THINK_END]] = np.inf
        scores = np.where(allowed, logits, -np.inf)
        if not np.isfinite(scores).any() and not np.isposinf(scores).any():
            out.problem = "empty mask"
            break
        token = int(np.argmax(scores))
        if not token_bytes[token]:
            out.problem = f"allowed a special or unused token ({token})"
            break
        t0 = time.perf_counter()
        try:
            session.advance(token)
        except Exception as exc:
            out.problem = f"advance error: {exc}"[:300]
            break
        out.advance_s += time.perf_counter() - t0
        generated.append(token)
        data = b"".join(token_bytes[i] for i in generated)
        inside = THINK.encode() in data and THINK_END.encode() not in data
        think_steps = think_steps + 1 if inside else -1
    out.text = b"".join(token_bytes[i] for i in generated).decode("utf-8", errors="replace")
    if not out.problem:
        out.problem = check_output(out.text, case)
    return out


@dataclass
class EngineResult:
    """One engine's figures over all requests."""

    name: str
    enforces: str
    notes: str
    code_lines: int
    requires: str = ""
    import_s: float | None = None
    setup_s: float = 0.0
    error: str = ""
    walks: list[Walk] = field(default_factory=list)
    same_as_ours: int | None = None

    @property
    def valid(self) -> int:
        return sum(not w.problem for w in self.walks)


def run_bench(
    tokenizer: Tokenizer,
    cases: Sequence[Case],
    engines: Sequence[str],
    seed: int,
    vocab_size: int | None = None,
    measure_imports: bool = False,
) -> list[EngineResult]:
    """Every engine on every case (the same logits per case for every engine);
    ``measure_imports``: also time each engine's import in a fresh interpreter."""
    size = vocab_size or _round_up(tokenizer.get_vocab_size(with_added_tokens=True), 128)
    token_bytes, specials = vocab_bytes(tokenizer)
    for i in specials:  # the walk never decodes special tokens into text
        token_bytes[i] = b""
    token_bytes += [b""] * (size - len(token_bytes))
    ids = {t: tokenizer.token_to_id(t) for t in (THINK_END, ANSWER_END)}
    results = []
    for key in engines:
        cls, code = ENGINES[key]
        lines = _code_lines(code)
        if key == "ours":  # the automaton and its token masks
            lines += _module_code_lines(grammar.__file__) + _module_code_lines(constraints.__file__)
        engine = cls()
        name, requires = _distribution(engine)
        result = EngineResult(name, engine.enforces, engine.notes, lines, requires)
        results.append(result)
        if measure_imports:
            result.import_s = _import_seconds(engine.module)
        t0 = time.perf_counter()
        try:
            engine.setup(tokenizer, size)
        except Exception as exc:  # not installed, or its setup failed: report, go on
            result.error = f"{type(exc).__name__}: {exc}"[:300]
            log.warning("%s: %s", name, result.error)
            continue
        result.setup_s = time.perf_counter() - t0
        log.info("%s: set up in %.2f s", name, result.setup_s)
        for k, case in enumerate(cases):
            result.walks.append(
                walk(engine, case, np.random.default_rng([seed, k]), token_bytes, ids)
            )
            if result.walks[-1].problem:
                log.debug(
                    "%s request %d: %s: %r", key, k, result.walks[-1].problem, result.walks[-1].text
                )
        log.info("%s: %d/%d valid", name, result.valid, len(cases))
    ours = next((r for k, r in zip(engines, results, strict=True) if k == "ours" and r.walks), None)
    for r in results:
        if ours is not None and r is not ours and r.walks:
            r.same_as_ours = sum(a.text == b.text for a, b in zip(r.walks, ours.walks, strict=True))
    return results


def _distribution(engine) -> tuple[str, str]:
    """The engine's name with its installed version, and what its package requires."""
    if isinstance(engine, OursEngine):
        return engine.name, "numpy (already a gmner_rt dependency)"
    try:
        version = importlib.metadata.version(engine.distribution)
        requires = importlib.metadata.requires(engine.distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return engine.name, "not installed"
    names = {re.split(r"[\s;<>=!~\[(]", r, maxsplit=1)[0] for r in requires if "extra" not in r}
    return engine.name.replace(" (", f" {version} (", 1), ", ".join(sorted(names)) or "none"


def _import_seconds(module: str) -> float | None:
    """Seconds to import ``module`` in a fresh interpreter (None when it fails)."""
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    return float(proc.stdout.strip()) if proc.returncode == 0 else None


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


#: The table's columns.
COLUMNS = (
    "engine",
    "import s",
    "setup s",
    "compile ms/req",
    "mask ms/step",
    "mask p95",
    "mask max",
    "total ms/req",
    "steps/req",
    "valid",
    "same as ours",
    "code lines",
)


def _row(r: EngineResult) -> tuple[str, ...]:
    imported = "-" if r.import_s is None else f"{r.import_s:.2f}"
    if r.error or not r.walks:
        return (r.name, imported, *["-"] * 7, "failed", "-", str(r.code_lines))
    masks = np.asarray([m for w in r.walks for m in w.mask_s] or [np.nan]) * 1e3
    total = [1e3 * (w.compile_s + sum(w.mask_s) + w.advance_s) for w in r.walks]
    return (
        r.name,
        imported,
        f"{r.setup_s:.2f}",
        f"{1e3 * np.mean([w.compile_s for w in r.walks]):.2f}",
        f"{masks.mean():.3f}",
        f"{np.percentile(masks, 95):.3f}",
        f"{masks.max():.1f}",
        f"{np.mean(total):.1f}",
        f"{np.mean([len(w.mask_s) for w in r.walks]):.1f}",
        f"{r.valid}/{len(r.walks)}",
        "-" if r.same_as_ours is None else f"{r.same_as_ours}/{len(r.walks)}",
        str(r.code_lines),
    )


def format_table(results: Sequence[EngineResult], header: str = "") -> str:
    """The figures as a plain-text table, then per engine what its grammar enforces, notes,
    its package's requirements, and its errors and invalid outputs by kind."""
    rows = [_row(r) for r in results]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(COLUMNS)]
    lines = [header] if header else []
    for row in (COLUMNS, tuple("-" * w for w in widths), *rows):
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    lines.append("")
    for r in results:
        lines.append(f"{r.name}: enforces {r.enforces}")
        lines.append(f"  notes: {r.notes}")
        lines.append(f"  requires: {r.requires}")
        if r.error:
            lines.append(f"  error: {r.error}")
        problems: dict[str, int] = {}
        for w in r.walks:
            if w.problem:
                problems[w.problem] = problems.get(w.problem, 0) + 1
        for problem, n in sorted(problems.items(), key=lambda kv: -kv[1]):
            lines.append(f"  invalid x{n}: {problem}")
    lines.append(
        "columns: import = fresh interpreter; setup = once per tokenizer; compile = per-request "
        "grammar; mask = per step; total = compile + masks + advances per request; code lines "
        "= grammar + glue (ours: gmner_rt/grammar.py + constraints.py + glue)"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--vocab",
        type=int,
        default=DEFAULT_VOCAB,
        help=f"BPE tokens before the special ones (default {DEFAULT_VOCAB:,})",
    )
    parser.add_argument("--requests", type=int, default=50, help="requests (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of corpus, texts, logits")
    parser.add_argument("--data", type=Path, help="Twitter-GMNER folder: real tweets")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path("out/bench/large_tokenizer.json"),
        help="tokenizer cache (default out/bench/large_tokenizer.json)",
    )
    parser.add_argument(
        "--engines",
        default="ours,llguidance,xgrammar",
        help="comma-separated, of: " + ", ".join(ENGINES),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def run(args: argparse.Namespace) -> int:
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        log.error("--engines: unknown %s; choose from %s", unknown, ", ".join(ENGINES))
        return 2
    started = time.perf_counter()
    tokenizer, build_s, cached = load_or_build_tokenizer(
        args.cache, args.vocab, args.seed, args.data
    )
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    log.info("tokenizer: %d tokens, %s in %.1f s", size, "loaded" if cached else "built", build_s)
    rng = np.random.default_rng([args.seed, 2])
    _, tweets = _data_tweets(args.data)
    cases = build_cases(rng, args.requests, tweets, _word_types(rng, 20_000))
    spans = np.mean([len(c.mentions) for c in cases])
    log.info("%d requests, %.0f mention spans each on average", len(cases), spans)
    results = run_bench(tokenizer, cases, engines, args.seed, measure_imports=True)
    elapsed = time.perf_counter() - started
    header = (
        f"tokenizer: {size:,} tokens ({'loaded' if cached else 'built'} in {build_s:.1f} s), "
        f"mask width {_round_up(size, 128):,}\n"
        f"requests: {len(cases)} ({'Twitter-GMNER' if tweets else 'generated'} texts, "
        f"{spans:.0f} mention spans each on average), labels {'/'.join(LABELS)}\n"
        f"walk: random logits, argmax among the allowed tokens, <= {MAX_TOKENS} tokens, "
        f"</think> after {THINK_TOKENS} reasoning tokens; total {elapsed:.0f} s"
    )
    print(format_table(results, header))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gmner.bench.grammar_engines",
        description="Compare gmner_rt's constrained decoding with llguidance and xgrammar.",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
