"""Corpus scale: a JSONL of (id, image, text) rows to the predictions JSONL that
``gmner eval --pred`` reads, in one process or on Ray Data, resumable.

    gmner extract --batch pairs.jsonl --out preds.jsonl                 # one process
    gmner extract --batch pairs.jsonl --out preds.jsonl --ray --workers 4
    RAY_ADDRESS=ray://head:10001 gmner extract --batch pairs.jsonl --out preds.jsonl --ray

Input rows: ``{"id": ..., "image": path, "text": ...}`` (image paths relative to the JSONL's
folder). Output rows: ``{"img_id": id, "output": "<think>...</think><answer>...</answer>"}``
with boxes in original pixels, or ``{"img_id": id, "error": "..."}`` for a row whose image (or
text) could not be used: the job goes on. Rows are appended as batches finish, in any order; a
rerun skips every id already in the output (a torn last line, from a killed run, is cut off
first), so a stopped job continues where it stopped.

With Ray, the rows are a Ray Data dataset mapped by a pool of actors (``--workers``), each
loading the bundle once and running ``extract_batch``; the driver writes the output. On a
cluster, the bundle and the images must be readable at the same paths on every node (shared
storage). Both paths run the same code per batch (:func:`predict_rows`), and a batch changes
no row's answer, so their predictions are identical. Ray comes with the ``[ray]`` extra and is
imported only here, only with ``ray=True``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gmner_rt.errors import GmnerError, InputError
from gmner_rt.predictions import ModelText, iter_json_objects

from .batching import extract_each
from .evaluate import prediction_output

_MODEL_TEXT_FIELDS = ("raw", "image_size", "model_size")

log = logging.getLogger(__name__)

__all__ = ["CorpusReport", "done_ids", "extract_corpus", "predict_rows", "read_rows"]


@dataclass(frozen=True)
class CorpusReport:
    """What one run did.

    Attributes:
        rows: rows in the input.
        skipped: rows whose id was already in the output (an earlier run's).
        written: predictions written by this run.
        errors: error records written by this run (unusable image or text).
        seconds: wall time of this run, loading included.
    """

    rows: int
    skipped: int
    written: int
    errors: int
    seconds: float


def read_rows(path: Path) -> list[dict[str, str]]:
    """The input's rows as ``{"id", "image", "text"}`` (image: a path made absolute against
    the JSONL's folder). A missing field or a repeated id stops with the file and line; an
    image that is missing or unreadable is left for the run to report as an error record."""
    if not path.is_file():
        raise InputError(f"--batch {path}: file not found")
    rows, seen = [], {}
    for where, row in iter_json_objects(path, "id, image and text"):
        rid, image, text = row.get("id"), row.get("image"), row.get("text")
        if isinstance(rid, int) and not isinstance(rid, bool):
            rid = str(rid)
        if not isinstance(rid, str) or not rid:
            raise InputError(f"{where}: field id must be a non-empty string, got {rid!r}")
        if not isinstance(image, str) or not image:
            raise InputError(f"{where}: field image must be a non-empty string, got {image!r}")
        if not isinstance(text, str):
            raise InputError(f"{where}: field text must be a string, got {text!r}")
        if rid in seen:
            raise InputError(f"{where}: id {rid!r} appears twice (first at line {seen[rid]})")
        seen[rid] = where.rsplit(":", 1)[1]
        rows.append({"id": rid, "image": str((path.parent / image).absolute()), "text": text})
    if not rows:
        raise InputError(f"--batch {path}: no rows")
    return rows


def done_ids(out: Path) -> set[str]:
    """Ids already predicted in the output file (rows with an error record are not: a rerun
    tries them again, and its record supersedes the error). A last line cut short (a killed
    run) is removed from the file; any other line that is not a record is an error naming
    it."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        log.warning("%s: cutting off a torn last line (%d bytes)", out, len(data) - end)
        with out.open("r+b") as f:
            f.truncate(end)
    ids: set[str] = set()
    failed: set[str] = set()
    for where, row in iter_json_objects(out, "img_id and output or error"):
        img_id = row.get("img_id")
        if not isinstance(img_id, str) or not ("output" in row or "error" in row):
            raise InputError(f"{where}: not a prediction record (img_id and output or error)")
        (ids if "output" in row else failed).add(img_id)
    retried = failed - ids
    if retried:  # an error record is run again: the image may have been fixed since
        log.info("%s: %d row(s) with an error record will be tried again", out, len(retried))
    return ids


def predict_rows(
    extractor, rows: Sequence[Mapping[str, str]], decoding: Mapping[str, Any]
) -> list[dict[str, str]]:
    """One output record per row: its prediction, or its error (the batch is run again row
    by row when one row fails, so the others still get theirs)."""
    pairs = [(Path(r["image"]), r["text"]) for r in rows]
    results = extract_each(extractor, pairs, decoding)
    out = []
    for row, result in zip(rows, results, strict=True):
        if isinstance(result, GmnerError):
            out.append({"img_id": row["id"], "error": str(result) or type(result).__name__})
        else:
            out.append(
                {
                    "img_id": row["id"],
                    "output": prediction_output(result),
                    # the text as generated, which gmner eval --protocol e2e scores
                    **ModelText(result.raw, result.image_size, result.model_size).as_fields(),
                }
            )
    return out


class _Writer:
    """Appends records to the output, one flushed line each, and counts them."""

    def __init__(self, out: Path):
        self.file = out.open("a", encoding="utf-8")
        self.written = self.errors = 0

    def write(self, records: Iterable[Mapping[str, str]]) -> None:
        for record in records:
            self.file.write(json.dumps(dict(record), ensure_ascii=False) + "\n")
            if "error" in record:
                self.errors += 1
            else:
                self.written += 1
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def extract_corpus(
    pairs: str | Path,
    out: str | Path,
    *,
    bundle: str | Path | None = None,
    load: Mapping[str, Any] | None = None,
    decoding: Mapping[str, Any] | None = None,
    batch_size: int = 4,
    ray: bool = False,
    workers: int = 2,
    ray_address: str | None = None,
) -> CorpusReport:
    """Predictions for every row of ``pairs`` not yet in ``out``, appended to ``out``.

    Args:
        bundle: the bundle (None: the embedded default).
        load: keyword arguments of :func:`gmner_rt.load` (provider, threads, ...).
        decoding: keyword arguments of ``extract_batch`` (think, max_new_tokens, ...).
        batch_size: rows per ``extract_batch`` call.
        ray: run on Ray Data (one actor per worker) instead of in this process.
        workers: Ray actors, each loading the bundle once.
        ray_address: the Ray cluster to join (None: ``RAY_ADDRESS``, else a local instance;
            a Ray already initialised in this process is used as it is).
    """
    started = time.perf_counter()
    pairs, out = Path(pairs), Path(out)
    if batch_size < 1:
        raise InputError(f"--batch-size: expected an integer >= 1, got {batch_size}")
    if workers < 1:
        raise InputError(f"--workers: expected an integer >= 1, got {workers}")
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: folder {out.parent} does not exist")
    rows = read_rows(pairs)
    done = done_ids(out)
    todo = [r for r in rows if r["id"] not in done]
    log.info(
        "%d rows, %d already in %s, %d to run", len(rows), len(rows) - len(todo), out, len(todo)
    )
    writer = _Writer(out)
    try:
        if todo and ray:
            _run_ray(
                todo, writer, bundle, load or {}, decoding or {}, batch_size, workers, ray_address
            )
        elif todo:
            _run_here(todo, writer, bundle, load or {}, decoding or {}, batch_size)
    finally:
        writer.close()
    report = CorpusReport(
        len(rows),
        len(rows) - len(todo),
        writer.written,
        writer.errors,
        time.perf_counter() - started,
    )
    log.info(
        "%d predictions and %d error records written to %s in %.1f s",
        report.written,
        report.errors,
        out,
        report.seconds,
    )
    return report


def _run_here(todo, writer: _Writer, bundle, load, decoding, batch_size: int) -> None:
    from .extract import load_extractor

    extractor = load_extractor(Path(bundle) if bundle is not None else None, **load)
    for start in range(0, len(todo), batch_size):
        writer.write(predict_rows(extractor, todo[start : start + batch_size], decoding))
        log.info("%d/%d rows", min(start + batch_size, len(todo)), len(todo))


class _RayWorker:
    """A Ray actor's callable: loads the bundle once, then maps batches of rows."""

    def __init__(self, bundle: str | None, load: dict, decoding: dict):
        import gmner_rt

        self.extractor = gmner_rt.load(bundle, **load)
        self.decoding = decoding

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list]:
        rows = [
            {"id": str(i), "image": str(p), "text": str(t)}
            for i, p, t in zip(batch["id"], batch["image"], batch["text"], strict=True)
        ]
        records = predict_rows(self.extractor, rows, self.decoding)
        # strings only: a None in a column comes back from Arrow as NaN
        return {
            "img_id": [r["img_id"] for r in records],
            "output": [r.get("output", "") for r in records],
            "error": [r.get("error", "") for r in records],
            # raw text and sizes as one JSON string: Arrow columns stay plain strings
            "model_text": [
                json.dumps({k: r[k] for k in _MODEL_TEXT_FIELDS}) if "raw" in r else ""
                for r in records
            ],
        }


def _run_ray(
    todo,
    writer: _Writer,
    bundle,
    load,
    decoding,
    batch_size: int,
    workers: int,
    ray_address: str | None,
) -> None:
    import ray

    if not ray.is_initialized():
        address = ray_address or os.environ.get("RAY_ADDRESS")
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    threads = load.get("threads") or 1
    options = {**load, "threads": threads}
    dataset = ray.data.from_items(todo).map_batches(
        _RayWorker,
        fn_constructor_kwargs={
            "bundle": str(Path(bundle).absolute()) if bundle is not None else None,
            "load": options,
            "decoding": dict(decoding),
        },
        batch_size=batch_size,
        concurrency=workers,
        num_cpus=threads,
        batch_format="numpy",
    )
    total = 0
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        records = [
            {"img_id": str(i), "error": str(e)}
            if e
            else {"img_id": str(i), "output": str(o), **(json.loads(str(m)) if m else {})}
            for i, o, e, m in zip(
                batch["img_id"], batch["output"], batch["error"], batch["model_text"], strict=True
            )
        ]
        writer.write(records)
        total += len(records)
        log.info("%d/%d rows", total, len(todo))
