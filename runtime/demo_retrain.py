"""``gmner demo --retrain``: the embedded default model, end to end: synthetic data ->
training -> export -> evaluation.

``retrain(work)`` reproduces the bundle shipped in ``gmner_rt/models/default``: it writes the
synthetic task (:mod:`gmner.train.synth`), builds a tiny Qwen2.5-VL
(:mod:`gmner.train.tiny_model`, preset ``demo``), trains it with the project's own trainer
and the demo's recipe (:mod:`gmner.train.demo_recipe`: full fine-tuning, vision tower
included, GRBP on, CoT targets from the synthetic ground truth), exports the last checkpoint
with ``gmner export`` and scores the test split with ``gmner eval --bundle``. Every step is
the same code a real user runs. It can also refresh the shipped example pairs. A pipeline
that chains the layers, so it lives in the top one.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["DemoResult", "retrain"]


@dataclass(frozen=True)
class DemoResult:
    """What ``retrain`` produced and measured."""

    bundle: Path
    scores: dict
    train_seconds: float
    seed: int


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
    from gmner.train.demo_recipe import demo_synth, train_demo, write_examples
    from gmner.train.synth import write_synth
    from gmner.train.tiny_model import build_tiny_model

    from .evaluate import evaluate_bundle

    work.mkdir(parents=True, exist_ok=True)
    data, model, run, bundle = (work / n for n in ("data", "model", "run", "bundle"))
    for path in (data, model, run, bundle):
        shutil.rmtree(path, ignore_errors=True)
    log.info("demo retrain 1/4: the synthetic task (seed %d) in %s", seed, data)
    write_synth(data, demo_synth(seed, **(sizes or {})))
    build_tiny_model(model, preset="demo", seed=seed)
    log.info("demo retrain 2/4: training (about 11 minutes on 2 cores) in %s", run)
    started = time.perf_counter()
    last = train_demo(model, data, run, epochs)
    train_seconds = time.perf_counter() - started
    log.info("demo retrain 3/4: export to %s", bundle)
    export_bundle(BundleOptions(model=model, adapter=last, out=bundle, name="gmner-demo-tiny"))
    log.info("demo retrain 4/4: scoring the test split")
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
        write_examples(data, examples)
    return DemoResult(bundle, scores, train_seconds, seed)
