"""Training examples: rows -> token ids, labels and image tensors, and their batching.

A row (see :mod:`gmner.train.sft`) holds the image path and size, the text, the gold records in
original pixels and the reasoning text. Each time an example is drawn, its boxes are mapped to
model space and, in training, perturbed by GRBP with a generator seeded by (seed, epoch,
index). Labels cover the assistant turn only (the target and ``<|im_end|>``); the prompt and
padding are -100.

This module knows nothing about optimisation or checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image

from gmner_rt.data import LABELS
from gmner_rt.errors import InputError
from gmner_rt.geometry import ImageGeometry
from gmner_rt.prompt import system_message, user_message
from gmner_rt.records import EntityRecord, format_answer
from gmner_rt.text_ids import TEXT_SENTINEL, PlainText
from gmner_rt.vision import to_rgb

from .augment import GRBPConfig, perturb_records, sample_rng

if TYPE_CHECKING:
    from .config import TrainConfig

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
END_OF_TURN = "<|im_end|>"


@dataclass(frozen=True)
class ExampleSettings:
    """How rows become examples.

    Attributes:
        min_pixels / max_pixels: image area bounds (must match the processor's).
        use_cot: put the reasoning text in targets and ask for it in the prompt.
        max_length: token limit; longer examples lose the end of their target (logged).
        grbp: box perturbation, applied to training examples only.
        seed: GRBP seed.
        prompt: prompt style, one of :data:`gmner_rt.prompt.PROMPT_STYLES`.
        system_prompt: a system prompt replacing the style's ('' keeps the style's).
    """

    min_pixels: int
    max_pixels: int
    use_cot: bool
    max_length: int
    grbp: GRBPConfig
    seed: int
    prompt: str = "full"
    system_prompt: str = ""


def row_records(row: dict) -> tuple[EntityRecord, ...]:
    return tuple(
        EntityRecord(
            r["mention"], r["type"], tuple(tuple(b) for b in r["boxes"]) if r["boxes"] else None
        )
        for r in row["records"]
    )


def load_image(path: str) -> Image.Image:
    """An RGB image as displayed (EXIF orientation applied), exactly as the runtime converts
    it (:func:`gmner_rt.vision.to_rgb`), so training and extraction see the same pixels."""
    return to_rgb(path)


def prompt_messages(
    row: dict, image: Image.Image, use_cot: bool, style: str = "full", system_prompt: str = ""
) -> list[dict]:
    return [
        system_message(style, system_prompt),
        user_message(image, row["text"], LABELS, think=use_cot, style=style),
    ]


def target_text(row: dict, settings: ExampleSettings, epoch: int | None, index: int) -> str:
    """The assistant target with boxes in model space (GRBP-perturbed when ``epoch`` is set)."""
    w, h = row["image_size"]
    geo = ImageGeometry.for_image(
        w, h, min_pixels=settings.min_pixels, max_pixels=settings.max_pixels
    )
    records = tuple(_to_model(r, geo, w, h) for r in row_records(row))
    if epoch is not None and settings.grbp.enabled:
        rng = sample_rng(settings.seed, epoch, index)
        records = perturb_records(records, geo.model_size, settings.grbp, rng)
    # A tweet without reasoning text still gets its (empty) think block when the prompt asks
    # for reasoning, as the reference trains it: the answer never starts where <think> should.
    think = (row.get("think") or "") if settings.use_cot else None
    return format_answer(records, think=think)


def _to_model(record: EntityRecord, geo: ImageGeometry, width: int, height: int) -> EntityRecord:
    """``record`` with its boxes in model space; a gold box with no area inside the image (an
    annotation error) is left out rather than made a one-pixel box on the edge, and a record
    left without boxes is ungrounded."""
    if record.boxes is None:
        return record
    inside = [b for b in record.boxes if min(b[2], width) > max(b[0], 0)]
    inside = [b for b in inside if min(b[3], height) > max(b[1], 0)]
    if len(inside) < len(record.boxes):
        log.warning("%s: gold boxes outside the image left out: %s", record.mention, record.boxes)
    boxes = tuple(geo.to_model(b) for b in inside) or None
    return EntityRecord(record.mention, record.type, boxes)


def encode_prompt(
    processor,
    row: dict,
    image: Image.Image,
    use_cot: bool,
    style: str = "full",
    system_prompt: str = "",
) -> dict:
    """Token ids (image pads expanded), pixel values and grid of the prompt. The tweet is
    encoded as plain text and spliced in (:mod:`gmner_rt.text_ids`), exactly as the runtime
    does: control tokens typed in a tweet stay text."""
    messages = prompt_messages({**row, "text": TEXT_SENTINEL}, image, use_cot, style, system_prompt)
    rendered = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    out = processor(text=[rendered], images=[image], return_tensors="pt")
    s = _plain_text(processor).splice(out["input_ids"][0].tolist(), row["text"])
    out["input_ids"] = torch.tensor([s.ids], dtype=out["input_ids"].dtype)
    if "attention_mask" in out:
        out["attention_mask"] = torch.ones_like(out["input_ids"])
    if "mm_token_type_ids" in out:  # the text is no image or video token
        types = out["mm_token_type_ids"][0].tolist()
        kept = types[: s.start] + [0] * s.count + types[s.start + s.replaced :]
        out["mm_token_type_ids"] = torch.tensor([kept], dtype=out["mm_token_type_ids"].dtype)
    return out


_PLAIN: dict[int, PlainText] = {}


def _plain_text(processor) -> PlainText:
    """The processor's tokenizer as a plain-text encoder (built once per processor)."""
    key = id(processor.tokenizer)
    if key not in _PLAIN:
        _PLAIN[key] = PlainText(processor.tokenizer.backend_tokenizer)
    return _PLAIN[key]


