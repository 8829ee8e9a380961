"""The tweet's token ids: its text encoded as plain text, spliced into the prompt's ids.

A prompt encoded in one piece would read ``<|im_end|>``, ``<|image_pad|>`` or ``</answer>``
typed in a tweet as the control tokens they name: a forged chat turn, an end of sequence, an
image slot. So the prompt is rendered with :data:`TEXT_SENTINEL` where the tweet goes and
encoded as usual (the template's control tokens are real), and the tweet is encoded on its own
with every added token of the tokenizer split like any other text; its ids replace the
sentinel's. For text without such tokens the ids are the ones the one-piece encoding gives: the
tweet follows ``Text: `` and precedes ``<|im_end|>``, so the space before it is encoded with it
(as the byte-level pre-tokenizer would: `` Alice``) and the control token after it is a hard
boundary anyway. Training (``gmner.train.dataset``) and the runtime both use this module, so
they see the same ids.

It knows token ids and a ``tokenizers.Tokenizer``; nothing of images or models.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import NamedTuple

from .errors import InputError

__all__ = ["TEXT_SENTINEL", "PlainText", "Splice", "splice_text"]

#: Stands for the tweet while the prompt is rendered and encoded: a special token of
#: Qwen2-VL's vocabulary that no prompt uses and that processors leave as it is.
TEXT_SENTINEL = "<|vision_pad|>"


class PlainText:
    """Encodes text with every added token (special or not) split as ordinary text."""

    def __init__(self, tokenizer):
        from tokenizers import Tokenizer

        data = json.loads(tokenizer.to_str())
        for token in data.get("added_tokens", []):
            token["special"] = True  # encode_special_tokens splits only special added tokens
        self._tokenizer = Tokenizer.from_str(json.dumps(data))
        self._tokenizer.encode_special_tokens = True
        self.sentinel_id = tokenizer.token_to_id(TEXT_SENTINEL)
        space = tokenizer.encode(" ", add_special_tokens=False).ids
        self.space_id = space[0] if len(space) == 1 else None

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` as plain text."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def splice(self, prompt_ids: Sequence[int], text: str) -> Splice:
        """The prompt's ids (rendered with :data:`TEXT_SENTINEL`) with the text in its place."""
        return splice_text(prompt_ids, text, self)


class Splice(NamedTuple):
    """A prompt's ids with the text in place of the sentinel.

    Attributes:
        ids: the prompt's ids.
        start: where the text's ids begin.
        replaced: how many of the rendered prompt's ids they replace (the sentinel, and the
            space before it when there is one).
        count: how many ids the text took.
    """

    ids: list[int]
    start: int
    replaced: int
    count: int


def splice_text(prompt_ids: Sequence[int], text: str, plain: PlainText) -> Splice:
    """See :meth:`PlainText.splice`."""
    ids = list(prompt_ids)
    if plain.sentinel_id is None:
        raise InputError(f"the tokenizer has no {TEXT_SENTINEL}: cannot place the text safely")
    where = [i for i, t in enumerate(ids) if t == plain.sentinel_id]
    if len(where) != 1:
        raise InputError(f"the prompt holds {len(where)} text slots ({TEXT_SENTINEL}), not one")
    at = where[0]
    before = ids[:at]
    if before and plain.space_id is not None and before[-1] == plain.space_id:
        before, text = before[:-1], " " + text  # the space is encoded with the word after it
    text_ids = plain.encode(text)
    return Splice(
        before + text_ids + ids[at + 1 :], len(before), at + 1 - len(before), len(text_ids)
    )
