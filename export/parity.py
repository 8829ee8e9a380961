"""Export-time parity: the exported graphs, run by onnxruntime, against the PyTorch model.

On probe inputs (images of several sizes and aspect ratios; batch 1 and batch 2 with left
padding) it compares, per graph and tensor: the vision tower's image embeddings, the token
embeddings, the decoder's logits and every present K/V tensor at prefill and at one decode
step (real positions only: what a padded position holds is never read), and the logits of all
:data:`VERIFY_TOKENS` positions of one call that feeds that many greedy tokens at once (what a
speculative step verifies; format-2 decoders). The error of each is
``max |ort - torch|`` and that over ``max |torch|``; a tensor passes when the relative error is
within :data:`TOLERANCES` for the export dtype. Then 32 greedy tokens from
:func:`gmner_rt.generate.generate` over the graphs must equal HF ``generate``'s (required in
fp32; reported in fp16). The ONNX side uses the runtime's own engine and host-side indices,
so this also checks ``gmner_rt.vision``'s M-RoPE and window indices against HF.
This module knows nothing about how the graphs were written.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch
from gmner.train.modeling import library_deprecations_filtered

from gmner_rt.errors import GmnerError
from gmner_rt.generate import PromptBatch, VisionSpec, generate, step, step_logits
from gmner_rt.generate import prefill as rt_prefill
from gmner_rt.vision import vision_indices

from .probes import probe_batches

log = logging.getLogger(__name__)

__all__ = [
    "TOLERANCES",
    "Check",
    "ParityError",
    "ParityReport",
    "Reference",
    "check_parity",
    "compare",
    "probe_batches",
    "reference_outputs",
    "vision_spec",
]

#: Largest accepted relative error (max |diff| / max |reference|) per export dtype.
TOLERANCES = {"float32": 1e-4, "float16": 2e-2}
GREEDY_STEPS = 32
#: Tokens fed in the one multi-position call whose every logit row is compared.
VERIFY_TOKENS = 4


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


def _compare(graph, tensor, probe, ours: np.ndarray, ref: np.ndarray, tol) -> Check:
    ref_np = np.asarray(ref, dtype=np.float32)
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


@dataclass
class Reference:
    """PyTorch's outputs for one probe batch (host arrays; the model can then be freed)."""

    name: str
    enc: dict[str, torch.Tensor]
    image_embeds: np.ndarray
    inputs_embeds: np.ndarray
    logits: dict[str, np.ndarray]  # "prefill" / "step" -> [B, vocab]; "verify" [B, K, vocab]
    kv: dict[str, list[np.ndarray]]  # "prefill" / "step" -> real positions of every K/V
    step_token: np.ndarray  # [B], the token fed at the decode step
    verify_tokens: np.ndarray  # [B, K], the tokens fed in the multi-position call
    greedy: list[list[int]]  # 32 greedy tokens per row (end of sequence suppressed)