def encode_example(
    processor, row: dict, settings: ExampleSettings, *, epoch: int | None, index: int
) -> dict:
    """One example: input ids, labels (assistant turn only) and image tensors."""
    image = load_image(row["images"][0])
    prompt = encode_prompt(
        processor, row, image, settings.use_cot, settings.prompt, settings.system_prompt
    )
    target = target_text(row, settings, epoch, index) + END_OF_TURN
    target_ids = processor.tokenizer(target, add_special_tokens=False, return_tensors="pt")
    target_ids = target_ids["input_ids"][0]
    prompt_ids = prompt["input_ids"][0]
    input_ids = torch.cat([prompt_ids, target_ids])
    labels = torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), target_ids])
    if input_ids.numel() > settings.max_length:
        if prompt_ids.numel() >= settings.max_length:
            raise InputError(
                f"tweet {row['id']}: the prompt alone is {prompt_ids.numel()} tokens, over "
                f"--optim.max_length {settings.max_length}; lower --model.max_pixels"
            )
        log.warning(
            "tweet %s: %d tokens, target cut to --optim.max_length %d",
            row["id"],
            input_ids.numel(),
            settings.max_length,
        )
        input_ids, labels = input_ids[: settings.max_length], labels[: settings.max_length]
    example = {
        "input_ids": input_ids,
        "labels": labels,
        "pixel_values": prompt["pixel_values"],
        "image_grid_thw": prompt["image_grid_thw"],
    }
    if "mm_token_type_ids" in prompt:
        mm = prompt["mm_token_type_ids"][0]
        example["mm_token_type_ids"] = torch.cat([mm, torch.zeros_like(target_ids)])[
            : input_ids.numel()
        ]
    return example


def _pad(seqs: Sequence[torch.Tensor], value: int, left: bool) -> torch.Tensor:
    length = max(s.numel() for s in seqs)
    out = torch.full((len(seqs), length), value, dtype=seqs[0].dtype)
    for i, s in enumerate(seqs):
        if left:
            out[i, length - s.numel() :] = s
        else:
            out[i, : s.numel()] = s
    return out


def collate(examples: Sequence[dict], pad_id: int, *, left: bool = False) -> dict:
    """A batch: sequences padded (right for training, left for generation), images joined."""
    batch = {
        "input_ids": _pad([e["input_ids"] for e in examples], pad_id, left),
        "attention_mask": _pad([torch.ones_like(e["input_ids"]) for e in examples], 0, left),
        "pixel_values": torch.cat([e["pixel_values"] for e in examples]),
        "image_grid_thw": torch.cat([e["image_grid_thw"] for e in examples]),
    }
    if "labels" in examples[0]:
        batch["labels"] = _pad([e["labels"] for e in examples], IGNORE_INDEX, left)
    if "mm_token_type_ids" in examples[0]:
        batch["mm_token_type_ids"] = _pad([e["mm_token_type_ids"] for e in examples], 0, left)
    return batch


def prompt_example(
    processor, row: dict, use_cot: bool, style: str = "full", system_prompt: str = ""
) -> dict:
    """The prompt alone, for generation."""
    image = load_image(row["images"][0])
    prompt = encode_prompt(processor, row, image, use_cot, style, system_prompt)
    example = {
        "input_ids": prompt["input_ids"][0],
        "pixel_values": prompt["pixel_values"],
        "image_grid_thw": prompt["image_grid_thw"],
    }
    if "mm_token_type_ids" in prompt:
        example["mm_token_type_ids"] = prompt["mm_token_type_ids"][0]
    return example


def example_settings(cfg: TrainConfig) -> ExampleSettings:
    """How a run with training config ``cfg`` turns rows into examples."""
    return ExampleSettings(
        min_pixels=cfg.model.min_pixels,
        max_pixels=cfg.model.max_pixels,
        use_cot=cfg.data.use_cot,
        max_length=cfg.optim.max_length,
        grbp=cfg.grbp,
        seed=cfg.optim.seed,
        prompt=cfg.data.prompt,
        system_prompt=cfg.data.system_prompt,
    )
