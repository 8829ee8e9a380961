"""``gmner extract``: grounded entities of one (image, text) pair, or of a JSONL batch.

    gmner extract --image photo.jpg --text "Alice visits Paris"            # a table
    gmner extract --bundle B --image photo.jpg --text-file t.txt --json     # Extraction JSON
    gmner extract --bundle B --image photo.jpg --text "..." --draw out.png  # boxes drawn
    gmner extract --bundle B --batch pairs.jsonl --batch-size 8             # one JSON line each
    gmner extract --provider cuda --image photo.jpg --text "..."            # on the GPU
    gmner extract --batch pairs.jsonl --out preds.jsonl [--ray --workers 4] # a corpus, resumable

What it prints is the program's output (stdout); diagnostics go to logging (stderr). Only
gmner_rt is used: no torch, no transformers.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import gmner_rt
from gmner_rt.errors import BundleError, InputError
from gmner_rt.extractor import Extraction, Extractor
from gmner_rt.images import image_size
from gmner_rt.predictions import iter_json_objects
from gmner_rt.providers import ENV_PROVIDER, PROVIDERS

log = logging.getLogger(__name__)

_TIMING_STAGES = ("preprocess", "vision", "prefill", "decode", "total")


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {number}")
    return number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bundle", type=Path, help="exported bundle folder (default: the embedded default)"
    )
    parser.add_argument("--image", type=Path, help="image file")
    text = parser.add_mutually_exclusive_group()
    text.add_argument("--text", help="the text (tweet)")
    text.add_argument("--text-file", type=Path, help="read the text from this UTF-8 file")
    parser.add_argument(
        "--batch",
        type=Path,
        help='JSONL of {"image": path, "text": ...} (paths relative to the JSONL\'s folder); '
        "prints one JSON line per pair, the input's fields plus the extraction's",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=4, help="pairs per batch (default 4)"
    )
    corpus = parser.add_argument_group(
        "corpus scale (--batch with --out; rows need an id)",
        "write the predictions JSONL that gmner eval --pred reads; a rerun skips ids already "
        "written; a row whose image or text is unusable becomes an error record",
    )
    corpus.add_argument("--out", type=Path, help="predictions JSONL to write (appended to)")
    corpus.add_argument(
        "--ray",
        action="store_true",
        help="run on Ray Data, one extractor actor per worker ([ray] extra); RAY_ADDRESS or "
        "--ray-address joins a cluster, else a local instance starts",
    )
    corpus.add_argument(
        "--workers", type=positive_int, help="Ray actors, each loading the bundle once (default 2)"
    )
    corpus.add_argument("--ray-address", help="the Ray cluster to join (default: $RAY_ADDRESS)")
    parser.add_argument("--json", action="store_true", help="print the extraction as JSON")
    parser.add_argument("--draw", type=Path, help="write the image with the boxes drawn here")
    add_decoding_arguments(parser)
    add_provider_arguments(parser)


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that choose how a bundle decodes (see :meth:`gmner_rt.Extractor.extract`)."""
    group = parser.add_argument_group("decoding")
    group.add_argument(
        "--think",
        choices=("on", "off", "auto"),
        default="auto",
        help="on: reason first; off: the answer-only prompt, answer at once; auto (default): "
        "the model chooses",
    )
    group.add_argument(
        "--think-budget", type=positive_int, help="close the reasoning after N tokens"
    )
    group.add_argument(
        "--unconstrained",
        action="store_true",
        help="decode without the record grammar (records that do not parse are reported)",
    )
    group.add_argument(
        "--no-jump-forward",
        action="store_true",
        help="feed the text the grammar forces one token per step",
    )
    group.add_argument(
        "--speculate",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="draft tokens by prompt lookup and verify them in one decoder call (same tokens; "
        "off by default: slower than plain decoding on the demo model, docs/benchmarks.md)",
    )
    group.add_argument(
        "--max-new-tokens", type=positive_int, help="generation limit (default: the bundle's)"
    )


def add_provider_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that choose where a bundle runs (see :func:`gmner_rt.load`)."""
    group = parser.add_argument_group("execution provider")
    group.add_argument(
        "--provider",
        type=str.lower,
        choices=PROVIDERS,
        default=None,
        help="auto: CUDA when onnxruntime has it, else the CPU (TensorRT when the bundle has "
        f"engines for this GPU); default: ${ENV_PROVIDER}, else auto",
    )
    group.add_argument(
        "--provider-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an onnxruntime option of that provider (repeatable), e.g. gpu_mem_limit=4000000000",
    )
    group.add_argument(
        "--device-id", type=int, default=0, help="CUDA device for cuda / tensorrt (default 0)"
    )
    group.add_argument("--threads", type=positive_int, help="onnxruntime intra-op threads")


def provider_options(values: Sequence[str]) -> dict[str, str]:
    """``--provider-option KEY=VALUE`` flags as a dict."""
    options = {}
    for value in values:
        key, sep, setting = value.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--provider-option: expected KEY=VALUE, got {value!r}")
        options[key.strip()] = setting.strip()
    return options


def load_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of :func:`gmner_rt.load` that the provider flags set."""
    if args.device_id < 0:
        raise InputError(f"--device-id: expected a non-negative integer, got {args.device_id}")
    return {
        "provider": args.provider,
        "provider_options": provider_options(args.provider_option),
        "device_id": args.device_id,
        "threads": args.threads,
    }


