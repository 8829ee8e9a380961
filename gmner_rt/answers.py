"""Model answers in original-image pixels.

A model writes boxes in its resized image's space; users and metrics want the image file's
pixels. This module rewrites parsed records, or a whole answer text, from one to the other.
Segments that could not be parsed are kept as written, so they still count as predictions.
"""

from __future__ import annotations

from collections.abc import Iterable

from .geometry import ImageGeometry
from .records import RECORD_SEPARATOR, EntityRecord, format_record, parse_output

__all__ = ["answer_to_original", "records_to_original"]


def records_to_original(
    records: Iterable[EntityRecord], geometry: ImageGeometry
) -> tuple[EntityRecord, ...]:
    """Records with every box mapped from model space to original pixels."""
    return tuple(r.map_boxes(geometry.to_original) for r in records)


def answer_to_original(text: str, geometry: ImageGeometry) -> str:
    """A model's text rewritten as ``[<think>..</think>]<answer>..</answer>`` in original pixels."""
    parsed = parse_output(text)
    if not parsed.answer_found:
        return f"<think>{parsed.think or ''}</think>"
    parts = [format_record(r) for r in records_to_original(parsed.records, geometry)]
    parts += list(parsed.malformed)
    body = RECORD_SEPARATOR.join(parts) if parts else "None"
    head = f"<think>{parsed.think}</think>" if parsed.think is not None else ""
    return f"{head}<answer>{body}</answer>"
