"""``gmner eval``: score predictions against a Twitter-GMNER split.

``--pred FILE`` scores a JSONL of model outputs whose boxes are in original image pixels.
Checkpoints (``--model``) and bundles (``--bundle``) are scored by generating those outputs
first, in the packages that own the models.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from gmner_rt.data import load_split
from gmner_rt.errors import InputError
from gmner_rt.metrics import PROTOCOLS, EvalReport, evaluate
from gmner_rt.predictions import read_predictions

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="Twitter-GMNER folder")
    parser.add_argument("--split", default="test", help="split to score (default: test)")
    parser.add_argument("--pred", type=Path, help="JSONL of {img_id, output}, boxes in pixels")
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="hindex",
        help="hindex (default, design.md) or e2e (the E2E-GMNER reference)",
    )
    parser.add_argument("--json", type=Path, help="also write the scores as JSON here")
    ckpt = parser.add_argument_group("score a checkpoint (needs the train extra)")
    ckpt.add_argument("--model", type=Path, help="base Qwen2.5-VL directory")
    ckpt.add_argument("--adapter", type=Path, help="LoRA adapter (a run's best/ or a checkpoint)")
    ckpt.add_argument("--images", type=Path, action="append", help="image folder (repeatable)")
    ckpt.add_argument("--out", type=Path, help="where to write the predictions JSONL")
    ckpt.add_argument("--max-new-tokens", type=int, default=512)
    ckpt.add_argument("--device", default="auto")


def score_file(data: Path, split: str, pred: Path, protocol: str = "hindex") -> EvalReport:
    """Scores of a predictions file on one split."""
    gold = {t.img_id: t.records() for t in load_split(data, split)}
    outputs = read_predictions(pred)
    unknown = sorted(set(outputs) - set(gold))
    if unknown:
        raise InputError(
            f"{pred}: {len(unknown)} image id(s) not in the {split} split of {data}, "
            f"e.g. {', '.join(unknown[:3])}"
        )
    return evaluate(gold, outputs, protocol=protocol)


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
    rows.append(
        f"protocol {report.protocol}; {report.tweets} tweets, {report.missing} without a "
        f"prediction; {report.malformed} malformed segment(s)"
    )
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    if args.json and not args.json.parent.is_dir():
        raise InputError(f"--json {args.json}: folder {args.json.parent} does not exist")
    if args.model is not None:
        if args.pred is not None:
            raise InputError("give either --pred or --model, not both")
        if not args.images:
            raise InputError("--model needs --images IMGDIR")
        from gmner.train.evaluate import evaluate_checkpoint

        pred = args.out or Path(f"{args.split}_pred.jsonl")
        report = evaluate_checkpoint(
            args.model,
            args.adapter,
            args.data,
            args.split,
            args.images,
            pred_path=pred,
            protocol=args.protocol,
            max_new_tokens=args.max_new_tokens,
            device=args.device,
        )
        log.info("predictions written to %s", pred)
    elif args.pred is not None:
        report = score_file(args.data, args.split, args.pred, args.protocol)
    else:
        raise InputError("gmner eval needs --pred FILE or --model DIR [--adapter DIR]")
    sys.stdout.write(format_report(report) + "\n")
    if args.json:
        args.json.write_text(json.dumps(report.as_dict(), indent=2) + "\n", encoding="utf-8")
        log.info("scores written to %s", args.json)
    return 0