def decoding_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of ``extract`` / ``extract_batch`` that the decoding flags set."""
    if args.unconstrained and args.think_budget is not None:
        raise InputError("--think-budget needs the grammar; drop --unconstrained")
    return {
        "think": args.think,
        "think_budget": args.think_budget,
        "constrained": not args.unconstrained,
        "jump_forward": not args.no_jump_forward,
        "max_new_tokens": args.max_new_tokens,
        "speculate": args.speculate,
    }


def load_extractor(bundle: Path | None, **options) -> Extractor:
    """``gmner_rt.load(bundle, **options)`` with a clear error for a bundle folder that does
    not exist (``options``: :func:`load_options`)."""
    if bundle is not None and not bundle.is_dir():
        raise BundleError(f"--bundle {bundle}: folder not found")
    started = time.perf_counter()
    extractor = gmner_rt.load(bundle, **options)
    log.info(
        "bundle loaded in %.2f s, running on %s", time.perf_counter() - started, extractor.provider
    )
    return extractor


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


#: A list of numbers as ``json.dumps(indent=2)`` lays it out, one per line (strings never
#: hold a raw newline, so text that looks like a list is never matched).
_NUMBER_LIST = re.compile(r"\[\n\s*(-?[\d.eE+-]+(?:,\n\s*-?[\d.eE+-]+)*)\n\s*\]")


def readable_json(data) -> str:
    """JSON indented by key, with lists of numbers (boxes, spans, token ids) on one line."""
    text = json.dumps(data, ensure_ascii=False, indent=2)
    return _NUMBER_LIST.sub(
        lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text
    )


def _boxes(boxes) -> str:
    if boxes is None:
        return "None"
    return " ".join("[" + ",".join(str(v) for v in box) + "]" for box in boxes)


def _spans(spans) -> str:
    return " ".join(f"{start}-{end}" for start, end in spans) or "-"


def format_table(extraction: Extraction) -> str:
    """A readable report: one row per entity, then reasoning, malformed segments, timings."""
    rows = [("mention", "type", "boxes", "spans")]
    rows += [(e.mention, e.type, _boxes(e.boxes), _spans(e.spans)) for e in extraction.records]
    widths = [max(len(row[k]) for row in rows) for k in range(3)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)) + "  " + row[3]
        for row in rows
    ]
    if not extraction.records:
        lines.append("(no entities)")
    if extraction.think is not None:
        lines.append(f"think: {extraction.think}")
    for segment in extraction.malformed:
        lines.append(f"malformed: {segment}")
    lines.append(f"image: {extraction.image_size[0]}x{extraction.image_size[1]}")
    t = extraction.timings
    stages = ", ".join(f"{k} {t[k]:.3f} s" for k in _TIMING_STAGES if k in t)
    tokens = int(t.get("tokens", len(extraction.token_ids)))
    lines.append(f"timings: {stages}; {tokens} tokens")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# One pair
# ---------------------------------------------------------------------------------------------


def _read_text(args: argparse.Namespace) -> str:
    if args.text_file is not None:
        try:
            text = args.text_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InputError(f"--text-file {args.text_file}: file not found") from None
        except UnicodeDecodeError as exc:
            raise InputError(f"--text-file {args.text_file}: not UTF-8 text ({exc})") from None
        text = text.strip()
    elif args.text is not None:
        text = args.text
    else:
        raise InputError("--image needs --text TEXT or --text-file FILE")
    if not text.strip():
        raise InputError("the text is empty (--text / --text-file)")
    return text


#: File extensions --draw writes.
_DRAW_FORMATS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


def warn_if_cut(extraction, extractor, max_new_tokens: int | None, where: str = "") -> None:
    """A warning when generation stopped at the token budget: the answer may be cut short or
    forced early (a reasoning that used the budget leaves no room for records)."""
    limit = max_new_tokens
    if limit is None:
        limit = extractor.bundle.manifest.generation.default_max_new_tokens
    timings = extraction.timings
    if timings.get("budget_limited") or timings.get("tokens", 0) >= limit:
        log.warning(
            "%sgeneration stopped at the budget of %d new tokens: the answer may be cut short "
            "or forced to end early; raise --max-new-tokens (or use --think off)",
            where,
            limit,
        )


def _run_one(args: argparse.Namespace) -> int:
    image_size(args.image)  # a missing, folder or unreadable --image: named before the load
    text = _read_text(args)
    if args.draw is not None and not args.draw.parent.is_dir():
        raise InputError(f"--draw {args.draw}: folder {args.draw.parent} does not exist")
    if args.draw is not None and args.draw.suffix.lower() not in _DRAW_FORMATS:
        raise InputError(
            f"--draw {args.draw}: unknown image format {args.draw.suffix or '(no extension)'}; "
            f"use one of {', '.join(sorted(_DRAW_FORMATS))}"
        )
    extractor = load_extractor(args.bundle, **load_options(args))
    extraction = extractor.extract(args.image, text, **decoding_options(args))
    warn_if_cut(extraction, extractor, args.max_new_tokens)
    if args.json:
        print(readable_json(extraction.to_dict()))
    else:
        print(format_table(extraction))
    if args.draw is not None:
        from gmner_rt.draw import draw_entities
        from gmner_rt.vision import to_rgb

        draw_entities(to_rgb(args.image), extraction.records, out=args.draw)
        log.info("drawing written to %s", args.draw)
    return 0


# ---------------------------------------------------------------------------------------------
# A JSONL batch
# ---------------------------------------------------------------------------------------------


def read_batch(path: Path) -> list[dict]:
    """The batch file's rows, each checked: an existing image and a non-empty text."""
    if not path.is_file():
        raise InputError(f"--batch {path}: file not found")
    rows = []
    for where, row in iter_json_objects(path, "image and text"):
        image, text = row.get("image"), row.get("text")
        if not isinstance(image, str) or not image:
            raise InputError(f"{where}: field image must be a non-empty string, got {image!r}")
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{where}: field text must be a non-empty string, got {text!r}")
        image_path = path.parent / image
        try:
            image_size(image_path)  # header only: a bad row is named before the bundle loads
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None
        rows.append({**row, "_path": image_path})
    if not rows:
        raise InputError(f"--batch {path}: no pairs")
    return rows


