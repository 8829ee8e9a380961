"""Training JSONL from a Twitter-GMNER folder (``gmner data sft``). Pure Python + Pillow.

One row per tweet::

    {"id": img_id, "messages": [system turn, user turn (image + instruction), assistant turn],
     "images": [path], "image_size": [w, h], "model_size": [w, h], "text": ...,
     "records": [{"mention", "type", "boxes"}] (ORIGINAL pixels), "think": str | null,
     "box_space": "model", "record_format_version": N, "min_pixels": .., "max_pixels": ..}

The assistant target is ``[<think>R</think>]<answer>records</answer>`` with boxes in MODEL
space for the stated min/max pixels, so other trainers can use the file as it is. gmner's own
trainer rebuilds targets from ``records`` (original pixels) with its own pixel bounds and GRBP.

This module knows nothing about tokenizers or models.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gmner_rt.data import LABELS, Tweet, find_image, load_split
from gmner_rt.errors import DataError, InputError
from gmner_rt.geometry import ImageGeometry
from gmner_rt.images import image_size
from gmner_rt.predictions import iter_json_objects
from gmner_rt.prompt import PROMPT_STYLES, assistant_message, system_message, user_message
from gmner_rt.records import RECORD_FORMAT_VERSION, EntityRecord, format_answer

log = logging.getLogger(__name__)

#: Pixel bounds of the paper's recipe (min 256, max 1024 visual tokens of 28 x 28).
PAPER_MIN_PIXELS = 256 * 28 * 28
PAPER_MAX_PIXELS = 1024 * 28 * 28
_THINK_KEYS = ("think", "cot", "reasoning")


@dataclass(frozen=True)
class SftConfig:
    """How training rows are written.

    Attributes:
        image_dirs: folders searched for ``<img_id>.<ext>``.
        min_pixels: smallest image area the model sees (``--min-pixels``).
        max_pixels: largest image area the model sees (``--max-pixels``).
        skip_missing_images: drop tweets whose image is missing instead of failing.
        labels: the entity types named in the instruction.
        prompt: prompt style (:data:`gmner_rt.prompt.PROMPT_STYLES`).
        system_prompt: a system prompt replacing the style's ('' keeps the style's).
    """

    image_dirs: tuple[Path, ...]
    min_pixels: int = PAPER_MIN_PIXELS
    max_pixels: int = PAPER_MAX_PIXELS
    skip_missing_images: bool = False
    labels: tuple[str, ...] = LABELS
    prompt: str = "full"
    system_prompt: str = ""

    def __post_init__(self) -> None:
        if self.prompt not in PROMPT_STYLES:
            raise InputError(f"--prompt: expected one of {PROMPT_STYLES}, got {self.prompt!r}")
        if not self.image_dirs:
            raise InputError("--images: give at least one image folder")
        missing = [str(d) for d in self.image_dirs if not Path(d).is_dir()]
        if missing:
            raise InputError(f"--images: folder not found: {', '.join(missing)}")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise InputError(
                f"--min-pixels/--max-pixels: need 0 < min <= max, got "
                f"{self.min_pixels}, {self.max_pixels}"
            )


@dataclass
class SplitReport:
    """What happened to one split."""

    rows: int = 0
    missing_images: int = 0
    with_think: int = 0
    size_mismatch: int = 0
    missing_image_ids: list[str] = field(default_factory=list)


def load_cot(path: str | Path) -> dict[str, str]:
    """Reasoning texts by image id from a CoT JSONL.

    Accepts gmner's own file (``img_id`` + ``think``) and the E2E-GMNER reference's
    (``image_path`` + ``think`` / ``cot`` / ``reasoning``, joined by the image's file stem).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--cot {path}: file not found")
    cot: dict[str, str] = {}
    for where, row in iter_json_objects(path, "img_id and think"):
        key = row.get("img_id") or (Path(row["image_path"]).stem if row.get("image_path") else "")
        think = next((row[k] for k in _THINK_KEYS if isinstance(row.get(k), str)), "")
        if not key:
            raise InputError(f"{where}: needs img_id or image_path")
        if any(tag in think.lower() for tag in ("<think>", "</think>", "<answer>", "</answer>")):
            raise InputError(f"{where}: reasoning for {key} contains a think/answer tag")
        if think.strip():
            cot[str(key)] = think.strip()
    return cot


def records_json(records: Sequence[EntityRecord]) -> list[dict]:
    return [
        {
            "mention": r.mention,
            "type": r.type,
            "boxes": [list(b) for b in r.boxes] if r.boxes else None,
        }
        for r in records
    ]


def sft_row(
    tweet: Tweet,
    image_path: Path,
    size: tuple[int, int],
    think: str | None,
    cfg: SftConfig,
    *,
    with_think_prompt: bool,
) -> dict:
    """The training row of one tweet."""
    geo = ImageGeometry.for_image(*size, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    model_records = [r.map_boxes(geo.to_model) for r in tweet.records()]
    # the prompt asks for reasoning: a tweet without it gets an empty think block
    target = format_answer(model_records, think=(think or "") if with_think_prompt else None)
    return {
        "id": tweet.img_id,
        "messages": [
            system_message(cfg.prompt, cfg.system_prompt),
            user_message(
                str(image_path), tweet.text, cfg.labels, think=with_think_prompt, style=cfg.prompt
            ),
            assistant_message(target),
        ],
        "images": [str(image_path)],
        "image_size": list(size),
        "model_size": list(geo.model_size),
        "text": tweet.text,
        "records": records_json(tweet.records()),
        "think": think,
        "box_space": "model",
        "record_format_version": RECORD_FORMAT_VERSION,
        "min_pixels": cfg.min_pixels,
        "max_pixels": cfg.max_pixels,
    }


def build_rows(
    tweets: Sequence[Tweet], cfg: SftConfig, cot: dict[str, str] | None
) -> tuple[list[dict], SplitReport]:
    """The training rows of some tweets, and what was skipped."""
    report = SplitReport()
    rows = []
    for tweet in tweets:
        path = find_image(cfg.image_dirs, tweet.img_id)
        if path is None:
            if not cfg.skip_missing_images:
                tried = ", ".join(str(Path(d) / f"{tweet.img_id}.jpg") for d in cfg.image_dirs)
                raise DataError(
                    f"tweet {tweet.img_id}: image not found (tried {tried} and other "
                    f"extensions); pass --skip-missing-images to leave such tweets out"
                )
            report.missing_images += 1
            report.missing_image_ids.append(tweet.img_id)
            continue
        size = image_size(path)
        if tweet.image_size is not None and tweet.image_size != size:
            report.size_mismatch += 1
            log.warning(
                "tweet %s: image %s is %s but its XML says %s",
                tweet.img_id,
                path,
                size,
                tweet.image_size,
            )
        think = cot.get(tweet.img_id) if cot is not None else None
        rows.append(
            sft_row(tweet, path.resolve(), size, think, cfg, with_think_prompt=cot is not None)
        )
        report.rows += 1
        report.with_think += think is not None
    return rows, report


def write_split(
    tweets: Sequence[Tweet], out_path: Path, cfg: SftConfig, cot: dict[str, str] | None
) -> SplitReport:
    """Write one split's rows atomically; returns what was written and skipped."""
    rows, report = build_rows(tweets, cfg, cot)
    tmp = out_path.with_name(out_path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, out_path)
    return report


def write_sft(
    data_dir: Path,
    out_dir: Path,
    splits: Sequence[str],
    cfg: SftConfig,
    cot_path: Path | None = None,
) -> dict[str, SplitReport]:
    """Write ``OUTDIR/<split>.jsonl`` for each split; returns a report per split."""
    cot = load_cot(cot_path) if cot_path is not None else None
    out_dir.mkdir(parents=True, exist_ok=True)
    reports: dict[str, SplitReport] = {}
    for split in splits:
        tweets = load_split(data_dir, split)
        reports[split] = report = write_split(tweets, out_dir / f"{split}.jsonl", cfg, cot)
        if cot is not None and split == "train" and report.with_think < report.rows:
            log.warning(
                "%s: %d of %d tweets have no reasoning text in %s; their targets are answer-only",
                split,
                report.rows - report.with_think,
                report.rows,
                cot_path,
            )
    meta = {
        "data": str(data_dir),
        "splits": {s: vars(r) for s, r in reports.items()},
        "min_pixels": cfg.min_pixels,
        "max_pixels": cfg.max_pixels,
        "cot": str(cot_path) if cot_path else None,
        "record_format_version": RECORD_FORMAT_VERSION,
    }
    (out_dir / "sft_meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return reports
