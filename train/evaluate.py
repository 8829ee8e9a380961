"""Evaluation of a model in training or of a checkpoint: greedy generation, dev loss, metrics.

Each output is kept as generated (model pixels, what the ``e2e`` protocol scores) and mapped
back to original pixels (what ``hindex`` scores), scored under both protocols with
:mod:`gmner_rt.metrics`, and written in the ``gmner eval --pred`` format. This module knows
nothing about optimisation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from gmner_rt import progress
from gmner_rt.answers import answer_to_original
from gmner_rt.geometry import ImageGeometry
from gmner_rt.metrics import PROTOCOLS, EvalReport, evaluate
from gmner_rt.predictions import ModelText, write_predictions

from . import distributed
from .dataset import ExampleSettings, collate, encode_example, prompt_example, row_records
from .modeling import library_deprecations_filtered

log = logging.getLogger(__name__)

STOP_STRINGS = ["</answer>"]


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@dataclass(frozen=True)
class Generated:
    """Greedy outputs per image id: ``outputs`` with boxes in original pixels, ``texts`` as
    generated (model pixels) with their sizes."""

    outputs: dict[str, str]
    texts: dict[str, ModelText]


def generate_outputs(
    model,
    processor,
    rows: Sequence[dict],
    settings: ExampleSettings,
    *,
    max_new_tokens: int,
    batch_size: int,
) -> Generated:
    """Greedy outputs per image id, as generated and mapped to original pixels. In a
    data-parallel run each rank generates its share of ``rows`` and every rank gets all
    outputs."""
    pairs = distributed.sharded(
        rows,
        lambda part: _generate(
            model, processor, part, settings, max_new_tokens=max_new_tokens, batch_size=batch_size
        ),
    )
    return Generated(
        {k: output for k, (output, _) in pairs.items()},
        {k: text for k, (_, text) in pairs.items()},
    )


@torch.no_grad()
def _generate(
    model,
    processor,
    rows: Sequence[dict],
    settings: ExampleSettings,
    *,
    max_new_tokens: int,
    batch_size: int,
) -> dict[str, tuple[str, ModelText]]:
    """This process's outputs: per image id, (text in original pixels, text as generated)."""
    model.eval()
    with progress.Progress(len(rows), "generate", "tweet", enabled=distributed.is_main()) as bar:
        return _generate_rows(model, processor, rows, settings, bar, max_new_tokens, batch_size)


def _generate_rows(model, processor, rows, settings, bar, max_new_tokens, batch_size) -> dict:
    tok = processor.tokenizer
    device = next(model.parameters()).device
    outputs: dict[str, tuple[str, ModelText]] = {}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        examples = [
            prompt_example(
                processor, row, settings.use_cot, settings.prompt, settings.system_prompt
            )
            for row in chunk
        ]
        batch = _to_device(collate(examples, tok.pad_token_id, left=True), device)
        with library_deprecations_filtered():
            generated = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                stop_strings=STOP_STRINGS,
                tokenizer=tok,
                pad_token_id=tok.pad_token_id,
            )
        new_tokens = generated[:, batch["input_ids"].shape[1] :]
        decoded = tok.batch_decode(new_tokens, skip_special_tokens=True)
        for row, text in zip(chunk, decoded, strict=True):
            w, h = row["image_size"]
            geo = ImageGeometry.for_image(
                w, h, min_pixels=settings.min_pixels, max_pixels=settings.max_pixels
            )
            model_text = ModelText(text, (w, h), geo.model_size)
            outputs[row["id"]] = (answer_to_original(text, geo), model_text)
        bar.update(len(chunk))
    return outputs


def mean_loss(
    model, processor, rows: Sequence[dict], settings: ExampleSettings, batch_size: int
) -> float:
    """Token-weighted loss on unperturbed targets (each rank of a data-parallel run takes
    its share of ``rows``)."""
    total = tokens = 0.0
    for part_total, part_tokens in distributed.all_gather(
        _loss_sums(
            model,
            processor,
            rows[distributed.rank() :: distributed.world_size()],
            settings,
            batch_size,
        )
    ):
        total, tokens = total + part_total, tokens + part_tokens
    return total / tokens if tokens else float("nan")


@torch.no_grad()
def _loss_sums(
    model, processor, rows: Sequence[dict], settings: ExampleSettings, batch_size: int
) -> tuple[float, float]:
    """(sum of token losses, tokens) over ``rows``."""
    model.eval()
    device = next(model.parameters()).device
    total = tokens = 0.0
    for start in range(0, len(rows), batch_size):
        examples = [
            encode_example(processor, row, settings, epoch=None, index=start + k)
            for k, row in enumerate(rows[start : start + batch_size])
        ]
        batch = _to_device(collate(examples, processor.tokenizer.pad_token_id), device)
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch).loss) * n
        tokens += n
    return total, tokens


def score_rows(
    model,
    processor,
    rows: Sequence[dict],
    settings: ExampleSettings,
    *,
    max_new_tokens: int,
    batch_size: int,
    pred_path: Path | None = None,
) -> dict[str, EvalReport]:
    """Generate for ``rows``, write the predictions (optional) and score them under every
    protocol (:data:`gmner_rt.metrics.PROTOCOLS`); the reports by protocol."""
    generated = generate_outputs(
        model, processor, rows, settings, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    return score_generated(rows, generated, pred_path)


def score_generated(
    rows: Sequence[dict], generated: Generated, pred_path: Path | None = None
) -> dict[str, EvalReport]:
    """Score outputs of ``rows`` under every protocol; write them first when asked (the
    main process alone, in a data-parallel run)."""
    if pred_path is not None and distributed.is_main():
        write_predictions(pred_path, generated.outputs, model_texts=generated.texts)
    gold = {row["id"]: row_records(row) for row in rows}
    return {
        protocol: evaluate(gold, generated.outputs, protocol=protocol, model_texts=generated.texts)
        for protocol in PROTOCOLS
    }


def evaluate_checkpoint(
    model_dir: Path,
    adapter_dir: Path | None,
    data_dir: Path,
    split: str,
    images: Sequence[Path],
    *,
    pred_path: Path,
    protocol: str = "hindex",
    max_new_tokens: int = 512,
    batch_size: int = 4,
    device: str = "auto",
) -> EvalReport:
    """Generate and score a base model (+ adapter) on one split; predictions to ``pred_path``."""
    from gmner_rt.data import load_split

    from .config import checkpoint_config, load_config
    from .dataset import example_settings
    from .modeling import load_model_and_processor, resolve_device
    from .sft import SftConfig, build_rows

    cfg = load_config(checkpoint_config(adapter_dir))
    dev = resolve_device(device)
    model, processor = load_model_and_processor(
        model_dir, device=str(dev), min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels
    )
    if adapter_dir is not None:
        from peft import PeftModel

        with library_deprecations_filtered():
            model = PeftModel.from_pretrained(model, str(adapter_dir))
    sft = SftConfig(
        image_dirs=tuple(images), min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels
    )
    rows, _ = build_rows(load_split(data_dir, split), sft, None)
    settings = example_settings(cfg)
    return score_rows(
        model,
        processor,
        rows,
        settings,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        pred_path=pred_path,
    )[protocol]
