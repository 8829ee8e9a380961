"""``gmner demo``: grounded extraction with the embedded default model on shipped examples.

    gmner demo                       # examples -> table + JSON + annotated images in out/demo
    gmner demo --retrain             # rebuild the default model: data -> train -> export -> eval

The default run uses the runtime alone (gmner_rt: no torch). ``--retrain`` imports the training
and export packages and reproduces the shipped bundle (see :mod:`gmner.runtime.demo_retrain`).
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import logging
import sys
from pathlib import Path

import gmner_rt
from gmner_rt.draw import Verdict, draw_panel
from gmner_rt.errors import InputError
from gmner_rt.extractor import DEFAULT_BUNDLE, Extraction
from gmner_rt.metrics import normalize_mention, region_correct
from gmner_rt.predictions import iter_json_objects
from gmner_rt.records import EntityRecord
from gmner_rt.vision import to_rgb

from .extract import add_provider_arguments, format_table, load_options, readable_json

log = logging.getLogger(__name__)

#: The shipped example pairs (written by ``gmner demo --retrain --install``): the repository's
#: ``examples/demo``, installed as the package data of ``gmner.examples``.
EXAMPLES = Path(str(importlib.resources.files("gmner.examples"))) / "demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bundle",
        type=Path,
        default=None,
        help="bundle to run (default: the embedded default model)",
    )
    parser.add_argument(
        "--examples", type=Path, default=EXAMPLES, help="folder with examples.jsonl and its images"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("out/demo"),
        help="where results.json and the panels go (default out/demo)",
    )
    parser.add_argument(
        "--retrain",
        action="store_true",
        help="rebuild the default model end to end and print its test F1",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("runs/demo"),
        help="--retrain: working folder (data, model, run, bundle)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="--retrain: seed of the synthetic data and the initial weights",
    )
    parser.add_argument("--epochs", type=int, default=None, help="--retrain: override epochs")
    parser.add_argument(
        "--install",
        action="store_true",
        help="--retrain: replace the embedded default bundle and examples",
    )
    add_provider_arguments(parser)


def _gold_entities(example: dict) -> list[EntityRecord]:
    return [
        EntityRecord(
            g["mention"], g["type"], tuple(tuple(b) for b in g["boxes"]) if g["boxes"] else None
        )
        for g in example.get("gold") or []
    ]


def _why_wrong(entity, golds: list[EntityRecord]) -> str:
    """Why a prediction matches no remaining gold entity, in words."""
    same = [g for g in golds if g.mention == entity.mention]
    if not same:
        return "not an entity of the tweet"
    typed = [g for g in same if g.type == entity.type]
    if not typed:
        return f"the type is {same[0].type}"
    gold = typed[0]
    if gold.boxes is None:
        return "the image does not show it"
    if entity.boxes is None:
        return "the image shows it"
    return "the box is in another place (gold: the dashed one)"


def judge(
    extraction: Extraction, golds: list[EntityRecord]
) -> tuple[list[Verdict], list[EntityRecord]]:
    """Each prediction right or wrong (mention, type and region as the hindex protocol reads
    them; each gold entity used once, in order), and the gold entities no prediction names."""
    left = list(golds)
    verdicts = []
    for entity in extraction.records:
        match = next(
            (
                g
                for g in left
                if (normalize_mention(g.mention), g.type)
                == (normalize_mention(entity.mention), entity.type)
                and region_correct(entity.boxes, g.boxes)
            ),
            None,
        )
        if match is not None:
            left.remove(match)
            verdicts.append(Verdict(entity, True))
        else:
            taken = any(g.mention == entity.mention for g in golds) and not any(
                g.mention == entity.mention for g in left
            )
            reason = "said twice" if taken else _why_wrong(entity, left)
            verdicts.append(Verdict(entity, False, reason))
    # a gold entity whose mention was predicted (wrongly) is told by that prediction's line
    told = {v.entity.mention for v in verdicts if not v.right}
    return verdicts, [g for g in left if g.mention not in told]


def _report(example: dict, extraction: Extraction, verdicts: list[Verdict], missed) -> dict:
    row = {
        "id": example.get("id"),
        "image": example["image"],
        "text": example["text"],
        **extraction.to_dict(),
    }
    if example.get("gold") is not None:
        row["gold"] = example["gold"]
        row["correct"] = sum(v.right for v in verdicts)
        row["wrong"] = [
            {"mention": v.entity.mention, "type": v.entity.type, "reason": v.reason}
            for v in verdicts
            if not v.right
        ]
        row["missed"] = [{"mention": g.mention, "type": g.type} for g in missed]
    return row


def score_line(example: dict, verdicts: list[Verdict], missed: list) -> str:
    """One line per example: predictions right, gold found."""
    gold = len(example.get("gold") or [])
    right = sum(v.right for v in verdicts)
    return (
        f"{example.get('id') or example['image']}: {right} of {len(verdicts)} predictions "
        f"right, {right} of {gold} gold entities found"
    )


def _overview(images: list[Path], out: Path) -> None:
    """The panels side by side, top-aligned on a white ground (what README shows)."""
    from PIL import Image

    tiles = []
    for path in images:
        with Image.open(path) as im:
            tiles.append(im.convert("RGB"))
    gap = 12
    canvas = Image.new(
        "RGB",
        (sum(t.width for t in tiles) + gap * (len(tiles) - 1), max(t.height for t in tiles)),
        "white",
    )
    x = 0
    for tile in tiles:
        canvas.paste(tile, (x, 0))
        x += tile.width + gap
    canvas.save(out)


def run_examples(
    bundle: Path | None, examples: Path, out: Path, load: dict | None = None
) -> list[dict]:
    """Extract every example, write annotated images and ``results.json``; return the rows.
    ``load``: keyword arguments of :func:`gmner_rt.load` (provider, device_id, ...)."""
    listing = examples / "examples.jsonl"
    if not listing.is_file():
        raise InputError(f"{listing}: no examples (gmner demo --retrain --install writes them)")
    rows = [row for _, row in iter_json_objects(listing, "image, text (and gold)")]
    extractor = gmner_rt.load(bundle, **(load or {}))
    log.info("running on %s", extractor.provider)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for example in rows:
        image_path = examples / example["image"]
        extraction = extractor.extract(image_path, example["text"])
        golds = _gold_entities(example)
        verdicts, missed = judge(extraction, golds)
        annotated = out / f"{Path(example['image']).stem}_annotated.png"
        draw_panel(to_rgb(image_path), example["text"], verdicts, golds, missed, out=annotated)
        results.append(
            {**_report(example, extraction, verdicts, missed), "annotated": str(annotated)}
        )
        sys.stdout.write(f"\n== {example['text']}\n{format_table(extraction)}\n")
        if example.get("gold") is not None:
            sys.stdout.write(score_line(example, verdicts, missed) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    _overview([Path(r["annotated"]) for r in results], out / "overview.png")
    sys.stdout.write(
        readable_json([{k: r[k] for k in ("text", "records")} for r in results]) + "\n"
    )
    log.info("annotated images and results.json written to %s", out)
    return results


def run(args: argparse.Namespace) -> int:
    if args.retrain:
        from .demo_retrain import retrain

        result = retrain(
            args.work,
            seed=args.seed,
            epochs=args.epochs,
            install=DEFAULT_BUNDLE if args.install else None,
            examples=args.examples if args.install else None,
        )
        gmner = result.scores["gmner"]
        sys.stdout.write(
            f"demo model (seed {result.seed}): test GMNER F1 {gmner['f1']:.4f} "
            f"(P {gmner['precision']:.4f}, R {gmner['recall']:.4f}), MNER F1 "
            f"{result.scores['mner']['f1']:.4f}, EEG F1 {result.scores['eeg']['f1']:.4f}; "
            f"training {result.train_seconds:.0f} s; bundle {result.bundle}\n"
        )
        return 0
    run_examples(args.bundle, args.examples, args.out, load_options(args))
    return 0
