"""The ``gmner`` console command: one entry point, one subcommand per job.

Each subcommand lives in the package that does the work and is imported only when it runs,
so ``gmner extract`` on a device never imports torch. A subcommand module provides
``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import sys
from collections.abc import Sequence

from gmner_rt import GmnerError, __version__, progress

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
    "serve": (
        "gmner.runtime.serve",
        "serve a bundle over HTTP (POST /v1/extract) with dynamic batching",
    ),
    "time": (
        "gmner.runtime.timing",
        "time a bundle with gmner_rt alone: time to first token, decode tokens/s, latency",
    ),
}
#: Packages above this layer add commands through this entry-point group (gmner-bench adds
#: ``bench``), so the command line never imports upwards.
ENTRY_POINTS = "gmner.commands"
#: Commands that come from the gmner-bench package (bench/) when it is installed.
BENCH_COMMANDS = ("bench",)


def _discover() -> None:
    """Adds the commands that installed packages register under :data:`ENTRY_POINTS`."""
    for entry in importlib.metadata.entry_points(group=ENTRY_POINTS):
        COMMANDS.setdefault(entry.name, (entry.value, f"from the {entry.dist.name} package"))


_discover()


def register(name: str, module: str, help_text: str) -> None:
    """Add a subcommand (used by packages that grow the CLI)."""
    COMMANDS[name] = (module, help_text)


def _load(name: str):
    try:
        return importlib.import_module(COMMANDS[name][0])
    except ModuleNotFoundError as exc:
        raise SystemExit(missing_message(name, exc.name)) from exc


#: A package a command may miss -> what brings it (gmner's extras, or the gmner-bench package).
_EXTRA_OF = {
    "torch": "[train]",
    "transformers": "[train]",
    "peft": "[train]",
    "accelerate": "[train]",
    "safetensors": "[train]",
    "tqdm": "[train]",
    "yaml": "[train] or [export]",
    "onnx": "[export]",
    "onnxscript": "[export]",
    "onnx_ir": "[export]",
    "onnxruntime": "[cpu] or [gpu]",
    "onnxruntime_genai": "the gmner-bench package (./bench)",
    "matplotlib": "the gmner-bench package (./bench)",
    "starlette": "[serve]",
    "uvicorn": "[serve]",
    "multipart": "[serve]",
    "python_multipart": "[serve]",
    "ray": "[ray]",
    "pyarrow": "[ray]",
    "pandas": "[ray]",
}


def missing_message(command: str, module: str | None) -> str:
    """What to install when ``gmner command`` misses the package ``module``."""
    root = (module or "").split(".")[0]
    extra = _EXTRA_OF.get(root, "[cpu,train,export]")
    how = (
        "pip install ./bench from gmner's source folder"
        if extra.startswith("the gmner-bench")
        else f"pip install '.{extra.split(' or ')[0]}' from gmner's source folder"
    )
    return (
        f"gmner {command} needs the package {root!r}, which is not installed: it comes with "
        f"{extra if extra.startswith('the') else 'gmner' + extra.replace(' or ', ' or gmner')}; "
        f"{how}"
    )


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; only the ``selected`` subcommand's module is imported."""
    parser = argparse.ArgumentParser(
        prog="gmner",
        description="Grounded multimodal named entity recognition: data, training, export, "
        "extraction.",
    )
    parser.add_argument("--version", action="version", version=f"gmner {__version__}")
    _verbosity(parser, argparse.SUPPRESS)
    parser.set_defaults(verbose=False, quiet=False)
    # the same flags on every command, so they work anywhere on the line (SUPPRESS: a
    # command's default never overwrites what was given before the command's name)
    common = argparse.ArgumentParser(add_help=False)
    _verbosity(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        if name == selected:
            _load(name).add_arguments(p)
            _verbosity_on_actions(p)
    return parser


def _verbosity_on_actions(parser: argparse.ArgumentParser) -> None:
    """-v/-q on a command's own actions too (``gmner data stats DIR -v``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for nested in action.choices.values():
                if "--verbose" not in nested._option_string_actions:
                    _verbosity(nested, argparse.SUPPRESS)
                _verbosity_on_actions(nested)


def _verbosity(parser: argparse.ArgumentParser, default: object) -> None:
    group = parser.add_argument_group("output")
    group.add_argument(
        "-v", "--verbose", action="store_true", default=default, help="debug logging"
    )
    group.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default,
        help="warnings and errors only, no progress bars",
    )


def _selected(argv: Sequence[str]) -> str | None:
    for arg in argv:
        if arg in COMMANDS:
            return arg
        if not arg.startswith("-"):
            return None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    if first in BENCH_COMMANDS and first not in COMMANDS:
        sys.stderr.write(
            f"gmner {first} is in the gmner-bench package, kept out of the runtime's install; "
            "from a checkout of gmner: pip install ./bench (scripts/dev.sh setup does)\n"
        )
        return 2
    selected = _selected(argv)
    parser = build_parser(selected)
    args = parser.parse_args(argv)
    if args.verbose and args.quiet:
        parser.error("-v/--verbose and -q/--quiet exclude each other")
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:  # gmner's own debug lines, not every library's (PIL's PNG chunks)
        for noisy in ("PIL", "urllib3", "filelock", "fsspec", "asyncio"):
            logging.getLogger(noisy).setLevel(logging.INFO)
    progress.configure(enabled=not args.quiet)
    try:
        return int(_load(args.command).run(args) or 0)
    except GmnerError as exc:
        log.error("%s", exc)
        return 2
    except ModuleNotFoundError as exc:  # a lazily imported extra (torch for --retrain, onnx, ...)
        if exc.name is None or exc.name.split(".")[0] not in _EXTRA_OF:
            raise
        log.error("%s", missing_message(args.command, exc.name))
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
