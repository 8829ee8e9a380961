"""``gmner time``: how fast one bundle runs here, with gmner_rt alone (no torch, no peers).

    gmner time [--bundle B] [--provider cuda] [--new-tokens 64] [--repeats 3] [--batch 4]

On fixed bench pairs (448 x 336 images of noise and shapes, tweet-like texts), each figure a
median over ``--repeats`` after ``--warmup`` runs: time to first token (preprocess + vision +
prefill), decode tokens/s at batch 1 and at ``--batch``, and the latency of a whole
``extract`` (unconstrained, end of sequence suppressed: exactly ``--new-tokens`` tokens). This
is what a device needs to time a bundle on its provider; the comparison with peers is
``gmner bench`` (the gmner-bench package), whose gmner_rt worker uses these same functions.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .extract import add_provider_arguments, load_extractor, load_options, positive_int

log = logging.getLogger(__name__)

__all__ = ["IMAGE_SIZE", "TEXTS", "Run", "bench_image", "bench_pairs", "loop_e2e", "loop_run"]
__all__ += ["time_bundle", "tokens_per_s"]

#: Bench images: (width, height); all one size so a batch of them has no padding in the image
#: part, texts of different lengths so the batch is left padded like real traffic.
IMAGE_SIZE = (448, 336)
TEXTS = (
    "Lionel Messi arrives in Miami ahead of the Inter Miami match on Saturday",
    "Great night at Madison Square Garden with the New York Knicks",
    "Apple CEO Tim Cook visits the new store in London",
    "Heavy rain expected in Paris as Roland Garros starts",
)


@dataclass
class Run:
    """One generation: time to first token (s), each later token's latency (s), the ids."""

    ttft: float
    token_times: list[float]
    tokens: list[list[int]]

    @property
    def decode_time(self) -> float:
        return float(sum(self.token_times))


def bench_image(seed: int) -> Image.Image:
    """A deterministic bench image: noise with a few filled shapes."""
    rng = np.random.default_rng(1000 + seed)
    width, height = IMAGE_SIZE
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        x1, y1 = x0 + int(rng.integers(20, width - x0)), y0 + int(rng.integers(20, height - y0))
        draw.rectangle((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return image


def bench_pairs(count: int) -> list[tuple[Image.Image, str]]:
    """``count`` fixed (image, text) pairs; texts cycle through :data:`TEXTS`."""
    return [(bench_image(i), TEXTS[i % len(TEXTS)]) for i in range(count)]


def median_ms(values: Sequence[float]) -> float:
    return float(np.median(values) * 1000.0)


def p90_ms(values: Sequence[float]) -> float:
    return float(np.percentile(values, 90) * 1000.0)


def suppress(logits: np.ndarray, eos_ids: Sequence[int]) -> np.ndarray:
    logits = np.array(logits, dtype=np.float32, copy=True)
    logits[:, list(eos_ids)] = -np.inf
    return logits


# --- systems driven by gmner_rt's loop (gmner_rt, ortgenai) ----------------------------------


def loop_run(extractor, pairs, new_tokens: int, *, prompt_batch=None) -> Run:
    """Preprocess + vision + prefill, then ``new_tokens - 1`` single-token steps, timed."""
    from gmner_rt.generate import prefill, step

    eos = extractor.bundle.manifest.tokens.eos_ids
    start = time.perf_counter()
    batch = prompt_batch if prompt_batch is not None else extractor.prompt_batch(pairs)
    logits, state = prefill(extractor.backend, batch, extractor.vision)
    chosen = np.argmax(suppress(logits, eos), axis=-1)
    ttft = time.perf_counter() - start
    tokens = [[int(t)] for t in chosen]
    times = []
    for _ in range(new_tokens - 1):
        began = time.perf_counter()
        logits = step(extractor.backend, state, chosen)
        chosen = np.argmax(suppress(logits, eos), axis=-1)
        times.append(time.perf_counter() - began)
        for row, token in enumerate(chosen):
            tokens[row].append(int(token))
    return Run(ttft, times, tokens)


def loop_e2e(extractor, pair, new_tokens: int) -> tuple[float, list[int]]:
    """One real ``extract`` call (unconstrained, eos suppressed), its latency and ids."""
    eos = extractor.bundle.manifest.tokens.eos_ids
    started = time.perf_counter()
    result = extractor.extract(
        pair[0],
        pair[1],
        think="on",
        constrained=False,
        max_new_tokens=new_tokens,
        logits_hook=lambda logits, _state: suppress(logits, eos),
    )
    return time.perf_counter() - started, list(result.token_ids)


def tokens_per_s(runs: Sequence[Run], rows: int) -> float:
    tokens = sum(len(r.token_times) for r in runs) * rows
    seconds = sum(r.decode_time for r in runs)
    return tokens / seconds if seconds > 0 else float("nan")


def time_bundle(
    extractor,
    *,
    new_tokens: int = 64,
    repeats: int = 3,
    warmup: int = 1,
    pairs: int = 2,
    batch: int = 0,
) -> dict:
    """The figures of the module docstring for a loaded extractor."""
    chosen = bench_pairs(max(pairs, batch))
    singles = chosen[:pairs]
    for _ in range(warmup):
        loop_run(extractor, singles[:1], new_tokens)
    runs = [loop_run(extractor, [p], new_tokens) for _ in range(repeats) for p in singles]
    out = {
        "provider": extractor.provider,
        "new_tokens": new_tokens,
        "ttft_ms": median_ms([r.ttft for r in runs]),
        "decode_tokens_per_s": tokens_per_s(runs, 1),
    }
    if batch > 1:
        group = chosen[:batch]
        loop_run(extractor, group, min(new_tokens, 4))
        batched = [loop_run(extractor, group, new_tokens) for _ in range(repeats)]
        out["batch"] = batch
        out["ttft_ms_batch"] = median_ms([r.ttft for r in batched])
        out["decode_tokens_per_s_batch"] = tokens_per_s(batched, batch)
    e2e = [loop_e2e(extractor, p, new_tokens)[0] for _ in range(repeats) for p in singles]
    out["e2e_ms_median"] = median_ms(e2e)
    out["e2e_ms_p90"] = p90_ms(e2e)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, help="bundle folder (default: the embedded one)")
    parser.add_argument("--new-tokens", type=positive_int, default=64, help="default 64")
    parser.add_argument("--repeats", type=positive_int, default=3, help="default 3")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured runs first (default 1)")
    parser.add_argument("--pairs", type=positive_int, default=2, help="bench pairs (default 2)")
    parser.add_argument(
        "--batch", type=int, default=0, help="batch size of the batched figures, 0: none"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    add_provider_arguments(parser)


def run(args: argparse.Namespace) -> int:
    extractor = load_extractor(args.bundle, **load_options(args))
    figures = time_bundle(
        extractor,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        warmup=max(0, args.warmup),
        pairs=args.pairs,
        batch=max(0, args.batch),
    )
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    for key, value in figures.items():
        shown = f"{value:.2f}" if isinstance(value, float) else str(value)
        sys.stdout.write(f"{key:28s} {shown}\n")
    return 0
