"""gmner_rt: the GMNER runtime library that applications import.

    import gmner_rt
    extractor = gmner_rt.load("path/to/bundle")   # or load() for the embedded default
    result = extractor.extract("photo.jpg", "Alice visits Paris")
    for entity in result.records:
        print(entity.mention, entity.type, entity.boxes)

It depends on numpy, pillow, tokenizers and onnxruntime only (any one build of it: the CPU
``onnxruntime``, ``onnxruntime-gpu``, or a Jetson wheel); it never imports torch,
transformers, or gmner's training and export packages. ``load(bundle, provider="cuda")`` picks
the execution provider (see :mod:`gmner_rt.providers`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import BackendError, BundleError, DataError, GmnerError, InputError
from .extractor import DEFAULT_BUNDLE, Entity, Extraction, Extractor, load
from .providers import PROVIDERS, requested
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
    "PROVIDERS",
    "ParsedOutput",
    "__version__",
    "extract",
    "format_answer",
    "load",
    "parse_output",
]

#: Extractors kept by :func:`extract`, least recently used first; at most :data:`_KEEP`.
_EXTRACTORS: OrderedDict[tuple, Extractor] = OrderedDict()
_KEEP = 4
_LOCK = threading.Lock()


def extract(
    image: ImageInput,
    text: str,
    *,
    bundle: str | Path | None = None,
    provider: str | None = None,
    provider_options: Mapping[str, Any] | None = None,
    device_id: int = 0,
    providers: Sequence[str] | None = None,
    **options,
) -> Extraction:
    """``load(bundle, provider=...).extract(image, text, **options)``, with the extractor
    cached per bundle, provider, provider options and device, so repeated calls load the
    model once (the four most recently used are kept). ``provider=None`` reads
    ``GMNER_PROVIDER`` at every call."""
    resolved = requested(provider) if providers is None else None
    key = (
        str(Path(bundle if bundle is not None else DEFAULT_BUNDLE).resolve()),
        resolved,
        tuple(sorted((str(k), str(v)) for k, v in (provider_options or {}).items())),
        device_id,
        tuple(providers) if providers is not None else None,
    )
    with _LOCK:
        extractor = _EXTRACTORS.get(key)
        if extractor is None:
            extractor = _EXTRACTORS[key] = load(
                bundle,
                provider=resolved,
                provider_options=provider_options,
                device_id=device_id,
                providers=providers,
            )
            while len(_EXTRACTORS) > _KEEP:
                _EXTRACTORS.popitem(last=False)
        _EXTRACTORS.move_to_end(key)
    return extractor.extract(image, text, **options)
