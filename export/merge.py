"""Merge a LoRA adapter into its base model, checked against the unmerged model's logits.

``load_merged`` gives the model to export (base, base + LoRA merged, or a fully fine-tuned
checkpoint); ``merge`` writes it as a standalone Qwen2.5-VL directory (``gmner export merge``),
idempotently: a second call with the same inputs finds ``merge_info.json`` and does nothing.
The processor (tokenizer, image processor with the pixel bounds used in training, chat
template) is taken from the adapter directory when it has one, else from the base.
This module knows nothing about ONNX or bundles.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from gmner.train.modeling import (
    ModelDirError,
    check_model_dir,
    check_processor_dir,
    is_full_checkpoint,
    library_deprecations_filtered,
    load_model_and_processor,
    load_processor,
)

from gmner_rt.bundle import file_entry

log = logging.getLogger(__name__)

__all__ = [
    "MERGE_INFO",
    "MergeError",
    "MergeReport",
    "check_adapter_dir",
    "load_merged",
    "merge",
]

MERGE_INFO = "merge_info.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
#: Largest accepted |merged - unmerged| logit difference, relative to the logits' scale.
MERGE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


class MergeError(ModelDirError):
    """An adapter directory is incomplete, or merging changed the model's outputs."""


@dataclass(frozen=True)
class MergeReport:
    """What ``load_merged`` did: the kind of checkpoint and the merge check's error."""

    kind: str  # "base", "lora" or "full" (a fully fine-tuned model directory)
    max_abs_logit_diff: float | None = None
    relative_logit_diff: float | None = None


def check_adapter_dir(adapter_dir: str | Path) -> Path:
    """Check a LoRA adapter directory; raise :class:`MergeError` naming the missing file."""
    path = Path(adapter_dir)
    if not path.is_dir():
        raise MergeError(f"adapter directory {path} does not exist")
    if not (path / ADAPTER_CONFIG).is_file():
        raise MergeError(f"{path}: missing {ADAPTER_CONFIG}")
    if not any((path / name).is_file() for name in ADAPTER_WEIGHTS):
        raise MergeError(f"{path}: missing adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    return path


def _probe_inputs(processor) -> dict[str, torch.Tensor]:
    """A small image + text through the processor: inputs that exercise every merged layer."""
    from PIL import Image

    gradient = torch.arange(56 * 84 * 3, dtype=torch.int64).reshape(56, 84, 3) % 251
    image = Image.fromarray(gradient.to(torch.uint8).numpy())
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image},
                {"type": "text", "text": "Merge probe: Alice met Bob in Paris."},
            ],
        }
    ]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return dict(processor(text=[text], images=[image], return_tensors="pt"))


@torch.no_grad()
def _logits(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    moved = {k: v.to(model.device) for k, v in inputs.items()}
    return model(**moved).logits.float().cpu()


def _merge_lora(model, processor, adapter_dir: Path) -> tuple[torch.nn.Module, MergeReport]:
    from peft import PeftModel

    probe = _probe_inputs(processor)
    with library_deprecations_filtered():
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    peft_model.eval()
    before = _logits(peft_model, probe)
    merged = peft_model.merge_and_unload()
    after = _logits(merged, probe)
    max_abs = float((after - before).abs().max())
    relative = max_abs / max(float(before.abs().max()), 1e-6)
    tolerance = MERGE_TOLERANCE[next(merged.parameters()).dtype]
    if not relative <= tolerance:
        raise MergeError(
            f"{adapter_dir}: merged model's logits differ from base + adapter by {max_abs:.3g} "
            f"(relative {relative:.3g} > {tolerance:g}); is the adapter for this base model?"
        )
    log.info("merged %s: max |logit diff| %.3g (relative %.3g)", adapter_dir, max_abs, relative)
    return merged, MergeReport("lora", max_abs, relative)


def load_merged(
    model_dir: str | Path,
    adapter_dir: str | Path | None = None,
    *,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
):
    """``(model, processor, report)``: the base model, with ``adapter_dir`` merged in.

    ``adapter_dir`` may be a LoRA adapter (merged with ``merge_and_unload`` and checked
    against the unmerged model's logits on a probe input) or a fully fine-tuned checkpoint
    directory (loaded instead of the base). The processor comes from ``adapter_dir`` when it
    holds one (the pixel bounds used in training), else from ``model_dir``.
    """
    base = check_model_dir(model_dir)
    if adapter_dir is None:
        model, processor = load_model_and_processor(base, dtype=dtype, device=device)
        return model, processor, MergeReport("base")
    adapter = Path(adapter_dir)
    if adapter.is_dir() and is_full_checkpoint(adapter):
        model, processor = load_model_and_processor(adapter, dtype=dtype, device=device)
        return model, processor, MergeReport("full")
    check_adapter_dir(adapter)
    model, processor = load_model_and_processor(base, dtype=dtype, device=device)
    if _has_processor(adapter):
        processor = load_processor(adapter, config_dir=base)
    merged, report = _merge_lora(model, processor, adapter)
    return merged, processor, report


def _has_processor(path: Path) -> bool:
    try:
        check_processor_dir(path)
    except ModelDirError:
        return False
    return True


def source_fingerprint(model_dir: Path, adapter_dir: Path | None, dtype: str) -> dict:
    """What a merged directory was made from: config and adapter file hashes, dtype."""

    def digest(path: Path) -> str:
        return file_entry(path)["sha256"]

    sources = {"base_config": digest(model_dir / "config.json"), "dtype": dtype}
    if adapter_dir is not None:
        for name in (ADAPTER_CONFIG, *ADAPTER_WEIGHTS, "model.safetensors"):
            if (adapter_dir / name).is_file():
                sources[f"adapter/{name}"] = digest(adapter_dir / name)
    return sources


def merge(
    model_dir: str | Path,
    adapter_dir: str | Path | None,
    out_dir: str | Path,
    *,
    dtype: str = "float32",
) -> Path:
    """Write base + adapter merged to ``out_dir`` as a Qwen2.5-VL directory; idempotent.

    If ``out_dir`` already holds a merge of the same inputs (same ``merge_info.json``
    fingerprint), nothing is done. An ``out_dir`` that exists with other content is refused.
    """
    base = check_model_dir(model_dir)
    adapter = Path(adapter_dir) if adapter_dir is not None else None
    out = Path(out_dir)
    fingerprint = source_fingerprint(base, adapter, dtype)
    info_file = out / MERGE_INFO
    if info_file.is_file():
        previous = json.loads(info_file.read_text(encoding="utf-8"))
        if previous.get("sources") == fingerprint:
            log.info("%s already holds this merge; nothing to do", out)
            return out
        raise MergeError(f"{out}: holds a merge of other inputs ({info_file}); choose a new --out")
    if out.exists() and any(out.iterdir()):
        raise MergeError(f"{out}: exists and is not empty; choose a new --out")
    model, processor, report = load_merged(base, adapter, dtype=dtype)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    info = {
        "sources": fingerprint,
        "kind": report.kind,
        "max_abs_logit_diff": report.max_abs_logit_diff,
    }
    (tmp / MERGE_INFO).write_text(json.dumps(info, indent=2), encoding="utf-8")
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    log.info("wrote merged model to %s", out)
    return out
