"""What each system of the speculation bench (:mod:`.speculation`) does with one request:
gmner_rt's ``extract``, onnxruntime-genai's decoder behind the same ``extract``, and HF
``generate`` with or without ``prompt_lookup_num_tokens``.

Boundary: a system here decodes one request and returns its ids and counts
(:class:`Decoded`); it knows nothing about variants, tables, ratios or which ids must agree
(:mod:`.speculation`'s). onnxruntime-genai is :class:`.ortgenai.OrtGenaiDecoder` (its model
builder's decoder, built once by :func:`.ortgenai.build_decoder`) behind a plain
:class:`gmner_rt.extractor.Extractor`: the bundle's vision and embedding graphs, prompts,
grammar and jump-forward, one chosen token per decoder call (its GroupQueryAttention reads the
cache as per-row lengths, so a rejected draft could not be masked out of it). HF runs the
source checkpoint on the bundle's own prompt (checked: the processor's ids must equal the
bundle's), unconstrained, greedy.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from gmner_rt.errors import GmnerError

log = logging.getLogger(__name__)

__all__ = ["Decoded", "HfPeer", "extract_decoded", "ortgenai_extractor"]

#: gmner_rt's decode stages (``Extraction.timings``): decoder calls (embedding included),
#: choosing tokens (the grammar's masks included), proposing and checking drafts.
STAGES = ("decode", "choose", "draft")


@dataclass(frozen=True)
class Decoded:
    """One request decoded by one system.

    Attributes:
        ids: the generated ids (stop token included).
        decoder_calls: decoder calls after the prefill.
        decode_s: seconds after the prefill (the first token's logits) to the end.
        total_s: seconds end to end (image preprocessing and prompt included).
        drafted: draft tokens proposed (None: the system does not say).
        accepted: draft tokens kept (None: the system does not say).
        stages: seconds per gmner_rt decode stage (:data:`STAGES`; empty for HF).
    """

    ids: list[int]
    decoder_calls: int
    decode_s: float
    total_s: float
    drafted: int | None = None
    accepted: int | None = None
    stages: dict[str, float] = field(default_factory=dict)


def extract_decoded(extractor, image, text, options: dict) -> Decoded:
    """``extractor.extract(image, text, **options)`` as a :class:`Decoded`."""
    out = extractor.extract(image, text, **options)
    t = out.timings
    return Decoded(
        ids=list(out.token_ids),
        decoder_calls=int(t["steps"]) - 1,
        decode_s=float(t["total"]) - t["preprocess"] - t["vision"] - t["prefill"],
        total_s=float(t["total"]),
        drafted=int(t["drafted_tokens"]),
        accepted=int(t["accepted_tokens"]),
        stages={stage: float(t.get(stage, 0.0)) for stage in STAGES},
    )


def ortgenai_extractor(bundle, model: Path, cache: Path, threads: int | None):
    """An :class:`~gmner_rt.extractor.Extractor` whose decoder is onnxruntime-genai's,
    built from ``model`` (fp32, CPU) into ``cache`` once."""
    from gmner_rt.extractor import Extractor

    from .ortgenai import OrtGenaiDecoder, build_decoder

    decoder_dir = build_decoder(model, cache, threads=threads)
    return Extractor(bundle, OrtGenaiDecoder.from_bundle(bundle, decoder_dir, threads=threads))


class HfPeer:
    """HF ``generate`` on the source checkpoint with the bundle's prompts, greedy, on the
    CPU. Counts its forward calls and times the first (the prefill) with hooks on the model,
    so a prompt-lookup run is timed like a plain one."""

    def __init__(self, model_dir: Path, extractor, threads: int | None):
        import torch
        from gmner.train.modeling import load_model_and_processor

        if threads:
            torch.set_num_threads(threads)
        m = extractor.bundle.manifest
        self.extractor = extractor
        self.model, self.processor = load_model_and_processor(
            model_dir,
            dtype=m.kv_cache.dtype,
            min_pixels=m.image_processor["min_pixels"],
            max_pixels=m.image_processor["max_pixels"],
        )
        self.ends: list[float] = []
        self.model.register_forward_hook(self._forward_done)

    def _forward_done(self, *_args) -> None:
        self.ends.append(time.perf_counter())

    def _prompt_text(self, text: str, think: bool) -> str:
        """The bundle's prompt with one image pad, which the processor expands."""
        from gmner_rt.prompt import render_prompt

        p = self.extractor.bundle.manifest.prompt
        tokens = self.extractor.bundle.manifest.tokens
        pad = self.extractor.tokenizer.id_to_token(tokens.image_pad_id)
        return render_prompt(
            p.chat_template,
            system=p.system,
            image=p.image.replace("{image_pads}", pad),
            instruction_template=p.instruction_think if think else p.instruction_answer_only,
            text=text,
        )

    def _encode(self, image, text: str, think: bool):
        from gmner_rt.vision import to_rgb

        rgb = to_rgb(image)
        enc = self.processor(
            text=[self._prompt_text(text, think)], images=[rgb], return_tensors="pt"
        )
        ours = self.extractor.prompt_batch([(rgb, text)], think=think).input_ids[0].tolist()
        if enc["input_ids"][0].tolist() != ours:
            raise GmnerError(
                f"hf: the processor's prompt ({enc['input_ids'].shape[1]} tokens) differs from "
                f"the bundle's ({len(ours)}); the systems would not do the same work"
            )
        return enc

    def decode(self, image, text: str, think: bool, new_tokens: int, lookup: int | None):
        """Greedy ``generate`` of at most ``new_tokens`` (``lookup``: with
        ``prompt_lookup_num_tokens``)."""
        import torch

        tokens = self.extractor.bundle.manifest.tokens
        start = time.perf_counter()
        enc = self._encode(image, text, think)
        self.ends = []
        extra = {"prompt_lookup_num_tokens": lookup} if lookup else {}
        with torch.inference_mode():
            out = self.model.generate(
                **enc,
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tokens.pad_id,
                eos_token_id=list(tokens.eos_ids),
                **extra,
            )
        total = time.perf_counter() - start
        return Decoded(
            ids=out[0, enc["input_ids"].shape[1] :].tolist(),
            decoder_calls=len(self.ends) - 1,
            decode_s=start + total - self.ends[0],
            total_s=total,
        )
