"""``gmner export``: base (+ adapter) -> a verified, self-describing bundle directory.

Three steps: merge (:mod:`.merge`), write the graphs (:mod:`.onnx_export`), then check them
against PyTorch (:mod:`.parity`) and write ``manifest.json`` (validated by
:mod:`gmner_rt.bundle`, the runtime's own reader). The bundle is built in a temporary sibling
directory and moved into place only when everything passed, so a failed export leaves no
half-written bundle behind. With ``quant`` set, that verified fp bundle is the source of a
quantized one (:mod:`.quantized_bundle`), which is what lands at ``out``.
"""

from __future__ import annotations

import gc
import importlib.metadata
import logging
import platform
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import yaml
from gmner.train.config import checkpoint_config, load_config

from gmner_rt import progress
from gmner_rt.bundle import FORMAT_VERSION, TOKENIZER_NAME, file_entry, load_bundle, write_manifest
from gmner_rt.data import LABELS
from gmner_rt.prompt import PROMPT_STYLES, prompt_style
from gmner_rt.records import RECORD_FORMAT_VERSION

from .card import write_card
from .merge import load_merged
from .onnx_export import ExportSettings, cast_for_export, export_graphs
from .quantize import QuantSettings
from .staging import move_into_place, staging_dir
from .tensorrt_ready import log_readiness

log = logging.getLogger(__name__)

__all__ = ["BundleOptions", "export_bundle", "manifest_data"]

IMAGE_SLOT = "<|vision_start|><|image_pad|><|vision_end|>"
INSTRUCTION_SENTINEL = "\x00INSTRUCTION\x00"
DEFAULT_MAX_NEW_TOKENS = 512


@dataclass(frozen=True)
class BundleOptions:
    """What ``gmner export`` was asked for.

    Attributes:
        model: base Qwen2.5-VL directory.
        adapter: LoRA adapter (or fully fine-tuned checkpoint) directory, or None.
        out: the bundle directory to create (must not exist, or be empty).
        settings: graph dtype, exporter and external-data threshold.
        quant: weight-only quantization of the decoder after the fp export, or None.
        max_image_tokens: cap on image tokens (sets max_pixels); None keeps the model's.
        verify: run the parity check (default on).
        name: a name recorded in the manifest.
        prompt: prompt style (:data:`gmner_rt.prompt.PROMPT_STYLES`) the bundle's prompt
            is written in; None takes the one the checkpoint was trained with
            (:func:`trained_prompt`), and is an error for an adapter that has no gmner
            training config (a plain PEFT directory, as the reference code writes).
        system_prompt: a system prompt replacing the style's; None takes the checkpoint's
            (its ``data.system_prompt``), else the style's.
    """

    model: Path
    adapter: Path | None
    out: Path
    settings: ExportSettings = ExportSettings()
    quant: QuantSettings | None = None
    max_image_tokens: int | None = None
    verify: bool = True
    name: str | None = None
    prompt: str | None = None
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.max_image_tokens is not None and self.max_image_tokens < 4:
            raise ValueError(f"max_image_tokens: must be >= 4, got {self.max_image_tokens}")
        if self.prompt is not None and self.prompt not in PROMPT_STYLES:
            raise ValueError(f"prompt: expected one of {PROMPT_STYLES}, got {self.prompt!r}")


def resolve_prompt(options: BundleOptions) -> tuple[str, str]:
    """The (style, system prompt) to write: what was asked for, else the checkpoint's."""
    style, system = trained_prompt(options.adapter, options.prompt)
    if options.prompt is not None:
        style = options.prompt
    if options.system_prompt is not None:
        system = options.system_prompt
    return style, system or prompt_style(style).system


