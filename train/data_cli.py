"""``gmner data``: dataset statistics and training JSONL.

``gmner data stats DIR`` prints per split: tweets, entities, groundable entities, boxes and XML
objects, by type. ``gmner data sft DIR --images IMGDIR --out OUTDIR [--cot FILE]`` writes the
training rows of :mod:`gmner.train.sft`. ``gmner data synth --out DIR`` writes the synthetic
dataset of :mod:`gmner.train.synth`. None needs torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from gmner_rt.cli_flags import add_path_list
from gmner_rt.data import available_splits, load_split, split_stats
from gmner_rt.errors import DataError, InputError
from gmner_rt.prompt import PROMPT_STYLES

from .sft import PAPER_MAX_PIXELS, PAPER_MIN_PIXELS, SftConfig, write_sft

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    stats = sub.add_parser("stats", help="per-split counts of tweets, entities and boxes")
    stats.add_argument("dir", type=Path, help="Twitter-GMNER folder (txt/ and xml/)")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")

    sft = sub.add_parser("sft", help="write training JSONL (chat messages + targets)")
    sft.add_argument("dir", type=Path, help="Twitter-GMNER folder (txt/ and xml/)")
    add_path_list(
        sft,
        "--images",
        required=True,
        help="image folder(s), e.g. twitter2015 and twitter2017",
    )
    sft.add_argument("--out", type=Path, required=True, help="output folder")
    sft.add_argument("--cot", type=Path, help="reasoning JSONL (gmner cot or E2E-GMNER format)")
    sft.add_argument(
        "--split",
        action="append",
        dest="splits",
        help="split to write (repeatable; default: every split present)",
    )
    sft.add_argument(
        "--min-pixels",
        type=int,
        default=PAPER_MIN_PIXELS,
        help=f"smallest image area the model sees (default {PAPER_MIN_PIXELS}: 256 x 28 x 28)",
    )
    sft.add_argument(
        "--max-pixels",
        type=int,
        default=PAPER_MAX_PIXELS,
        help=f"largest image area the model sees (default {PAPER_MAX_PIXELS}: 1024 x 28 x 28)",
    )
    sft.add_argument(
        "--prompt",
        choices=PROMPT_STYLES,
        default="full",
        help="prompt style: full (default), compact (a one-line task tag) or reference (the "
        "E2E-GMNER reference code's system prompt and instruction)",
    )
    sft.add_argument(
        "--system-prompt",
        default="",
        help="a system prompt replacing the style's",
    )
    sft.add_argument(
        "--skip-missing-images",
        action="store_true",
        help="leave out tweets whose image is missing (reported as a count)",
    )

    synth = sub.add_parser("synth", help="write a synthetic Twitter-GMNER dataset (with images)")
    synth.add_argument("--out", type=Path, required=True, help="new or empty output folder")
    synth.add_argument("--seed", type=int, help="generator seed (default 0)")
    for split, n in (("train", 1200), ("dev", 150), ("test", 150)):  # SynthConfig's defaults
        synth.add_argument(f"--{split}", type=int, help=f"{split} tweets (default {n})")
    synth.add_argument(
        "--grid", type=int, help="N: each glyph in its own cell of an N x N grid (default 0: free)"
    )
    synth.add_argument(
        "--demo",
        action="store_true",
        help="the embedded default model's data (gmner demo --retrain): 336 x 336 images, "
        "3 x 3 grid, a tint per cell, 24000 train tweets; --seed and the split sizes still apply",
    )


def stats_table(stats: dict[str, dict]) -> str:
    head = f"{'split':<8}{'tweets':>8}{'entities':>10}{'groundable':>12}{'boxes':>8}{'xml obj':>9}"
    rows = [head]
    for split, s in stats.items():
        rows.append(
            f"{split:<8}{s['tweets']:>8}{s['entities']:>10}{s['groundable']:>12}"
            f"{s['boxes']:>8}{s['xml_objects']:>9}"
        )
        for etype, t in s["by_type"].items():
            rows.append(
                f"  {etype:<6}{'':>8}{t['entities']:>10}{t['groundable']:>12}{t['boxes']:>8}"
            )
    return "\n".join(rows)


def run_stats(data_dir: Path, as_json: bool) -> str:
    splits = available_splits(data_dir)
    if not splits:
        raise DataError(f"{data_dir}: no split files (expected txt/train.txt, txt/dev.txt, ...)")
    stats = {split: split_stats(load_split(data_dir, split)) for split in splits}
    return json.dumps(stats, indent=2) if as_json else stats_table(stats)


def run(args: argparse.Namespace) -> int:
    if args.data_command == "stats":
        sys.stdout.write(run_stats(args.dir, args.json) + "\n")
        return 0
    if args.data_command == "synth":
        from .synth import SynthConfig, write_synth  # numpy + PIL drawing, only when asked

        given = {k: getattr(args, k) for k in ("seed", "train", "dev", "test", "grid")}
        given = {k: v for k, v in given.items() if v is not None}
        if args.demo:
            from .demo_recipe import demo_synth

            if "grid" in given:
                raise InputError("--grid: the --demo data has its own grid (3); drop one flag")
            seed = given.pop("seed", 0)
            cfg = demo_synth(seed, **given)
        else:
            cfg = SynthConfig(**given)
        for split, c in write_synth(args.out, cfg).items():
            log.info("%s: %s", split, ", ".join(f"{v} {k}" for k, v in c.items()))
        return 0
    cfg = SftConfig(
        image_dirs=tuple(args.images),
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
        skip_missing_images=args.skip_missing_images,
        prompt=args.prompt,
        system_prompt=args.system_prompt,
    )
    splits = args.splits or available_splits(args.dir)
    if not splits:
        raise DataError(f"{args.dir}: no split files (expected txt/train.txt, txt/dev.txt, ...)")
    reports = write_sft(args.dir, args.out, splits, cfg, args.cot)
    for split, r in reports.items():
        log.info(
            "%s: %d rows (%d with reasoning), %d missing images, %d size mismatches -> %s",
            split,
            r.rows,
            r.with_think,
            r.missing_images,
            r.size_mismatch,
            args.out / f"{split}.jsonl",
        )
    return 0
