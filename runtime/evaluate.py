"""``gmner eval``: score predictions against a Twitter-GMNER split.

``--pred FILE`` scores a JSONL of model outputs whose boxes are in original image pixels.
Checkpoints (``--model``) and bundles (``--bundle``) are scored by generating those outputs
first and writing them in that format: a checkpoint in :mod:`gmner.train.evaluate` (torch), a
bundle here with :mod:`gmner_rt` alone (no torch, no transformers).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gmner_rt import progress
from gmner_rt.cli_flags import add_path_list
from gmner_rt.data import Tweet, find_image, load_split
from gmner_rt.errors import DataError, InputError
from gmner_rt.extractor import Extraction
from gmner_rt.metrics import PROTOCOLS, EvalReport, evaluate
from gmner_rt.predictions import (
    ModelText,
    read_predictions_and_texts,
    write_predictions,
)
from gmner_rt.records import NO_ENTITY, RECORD_SEPARATOR, EntityRecord, format_record

from .extract import (
    add_decoding_arguments,
    add_provider_arguments,
    decoding_options,
    load_extractor,
    load_options,
    positive_int,
)

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="Twitter-GMNER folder")
    parser.add_argument("--split", default="test", help="split to score (default: test)")
    parser.add_argument("--pred", type=Path, help="JSONL of {img_id, output}, boxes in pixels")
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="hindex",
        help="hindex (default: the H-Index rule, README 'Metrics') or e2e (the E2E-GMNER "
        "reference's evaluator, on the raw model-space text)",
    )
    parser.add_argument("--json", type=Path, help="also write the scores as JSON here")
    gen = parser.add_argument_group("generate, then score (--model or --bundle)")
    add_path_list(gen, "--images", help="image folder(s)")
    gen.add_argument(
        "--out", type=Path, help="where to write the predictions (default: SPLIT_pred.jsonl)"
    )
    gen.add_argument("--batch-size", type=positive_int, default=4, help="default 4")
    ckpt = parser.add_argument_group("score a checkpoint (needs the train extra)")
    ckpt.add_argument("--model", type=Path, help="base Qwen2.5-VL directory")
    ckpt.add_argument("--adapter", type=Path, help="LoRA adapter (a run's best/ or a checkpoint)")
    ckpt.add_argument(
        "--device", default="auto", help="torch device of the checkpoint: auto, cpu, cuda[:N]"
    )
    bundle = parser.add_argument_group("score an exported bundle (gmner_rt only, no torch)")
    bundle.add_argument("--bundle", type=Path, help="bundle folder written by gmner export")
    bundle.add_argument(
        "--limit", type=positive_int, help="score only the first N tweets of the split"
    )
    bundle.add_argument(
        "--skip-missing-images",
        action="store_true",
        help="leave out (of predictions and gold) tweets whose image is missing",
    )
    add_decoding_arguments(parser)
    add_provider_arguments(parser)


def score_file(data: Path, split: str, pred: Path, protocol: str = "hindex") -> EvalReport:
    """Scores of a predictions file on one split."""
    gold = {t.img_id: t.records() for t in load_split(data, split)}
    outputs, texts = read_predictions_and_texts(pred, with_texts=protocol == "e2e")
    unknown = sorted(set(outputs) - set(gold))
    if unknown:
        raise InputError(
            f"{pred}: {len(unknown)} image id(s) not in the {split} split of {data}, "
            f"e.g. {', '.join(unknown[:3])}"
        )
    if protocol != "e2e":
        return evaluate(gold, outputs, protocol=protocol)
    lacking = sorted(set(outputs) - set(texts))
    if lacking:
        raise InputError(
            f"{pred}: --protocol e2e scores the text as the model generated it (fields raw, "
            f"image_size, model_size), and {len(lacking)} row(s) lack it, e.g. "
            f"{', '.join(lacking[:3])}; files written by gmner eval --bundle/--model and by "
            "training carry it; use --protocol hindex for this file"
        )
    return evaluate(gold, outputs, protocol=protocol, model_texts=texts)


def format_report(report: EvalReport) -> str:
    """A plain-text table of the scores."""
    rows = [f"{'task':<8}{'P':>8}{'R':>8}{'F1':>8}{'correct':>9}{'pred':>7}{'gold':>7}"]
    for name in ("gmner", "mner", "eeg"):
        c = getattr(report, name)
        rows.append(
            f"{name.upper():<8}{100 * c.precision:>8.2f}{100 * c.recall:>8.2f}"
            f"{100 * c.f1:>8.2f}{c.correct:>9}{c.predicted:>7}{c.gold:>7}"
        )
    for etype, tasks in sorted(report.by_type.items()):
        g, m = tasks["gmner"], tasks["mner"]
        rows.append(
            f"  {etype:<6} GMNER F1 {100 * g.f1:6.2f}  MNER F1 {100 * m.f1:6.2f}"
            f"  (gold {g.gold}, pred {g.predicted})"
        )
    dropped = f", {report.dropped} dropped by the protocol" if report.dropped else ""
    rows.append(
        f"protocol {report.protocol}; {report.tweets} tweets{dropped}, {report.missing} "
        f"without a prediction; {report.malformed} malformed segment(s)"
    )
    return "\n".join(rows)


def prediction_output(extraction: Extraction) -> str:
    """An extraction as a predictions-file output, boxes in original pixels (already so).

    Its records, then its malformed segments as written (so they still count as wrong
    predictions), and its reasoning: what :func:`gmner_rt.answers.answer_to_original` writes
    for a checkpoint's text.
    """
    records = [EntityRecord(e.mention, e.type, e.boxes) for e in extraction.records]
    parts = [format_record(r) for r in records] + list(extraction.malformed)
    answer = f"<answer>{RECORD_SEPARATOR.join(parts) if parts else NO_ENTITY}</answer>"
    return answer if extraction.think is None else f"<think>{extraction.think}</think>{answer}"


def tweet_images(
    tweets: list[Tweet], images: list[Path], *, skip_missing: bool
) -> list[tuple[Tweet, Path]]:
    """Each tweet with its image file; a missing one is an error, or left out (logged)."""
    found, missing = [], []
    for tweet in tweets:
        path = find_image(images, tweet.img_id)
        if path is not None:
            found.append((tweet, path))
        elif skip_missing:
            missing.append(tweet.img_id)
        else:
            folders = ", ".join(str(d) for d in images)
            raise DataError(
                f"tweet {tweet.img_id}: no image {tweet.img_id}.jpg (or .png, ...) in {folders}; "
                "pass --skip-missing-images to leave such tweets out"
            )
    if missing:
        log.warning(
            "%d tweet(s) left out, their image is missing: %s%s",
            len(missing),
            ", ".join(missing[:5]),
            ", ..." if len(missing) > 5 else "",
        )
    return found


def evaluate_bundle(
    bundle: Path,
    data: Path,
    split: str,
    images: list[Path],
    *,
    pred_path: Path,
    protocol: str = "hindex",
    limit: int | None = None,
    batch_size: int = 4,
    skip_missing_images: bool = False,
    decoding: Mapping[str, Any] | None = None,
    load: Mapping[str, Any] | None = None,
) -> EvalReport:
    """Generate with a bundle on (the first ``limit`` tweets of) a split, write the predictions
    to ``pred_path`` and score them against the tweets that were run. ``decoding``: keyword
    arguments of :meth:`gmner_rt.Extractor.extract_batch` (think, constrained, ...);
    ``load``: those of :func:`gmner_rt.load` (provider, provider_options, device_id, threads)."""
    tweets = load_split(data, split)[:limit]
    pairs = tweet_images(tweets, images, skip_missing=skip_missing_images)
    extractor = load_extractor(bundle, **(load or {}))
    outputs: dict[str, str] = {}
    texts: dict[str, ModelText] = {}
    with progress.Progress(len(pairs), f"eval {split}", "tweet") as bar:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            results = extractor.extract_batch(
                [(path, tweet.text) for tweet, path in chunk], **(decoding or {})
            )
            for (tweet, _), extraction in zip(chunk, results, strict=True):
                outputs[tweet.img_id] = prediction_output(extraction)
                texts[tweet.img_id] = ModelText(
                    extraction.raw, extraction.image_size, extraction.model_size
                )
            bar.update(len(chunk))
    write_predictions(pred_path, outputs, model_texts=texts)
    gold = {tweet.img_id: tweet.records() for tweet, _ in pairs}
    return evaluate(gold, outputs, protocol=protocol, model_texts=texts)


def _check_mode(args: argparse.Namespace) -> str:
    modes = [m for m in ("pred", "model", "bundle") if getattr(args, m) is not None]
    if len(modes) != 1:
        given = f" (got {', '.join('--' + m for m in modes)})" if modes else ""
        raise InputError(
            f"gmner eval needs exactly one of --pred FILE, --model DIR [--adapter DIR] or "
            f"--bundle DIR{given}"
        )
    mode = modes[0]
    if mode != "bundle":
        for flag in ("limit", "threads", "provider"):
            if getattr(args, flag) is not None:
                raise InputError(f"--{flag} applies to --bundle only")
        if args.provider_option or args.device_id:
            raise InputError("--provider-option / --device-id apply to --bundle only")
        if args.skip_missing_images:
            raise InputError("--skip-missing-images applies to --bundle only")
        decoding = {
            "--think": args.think != "auto",
            "--think-budget": args.think_budget is not None,
            "--unconstrained": args.unconstrained,
            "--no-jump-forward": args.no_jump_forward,
            "--speculate": args.speculate,
        }
        for flag, given in decoding.items():
            if given:
                raise InputError(f"{flag} applies to --bundle only")
    if mode != "pred":
        if not args.images:
            raise InputError(f"--{mode} needs --images IMGDIR")
        missing = [str(d) for d in args.images if not d.is_dir()]
        if missing:
            raise InputError(f"--images: folder not found: {', '.join(missing)}")
    return mode


def run(args: argparse.Namespace) -> int:
    if args.json and not args.json.parent.is_dir():
        raise InputError(f"--json {args.json}: folder {args.json.parent} does not exist")
    mode = _check_mode(args)
    pred = args.out or Path(f"{args.split}_pred.jsonl")
    if mode != "pred" and not pred.parent.is_dir():
        raise InputError(f"--out {pred}: folder {pred.parent} does not exist")
    if mode != "pred" and pred.exists():
        log.warning("%s exists and will be replaced by this run's predictions", pred)
    if mode == "model":
        from gmner.train.evaluate import evaluate_checkpoint

        report = evaluate_checkpoint(
            args.model,
            args.adapter,
            args.data,
            args.split,
            args.images,
            pred_path=pred,
            protocol=args.protocol,
            max_new_tokens=args.max_new_tokens or 512,
            batch_size=args.batch_size,
            device=args.device,
        )
    elif mode == "bundle":
        report = evaluate_bundle(
            args.bundle,
            args.data,
            args.split,
            args.images,
            pred_path=pred,
            protocol=args.protocol,
            limit=args.limit,
            batch_size=args.batch_size,
            decoding=decoding_options(args),
            skip_missing_images=args.skip_missing_images,
            load=load_options(args),
        )
    else:
        report = score_file(args.data, args.split, args.pred, args.protocol)
    if mode != "pred":
        log.info("predictions written to %s", pred)
    sys.stdout.write(format_report(report) + "\n")
    if args.json:
        args.json.write_text(json.dumps(report.as_dict(), indent=2) + "\n", encoding="utf-8")
        log.info("scores written to %s", args.json)
    return 0
