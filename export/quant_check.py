"""A quantized decoder measured against the fp decoder it was made from, both on onnxruntime.

The error of a quantized decoder is a property of its rounded weights, not an export bug, so
this is a measurement, not a parity test. The fp decoder's own agreement with PyTorch is the
export's parity report (``parity.max_relative_error``, greedy tokens); the two errors add up
at most.

On the export's probe inputs (:mod:`.probes`), as the runtime prompts them (the bundle's
chat layout and tokenizer, reasoning on), both decoders run in lockstep for
:data:`GREEDY_STEPS` greedy steps with end of sequence suppressed, each fed the fp decoder's
token (teacher forcing). Per probe it records the largest logit difference, that over the
largest fp logit of the step (``relative``), the mean KL divergence of the next-token
distribution from the fp one, how many steps pick the same token, and each row's steps before
the first different pick (where free-running greedy decoding would part).

Only non-finite logits fail the check. No fixed tolerance on the error separates a broken
graph from an honest one here: on random weights the rounding noise compounds with depth
(int4 at block 32: relative error 0.25 on the 2-layer tiny model, 0.66 on the 24-layer
bench-small one; int8 0.018 and 0.061), so a bound loose enough for random deep models
catches nothing, and whether a real model stays accurate enough is a question for a task
evaluation, not for this check. Above :data:`WARN_RELATIVE` the exporter warns. The test
suite holds the tiny model to tight bounds (tests/export/test_quantize.py), which is what catches a
quantizer that goes wrong.

Vision and embedding graphs are the fp bundle's, unchanged. This module knows nothing of how
the decoder was quantized, and needs no torch.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from gmner_rt.backends.onnxruntime import OrtGraphs
from gmner_rt.bundle import Bundle
from gmner_rt.errors import GmnerError
from gmner_rt.extractor import Extractor
from gmner_rt.generate import PromptBatch, prefill, step

from .probes import probe_batches

log = logging.getLogger(__name__)

__all__ = [
    "GREEDY_STEPS",
    "WARN_RELATIVE",
    "QuantCheckError",
    "QuantReport",
    "check_quantized",
    "kl_divergence",
]

GREEDY_STEPS = 32
#: A relative logit error (max |quantized - fp| over max |fp|) above this is logged as a
#: warning: the logits then move by half the largest one, and greedy picks often differ.
WARN_RELATIVE = 0.5


@dataclass(frozen=True)
class ProbeResult:
    """One probe batch: worst logit error over its steps, and greedy agreement."""

    probe: str
    max_abs: float
    relative: float
    agreed: int  # (row, step) pairs whose argmax equals the fp decoder's
    steps: int  # rows * GREEDY_STEPS
    prefix: tuple[int, ...]  # per row: steps before the first different argmax
    kl_mean: float  # mean over (row, step) of KL(fp || quantized) of the next-token softmax

    @property
    def finite(self) -> bool:
        return bool(np.isfinite(self.max_abs))


@dataclass(frozen=True)
class QuantReport:
    """Every probe of one quantized decoder against its fp source."""

    scheme: str
    probes: tuple[ProbeResult, ...]

    @property
    def failures(self) -> list[ProbeResult]:
        return [p for p in self.probes if not p.finite]

    def accuracy(self) -> dict[str, float]:
        """The manifest's ``quantization.accuracy`` figures."""
        return {
            "logits_max_abs_error": max(p.max_abs for p in self.probes),
            "logits_relative_error": max(p.relative for p in self.probes),
            "top1_agreement": sum(p.agreed for p in self.probes)
            / sum(p.steps for p in self.probes),
            "greedy_prefix_min": min(min(p.prefix) for p in self.probes),
            "greedy_prefix_mean": float(np.mean([n for p in self.probes for n in p.prefix])),
            "kl_mean": sum(p.kl_mean * p.steps for p in self.probes)
            / sum(p.steps for p in self.probes),
            "greedy_steps": GREEDY_STEPS,
        }

    def to_dict(self) -> dict:
        """The manifest's ``parity.quantized`` report."""
        return {
            "reference": "the fp decoder on onnxruntime, teacher forced",
            "scheme": self.scheme,
            "warn_above": WARN_RELATIVE,
            "probes": [asdict(p) for p in self.probes],
            "passed": not self.failures,
        }


