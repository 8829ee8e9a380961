"""``gmner export``: write a verified bundle; ``gmner export merge``: write a merged model.

Thin argument parsing over :func:`gmner.export.build.export_bundle` and
:func:`gmner.export.merge.merge`; every check lives there.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from gmner_rt.errors import InputError

log = logging.getLogger(__name__)

__all__ = ["add_arguments", "run"]

DTYPES = {"fp32": "float32", "fp16": "float16"}


def _model_flags(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument(
        "--model", type=Path, required=required, help="base Qwen2.5-VL directory (local)"
    )
    parser.add_argument(
        "--adapter",
        type=Path,
        default=None,
        help="LoRA adapter or fully fine-tuned checkpoint directory to merge in",
    )
    parser.add_argument("--out", type=Path, required=required, help="new output directory")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="fp32",
        help="weights and activations of the result (default fp32)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _model_flags(parser, required=False)
    parser.add_argument(
        "--max-image-tokens",
        type=int,
        default=None,
        help="cap the image tokens per image (sets the bundle's max_pixels)",
    )
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip the parity check against PyTorch (default: run it)",
    )
    parser.add_argument(
        "--exporter",
        choices=("torchscript", "dynamo"),
        default="torchscript",
        help="torch.onnx exporter (default torchscript: same graphs, faster)",
    )
    parser.add_argument("--name", default=None, help="model name recorded in the manifest")
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    merge = sub.add_parser(
        "merge",
        help="write base + adapter merged as a model directory",
        description="Write base + LoRA adapter merged (merge_and_unload, "
        "checked against the unmerged logits) as a Qwen2.5-VL directory.",
    )
    _model_flags(merge, required=True)


def _export(args: argparse.Namespace) -> int:
    from .build import BundleOptions, export_bundle
    from .onnx_export import ExportSettings

    missing = [
        flag for flag, value in (("--model", args.model), ("--out", args.out)) if value is None
    ]
    if missing:
        raise InputError(f"gmner export: {' and '.join(missing)} required")
    try:
        options = BundleOptions(
            model=args.model,
            adapter=args.adapter,
            out=args.out,
            settings=ExportSettings(dtype=DTYPES[args.dtype], exporter=args.exporter),
            max_image_tokens=args.max_image_tokens,
            verify=args.verify,
            name=args.name,
        )
    except ValueError as exc:
        raise InputError(f"gmner export: {exc}") from None
    export_bundle(options)
    log.info("wrote bundle %s", args.out)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.action == "merge":
        from .merge import merge

        merge(args.model, args.adapter, args.out, dtype=DTYPES[args.dtype])
        return 0
    return _export(args)