def trained_prompt(adapter: Path | None, asked: str | None = None) -> tuple[str, str]:
    """The ``data.prompt`` and ``data.system_prompt`` of the training config saved with
    ``adapter`` (:func:`gmner.train.config.checkpoint_config`). Without an adapter: ``full``
    and the style's system prompt. An adapter with no gmner config (a plain PEFT directory)
    says nothing of how it was prompted, so ``asked`` (``--prompt``) must name it: a
    ValueError otherwise, never a silent default."""
    if adapter is None:
        return "full", ""
    path = checkpoint_config(adapter)
    if path is None:
        if asked is None:
            raise ValueError(
                f"{adapter}: no gmner training config (config.yaml) beside this adapter, so "
                "its prompt style is unknown; say how it was trained: --prompt reference for "
                "an adapter trained by the E2E-GMNER reference code, else --prompt "
                f"{'|'.join(s for s in PROMPT_STYLES if s != 'reference')}"
            )
        return asked, ""
    try:
        data = load_config(path).data
    except (ValueError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: {exc}") from exc
    return data.prompt, data.system_prompt


def _versions() -> dict[str, str | None]:
    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    names = ("gmner", "torch", "transformers", "peft", "onnx", "onnxruntime")
    return {"python": platform.python_version(), **{n: version(n) for n in names}}


def _prompt(processor, style: str, system: str) -> dict[str, str]:
    """The chat layout with {system}, {image}, {instruction} slots, rendered by the model's
    own chat template (so the runtime's token ids equal ``apply_chat_template``'s), and the
    texts of prompt style ``style`` with system prompt ``system``."""
    messages = [
        {"role": "system", "content": [{"type": "text", "text": system}]},
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": INSTRUCTION_SENTINEL}],
        },
    ]
    rendered = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    for piece in (system, IMAGE_SLOT, INSTRUCTION_SENTINEL):
        if rendered.count(piece) != 1:
            raise ValueError(f"chat template: expected {piece!r} once in {rendered!r}")
    template = (
        rendered.replace(system, "{system}")
        .replace(IMAGE_SLOT, "{image}")
        .replace(INSTRUCTION_SENTINEL, "{instruction}")
    )
    texts = prompt_style(style)
    return {
        "system": system,
        "chat_template": template,
        "image": "<|vision_start|>{image_pads}<|vision_end|>",
        "instruction_think": texts.instruction("{text}", LABELS, think=True),
        "instruction_answer_only": texts.instruction("{text}", LABELS, think=False),
    }


def _image_processor(processor, config, max_image_tokens: int | None) -> dict:
    ip = processor.image_processor
    size = dict(ip.size)
    factor = ip.patch_size * ip.merge_size
    max_pixels = size["longest_edge"]
    if max_image_tokens is not None:
        max_pixels = min(max_pixels, max_image_tokens * factor * factor)
    min_pixels = min(size["shortest_edge"], max_pixels)
    resample = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
    return {
        "patch_size": ip.patch_size,
        "merge_size": ip.merge_size,
        "temporal_patch_size": ip.temporal_patch_size,
        "min_pixels": int(min_pixels),
        "max_pixels": int(max_pixels),
        "image_mean": [float(v) for v in ip.image_mean],
        "image_std": [float(v) for v in ip.image_std],
        "rescale_factor": float(ip.rescale_factor),
        "resample": resample[int(getattr(ip.resample, "value", ip.resample))],
    }


def _token_ids(tokenizer, config, generation_config) -> dict:
    def tid(token: str) -> int:
        value = tokenizer.convert_tokens_to_ids(token)
        if value is None or value == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer: no id for {token}")
        return int(value)

    eos = generation_config.eos_token_id if generation_config is not None else None
    eos_ids = sorted(
        {int(e) for e in ([eos] if isinstance(eos, int) else (eos or []))}
        | {tid("<|im_end|>"), tid("<|endoftext|>")}
    )
    pad = tokenizer.pad_token_id
    return {
        "image_pad_id": int(config.image_token_id),
        "vision_start_id": int(config.vision_start_token_id),
        "vision_end_id": tid("<|vision_end|>"),
        "im_start_id": tid("<|im_start|>"),
        "im_end_id": tid("<|im_end|>"),
        "endoftext_id": tid("<|endoftext|>"),
        "pad_id": int(pad) if pad is not None else tid("<|endoftext|>"),
        "eos_ids": eos_ids,
    }


def _adapter_name(adapter: Path | None) -> str | None:
    """An adapter's folder name, with its run's (``e1/best``, ``checkpoints/step-000300``)."""
    if adapter is None:
        return None
    adapter = Path(adapter).resolve()
    return f"{adapter.parent.name}/{adapter.name}" if adapter.parent.name else adapter.name