class QuantCheckError(GmnerError):
    """A quantized decoder gives non-finite logits; the message names the probes."""

    def __init__(self, message: str, report: QuantReport):
        super().__init__(message)
        self.report = report


def _lockstep(fp, quant, extractor: Extractor, name: str, batch: PromptBatch) -> ProbeResult:
    eos = list(extractor.bundle.manifest.tokens.eos_ids)
    vision = extractor.vision
    (ours, q_state), (ref, fp_state) = prefill(quant, batch, vision), prefill(fp, batch, vision)
    rows = len(batch.input_ids)
    max_abs = relative = 0.0
    agreed, prefix, kl = 0, [GREEDY_STEPS] * rows, 0.0
    for index in range(GREEDY_STEPS):
        ref, ours = ref.astype(np.float32), ours.astype(np.float32)  # [B, vocab]
        kl += float(kl_divergence(ref, ours).sum())
        diff = float(np.abs(ours - ref).max())
        diff = diff if np.isfinite(diff) else float("inf")  # NaN would pass max()
        max_abs = max(max_abs, diff)
        relative = max(relative, diff / max(float(np.abs(ref).max()), 1e-6))
        ref[:, eos], ours[:, eos] = -np.inf, -np.inf
        tokens, picks = ref.argmax(-1), ours.argmax(-1)
        for row in np.flatnonzero(picks != tokens):
            prefix[row] = min(prefix[row], index)
        agreed += int((picks == tokens).sum())
        if index + 1 < GREEDY_STEPS:
            ref, ours = step(fp, fp_state, tokens), step(quant, q_state, tokens)
    steps = rows * GREEDY_STEPS
    return ProbeResult(name, max_abs, relative, agreed, steps, tuple(prefix), kl / steps)


def kl_divergence(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """``KL(softmax(reference) || softmax(other))`` per row of ``[B, vocab]`` logits, in nats
    (computed in float64 from log-softmaxes, so a tiny probability cannot overflow it)."""
    a = reference.astype(np.float64)
    b = other.astype(np.float64)
    log_p = a - a.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    log_q = b - b.max(-1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
    return (np.exp(log_p) * (log_p - log_q)).sum(-1)


def check_quantized(source: Bundle, decoder: Path, scheme: str) -> QuantReport:
    """Measure ``decoder`` (a quantized decoder graph) against ``source``'s fp decoder on CPU;
    raise :class:`QuantCheckError` when its logits are not finite."""
    fp = OrtGraphs.from_bundle(source)  # the CPU
    files = {name: source.file(spec.file) for name, spec in source.manifest.graphs.items()}
    quant = OrtGraphs({**files, "decoder": decoder}, fp.kv, providers=["CPUExecutionProvider"])
    extractor = Extractor(source, fp)
    probes = []
    for index, pairs in enumerate(probe_batches()):
        sizes = "+".join(f"{image.width}x{image.height}" for image, _ in pairs)
        batch = extractor.prompt_batch(pairs)  # as extract would feed them
        probes.append(_lockstep(fp, quant, extractor, f"batch{index}[{sizes}]", batch))
    report = QuantReport(scheme, tuple(probes))
    if report.failures:
        lines = [f"quantized decoder ({scheme}) gives non-finite logits:"]
        lines += [f"  logits on {p.probe}: max abs error {p.max_abs}" for p in report.failures]
        raise QuantCheckError("\n".join(lines), report)
    figures = report.accuracy()
    log.info("quantized decoder (%s) against the fp one: %s", scheme, figures)
    if figures["logits_relative_error"] > WARN_RELATIVE:
        log.warning(
            "%s logits move by %.2f of the largest fp logit (top-1 agreement %.2f): measure "
            "task accuracy before using this bundle",
            scheme,
            figures["logits_relative_error"],
            figures["top1_agreement"],
        )
    return report
