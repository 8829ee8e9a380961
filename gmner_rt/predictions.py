"""The predictions file: JSONL of ``{"img_id": "...", "output": "<model text>"}``.

Boxes in ``output`` are in ORIGINAL image pixels. Rows written by gmner's evaluation and corpus
runs also carry the model's text as generated (``raw``, boxes in MODEL pixels) with
``image_size`` and ``model_size`` (``[w, h]``), which the ``e2e`` protocol scores as the
reference code does. A corpus run (``gmner extract --batch ... --out``) writes
``{"img_id": "...", "error": "..."}`` for a row it could not run (an unreadable image): such
error records are read as no prediction for that id, unless a later record of a rerun gives
one. Read by ``gmner eval --pred``. This module
knows nothing about models or metrics.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

__all__ = [
    "ModelText",
    "iter_json_objects",
    "read_predictions",
    "read_predictions_and_texts",
    "write_predictions",
]


@dataclass(frozen=True, slots=True)
class ModelText:
    """A model's text as generated, with the sizes that place its boxes.

    Attributes:
        raw: the generated text (special tokens skipped), boxes in model pixels.
        image_size: the original image's ``(width, height)``.
        model_size: the image's ``(width, height)`` as the model saw it (``smart_resize``).
    """

    raw: str
    image_size: tuple[int, int]
    model_size: tuple[int, int]

    def as_fields(self) -> dict:
        return {
            "raw": self.raw,
            "image_size": list(self.image_size),
            "model_size": list(self.model_size),
        }


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
    return read_predictions_and_texts(path, with_texts=False)[0]


def read_predictions_and_texts(
    path: str | Path, *, with_texts: bool = True
) -> tuple[dict[str, str], dict[str, ModelText]]:
    """Model outputs by image id, and, in the same pass (``with_texts``), the generated
    texts with their sizes of the rows that carry them (files written before they were
    recorded have none; without ``with_texts`` those fields are not read at all). Errors
    name the file, the line and the problem."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: predictions file not found")
    outputs: dict[str, str] = {}
    texts: dict[str, ModelText] = {}
    errors: set[str] = set()
    for where, row in iter_json_objects(path, "img_id and output"):
        img_id, output = row.get("img_id"), row.get("output")
        if not isinstance(img_id, str) or not img_id:
            raise InputError(f"{where}: field img_id must be a non-empty string, got {img_id!r}")
        if "output" not in row and isinstance(row.get("error"), str):  # an error record
            if img_id in outputs:
                raise InputError(f"{where}: img_id {img_id!r} appears twice")
            errors.add(img_id)  # a row retried and failed again is one error
            continue
        errors.discard(img_id)  # a retried row's prediction supersedes its error record
        if not isinstance(output, str):
            raise InputError(f"{where}: field output must be a string, got {type(output).__name__}")
        if img_id in outputs:
            raise InputError(f"{where}: img_id {img_id!r} appears twice")
        outputs[img_id] = output
        if with_texts and "raw" in row:
            texts[img_id] = _model_text(where, row)
    if errors:
        log.warning(
            "%s: %d error record(s) (rows the run could not use) count as no prediction",
            path,
            len(errors),
        )
    return outputs, texts


def _size(where: str, name: str, value: object) -> tuple[int, int]:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise InputError(f"{where}: field {name} must be [width, height] in pixels, got {value!r}")
    return int(value[0]), int(value[1])


def _model_text(where: str, row: dict) -> ModelText:
    """A row's generated text and sizes; a field present but wrong names file:line."""
    if not isinstance(row["raw"], str):
        raise InputError(f"{where}: field raw must be a string, got {row['raw']!r}")
    return ModelText(
        row["raw"],
        _size(where, "image_size", row.get("image_size")),
        _size(where, "model_size", row.get("model_size")),
    )


def write_predictions(
    path: str | Path,
    outputs: Mapping[str, str] | Iterable[tuple[str, str]],
    *,
    model_texts: Mapping[str, ModelText] | None = None,
    **extra: object,
) -> None:
    """Write outputs atomically (a temporary file renamed into place); with
    ``model_texts``, each row also carries its id's generated text and sizes."""
    path = Path(path)
    items = outputs.items() if isinstance(outputs, Mapping) else outputs
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for img_id, output in items:
            row = {"img_id": img_id, "output": output, **extra}
            if model_texts is not None and img_id in model_texts:
                row.update(model_texts[img_id].as_fields())
            f.write(json.dumps(row, ensure_ascii=False))
            f.write("\n")
    os.replace(tmp, path)
