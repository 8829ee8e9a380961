"""Decoding variants of one bundle side by side: unconstrained, grammar, grammar + jump-forward.

    python -m gmner.bench.decoding_variants --bundle B --data D --images D/images [--split test]

Each variant extracts the same tweets one at a time (batch 1, so that steps count decoder
calls of one request) and reports its scores, malformed segments, generated tokens, decoder
steps, tokens the grammar forced, and the time per step of the decoder and of choosing the
next token (the grammar's masks included), whose ratio is the mask's cost. Figures go to stdout
as a table and, with ``--json``, to a file.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from gmner.runtime.evaluate import prediction_output, tweet_images
from gmner.runtime.extract import positive_int

import gmner_rt
from gmner_rt.data import load_split
from gmner_rt.metrics import evaluate

log = logging.getLogger(__name__)

#: name -> extract keyword arguments
VARIANTS: dict[str, dict] = {
    "unconstrained": {"constrained": False},
    "grammar": {"constrained": True, "jump_forward": False},
    "grammar + jump-forward": {"constrained": True, "jump_forward": True},
}


@dataclass(frozen=True)
class VariantResult:
    """One variant's figures over the split."""

    name: str
    gmner_f1: float
    mner_f1: float
    eeg_f1: float
    malformed: int
    tokens: int
    steps: int
    forced_tokens: int
    decode_ms_per_step: float
    choose_ms_per_step: float
    seconds: float


def run_variant(extractor, pairs, name: str, options: dict) -> VariantResult:
    """Extract every (tweet, image) pair with ``options`` and score the outputs."""
    outputs: dict[str, str] = {}
    totals = {"tokens": 0.0, "steps": 0.0, "forced_tokens": 0.0, "decode": 0.0, "choose": 0.0}
    seconds, malformed = 0.0, 0
    for tweet, path in pairs:
        extraction = extractor.extract(path, tweet.text, **options)
        outputs[tweet.img_id] = prediction_output(extraction)
        malformed += len(extraction.malformed)
        seconds += extraction.timings["total"]
        for key in totals:
            totals[key] += extraction.timings.get(key, 0.0)
    report = evaluate({t.img_id: t.records() for t, _ in pairs}, outputs)
    decode_steps = max(totals["steps"] - len(pairs), 1)  # the prefill is not a decode step
    return VariantResult(
        name=name,
        gmner_f1=report.gmner.f1,
        mner_f1=report.mner.f1,
        eeg_f1=report.eeg.f1,
        malformed=malformed,
        tokens=int(totals["tokens"]),
        steps=int(totals["steps"]),
        forced_tokens=int(totals["forced_tokens"]),
        decode_ms_per_step=1000 * totals["decode"] / decode_steps,
        choose_ms_per_step=1000 * totals["choose"] / totals["steps"],
        seconds=seconds,
    )


def format_table(results: list[VariantResult]) -> str:
    head = (
        f"{'variant':24} {'GMNER':>6} {'MNER':>6} {'EEG':>6} {'malf':>5} {'tokens':>7} "
        f"{'steps':>6} {'forced':>6} {'decode ms':>9} {'choose ms':>9} {'choose/decode':>13} "
        f"{'total s':>8}"
    )
    rows = [head, "-" * len(head)]
    for r in results:
        share = r.choose_ms_per_step / r.decode_ms_per_step if r.decode_ms_per_step else 0.0
        rows.append(
            f"{r.name:24} {100 * r.gmner_f1:6.2f} {100 * r.mner_f1:6.2f} {100 * r.eeg_f1:6.2f} "
            f"{r.malformed:5d} "
            f"{r.tokens:7d} {r.steps:6d} {r.forced_tokens:6d} {r.decode_ms_per_step:9.2f} "
            f"{r.choose_ms_per_step:9.3f} {share:12.1%} {r.seconds:8.1f}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gmner.bench.decoding_variants")
    parser.add_argument("--bundle", type=Path, help="bundle folder (default: the embedded one)")
    parser.add_argument("--data", type=Path, required=True, help="Twitter-GMNER-format folder")
    parser.add_argument("--images", type=Path, required=True, help="image folder")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=positive_int, help="the first N tweets only")
    parser.add_argument("--threads", type=positive_int, help="onnxruntime intra-op threads")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--max-new-tokens", type=positive_int, help="default: the bundle's")
    parser.add_argument("--think", choices=("on", "off", "auto"), default="auto")
    parser.add_argument(
        "--think-budget", type=positive_int, help="reasoning tokens (grammar variants)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    pairs = tweet_images(
        load_split(args.data, args.split)[: args.limit], [args.images], skip_missing=False
    )
    extractor = gmner_rt.load(args.bundle, threads=args.threads)
    extractor.extract(pairs[0][1], pairs[0][0].text, max_new_tokens=64)  # warm-up, token table
    results = []
    common = {"max_new_tokens": args.max_new_tokens, "think": args.think}
    for name, options in VARIANTS.items():
        if options["constrained"]:
            options = {**options, "think_budget": args.think_budget}
        results.append(run_variant(extractor, pairs, name, {**common, **options}))
        log.info("%s done in %.1f s", name, results[-1].seconds)
    sys.stdout.write(
        f"{len(pairs)} tweets of {args.data} ({args.split}), bundle {extractor.bundle.path}\n"
    )
    sys.stdout.write(format_table(results) + "\n")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