def _provenance(options: BundleOptions, prompt: tuple[str, str]) -> dict:
    """What the bundle was made from, by hash and name, and how its adapter was trained."""
    from .merge import source_fingerprint

    adapter = Path(options.adapter) if options.adapter is not None else None
    sources = source_fingerprint(Path(options.model), adapter, options.settings.dtype)
    provenance: dict = {"prompt_style": prompt[0], "sources": sources}
    config = checkpoint_config(adapter)
    if config is not None:
        cfg = load_config(config)
        provenance["training"] = {
            "recipe": f"lr {cfg.optim.lr}, {cfg.optim.epochs} epochs, batch "
            f"{cfg.optim.batch_size} x {cfg.optim.grad_accum}, seed {cfg.optim.seed}",
            "lora": f"r {cfg.lora.r}, alpha {cfg.lora.alpha}" if cfg.lora.enabled else "off",
            "grbp": (
                f"{cfg.grbp.distribution} beta {cfg.grbp.beta} gamma {cfg.grbp.gamma} "
                f"tau {cfg.grbp.tau}"
                if cfg.grbp.enabled
                else "off"
            ),
            "reasoning targets": cfg.data.use_cot,
            "pixels": f"{cfg.model.min_pixels}..{cfg.model.max_pixels}",
        }
    return provenance


def _model_info(config, options: BundleOptions) -> dict:
    text, vision = config.text_config, config.vision_config
    rope = text.rope_parameters
    return {
        "name": options.name or Path(options.model).resolve().name,
        # names, not paths: a bundle records nothing of the exporting machine's folders
        # (its inputs are identified by hash under "provenance")
        "source_model": Path(options.model).resolve().name,
        "adapter": _adapter_name(options.adapter),
        "dtype": options.settings.dtype,
        "text": {
            "hidden_size": text.hidden_size,
            "num_layers": text.num_hidden_layers,
            "num_attention_heads": text.num_attention_heads,
            "num_kv_heads": text.num_key_value_heads,
            "head_dim": text.hidden_size // text.num_attention_heads,
            "intermediate_size": text.intermediate_size,
            "vocab_size": text.vocab_size,
            "rms_norm_eps": float(text.rms_norm_eps),
            "rope_theta": float(rope["rope_theta"]),
            "mrope_section": [int(v) for v in rope["mrope_section"]],
            "tie_word_embeddings": bool(config.tie_word_embeddings),
        },
        "vision": {
            "hidden_size": vision.hidden_size,
            "depth": vision.depth,
            "num_heads": vision.num_heads,
            "out_hidden_size": vision.out_hidden_size,
            "window_size": vision.window_size,
            "fullatt_block_indexes": list(vision.fullatt_block_indexes),
            "patch_size": vision.patch_size,
            "spatial_merge_size": vision.spatial_merge_size,
            "temporal_patch_size": vision.temporal_patch_size,
            "max_image_tokens": options.max_image_tokens,
        },
    }


def manifest_data(
    facts,
    processor,
    graphs: dict,
    options: BundleOptions,
    bundle: Path,
    extra: dict,
    *,
    prompt: tuple[str, str] | None = None,
) -> dict:
    """The manifest dict for a bundle directory whose files are all written.

    ``facts`` carries the model's ``config`` and its special token ids; ``prompt`` the
    (style, system prompt) to write (default: :func:`resolve_prompt` of ``options``).
    """
    prompt = prompt or resolve_prompt(options)
    config = facts.config
    text = config.text_config
    files = {
        p.name: file_entry(p)
        for p in sorted(bundle.iterdir())
        if p.is_file() and p.name != "manifest.json"
    }
    return {
        "format": "gmner-bundle",
        "format_version": FORMAT_VERSION,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": _model_info(config, options),
        "kv_cache": {
            "layout": ["batch", "kv_heads", "sequence", "head_dim"],
            "num_layers": text.num_hidden_layers,
            "num_kv_heads": text.num_key_value_heads,
            "head_dim": text.hidden_size // text.num_attention_heads,
            "dtype": options.settings.dtype,
            "past_key": "past_key_{layer}",
            "past_value": "past_value_{layer}",
            "present_key": "present_key_{layer}",
            "present_value": "present_value_{layer}",
        },
        "graphs": graphs,
        "tokens": facts.tokens,
        "image_processor": _image_processor(processor, config, options.max_image_tokens),
        "prompt": _prompt(processor, *prompt),
        "provenance": _provenance(options, prompt),
        "labels": list(LABELS),
        "record_format_version": RECORD_FORMAT_VERSION,
        "generation": {
            "stop_strings": ["</answer>"],
            "think_open": "<think>",
            "think_close": "</think>",
            "answer_open": "<answer>",
            "answer_close": "</answer>",
            "default_max_new_tokens": DEFAULT_MAX_NEW_TOKENS,
        },
        "files": files,
        "exporter": _versions(),
        **extra,
    }


