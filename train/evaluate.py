"""Evaluation of a model in training or of a checkpoint: greedy generation, dev loss, metrics.

Outputs are mapped back to original pixels before scoring with :mod:`gmner_rt.metrics`, and
written in the ``gmner eval --pred`` format. This module knows nothing about optimisation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from gmner_rt.answers import answer_to_original
from gmner_rt.geometry import ImageGeometry
from gmner_rt.metrics import EvalReport, evaluate
from gmner_rt.predictions import write_predictions

from . import distributed
from .dataset import ExampleSettings, collate, encode_example, prompt_example, row_records

log = logging.getLogger(__name__)

STOP_STRINGS = ["</answer>"]


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def generate_outputs(
    model,
    processor,
    rows: Sequence[dict],
    settings: ExampleSettings,
    *,
    max_new_tokens: int,
    batch_size: int,
) -> dict[str, str]:
    """Greedy outputs per image id, boxes mapped to original pixels. In a data-parallel
    run each rank generates its share of ``rows`` and every rank gets all outputs."""
    return distributed.sharded(
        rows,
        lambda part: _generate(
            model, processor, part, settings, max_new_tokens=max_new_tokens, batch_size=batch_size
        ),
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
) -> dict[str, str]:
    model.eval()
    tok = processor.tokenizer
    device = next(model.parameters()).device
    outputs: dict[str, str] = {}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        examples = [
            prompt_example(processor, row, settings.use_cot, settings.prompt) for row in chunk
        ]
        batch = _to_device(collate(examples, tok.pad_token_id, left=True), device)
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
        texts = tok.batch_decode(new_tokens, skip_special_tokens=True)
        for row, text in zip(chunk, texts, strict=True):
            w, h = row["image_size"]
            geo = ImageGeometry.for_image(
                w, h, min_pixels=settings.min_pixels, max_pixels=settings.max_pixels
            )
            outputs[row["id"]] = answer_to_original(text, geo)
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
    protocol: str,
    pred_path: Path | None = None,
) -> EvalReport:
    """Generate for ``rows``, write the predictions (optional) and score them."""
    outputs = generate_outputs(
        model, processor, rows, settings, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    if pred_path is not None and distributed.is_main():
        write_predictions(pred_path, outputs)
    gold = {row["id"]: row_records(row) for row in rows}
    return evaluate(gold, outputs, protocol=protocol)


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
        protocol=protocol,
        pred_path=pred_path,
    )
