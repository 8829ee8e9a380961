"""Speculative decoding side by side: gmner_rt with and without prompt-lookup drafts, and HF
``generate`` with and without ``prompt_lookup_num_tokens``, on the same requests in one run.

    python -m gmner.bench.speculation --bundle B --data D --images D/images --think on
    python -m gmner.bench.speculation --preset bench-small --model-too --limit 4

Every request is run by every variant in turn (the order rotated per request), so that all
variants see the same load on a shared machine; figures are ratios measured in this one run.
Variants: ``gmner_rt`` (``extract``, constrained as shipped) with ``speculate`` False/True;
``gmner_rt unconstrained`` False/True (no grammar: the same work as HF); with ``--model``,
``hf`` greedy ``generate`` with and without ``prompt_lookup_num_tokens`` (unconstrained, on
the source checkpoint). The ids of the two gmner_rt runs of a request must be equal (the bench
fails otherwise), and so must HF's two. Per variant: output tokens, decoder calls per output
token (the prefill not counted), accepted tokens per call (drafts kept + the token each call
chooses), decode tokens/s (tokens over the time after the prefill), end-to-end latency
(median). It knows nothing about how a system decodes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gmner.runtime.evaluate import tweet_images
from gmner.runtime.extract import positive_int
from gmner.runtime.timing import bench_pairs

import gmner_rt
from gmner_rt.data import load_split
from gmner_rt.errors import GmnerError

log = logging.getLogger(__name__)

__all__ = ["Tally", "format_table", "main", "run"]


@dataclass
class Tally:
    """One variant's sums over the requests."""

    name: str
    tokens: int = 0
    decoder_calls: int = 0  # after the prefill
    drafted: int = 0
    accepted: int = 0
    decode_s: float = 0.0
    latencies: list[float] = field(default_factory=list)

    def figures(self) -> dict:
        calls = max(self.decoder_calls, 1)
        return {
            "variant": self.name,
            "tokens": self.tokens,
            "decoder_calls_per_token": self.decoder_calls / max(self.tokens, 1),
            "tokens_per_call": self.tokens / calls,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "decode_tokens_per_s": self.tokens / self.decode_s if self.decode_s else 0.0,
            "e2e_ms_median": 1000 * float(np.median(self.latencies)) if self.latencies else 0.0,
        }


def _gmner(extractor, tally: Tally, image, text, options: dict) -> list[int]:
    out = extractor.extract(image, text, **options)
    t = out.timings
    tally.tokens += int(t["tokens"])
    tally.decoder_calls += int(t["steps"]) - 1
    tally.drafted += int(t["drafted_tokens"])
    tally.accepted += int(t["accepted_tokens"])
    tally.decode_s += float(t["total"]) - t["preprocess"] - t["vision"] - t["prefill"]
    tally.latencies.append(float(t["total"]))
    return list(out.token_ids)


class _HF:
    """HF ``generate`` on the source checkpoint, the bundle's prompts, greedy."""

    def __init__(self, model_dir: Path, extractor, threads: int | None):
        import torch
        from gmner.train.modeling import load_model_and_processor

        if threads:
            torch.set_num_threads(threads)
        m = extractor.bundle.manifest
        self.model, self.processor = load_model_and_processor(
            model_dir,
            dtype=m.kv_cache.dtype,
            min_pixels=m.image_processor["min_pixels"],
            max_pixels=m.image_processor["max_pixels"],
        )
        self.tokens, self.labels = m.tokens, m.labels
        self.calls = 0
        self.model.register_forward_pre_hook(self._count)

    def _count(self, *_args) -> None:
        self.calls += 1

    def run(self, tally: Tally, image, text, think: bool, new_tokens: int, lookup: int | None):
        import torch
        from gmner.bench.workers import _Clock

        from gmner_rt.prompt import user_message

        prompt = self.processor.apply_chat_template(
            [user_message(image, text, self.labels, think=think)],
            tokenize=False,
            add_generation_prompt=True,
        )
        clock = _Clock([])  # records when the first token's scores are ready
        start = time.perf_counter()
        enc = self.processor(text=[prompt], images=[image], return_tensors="pt")
        self.calls = 0
        extra = {"prompt_lookup_num_tokens": lookup} if lookup else {}
        with torch.inference_mode():
            out = self.model.generate(
                **enc,
                max_new_tokens=new_tokens,
                do_sample=False,
                logits_processor=[clock] if not lookup else None,
                pad_token_id=self.tokens.pad_id,
                eos_token_id=list(self.tokens.eos_ids),
                **extra,
            )
        total = time.perf_counter() - start
        ids = out[0, enc["input_ids"].shape[1] :].tolist()
        first = clock.times[0] - start if clock.times else None
        tally.tokens += len(ids)
        tally.decoder_calls += self.calls - 1
        tally.latencies.append(total)
        return ids, total, first


def _pairs(args) -> list[tuple[object, str]]:
    if args.data is None:
        return bench_pairs(args.limit or 4)
    tweets = load_split(args.data, args.split)[: args.limit]
    return [
        (path, tweet.text)
        for tweet, path in tweet_images(tweets, [args.images], skip_missing=False)
    ]


