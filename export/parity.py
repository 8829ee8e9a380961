"""Export-time parity: the exported graphs, run by onnxruntime, against the PyTorch model.

On probe inputs (images of several sizes and aspect ratios; batch 1 and batch 2 with left
padding) it compares, per graph and tensor: the vision tower's image embeddings, the token
embeddings, the decoder's logits and every present K/V tensor at prefill and at one decode
step (real positions only: what a padded position holds is never read). The error of each is
``max |ort - torch|`` and that over ``max |torch|``; a tensor passes when the relative error is
within :data:`TOLERANCES` for the export dtype. Then 32 greedy tokens from
:func:`gmner_rt.generate.generate` over the graphs must equal HF ``generate``'s (required in
fp32; reported in fp16). The ONNX side uses the runtime's own engine and host-side indices,
so this also checks ``gmner_rt.vision``'s M-RoPE and window indices against HF.
This module knows nothing about how the graphs were written.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from gmner_rt.errors import GmnerError
from gmner_rt.generate import PromptBatch, VisionSpec, generate, step
from gmner_rt.generate import prefill as rt_prefill
from gmner_rt.vision import vision_indices

log = logging.getLogger(__name__)

__all__ = ["TOLERANCES", "Check", "ParityError", "ParityReport", "check_parity", "probe_batches"]

#: Largest accepted relative error (max |diff| / max |reference|) per export dtype.
TOLERANCES = {"float32": 1e-4, "float16": 2e-2}
GREEDY_STEPS = 32
#: (width, height) of the probe images: square, wide, tall, tiny, and a very wide one.
PROBE_SIZES = ((224, 160), (300, 100), (90, 260), (56, 56), (500, 40))
PROBE_TEXTS = (
    "Alice Smith visits the Louvre in Paris with Acme Corp .",
    "RT @bob : Manchester United beat Chelsea",
    "Nothing to see here",
    "NASA and SpaceX launch from Florida today , says Elon Musk",
    "Tokyo",
)


class ParityError(GmnerError):
    """An exported graph does not match PyTorch; the message names graph, tensor and error."""

    def __init__(self, message: str, report: ParityReport):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Check:
    """One compared tensor."""

    graph: str
    tensor: str
    probe: str
    max_abs: float
    relative: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return bool(self.relative <= self.tolerance)


@dataclass(frozen=True)
class GreedyCheck:
    """Greedy tokens of one probe row: how many leading tokens agree, out of how many."""

    probe: str
    agreed: int
    length: int
    required: bool

    @property
    def ok(self) -> bool:
        return not self.required or self.agreed == self.length


@dataclass(frozen=True)
class ParityReport:
    """Every check of one export; ``failures`` lists those that missed."""

    dtype: str
    checks: tuple[Check, ...]
    greedy: tuple[GreedyCheck, ...]

    @property
    def failures(self) -> list[Check | GreedyCheck]:
        return [c for c in (*self.checks, *self.greedy) if not c.ok]

    def worst(self, graph: str) -> float:
        return max((c.relative for c in self.checks if c.graph == graph), default=0.0)

    def to_dict(self) -> dict:
        """A JSON summary for the manifest: worst error per graph and tensor kind, greedy."""
        summary: dict[str, dict[str, float]] = {}
        for c in self.checks:
            kind = c.tensor.rsplit("_", 1)[0] if c.tensor.startswith("present") else c.tensor
            key = f"{kind}@{c.probe.split(':')[-1]}" if c.graph == "decoder" else kind
            entry = summary.setdefault(c.graph, {})
            entry[key] = max(entry.get(key, 0.0), c.relative)
        return {
            "dtype": self.dtype,
            "tolerance": TOLERANCES[self.dtype],
            "max_relative_error": summary,
            "checks": len(self.checks),
            "greedy": [asdict(g) for g in self.greedy],
            "passed": not self.failures,
        }


def _probe_image(width: int, height: int, seed: int) -> Image.Image:
    """Noise with a few filled shapes: varied content at every scale."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(1, width)), y0 + int(rng.integers(1, height))
        draw.rectangle((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return image


def probe_batches() -> list[list[tuple[Image.Image, str]]]:
    """Batches of (image, text): three of batch 1, one of batch 2 (prompts of unequal length)."""
    pairs = [
        (_probe_image(w, h, seed), text)
        for seed, ((w, h), text) in enumerate(zip(PROBE_SIZES, PROBE_TEXTS, strict=True))
    ]
    return [[pairs[0]], [pairs[3]], [pairs[4]], [pairs[1], pairs[2]]]


def _encode(processor, pairs) -> dict[str, torch.Tensor]:
    texts = []
    for image, text in pairs:
        messages = [
            {
                "role": "user",
                "content": [{"type": "image", "image": image}, {"type": "text", "text": text}],
            }
        ]
        texts.append(
            processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        )
    processor.tokenizer.padding_side = "left"
    images = [image for image, _ in pairs]
    return dict(processor(text=texts, images=images, return_tensors="pt", padding=True))


def _compare(graph, tensor, probe, ours: np.ndarray, ref: torch.Tensor, tol) -> Check:
    ref_np = ref.detach().float().cpu().numpy()
    ours = np.asarray(ours, dtype=np.float32)
    if ours.shape != ref_np.shape:
        return Check(
            graph,
            f"{tensor} shape {ours.shape} vs {ref_np.shape}",
            probe,
            float("inf"),
            float("inf"),
            tol,
        )
    max_abs = float(np.abs(ours - ref_np).max()) if ours.size else 0.0
    scale = max(float(np.abs(ref_np).max()) if ref_np.size else 0.0, 1e-6)
    relative = max_abs / scale if np.isfinite(max_abs) else float("inf")
    return Check(graph, tensor, probe, max_abs, relative, tol)


def _real_positions(kv: torch.Tensor | np.ndarray, mask: np.ndarray):
    """``[B, heads, S, d]`` -> ``[real tokens, heads, d]`` (padding positions dropped)."""
    kv = kv.permute(0, 2, 1, 3) if torch.is_tensor(kv) else np.transpose(kv, (0, 2, 1, 3))
    keep = mask.astype(bool)
    return kv[torch.from_numpy(keep)] if torch.is_tensor(kv) else kv[keep]


def _batch(enc: dict[str, torch.Tensor]) -> PromptBatch:
    grids = tuple(tuple(int(v) for v in g) for g in enc["image_grid_thw"].tolist())
    return PromptBatch(
        input_ids=enc["input_ids"].numpy().astype(np.int64),
        attention_mask=enc["attention_mask"].numpy().astype(np.int64),
        pixel_values=enc["pixel_values"].float().numpy(),
        grids=grids,
    )


class _Probe:
    """Runs one probe batch through PyTorch and through the graphs, collecting checks."""

    def __init__(self, model, graphs, vision: VisionSpec, dtype: str, name: str, enc):
        self.model, self.graphs, self.vision = model, graphs, vision
        self.tol, self.name, self.enc = TOLERANCES[dtype], name, enc
        self.batch = _batch(enc)
        self.checks: list[Check] = []

    def add(self, graph, tensor, ours, ref, probe=None) -> None:
        self.checks.append(_compare(graph, tensor, probe or self.name, ours, ref, self.tol))

    @torch.no_grad()
    def run_vision_and_embedding(self) -> None:
        visual = self.model.model.visual
        pixel_values = self.enc["pixel_values"].to(visual.dtype)
        ref = self.model.model.get_image_features(pixel_values, self.enc["image_grid_thw"])
        ref = torch.cat(ref.pooler_output, dim=0)
        indices = vision_indices(
            self.batch.grids,
            merge_size=self.vision.merge_size,
            window_size=self.vision.window_size,
            patch_size=self.vision.patch_size,
        )
        self.add(
            "vision",
            "image_embeds",
            self.graphs.encode_images(self.batch.pixel_values, indices),
            ref,
        )
        ids = self.enc["input_ids"]
        ref_embeds = self.model.model.language_model.embed_tokens(ids)
        self.add("embedding", "inputs_embeds", self.graphs.embed(self.batch.input_ids), ref_embeds)

    @torch.no_grad()
    def run_decoder(self) -> None:
        ref = self.model(**self.enc, use_cache=True)
        logits, state = rt_prefill(self.graphs, self.batch, self.vision)
        mask = self.batch.attention_mask
        self._compare_step("prefill", logits, state.past, ref, mask)
        token = ref.logits[:, -1].argmax(-1)
        ours = step(self.graphs, state, token.numpy().astype(np.int64))
        full_mask = np.concatenate([mask, np.ones((len(mask), 1), dtype=np.int64)], axis=1)
        positions = torch.from_numpy(state.next_positions - 1).reshape(1, -1, 1).expand(3, -1, 1)
        ref_step = self.model(
            input_ids=token[:, None],
            attention_mask=torch.from_numpy(full_mask),
            position_ids=positions,
            past_key_values=ref.past_key_values,
            use_cache=True,
        )
        self._compare_step("step", ours, state.past, ref_step, full_mask)

    def _compare_step(self, when, logits, past, ref, mask) -> None:
        probe = f"{self.name}:{when}"
        self.add("decoder", "logits", logits, ref.logits[:, -1], probe)
        for layer, cache in enumerate(ref.past_key_values.layers):
            for kind, tensor in (("key", cache.keys), ("value", cache.values)):
                ours = _real_positions(past[2 * layer + (kind == "value")], mask)
                self.add(
                    "decoder", f"present_{kind}_{layer}", ours, _real_positions(tensor, mask), probe
                )


def _greedy(model, graphs, vision, enc, eos_ids, pad_id, required) -> list[GreedyCheck]:
    """32 greedy tokens each side; end-of-sequence is suppressed on both (HF's
    ``min_new_tokens``, our logits hook), so a random model cannot stop early."""
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=GREEDY_STEPS,
            min_new_tokens=GREEDY_STEPS,
            do_sample=False,
            eos_token_id=list(eos_ids),
            pad_token_id=pad_id,
        )
    ref_rows = out[:, enc["input_ids"].shape[1] :].tolist()
    eos = list(eos_ids)

    def no_eos(logits: np.ndarray, _state) -> np.ndarray:
        logits = logits.copy()
        logits[:, eos] = -np.inf
        return logits

    ours = generate(
        graphs,
        _batch(enc),
        vision,
        max_new_tokens=GREEDY_STEPS,
        eos_ids=eos_ids,
        pad_id=pad_id,
        logits_hook=no_eos,
    ).tokens
    checks = []
    for row, (mine, theirs) in enumerate(zip(ours, ref_rows, strict=True)):
        agreed = _common_prefix(mine, theirs)
        checks.append(GreedyCheck(f"row{row}", agreed, len(theirs), required))
    return checks


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two sequences share."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def check_parity(model, processor, graphs, dtype: str, *, eos_ids, pad_id) -> ParityReport:
    """Compare ``graphs`` (an :class:`gmner_rt.backends.onnxruntime.OrtGraphs`) with ``model``.

    ``model`` is the PyTorch model the graphs were exported from (same dtype). Raises
    :class:`ParityError` naming every failing graph, tensor and error.
    """
    config = model.config
    vision = VisionSpec(
        image_token_id=config.image_token_id,
        merge_size=config.vision_config.spatial_merge_size,
        window_size=config.vision_config.window_size,
        patch_size=config.vision_config.patch_size,
    )
    checks: list[Check] = []
    greedy: list[GreedyCheck] = []
    for index, pairs in enumerate(probe_batches()):
        enc = _encode(processor, pairs)
        sizes = "+".join(f"{im.width}x{im.height}" for im, _ in pairs)
        probe = _Probe(model, graphs, vision, dtype, f"batch{index}[{sizes}]", enc)
        probe.run_vision_and_embedding()
        probe.run_decoder()
        checks += probe.checks
        for g in _greedy(model, graphs, vision, enc, eos_ids, pad_id, dtype == "float32"):
            greedy.append(GreedyCheck(f"{probe.name}:{g.probe}", g.agreed, g.length, g.required))
    report = ParityReport(dtype, tuple(checks), tuple(greedy))
    if report.failures:
        raise ParityError(_failure_message(report), report)
    log.info(
        "parity passed: %d tensors, greedy %s",
        len(checks),
        [f"{g.agreed}/{g.length}" for g in greedy],
    )
    return report


def _failure_message(report: ParityReport) -> str:
    lines = [f"export parity failed ({report.dtype}):"]
    for c in report.failures[:20]:
        if isinstance(c, Check):
            lines.append(
                f"  {c.graph}.onnx {c.tensor} on {c.probe}: max abs error {c.max_abs:.3g}, "
                f"relative {c.relative:.3g} > tolerance {c.tolerance:g}"
            )
        else:
            lines.append(
                f"  decoder greedy tokens on {c.probe}: first {c.agreed} of {c.length} agree"
            )
    return "\n".join(lines)
