"""gmner_rt: the GMNER runtime library that applications import.

    import gmner_rt
    extractor = gmner_rt.load("path/to/bundle")   # or load() for the embedded default
    result = extractor.extract("photo.jpg", "Alice visits Paris")
    for entity in result.records:
        print(entity.mention, entity.type, entity.boxes)

It depends on numpy, pillow, tokenizers and onnxruntime only; it never imports torch,
transformers, or gmner's training and export packages.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

from .errors import BackendError, BundleError, DataError, GmnerError, InputError
from .extractor import Entity, Extraction, Extractor, load
from .records import EntityRecord, ParsedOutput, format_answer, parse_output
from .vision import ImageInput

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "BundleError",
    "DataError",
    "Entity",
    "EntityRecord",
    "Extraction",
    "Extractor",
    "GmnerError",
    "InputError",
    "ParsedOutput",
    "__version__",
    "extract",
    "format_answer",
    "load",
    "parse_output",
]

_EXTRACTORS: dict[tuple[str, tuple[str, ...] | None], Extractor] = {}
_LOCK = threading.Lock()


def extract(
    image: ImageInput,
    text: str,
    *,
    bundle: str | Path | None = None,
    providers: Sequence[str] | None = None,
    **options,
) -> Extraction:
    """``load(bundle).extract(image, text, **options)``, with the extractor cached per bundle
    (and providers), so repeated calls load the model once."""
    key = (
        str(Path(bundle).resolve()) if bundle is not None else "",
        tuple(providers) if providers is not None else None,
    )
    with _LOCK:
        extractor = _EXTRACTORS.get(key)
        if extractor is None:
            extractor = _EXTRACTORS[key] = load(bundle, providers=providers)
    return extractor.extract(image, text, **options)
