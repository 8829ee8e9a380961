"""The task prompt: the instruction text and the chat messages built from it.

Training data, training-time evaluation and the runtime build their prompts here, so a model
always sees the same words. Rendering messages to token ids is the tokenizer's job, not this
module's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = [
    "PROMPT_STYLES",
    "SYSTEM_PROMPT",
    "assistant_message",
    "instruction",
    "render_prompt",
    "user_message",
]

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
_COMPACT = {
    True: "Named entities ({labels}): reason, then answer.\n",
    False: "Named entities ({labels}): answer.\n",
}

#: Instruction wordings. ``full`` describes the task and the record format for a pretrained
#: model to read (the paper's kind of prompt, the default). ``compact`` is a one-line task
#: tag for a model trained from scratch on this one task (the embedded demo model): such a
#: model learns nothing from the wording, and pays for each of its tokens at every step. A
#: model is trained with one style; its bundle carries that style's text.
PROMPT_STYLES = ("full", "compact")


def instruction(
    text: str, labels: Sequence[str], *, think: bool = True, style: str = "full"
) -> str:
    """The user instruction for one tweet, in one of :data:`PROMPT_STYLES`."""
    if style == "full":
        head = _TASK.format(labels=", ".join(labels)) + (_WITH_THINK if think else _ANSWER_ONLY)
        return f"{head}\nText: {text}"
    if style == "compact":
        return _COMPACT[think].format(labels=", ".join(labels)) + f"Text: {text}"
    raise ValueError(f"prompt style: expected one of {PROMPT_STYLES}, got {style!r}")


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