def run(args: argparse.Namespace) -> dict:
    """Every variant on every request; the figures."""
    bundle, model = args.bundle, args.model
    if args.preset:
        from gmner.bench.peers import prepare_preset

        model, bundle = prepare_preset(args.preset, args.cache)
        model = model if args.model_too else None
    extractor = gmner_rt.load(bundle, provider=args.provider, threads=args.threads)
    if not extractor.backend.verifies_drafts:
        raise GmnerError(f"{bundle}: a format-1 bundle cannot verify drafts; re-export it")
    pairs = _pairs(args)
    limit = args.max_new_tokens
    base = {"think": args.think, "max_new_tokens": limit}
    variants = {
        "gmner_rt": {**base},
        "gmner_rt + speculation": {**base, "speculate": True},
        "gmner_rt unconstrained": {**base, "constrained": False},
        "gmner_rt unconstrained + speculation": {**base, "constrained": False, "speculate": True},
    }
    for name in ("gmner_rt", "gmner_rt unconstrained"):
        variants[name]["speculate"] = False
    tallies = {name: Tally(name) for name in variants}
    hf = _HF(model, extractor, args.threads) if model else None
    if hf:
        tallies.update({n: Tally(n) for n in ("hf", "hf + prompt lookup")})
    extractor.extract(pairs[0][0], pairs[0][1], max_new_tokens=16)  # warm-up, token table
    think = args.think != "off"
    for index, (image, text) in enumerate(pairs):
        names = list(variants)
        names = names[index % len(names) :] + names[: index % len(names)]
        ids = {
            name: _gmner(extractor, tallies[name], image, text, variants[name]) for name in names
        }
        for plain in ("gmner_rt", "gmner_rt unconstrained"):
            fast = next(n for n in variants if n.startswith(plain) and n.endswith("speculation"))
            if ids[plain] != ids[fast]:
                raise GmnerError(f"request {index}: {fast} generated other ids than {plain}")
        if hf:
            new = len(ids["gmner_rt unconstrained"]) or 1
            a, total_a, first = hf.run(tallies["hf"], image, text, think, new, None)
            b, _, _ = hf.run(tallies["hf + prompt lookup"], image, text, think, new, args.lookup)
            tallies["hf"].decode_s += total_a - (first or 0.0)
            # prompt lookup: the same prefill; its decode time is its total minus hf's first
            tallies["hf + prompt lookup"].decode_s += tallies["hf + prompt lookup"].latencies[
                -1
            ] - (first or 0.0)
            if a != b:
                raise GmnerError(f"request {index}: hf with prompt lookup generated other ids")
            if a != ids["gmner_rt unconstrained"]:
                log.warning("request %d: hf's ids differ from gmner_rt's unconstrained", index)
        log.info("request %d/%d done", index + 1, len(pairs))
    figures = {name: tally.figures() for name, tally in tallies.items()}
    for plain, fast in (
        ("gmner_rt", "gmner_rt + speculation"),
        ("gmner_rt unconstrained", "gmner_rt unconstrained + speculation"),
        ("hf", "hf + prompt lookup"),
    ):
        if plain in figures and figures[plain]["decode_tokens_per_s"]:
            figures[fast]["decode_speedup"] = (
                figures[fast]["decode_tokens_per_s"] / figures[plain]["decode_tokens_per_s"]
            )
            figures[fast]["e2e_speedup"] = (
                figures[plain]["e2e_ms_median"] / figures[fast]["e2e_ms_median"]
            )
    return {"bundle": str(bundle), "requests": len(pairs), "think": args.think,
            "max_new_tokens": limit, "variants": figures}  # fmt: skip


def format_table(report: dict) -> str:
    head = (
        f"{'variant':38} {'tokens':>6} {'calls/tok':>9} {'tok/call':>8} {'accepted':>8} "
        f"{'decode tok/s':>12} {'x':>5} {'e2e ms':>8} {'x':>5}"
    )
    rows = [head, "-" * len(head)]
    for f in report["variants"].values():
        rows.append(
            f"{f['variant']:38} {f['tokens']:6d} {f['decoder_calls_per_token']:9.3f} "
            f"{f['tokens_per_call']:8.2f} {f['accepted']:8d} {f['decode_tokens_per_s']:12.1f} "
            f"{f.get('decode_speedup', 1.0):5.2f} {f['e2e_ms_median']:8.1f} "
            f"{f.get('e2e_speedup', 1.0):5.2f}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gmner.bench.speculation")
    parser.add_argument("--bundle", type=Path, help="bundle folder (format 2)")
    parser.add_argument("--model", type=Path, help="its source checkpoint: adds hf variants")
    parser.add_argument("--preset", choices=("tiny", "bench-small"), help="random-weight model")
    parser.add_argument("--model-too", action="store_true", help="with --preset: hf variants")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/gmner/bench")
    parser.add_argument("--data", type=Path, help="Twitter-GMNER-format folder (default: the "
                        "bench's synthetic pairs)")  # fmt: skip
    parser.add_argument("--images", type=Path, help="image folder (with --data)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=positive_int, help="the first N requests only")
    parser.add_argument("--threads", type=positive_int, help="onnxruntime / torch threads")
    parser.add_argument("--think", choices=("on", "off", "auto"), default="on")
    parser.add_argument("--provider", choices=("cpu", "cuda"), help="gmner_rt's provider")
    parser.add_argument("--max-new-tokens", type=positive_int, default=256)
    parser.add_argument("--lookup", type=positive_int, default=10,
                        help="hf's prompt_lookup_num_tokens")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if (args.bundle is None) == (args.preset is None):
        parser.error("give --bundle or --preset")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = run(args)
    sys.stdout.write(
        f"{report['requests']} requests, think {report['think']}, bundle {report['bundle']} "
        "(all variants in one run, requests interleaved)\n"
    )
    sys.stdout.write(format_table(report) + "\n")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
