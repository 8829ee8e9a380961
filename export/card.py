"""The bundle's model card: a ``README.md`` written into every bundle ``gmner export`` makes.

It is rendered from the bundle's validated manifest alone (what the model is, its labels,
prompt, precision, parity figures, provenance, intended use and limits), so it can never
disagree with what the runtime loads. The card is documentation: it is not listed in the
manifest's files and the runtime never reads it. This module knows nothing about torch.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from gmner_rt.bundle import Manifest

log = logging.getLogger(__name__)

CARD_NAME = "README.md"

_INTENDED_USE = """\
## Intended use

Grounded multimodal named entity recognition on short social-media posts with one image (the
Twitter-GMNER task): each named entity of the text with its type and, when the image shows it,
its box(es) in the image's original pixels, or None.

## Limits

- It knows the entity types above only, and English tweets of the kind it was trained on; on
  other text or images its answers are guesses, and its boxes can be wrong even when the
  mention and type are right.
- Boxes are predicted as text by a language model: check them before acting on them.
- Images are resized to at most the pixel budget below; small objects in large images may be
  missed.
- It is not meant to identify private persons in images, nor for decisions about people.
"""


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2e}"


def _parity_lines(parity: dict | None) -> list[str]:
    if not parity:
        return ["Not checked (exported with `--no-verify`)."]
    verdict = "passed" if parity.get("passed") else "FAILED"
    lines = [
        f"Checked against the PyTorch model at export: {verdict} "
        f"({parity.get('checks', 0)} tensor checks, tolerance {parity.get('tolerance')} "
        "relative).",
        "",
        "| graph | tensor | worst relative error |",
        "|---|---|---|",
    ]
    for graph, tensors in sorted((parity.get("max_relative_error") or {}).items()):
        for tensor, error in sorted(tensors.items()):
            lines.append(f"| {graph} | {tensor} | {_fmt(error)} |")
    greedy = parity.get("greedy") or []
    if greedy:
        agreed = sum(g["agreed"] for g in greedy)
        total = sum(g["length"] for g in greedy)
        lines += [
            "",
            f"Greedy tokens identical to PyTorch's: {agreed} of {total} ({len(greedy)} probes).",
        ]
    merge = parity.get("merge") or {}
    if merge.get("kind") == "lora":
        lines.append(
            f"LoRA merge checked against the unmerged model: largest logit difference "
            f"{_fmt(merge.get('max_abs_logit_diff'))}."
        )
    return lines


def render_card(manifest: Manifest, provenance: dict | None = None) -> str:
    """The card's Markdown for a validated manifest (and the manifest's provenance)."""
    m, provenance = manifest.model, provenance or {}
    text, vision = m.text, m.vision
    quant = manifest.quantization
    precision = m.dtype + (f", decoder weights {quant.scheme} (MatMulNBits)" if quant else "")
    style = provenance.get("prompt_style", "unknown")
    ip = manifest.image_processor
    lines = [
        f"# {m.name}: a gmner bundle",
        "",
        "A Qwen2.5-VL model for grounded multimodal named entity recognition, exported by "
        f"gmner {manifest.exporter.get('gmner') or ''} on {manifest.created_utc} as three ONNX "
        "graphs (vision, embedding, decoder) with a tokenizer and a validated `manifest.json`.",
        "",
        "```bash",
        'gmner extract --bundle THIS_FOLDER --image photo.jpg --text "..." [--provider cuda]',
        "```",
        "",
        "## The model",
        "",
        f"- Base model: `{m.source_model}`; adapter: `{m.adapter or 'none (the base model)'}`"
        f" ({(manifest.parity or {}).get('merge', {}).get('kind', 'base')}).",
        f"- Language model: {text.num_layers} layers, hidden size {text.hidden_size}, "
        f"{text.num_attention_heads} attention heads ({text.num_kv_heads} KV), vocabulary "
        f"{text.vocab_size}.",
        f"- Vision tower: {vision.depth} blocks, hidden size {vision.hidden_size}.",
        f"- Precision: {precision}.",
        f"- Images: {ip['min_pixels']} to {ip['max_pixels']} pixels as the model sees them "
        f"(patch {ip['patch_size']}, merge {ip['merge_size']}).",
        f"- Labels: {', '.join(manifest.labels)}.",
        f"- Answers: `mention|TYPE|[x1,y1,x2,y2]` records (format version "
        f"{manifest.record_format_version}), up to {manifest.generation.default_max_new_tokens} "
        "new tokens by default.",
        "",
        "## Prompt",
        "",
        f"Prompt style `{style}`. System prompt:",
        "",
        "> " + manifest.prompt.system.replace("\n", "\n> "),
        "",
        "Instruction (reasoning asked for; `{text}` is the tweet):",
        "",
        "```text",
        manifest.prompt.instruction_think,
        "```",
        "",
        "## Parity",
        "",
        *_parity_lines(manifest.parity),
        "",
        "## How it was made",
        "",
    ]
    sources = dict(provenance.get("sources") or {})
    exported_as = sources.pop("dtype", None)
    if sources:
        lines.append("Inputs, by sha256 (no paths of the exporting machine are recorded):")
        lines.append("")
        lines += [f"- `{name}`: `{digest}`" for name, digest in sorted(sources.items())]
        if exported_as:
            lines += ["", f"Merged in {exported_as}."]
    else:
        lines.append(provenance.get("note") or "No provenance recorded.")
    if provenance.get("upgraded_from_format"):
        lines += [
            "",
            f"Upgraded from bundle format {provenance['upgraded_from_format']} by `gmner export "
            "upgrade` (the decoder returns the logits of chosen positions; weights unchanged, "
            "checked against the old decoder).",
        ]
    training = provenance.get("training")
    if training:
        lines += ["", "Training settings (the adapter's `config.yaml`):", ""]
        lines += [f"- {key}: `{value}`" for key, value in training.items()]
    versions = ", ".join(f"{k} {v}" for k, v in sorted(manifest.exporter.items()) if v)
    lines += ["", f"Exported with {versions}.", "", _INTENDED_USE]
    return "\n".join(lines)


def write_card(bundle: str | Path, manifest: Manifest) -> Path:
    """Render the card of ``manifest`` (the bundle's, as loaded and validated by whoever
    wrote it: nothing is read or hashed again) and write it into the folder ``bundle``
    (atomically), normally its staging folder before it moves into place."""
    path = Path(bundle) / CARD_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_card(manifest, manifest.extra.get("provenance")), encoding="utf-8")
    os.replace(tmp, path)
    log.info("model card written to %s", path)
    return path
