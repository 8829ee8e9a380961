"""``gmner export``: write a verified bundle; ``gmner export merge``: write a merged model;
``gmner export quantize``: write an existing bundle with its decoder quantized; ``gmner export
engine``: build TensorRT engines for a bundle on the GPU that runs this.

Thin argument parsing over :func:`gmner.export.build.export_bundle`,
:func:`gmner.export.merge.merge`, :func:`gmner.export.quantized_bundle.quantize_bundle` and
:func:`gmner.export.engine.build_engines`;
every check lives there.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from gmner_rt.errors import InputError
from gmner_rt.prompt import PROMPT_STYLES

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


def _quant_flags(parser: argparse.ArgumentParser, *, required: bool) -> None:
    """Flags of :class:`gmner.export.quantize.QuantSettings`; None means its default."""
    parser.add_argument(
        "--quant",
        metavar="int8|int4",
        required=required,
        default=None,
        help="weight-only quantization of the decoder's MatMuls (onnxruntime MatMulNBits)"
        + ("" if required else "; default none"),
    )
    parser.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="weights per scale, a power of two >= 16 (default 32)",
    )
    parser.add_argument(
        "--quant-lm-head",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="quantize the LM head too (default on)",
    )
    parser.add_argument(
        "--accuracy-level",
        type=int,
        default=None,
        help="MatMulNBits CPU compute: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 (default 4)",
    )
    parser.add_argument(
        "--symmetric",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="scales only, no zero points (default on)",
    )


def _no_verify(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--no-verify", dest="verify", action="store_false", help=what)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _model_flags(parser, required=False)
    parser.add_argument(
        "--max-image-tokens",
        type=int,
        default=None,
        help="cap the image tokens per image (sets the bundle's max_pixels)",
    )
    _no_verify(parser, "skip the parity check against PyTorch and the quantized decoder's check")
    parser.add_argument(
        "--exporter",
        choices=("torchscript", "dynamo"),
        default="torchscript",
        help="torch.onnx exporter (default torchscript: same graphs, faster)",
    )
    parser.add_argument("--name", default=None, help="model name recorded in the manifest")
    parser.add_argument(
        "--prompt",
        choices=PROMPT_STYLES,
        default=None,
        help="prompt style written into the bundle (default: the one the checkpoint's "
        "config.yaml names; required for an adapter without one, such as one trained by the "
        "E2E-GMNER reference code: --prompt reference)",
    )
    parser.add_argument(
        "--system-prompt",
        default=None,
        help="system prompt written into the bundle (default: the checkpoint's, else the "
        "style's; the reference code's --system_prompt)",
    )
    _quant_flags(parser, required=False)
    sub = parser.add_subparsers(
        dest="action",
        metavar="ACTION",
        title="other actions (optional: without one, gmner export writes a bundle)",
    )
    merge = sub.add_parser(
        "merge",
        help="write base + adapter merged as a model directory",
        description="Write base + LoRA adapter merged (merge_and_unload, "
        "checked against the unmerged logits) as a Qwen2.5-VL directory.",
    )
    _model_flags(merge, required=True)
    quantize = sub.add_parser(
        "quantize",
        help="write an existing bundle with its decoder quantized (no torch, no re-export)",
        description="Copy an fp bundle with its decoder's MatMul weights quantized to int8 or "
        "int4 (onnxruntime MatMulNBits), measured against the fp decoder.",
    )
    quantize.add_argument("--bundle", type=Path, required=True, help="the fp bundle to quantize")
    quantize.add_argument("--out", type=Path, required=True, help="new output directory")
    _quant_flags(quantize, required=True)
    _no_verify(quantize, "skip the check of the quantized decoder against the fp one")
    upgrade = sub.add_parser(
        "upgrade",
        help="write a format-1 bundle as format 2 (speculation) without its checkpoint",
        description="Rewrite a format-1 bundle's decoder to return the logits of chosen "
        "positions (format 2, what speculation verifies drafts with), checked against the "
        "old decoder; weights untouched.",
    )
    upgrade.add_argument("--bundle", type=Path, required=True, help="the format-1 bundle")
    upgrade.add_argument("--out", type=Path, required=True, help="new output directory")
    trt_check = sub.add_parser(
        "trt-check",
        help="check that a bundle's graphs meet TensorRT's ONNX parser (CPU only)",
        description="Read a bundle's graph protos and list every reason TensorRT 10's ONNX "
        "parser would refuse them (operators, contrib domains, control flow, constant inputs, "
        "input ranks and types); exit 1 when there is one.",
    )
    trt_check.add_argument("--bundle", type=Path, required=True, help="the bundle to check")
    _engine_parser(sub)
    # set last: the actions' own usage lines are built from the usage at the time
    parser.usage = (
        "%(prog)s --model DIR [--adapter DIR] --out DIR [options]   (export a bundle)\n"
        "       %(prog)s {merge,quantize,upgrade,trt-check,engine} ...  (other actions; "
        "%(prog)s ACTION --help)"
    )


def _engine_parser(sub) -> None:
    engine = sub.add_parser(
        "engine",
        help="build TensorRT engines for a bundle on this GPU (onnxruntime's TensorRT EP)",
        description="Build TensorRT engines for the bundle's three graphs on the GPU this runs "
        "on, through onnxruntime's TensorRT execution provider, with optimization profiles "
        "from the bundle and the limits below; store them as EP-context models in "
        "BUNDLE/engines/NAME/ and record them in the manifest. The runtime uses them only on "
        "the same GPU architecture with the same TensorRT and onnxruntime versions.",
    )
    engine.add_argument("--bundle", type=Path, required=True, help="the fp16 or fp32 bundle")
    engine.add_argument("--max-batch", type=int, help="pairs decoded together (default 1)")
    engine.add_argument(
        "--max-context",
        type=int,
        help="prompt + image tokens + new tokens per row (default: the image tokens + 512 + "
        "the bundle's generation budget)",
    )
    engine.add_argument(
        "--max-image-tokens",
        type=int,
        help="merged image tokens per image (default: all the bundle's max_pixels gives)",
    )
    engine.add_argument("--device-id", type=int, default=0, help="CUDA device (default 0)")
    engine.add_argument(
        "--precision",
        choices=("fp16", "fp32"),
        help="TensorRT kernels (default: fp16 for an fp16 bundle, else fp32)",
    )
    engine.add_argument(
        "--check-tokens",
        type=int,
        default=16,
        help="greedy tokens compared with the CPU graphs after the build, 0: none (default 16)",
    )
    engine.add_argument("--replace", action="store_true", help="replace a set of the same name")
    engine.add_argument(
        "--dry-run",
        action="store_true",
        help="print the set's name, limits and provider options as JSON; build nothing",
    )


_QUANT_FLAGS = {
    "block_size": "--block-size",
    "quant_lm_head": "--quant-lm-head",
    "accuracy_level": "--accuracy-level",
    "symmetric": "--symmetric",
}


def _quant_settings(args: argparse.Namespace):
    """The QuantSettings the flags ask for, or None without ``--quant``."""
    from .quantize import QuantSettings

    given = {key: getattr(args, key) for key in _QUANT_FLAGS if getattr(args, key) is not None}
    if args.quant is None:
        if given:
            raise ValueError(f"{_QUANT_FLAGS[next(iter(given))]}: needs --quant int8|int4")
        return None
    return QuantSettings(scheme=args.quant, **given)


def _export(args: argparse.Namespace) -> int:
    from .build import BundleOptions, export_bundle, resolve_prompt
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
            quant=_quant_settings(args),
            max_image_tokens=args.max_image_tokens,
            verify=args.verify,
            name=args.name,
            prompt=args.prompt,
            system_prompt=args.system_prompt,
        )
        resolve_prompt(options)  # an adapter whose prompt style is unknown: before any work
    except ValueError as exc:
        raise InputError(f"gmner export: {exc}") from None
    export_bundle(options)
    log.info("wrote bundle %s", args.out)
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from .quantized_bundle import quantize_bundle

    try:
        settings = _quant_settings(args)
    except ValueError as exc:
        raise InputError(f"gmner export quantize: {exc}") from None
    quantize_bundle(args.bundle, args.out, settings, verify=args.verify)
    return 0


def _trt_check(args: argparse.Namespace) -> int:
    from .tensorrt_ready import bundle_problems

    problems = bundle_problems(args.bundle)
    for problem in problems:
        log.error("not TensorRT-ready: %s", problem)
    if problems:
        log.error("%s: %d problem(s) for TensorRT's parser", args.bundle, len(problems))
        return 1
    log.info("%s: every graph meets TensorRT's parser requirements", args.bundle)
    return 0


def _engine(args: argparse.Namespace) -> int:
    import json
    import sys

    from .engine import EngineBuild, build_engines, describe

    config = EngineBuild(
        bundle=args.bundle,
        max_batch=args.max_batch,
        max_context=args.max_context,
        max_image_tokens=args.max_image_tokens,
        device_id=args.device_id,
        precision=args.precision,
        replace=args.replace,
        check_tokens=args.check_tokens,
    )
    if args.dry_run:
        sys.stdout.write(json.dumps(describe(config), indent=2) + "\n")
        return 0
    build_engines(config)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.action == "engine":
        return _engine(args)
    if args.action == "quantize":
        return _quantize(args)
    if args.action == "upgrade":
        from .upgrade import upgrade_bundle

        upgrade_bundle(args.bundle, args.out)
        return 0
    if args.action == "trt-check":
        return _trt_check(args)
    if args.action == "merge":
        from .merge import merge

        merge(args.model, args.adapter, args.out, dtype=DTYPES[args.dtype])
        return 0
    return _export(args)
