"""The embedded default model, end to end: synthetic data -> training -> export -> evaluation.

``retrain(work)`` reproduces the bundle shipped in ``gmner_rt/models/default``: it writes the
synthetic task (:mod:`.synth`), builds a tiny Qwen2.5-VL (:mod:`.tiny_model`, preset
``demo``), trains it with the project's own trainer (full fine-tuning, vision tower included,
GRBP on, CoT targets from the synthetic ground truth), exports the last checkpoint with
``gmner export`` and scores the test split with ``gmner eval --bundle``. Every step is the
same code a real user runs; only the recipe below is the demo's. It can also refresh the
shipped example pairs.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["DEMO_RECIPE", "DemoResult", "demo_synth", "retrain", "write_examples"]

#: Training settings of the demo model (every other setting is the trainer's default).
DEMO_RECIPE: dict[str, object] = {
    "lora.enabled": False,
    "lora.train_vision": True,
    "model.min_pixels": 56 * 56,
    "model.max_pixels": 168 * 168,
    "model.device": "cpu",
    # a one-line instruction: the demo model is trained from scratch and reads nothing in the
    # wording, and the full one was 43 % of each training sequence (296 -> 169 tokens)
    "data.prompt": "compact",
    "optim.batch_size": 8,
    "optim.grad_accum": 1,
    # one pass over many tweets (DEMO_TRAIN): the same 3,000 steps learn more from fresh
    # images than from eight passes over 3,000 (dev GMNER F1, two trainer seeds each:
    # 98.3 / 90.3 against 80.3 / 66.7)
    "optim.epochs": 1,
    "optim.lr": 3e-3,
    # the tower is trained from scratch: at the full rate its output grows into a large
    # constant that carries nothing of the image, and the decoder learns to ignore it
    "optim.vision_lr_scale": 0.05,
    "optim.weight_decay": 0.01,
    # no dev evaluation between epochs: generation costs as much as an epoch of training
    # here; the exported bundle is scored on the test split at the end
    "eval.enabled": False,
}
#: Train-split tweets of the demo data (dev and test keep SynthConfig's 150), seen once each.
DEMO_TRAIN = 24000
#: Shipped example pairs: test-split tweets with at least this many entities.
EXAMPLE_COUNT = 4


@dataclass(frozen=True)
class DemoResult:
    """What ``retrain`` produced and measured."""

    bundle: Path
    scores: dict
    train_seconds: float
    seed: int


def _train(model: Path, data: Path, run: Path, epochs: int | None) -> Path:
    from .config import load_config
    from .loop import train

    overrides = {
        **DEMO_RECIPE,
        "model.path": str(model),
        "data.dir": str(data),
        "data.images": str(data / "images"),
        "data.cot": str(data / "cot.jsonl"),
        "output.dir": str(run),
    }
    if epochs is not None:
        overrides["optim.epochs"] = epochs
    train(load_config(None, overrides))
    return run / "checkpoints" / (run / "latest").read_text(encoding="utf-8").strip()


def _solved(tweets, predictions: Path | None) -> set[str]:
    """Ids of the tweets whose predictions are all right (GMNER) with every entity found."""
    if predictions is None:
        return set()
    from gmner_rt.metrics import evaluate
    from gmner_rt.predictions import read_predictions

    outputs = read_predictions(predictions)
    solved = set()
    for tweet in tweets:
        if tweet.img_id not in outputs:
            continue
        report = evaluate({tweet.img_id: tweet.records()}, {tweet.img_id: outputs[tweet.img_id]})
        g = report.gmner
        if g.correct == g.gold == g.predicted and report.malformed == 0:
            solved.add(tweet.img_id)
    return solved


def write_examples(
    data: Path, out: Path, count: int = EXAMPLE_COUNT, predictions: Path | None = None
) -> Path:
    """Copy ``count`` test-split pairs (image, text, gold records) to ``out/examples.jsonl``.

    The richest tweets come first (most grounded entities, then most entities). With the
    model's test ``predictions``, the first example is the richest tweet the model solved
    entirely (the regression test checks the shipped bundle still does), the rest the
    richest others, solved or not.
    """
    from gmner_rt.data import load_split

    out.mkdir(parents=True, exist_ok=True)
    tweets = load_split(data, "test")

    def richness(tweet):
        grounded = sum(1 for r in tweet.records() if r.boxes)
        return (-grounded, -len(tweet.entities), tweet.img_id)

    ranked = sorted(tweets, key=richness)
    solved = _solved(tweets, predictions)
    first = [t for t in ranked if t.img_id in solved][:1]
    chosen = first + [t for t in ranked if t not in first][: count - len(first)]
    rows = []
    for tweet in chosen:
        image = f"{tweet.img_id}.png"
        shutil.copyfile(data / "images" / image, out / image)
        gold = [
            {
                "mention": r.mention,
                "type": r.type,
                "boxes": [list(b) for b in r.boxes] if r.boxes else None,
            }
            for r in tweet.records()
        ]
        rows.append({"id": tweet.img_id, "image": image, "text": tweet.text, "gold": gold})
    for stale in out.glob("*.png"):
        if stale.name not in {r["image"] for r in rows}:
            stale.unlink()
    path = out / "examples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def demo_synth(seed: int, **sizes: int):
    """The demo's synthetic data settings: square 336 x 336 images, which the demo model sees
    at 168 x 168 (one coordinate scale to learn; 6 x 6 image tokens), glyphs in the cells of a
    3 x 3 grid that the reasoning names (each cell 2 x 2 image tokens), and a position wash
    that steps from cell to cell."""
    from .synth import SynthConfig

    sizes = {"train": DEMO_TRAIN, **sizes}
    return SynthConfig(seed=seed, min_side=336, max_side=336, grid=3, wash_cells=True, **sizes)


def retrain(
    work: Path,
    *,
    seed: int = 0,
    epochs: int | None = None,
    install: Path | None = None,
    examples: Path | None = None,
    sizes: dict[str, int] | None = None,
) -> DemoResult:
    """Data -> train -> export -> eval in ``work``; optionally install the bundle and examples.

    ``seed`` seeds the synthetic data and the model's initial weights; the trainer's own seed
    (shuffling, dropout, GRBP) stays its default, 42. ``sizes`` overrides the split sizes
    (``{"train": 16, ...}``, for tests).
    """
    from gmner.export.build import BundleOptions, export_bundle
    from gmner.runtime.evaluate import evaluate_bundle

    from .synth import write_synth
    from .tiny_model import build_tiny_model

    work.mkdir(parents=True, exist_ok=True)
    data, model, run, bundle = (work / n for n in ("data", "model", "run", "bundle"))
    for path in (data, model, run, bundle):
        shutil.rmtree(path, ignore_errors=True)
    write_synth(data, demo_synth(seed, **(sizes or {})))
    build_tiny_model(model, preset="demo", seed=seed)
    started = time.perf_counter()
    last = _train(model, data, run, epochs)
    train_seconds = time.perf_counter() - started
    export_bundle(BundleOptions(model=model, adapter=last, out=bundle, name="gmner-demo-tiny"))
    report = evaluate_bundle(
        bundle, data, "test", [data / "images"], pred_path=work / "test_pred.jsonl", batch_size=8
    )
    scores = report.as_dict()
    (work / "test_scores.json").write_text(json.dumps(scores, indent=2) + "\n", encoding="utf-8")
    log.info(
        "demo model: test GMNER F1 %.4f after %.0f s of training (seed %d)",
        report.gmner.f1,
        train_seconds,
        seed,
    )
    if install is not None:
        shutil.rmtree(install, ignore_errors=True)
        shutil.copytree(bundle, install)
    if examples is not None:
        write_examples(data, examples, predictions=work / "test_pred.jsonl")
    return DemoResult(bundle, scores, train_seconds, seed)