def export_bundle(options: BundleOptions) -> Path:
    """Merge, export, verify and write the bundle at ``options.out``; return its path."""
    prompt = resolve_prompt(options)  # an unknown prompt style stops us before any work
    tmp = staging_dir(options.out)
    started = time.perf_counter()
    stages = progress.Progress(4 if options.verify else 3, "export", "stage")
    try:
        log.info("export: merging %s", options.adapter or "no adapter (the base model)")
        model, processor, merge_report = load_merged(
            options.model, options.adapter, dtype=options.settings.dtype
        )
        stages.update(1, done="merge")
        log.info("export: writing the vision, embedding and decoder graphs")
        kept = cast_for_export(model, options.settings)
        graphs = export_graphs(model, tmp, options.settings)
        stages.update(1, done="graphs")
        processor.tokenizer.save_pretrained(tmp, filename_prefix=None)
        _keep_only_tokenizer_json(tmp)
        facts = _ModelFacts(
            model.config, _token_ids(processor.tokenizer, model.config, model.generation_config)
        )
        refs = _references(model, processor, facts) if options.verify else None
        del model  # onnxruntime loads the graphs next: both do not fit at 3B scale
        gc.collect()
        if refs:
            log.info("export: checking parity against PyTorch")
        parity = _verify(refs, tmp, facts, options.settings.dtype) if refs else {}
        if refs:
            stages.update(1, done="parity")
        parity["merge"] = {
            "kind": merge_report.kind,
            "max_abs_logit_diff": merge_report.max_abs_logit_diff,
        }
        parity["fp32_vision_mlps"] = list(kept)
        data = manifest_data(
            facts, processor, graphs, options, tmp, {"parity": parity}, prompt=prompt
        )
        write_manifest(tmp, data)
        written = load_bundle(tmp)  # the runtime's reader accepts what we wrote
        stages.update(1, done="manifest")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        stages.close()
    if options.quant is None:
        write_card(tmp, written.manifest)
        move_into_place(tmp, options.out)
        log_readiness(options.out)
    else:  # the fp bundle, verified, is the source of the quantized one
        from .quantized_bundle import quantize_bundle

        try:
            quantize_bundle(tmp, options.out, options.quant, verify=options.verify)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("bundle written to %s in %.1f s", options.out, time.perf_counter() - started)
    return options.out


@dataclass(frozen=True)
class _ModelFacts:
    """What the manifest and the parity check need from a model once its weights are gone."""

    config: object
    tokens: dict  # the manifest's "tokens" section (special ids, eos ids, pad id)


def _keep_only_tokenizer_json(bundle: Path) -> None:
    """The runtime reads tokenizer.json alone (the ``tokenizers`` library); drop the rest."""
    if not (bundle / TOKENIZER_NAME).is_file():
        raise FileNotFoundError(f"{bundle}: the tokenizer did not write {TOKENIZER_NAME}")
    for name in (
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
    ):
        (bundle / name).unlink(missing_ok=True)


def _references(model, processor, facts: _ModelFacts):
    from .parity import reference_outputs

    return reference_outputs(
        model, processor, eos_ids=facts.tokens["eos_ids"], pad_id=facts.tokens["pad_id"]
    )


def _verify(refs, bundle: Path, facts: _ModelFacts, dtype: str) -> dict:
    from gmner_rt.backends.onnxruntime import KvLayout, OrtGraphs

    from .parity import compare, vision_spec

    text = facts.config.text_config
    kv = KvLayout(
        text.num_hidden_layers,
        text.num_key_value_heads,
        text.hidden_size // text.num_attention_heads,
        np.dtype(dtype),
    )
    graphs = OrtGraphs(
        {n: bundle / f"{n}.onnx" for n in ("vision", "embedding", "decoder")},
        kv,
        providers=["CPUExecutionProvider"],
    )
    report = compare(
        graphs,
        refs,
        vision_spec(facts.config),
        dtype,
        eos_ids=facts.tokens["eos_ids"],
        pad_id=facts.tokens["pad_id"],
    )
    return report.to_dict()
