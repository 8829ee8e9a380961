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
from gmner_rt.draw import draw_entities
from gmner_rt.errors import InputError
from gmner_rt.extractor import DEFAULT_BUNDLE, Extraction
from gmner_rt.metrics import region_correct
from gmner_rt.predictions import iter_json_objects
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
        help="where results.json and the annotated images go",
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


def _matches(entity, gold: dict) -> bool:
    """Mention, type and region right (the GMNER rule for one pair)."""
    gold_boxes = tuple(tuple(b) for b in gold["boxes"]) if gold["boxes"] is not None else None
    return (entity.mention, entity.type) == (gold["mention"], gold["type"]) and region_correct(
        entity.boxes, gold_boxes
    )


def _report(example: dict, extraction: Extraction) -> dict:
    gold = example.get("gold")
    row = {
        "id": example.get("id"),
        "image": example["image"],
        "text": example["text"],
        **extraction.to_dict(),
    }
    if gold is not None:
        row["gold"] = gold
        row["correct"] = sum(any(_matches(e, g) for g in gold) for e in extraction.records)
    return row


def _overview(images: list[Path], out: Path, height: int = 320) -> None:
    """The annotated images side by side, scaled to one height (what README shows)."""
    from PIL import Image

    tiles = []
    for path in images:
        with Image.open(path) as im:
            width = max(1, round(im.width * height / im.height))
            tiles.append(im.convert("RGB").resize((width, height)))
    gap = 8
    canvas = Image.new(
        "RGB", (sum(t.width for t in tiles) + gap * (len(tiles) - 1), height), "white"
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
        annotated = out / f"{Path(example['image']).stem}_annotated.png"
        draw_entities(to_rgb(image_path), extraction.records, out=annotated)
        results.append({**_report(example, extraction), "annotated": str(annotated)})
        sys.stdout.write(f"\n== {example['text']}\n{format_table(extraction)}\n")
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