def _host(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy()


def _kv(cache, mask: np.ndarray) -> list[np.ndarray]:
    out = []
    for layer in cache.layers:
        out += [
            _host(_real_positions(layer.keys, mask)),
            _host(_real_positions(layer.values, mask)),
        ]
    return out


@torch.no_grad()
def _reference(model, name: str, enc, eos_ids, pad_id) -> Reference:
    image_embeds = model.model.get_image_features(
        enc["pixel_values"].to(model.model.visual.dtype), enc["image_grid_thw"]
    ).pooler_output
    mask = enc["attention_mask"].numpy().astype(np.int64)
    with library_deprecations_filtered():
        prefill = model(**enc, use_cache=True)
        token = prefill.logits[:, -1].argmax(-1)
        prefill_kv = _kv(prefill.past_key_values, mask)  # before the step extends the cache
        verify_cache = copy.deepcopy(prefill.past_key_values)
        full_mask = np.concatenate([mask, np.ones((len(mask), 1), dtype=np.int64)], axis=1)
        # HF's decode positions: (real tokens so far - 1) + the rope delta of the prompt
        text_pos = torch.from_numpy(full_mask.sum(-1) - 1)
        positions = (text_pos + model.model.rope_deltas[:, 0]).reshape(1, -1, 1).expand(3, -1, 1)
        stepped = model(
            input_ids=token[:, None],
            attention_mask=torch.from_numpy(full_mask),
            position_ids=positions,
            past_key_values=prefill.past_key_values,
            use_cache=True,
        )
        generated = model.generate(
            **enc,
            max_new_tokens=GREEDY_STEPS,
            min_new_tokens=GREEDY_STEPS,
            do_sample=False,
            eos_token_id=list(eos_ids),
            pad_token_id=pad_id,
        )
        verify_ids = generated[:, enc["input_ids"].shape[1] :][:, :VERIFY_TOKENS]
        verify_mask = np.concatenate([mask, np.ones_like(verify_ids.numpy())], axis=1)
        offsets = torch.arange(VERIFY_TOKENS)[None, :]
        verify_pos = (positions[0] + offsets)[None].expand(3, -1, -1)  # [3, B, K]
        verified = model(
            input_ids=verify_ids,
            attention_mask=torch.from_numpy(verify_mask),
            position_ids=verify_pos,
            past_key_values=verify_cache,
            use_cache=True,
        )
    return Reference(
        name=name,
        enc=enc,
        image_embeds=_host(torch.cat(image_embeds, dim=0)),
        inputs_embeds=_host(model.model.language_model.embed_tokens(enc["input_ids"])),
        logits={
            "prefill": _host(prefill.logits[:, -1]),
            "step": _host(stepped.logits[:, -1]),
            "verify": _host(verified.logits),
        },
        kv={"prefill": prefill_kv, "step": _kv(stepped.past_key_values, full_mask)},
        step_token=token.numpy().astype(np.int64),
        verify_tokens=verify_ids.numpy().astype(np.int64),
        greedy=generated[:, enc["input_ids"].shape[1] :].tolist(),
    )


def reference_outputs(model, processor, *, eos_ids, pad_id) -> list[Reference]:
    """PyTorch's outputs on every probe batch: computed first, so that the model can be freed
    before onnxruntime loads the graphs (a 3B model and its graphs do not fit in 24 GB)."""
    refs = []
    for index, pairs in enumerate(probe_batches()):
        sizes = "+".join(f"{im.width}x{im.height}" for im, _ in pairs)
        enc = _encode(processor, pairs)
        refs.append(_reference(model, f"batch{index}[{sizes}]", enc, eos_ids, pad_id))
    return refs


class _Comparer:
    """Runs the graphs on one reference's inputs and collects the checks."""

    def __init__(self, graphs, vision: VisionSpec, dtype: str, ref: Reference):
        self.graphs, self.vision, self.ref = graphs, vision, ref
        self.tol = TOLERANCES[dtype]
        self.batch = _batch(ref.enc)
        self.checks: list[Check] = []

    def add(self, graph, tensor, ours, ref, probe=None) -> None:
        self.checks.append(_compare(graph, tensor, probe or self.ref.name, ours, ref, self.tol))

    def vision_and_embedding(self) -> None:
        indices = vision_indices(
            self.batch.grids,
            merge_size=self.vision.merge_size,
            window_size=self.vision.window_size,
            patch_size=self.vision.patch_size,
        )
        ours = self.graphs.encode_images(self.batch.pixel_values, indices)
        self.add("vision", "image_embeds", ours, self.ref.image_embeds)
        ours = self.graphs.embed(self.batch.input_ids)
        self.add("embedding", "inputs_embeds", ours, self.ref.inputs_embeds)

    def decoder(self) -> None:
        logits, state = rt_prefill(self.graphs, self.batch, self.vision)
        mask = self.batch.attention_mask
        self._step_checks("prefill", logits, state.past, mask)
        logits = step(self.graphs, state, self.ref.step_token)
        self._step_checks("step", logits, state.past, state.attention_mask)
        if getattr(self.graphs, "verifies_drafts", False):
            _, state = rt_prefill(self.graphs, self.batch, self.vision)
            tokens = self.ref.verify_tokens
            logits = step_logits(self.graphs, state, tokens.tolist(), last=tokens.shape[1])
            probe = f"{self.ref.name}:verify"
            self.add("decoder", "logits", logits, self.ref.logits["verify"], probe)

    def _step_checks(self, when, logits, past, mask) -> None:
        probe = f"{self.ref.name}:{when}"
        self.add("decoder", "logits", logits, self.ref.logits[when], probe)
        host = self.graphs.cache_to_numpy(past)
        for index, ref in enumerate(self.ref.kv[when]):
            kind = "value" if index % 2 else "key"
            ours = _real_positions(host[index], mask)
            self.add("decoder", f"present_{kind}_{index // 2}", ours, ref, probe)

    def greedy(self, eos_ids, pad_id, required: bool) -> list[GreedyCheck]:
        """32 greedy tokens with end of sequence suppressed, as the reference was made
        (HF's ``min_new_tokens``; here the engine's logits hook)."""
        eos = list(eos_ids)

        def no_eos(logits: np.ndarray, _state) -> np.ndarray:
            logits = logits.copy()
            logits[:, eos] = -np.inf
            return logits

        ours = generate(
            self.graphs,
            self.batch,
            self.vision,
            max_new_tokens=GREEDY_STEPS,
            eos_ids=eos_ids,
            pad_id=pad_id,
            logits_hook=no_eos,
        ).tokens
        return [
            GreedyCheck(
                f"{self.ref.name}:row{row}", _common_prefix(mine, theirs), len(theirs), required
            )
            for row, (mine, theirs) in enumerate(zip(ours, self.ref.greedy, strict=True))
        ]


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two sequences share."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def vision_spec(config) -> VisionSpec:
    """The host-side vision facts of a Qwen2.5-VL config."""
    return VisionSpec(
        image_token_id=config.image_token_id,
        merge_size=config.vision_config.spatial_merge_size,
        window_size=config.vision_config.window_size,
        patch_size=config.vision_config.patch_size,
    )


def compare(
    graphs, references: list[Reference], vision: VisionSpec, dtype: str, *, eos_ids, pad_id
) -> ParityReport:
    """Run ``graphs`` on the references' inputs; raise :class:`ParityError` naming every
    failing graph, tensor and error."""
    checks: list[Check] = []
    greedy: list[GreedyCheck] = []
    for ref in references:
        comparer = _Comparer(graphs, vision, dtype, ref)
        comparer.vision_and_embedding()
        comparer.decoder()
        checks += comparer.checks
        greedy += comparer.greedy(eos_ids, pad_id, required=dtype == "float32")
    report = ParityReport(dtype, tuple(checks), tuple(greedy))
    if report.failures:
        raise ParityError(_failure_message(report), report)
    log.info(
        "parity passed: %d tensors, greedy %s",
        len(checks),
        [f"{g.agreed}/{g.length}" for g in greedy],
    )
    return report


def check_parity(model, processor, graphs, dtype: str, *, eos_ids, pad_id) -> ParityReport:
    """Compare ``graphs`` (an :class:`gmner_rt.backends.onnxruntime.OrtGraphs`) with ``model``,
    the PyTorch model they were exported from (same dtype)."""
    refs = reference_outputs(model, processor, eos_ids=eos_ids, pad_id=pad_id)
    return compare(graphs, refs, vision_spec(model.config), dtype, eos_ids=eos_ids, pad_id=pad_id)


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
