"""The predictions file: JSONL of ``{"img_id": "...", "output": "<model text>"}``.

Boxes in ``output`` are in ORIGINAL image pixels. Written by evaluation runs and corpus runs
(``gmner extract --batch ... --out``), read by ``gmner eval --pred``. A corpus run writes
``{"img_id": "...", "error": "..."}`` for a row it could not run (an unreadable image): such
error records are read as no prediction for that id. This module knows nothing about models
or metrics.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from .errors import InputError

__all__ = ["iter_json_objects", "read_predictions", "write_predictions"]

log = logging.getLogger(__name__)


def iter_json_objects(path: Path, expected: str) -> Iterator[tuple[str, dict]]:
    """``(file:line, object)`` for each non-blank line of a JSONL file of objects.

    A line that is not JSON, or not an object, is an :class:`InputError` naming file:line and
    saying what was ``expected`` (e.g. "img_id and output").
    """
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected an object with {expected}")
        yield where, row


def read_predictions(path: str | Path) -> dict[str, str]:
    """Model outputs by image id. Errors name the file, the line and the problem."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: predictions file not found")
    outputs: dict[str, str] = {}
    errors: set[str] = set()
    for where, row in iter_json_objects(path, "img_id and output"):
        img_id, output = row.get("img_id"), row.get("output")
        if not isinstance(img_id, str) or not img_id:
            raise InputError(f"{where}: field img_id must be a non-empty string, got {img_id!r}")
        if "output" not in row and isinstance(row.get("error"), str):  # an error record
            if img_id in outputs or img_id in errors:
                raise InputError(f"{where}: img_id {img_id!r} appears twice")
            errors.add(img_id)
            continue
        if img_id in errors:
            raise InputError(f"{where}: img_id {img_id!r} appears twice")
        if not isinstance(output, str):
            raise InputError(f"{where}: field output must be a string, got {type(output).__name__}")
        if img_id in outputs:
            raise InputError(f"{where}: img_id {img_id!r} appears twice")
        outputs[img_id] = output
    if errors:
        log.warning(
            "%s: %d error record(s) (rows the run could not use) count as no prediction",
            path,
            len(errors),
        )
    return outputs


def write_predictions(
    path: str | Path, outputs: Mapping[str, str] | Iterable[tuple[str, str]], **extra: object
) -> None:
    """Write outputs atomically (a temporary file renamed into place)."""
    path = Path(path)
    items = outputs.items() if isinstance(outputs, Mapping) else outputs
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for img_id, output in items:
            f.write(json.dumps({"img_id": img_id, "output": output, **extra}, ensure_ascii=False))
            f.write("\n")
    os.replace(tmp, path)
