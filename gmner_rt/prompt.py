"""The task prompt: named prompt styles (system prompt and instruction texts) and the chat
messages built from them.

Training data, training-time evaluation, ``gmner export`` (which writes the style's texts into
the bundle's manifest) and the runtime all build their prompts from :data:`STYLES`, so a model
always sees the words it was trained with. Rendering messages to token ids is the tokenizer's
job, not this module's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "PROMPT_STYLES",
    "STYLES",
    "SYSTEM_PROMPT",
    "PromptStyle",
    "assistant_message",
    "instruction",
    "prompt_style",
    "render_prompt",
    "system_message",
    "user_message",
]

#: gmner's own system prompt (styles ``full`` and ``compact``): Qwen's default.
SYSTEM_PROMPT = "You are a helpful assistant."

_TASK = (
    "Perform grounded multimodal named entity recognition on the text and the image.\n"
    "Find every named entity in the text and give its type, one of {labels}.\n"
    "For each entity, output `entity|type|[x1,y1,x2,y2]` with its box in the image if the image "
    "shows it (several boxes as `[[x1,y1,x2,y2],[x1,y1,x2,y2]]`), otherwise `entity|type|None`.\n"
    "Separate results with `; `, or output `None` if the text has no entity.\n"
)
_WITH_THINK = (
    "First reason briefly inside <think></think> about what the image shows and what each "
    "name refers to, then give the results inside <answer></answer>.\n"
)
_ANSWER_ONLY = "Give the results inside <answer></answer>.\n"

# The E2E-GMNER reference's texts (Finch-coder/E2E-GMNER: the collator's default system prompt
# and gmner_to_sft_data.py's instruction, which the tweet follows directly). Its instruction
# does not change with reasoning on or off: the system prompt always asks for it.
_REFERENCE_SYSTEM = (
    "You are an information extraction assistant for grounded multimodal named entity "
    "recognition. Given the image and text, first think briefly and then answer in a strict "
    "XML-like format. The final output must contain exactly one <think>...</think> block "
    "followed by exactly one <answer>...</answer> block. Inside <answer>, output only "
    "structured entity triples in the format mention|type|[x1,y1,x2,y2], separated by '; '. "
    "If there is no entity, output <answer>None</answer>. Do not add any extra explanation "
    "outside the tags."
)
_REFERENCE_INSTRUCTION = (
    "Perform grounded MNER by extracting entities from the text.\n"
    "For each entity, output `entity|type|[x1,y1,x2,y2]` if it is visible in the image; "
    "otherwise output `entity|type|None`.\n"
    "Separate multiple results with `;`, or output `None` if no entity is found.\n\n"
    "Use both textual evidence and visual evidence when available.\n\n"
    "Text: {text}"
)


@dataclass(frozen=True)
class PromptStyle:
    """One way of prompting the model; a model is trained with one style, and its bundle
    carries that style's texts.

    Attributes:
        name: the style's name (``--data.prompt``, ``gmner export --prompt``).
        system: the system prompt.
        think: the user instruction when reasoning is asked for; ``{labels}`` (the entity
            types, comma-separated) and ``{text}`` (the tweet) are its slots.
        answer_only: the instruction when it is not.
        summary: what the style is for, one line.
    """

    name: str
    system: str
    think: str
    answer_only: str
    summary: str

    def instruction(self, text: str, labels: Sequence[str], *, think: bool = True) -> str:
        """The instruction for one tweet (slots filled by ``str.replace``, so braces in the
        tweet are never read as slots)."""
        template = self.think if think else self.answer_only
        return template.replace("{labels}", ", ".join(labels)).replace("{text}", text, 1)


#: The prompt styles, by name.
STYLES: dict[str, PromptStyle] = {
    style.name: style
    for style in (
        PromptStyle(
            name="full",
            system=SYSTEM_PROMPT,
            think=_TASK + _WITH_THINK + "\nText: {text}",
            answer_only=_TASK + _ANSWER_ONLY + "\nText: {text}",
            summary="describes the task and the record format for a pretrained model to read "
            "(gmner's default)",
        ),
        PromptStyle(
            name="compact",
            system=SYSTEM_PROMPT,
            think="Named entities ({labels}): reason, then answer.\nText: {text}",
            answer_only="Named entities ({labels}): answer.\nText: {text}",
            summary="a one-line task tag, for a model trained from scratch on this one task "
            "(the embedded demo model): it learns nothing from wording and pays for each token",
        ),
        PromptStyle(
            name="reference",
            system=_REFERENCE_SYSTEM,
            think=_REFERENCE_INSTRUCTION,
            answer_only=_REFERENCE_INSTRUCTION,
            summary="the E2E-GMNER reference code's system prompt and instruction, for "
            "adapters it trained and for runs comparable with its numbers",
        ),
    )
}

#: The names of :data:`STYLES`.
PROMPT_STYLES = tuple(STYLES)


def prompt_style(name: str) -> PromptStyle:
    """The style called ``name``; ``ValueError`` naming the choices otherwise."""
    try:
        return STYLES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"prompt style: expected one of {', '.join(PROMPT_STYLES)}, got {name!r}"
        ) from None


def instruction(
    text: str, labels: Sequence[str], *, think: bool = True, style: str = "full"
) -> str:
    """The user instruction for one tweet, in one of :data:`PROMPT_STYLES`."""
    return prompt_style(style).instruction(text, labels, think=think)


def system_message(style: str = "full", system_prompt: str | None = None) -> dict:
    """A chat ``system`` turn: ``system_prompt`` when given, else the style's."""
    text = system_prompt if system_prompt else prompt_style(style).system
    return {"role": "system", "content": [{"type": "text", "text": text}]}


def user_message(
    image: object, text: str, labels: Sequence[str], *, think: bool = True, style: str = "full"
) -> dict:
    """A chat ``user`` turn with one image (a path, URL or image object) and the instruction."""
    return {
        "role": "user",
        "content": [
            {"type": "image", "image": image},
            {"type": "text", "text": instruction(text, labels, think=think, style=style)},
        ],
    }


def assistant_message(target: str) -> dict:
    """A chat ``assistant`` turn holding a training target."""
    return {"role": "assistant", "content": [{"type": "text", "text": target}]}


_SLOT = re.compile(r"\{(system|image|instruction)\}")


def render_prompt(
    chat_template: str,
    *,
    system: str,
    image: str,
    instruction_template: str,
    text: str,
) -> str:
    """Fill a bundle's chat layout (``{system}``, ``{image}``, ``{instruction}`` slots) and
    the instruction's ``{text}`` slot in one pass, so braces in the tweet are never read as
    slots. The result equals the model's chat template rendered with the same messages."""
    instruction_text = instruction_template.replace("{text}", text, 1)
    values = {"system": system, "image": image, "instruction": instruction_text}
    return _SLOT.sub(lambda match: values[match.group(1)], chat_template)
