"""``gmner train``: LoRA fine-tuning with the paper's recipe, one command, and the
reinforcement stage after it.

    gmner train --model QWEN_DIR --data TWITTER_GMNER_DIR --images IMG_DIR --cot cot.jsonl \
        --out runs/exp1 [--recipe reference] [--config run.yaml] [--resume] [--optim.lr 1e-4 ...]
    gmner train --stage grpo --grpo.init runs/exp1/best --out runs/exp1-grpo [--grpo.steps ...]

The grpo stage starts from the SFT checkpoint's saved configuration (model, data, prompt,
pixels, LoRA); --config and flags override it.

The short flags set leaves of the configuration tree (:mod:`gmner.train.config`); every leaf
also has its own ``--section.field`` flag.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from gmner_rt.cli_flags import add_path_list
from gmner_rt.errors import InputError

from .config import RECIPES, add_config_flags, checkpoint_config, config_from_args

log = logging.getLogger(__name__)

_SHORT = {
    "model": "model.path",
    "data": "data.dir",
    "images": "data.images",
    "cot": "data.cot",
    "out": "output.dir",
    "device": "model.device",
    "epochs": "optim.epochs",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = (
        "%(prog)s --model DIR --data DIR --images DIR --out DIR [--cot FILE] [--recipe NAME] "
        "[--config YAML] [--resume] [--section.field VALUE ...]  (all flags: --help)"
    )
    parser.add_argument(
        "--recipe",
        choices=RECIPES,
        help="start from a shipped recipe (reference: every setting of the E2E-GMNER "
        "reference's train_lora.sh); --config and flags override it; --print-config shows "
        "the result",
    )
    parser.add_argument("--config", help="YAML file with (part of) the configuration tree")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved configuration (recipe, --config and flags applied) as YAML "
        "and exit; the defaults below are those without a recipe",
    )
    parser.add_argument("--model", help="local Qwen2.5-VL directory (model.path)")
    parser.add_argument("--data", help="Twitter-GMNER folder (data.dir)")
    add_path_list(parser, "--images", help="image folder(s) (data.images)")
    parser.add_argument("--cot", help="reasoning JSONL from gmner cot (data.cot)")
    parser.add_argument("--no-cot", action="store_true", help="answer-only targets")
    parser.add_argument("--out", help="run folder (output.dir)")
    parser.add_argument("--device", help="auto, cuda, mps or cpu (model.device)")
    parser.add_argument("--epochs", type=int, help="optim.epochs")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the run's latest checkpoint"
    )
    add_config_flags(parser)


def run(args: argparse.Namespace) -> int:
    if args.images:  # the config tree holds the folders comma-separated
        args.images = ",".join(str(p) for p in args.images)
    else:
        args.images = None
    for short, dotted in _SHORT.items():
        value = getattr(args, short)
        if value is not None and getattr(args, f"cfg:{dotted}") is None:
            setattr(args, f"cfg:{dotted}", value)
    if args.no_cot:
        setattr(args, "cfg:data.use_cot", False)
    inherit = _inherited_config(args)
    try:
        cfg = config_from_args(args, args.config, args.recipe, inherit)
    except (ValueError, OSError) as exc:  # a bad value or YAML file: named, no traceback
        raise InputError(str(exc)) from None
    if args.print_config:
        import dataclasses
        import sys

        import yaml

        sys.stdout.write(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        return 0
    missing = [
        flag
        for flag, value in (
            ("--model", cfg.model.path),
            ("--data", cfg.data.dir),
            ("--images", cfg.data.images),
        )
        if not value
    ]
    if missing:
        raise InputError(
            f"gmner train needs {', '.join(missing)} (or model.path / data.dir / data.images "
            "in --config); see gmner train --help"
        )
    if cfg.stage == "grpo":
        return _run_grpo(cfg, args.resume)
    from .loop import train  # torch is imported only when training runs

    pos = train(cfg, resume=args.resume)
    run = Path(cfg.output.dir)
    if pos.best_step >= 0:
        log.info(
            "done: %d optimizer steps; best dev GMNER F1 %.4f (%s) at step %d, in %s",
            pos.step,
            pos.best_f1,
            cfg.eval.protocol,
            pos.best_step,
            run / "best",
        )
    else:
        log.info(
            "done: %d optimizer steps; no dev evaluation ran, so there is no best/ "
            "checkpoint; the last one is %s",
            pos.step,
            run / "checkpoints" / f"step-{pos.step:06d}",
        )
    return 0


def _inherited_config(args: argparse.Namespace) -> Path | None:
    """The grpo stage's starting configuration: its SFT checkpoint's ``config.yaml`` (None
    for an SFT run, or a checkpoint without one, such as a plain PEFT adapter)."""
    if getattr(args, "cfg:stage") != "grpo":
        return None
    if args.recipe:
        raise InputError(
            "--recipe: recipes are SFT settings; the grpo stage starts from the configuration "
            "saved with --grpo.init"
        )
    init = getattr(args, "cfg:grpo.init")
    if not init:
        raise InputError("--stage grpo needs --grpo.init SFT_CHECKPOINT (RUN/best or a step)")
    if not Path(init).is_dir():
        raise InputError(f"--grpo.init: {init} is not a checkpoint folder")
    found = checkpoint_config(init)
    if found is None:
        log.warning(
            "%s has no config.yaml (a plain PEFT adapter?): the model, prompt style, system "
            "prompt, reasoning switch and pixel bounds come from --config, flags and the "
            "defaults; give the ones it was trained with (--model, --data.prompt, "
            "--model.min_pixels / --model.max_pixels, --no-cot)",
            init,
        )
    return found


def _run_grpo(cfg, resume: bool) -> int:
    from .grpo import train_grpo  # torch and TRL are imported only when training runs

    result = train_grpo(cfg, resume=resume)
    best = (
        f"best dev GMNER F1 {result.best_f1:.4f} at step {result.best_step}, in "
        f"{Path(cfg.output.dir) / 'best'}"
        if result.best_step >= 0
        else "no dev evaluation ran (eval.enabled false), so there is no best/"
    )
    log.info("done: %d grpo steps; the last checkpoint is %s; %s", result.steps, result.last, best)
    return 0
