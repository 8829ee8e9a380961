"""The ``gmner`` console command: one entry point, one subcommand per job.

Each subcommand lives in the package that does the work and is imported only when it runs,
so ``gmner extract`` on a device never imports torch. A subcommand module provides
``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from gmner_rt import GmnerError, __version__

log = logging.getLogger("gmner")

#: name -> (module, one-line help). Modules are imported on use only.
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("gmner.train.data_cli", "Twitter-GMNER data: statistics and training JSONL"),
    "eval": ("gmner.runtime.evaluate", "score predictions with the GMNER / MNER / EEG metrics"),
    "train": ("gmner.train.cli", "LoRA fine-tuning of Qwen2.5-VL with GRBP and CoT targets"),
    "tiny-model": (
        "gmner.train.tiny_model",
        "write a random-weight Qwen2.5-VL checkpoint with a local tokenizer",
    ),
    "cot": ("gmner.train.cot", "write teacher chain-of-thought for training tweets (OpenAI API)"),
    "demo": ("gmner.runtime.demo", "the embedded default model on shipped examples (--retrain)"),
    "export": ("gmner.export.cli", "merge, export ONNX graphs, verify parity, write a bundle"),
    "extract": (
        "gmner.runtime.extract",
        "extract grounded entities from an image and a text with a bundle",
    ),
    "bench": (
        "gmner.runtime.bench",
        "gmner_rt against HF transformers and onnxruntime-genai: latency, tokens/s, memory",
    ),
}


def register(name: str, module: str, help_text: str) -> None:
    """Add a subcommand (used by packages that grow the CLI)."""
    COMMANDS[name] = (module, help_text)


def _load(name: str):
    try:
        return importlib.import_module(COMMANDS[name][0])
    except ModuleNotFoundError as exc:
        raise SystemExit(
            f"gmner {name} needs the package {exc.name!r}, which is not installed; install "
            f"gmner with its extras, e.g. pip install 'gmner[train,export]'"
        ) from exc


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; only the ``selected`` subcommand's module is imported."""
    parser = argparse.ArgumentParser(
        prog="gmner",
        description="Grounded multimodal named entity recognition: data, training, export, "
        "extraction.",
    )
    parser.add_argument("--version", action="version", version=f"gmner {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == selected:
            _load(name).add_arguments(p)
    return parser


def _selected(argv: Sequence[str]) -> str | None:
    for arg in argv:
        if arg in COMMANDS:
            return arg
        if not arg.startswith("-"):
            return None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = _selected(argv)
    args = build_parser(selected).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(_load(args.command).run(args) or 0)
    except GmnerError as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