def _chunks(rows: Sequence[dict], size: int) -> Iterator[Sequence[dict]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def _run_batch(args: argparse.Namespace) -> int:
    given = [f for f in ("image", "text", "text_file", "draw") if getattr(args, f) is not None]
    if given:
        flags = ", ".join("--" + f.replace("_", "-") for f in given)
        raise InputError(f"--batch takes its images and texts from the file; drop {flags}")
    if args.out is not None:
        return _run_corpus(args)
    ray_flags = [f for f in ("ray", "workers", "ray_address") if getattr(args, f)]
    if ray_flags:
        flag = "--" + ray_flags[0].replace("_", "-")
        raise InputError(f"{flag} writes predictions: add --out FILE")
    rows = read_batch(args.batch)
    extractor = load_extractor(args.bundle, **load_options(args))
    started = time.perf_counter()
    for chunk in _chunks(rows, args.batch_size):
        pairs = [(row["_path"], row["text"]) for row in chunk]
        results = extractor.extract_batch(pairs, **decoding_options(args))
        for row, extraction in zip(chunk, results, strict=True):
            warn_if_cut(extraction, extractor, args.max_new_tokens, f"row {row.get('id', '')}: ")
            fields = {k: v for k, v in row.items() if k != "_path"}
            print(json.dumps({**fields, **extraction.to_dict()}, ensure_ascii=False))
        sys.stdout.flush()
    log.info("%d pairs in %.1f s", len(rows), time.perf_counter() - started)
    return 0


def _run_corpus(args: argparse.Namespace) -> int:
    from .corpus import extract_corpus

    if not args.ray and (args.workers or args.ray_address):
        raise InputError("--workers / --ray-address apply to --ray only")
    if args.bundle is not None and not args.bundle.is_dir():
        raise BundleError(f"--bundle {args.bundle}: folder not found")
    report = extract_corpus(
        args.batch,
        args.out,
        bundle=args.bundle,
        load=load_options(args),
        decoding=decoding_options(args),
        batch_size=args.batch_size,
        ray=args.ray,
        workers=args.workers or 2,
        ray_address=args.ray_address,
    )
    print(
        f"{report.written} predictions, {report.errors} error record"
        f"{'' if report.errors == 1 else 's'} written to {args.out} "
        f"({report.skipped} of {report.rows} rows were there already) in {report.seconds:.1f} s"
    )
    return 0


def run(args: argparse.Namespace) -> int:
    if args.out is not None and args.batch is None:
        raise InputError("--out writes the predictions of a --batch file; add --batch FILE")
    if args.batch is not None:
        return _run_batch(args)
    if args.image is None:
        raise InputError("gmner extract needs --image FILE with --text/--text-file, or --batch")
    return _run_one(args)
