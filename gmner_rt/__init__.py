"""gmner_rt: the GMNER runtime library that applications import.

It depends on numpy, pillow, tokenizers and onnxruntime only; it never imports torch,
transformers, or gmner's training and export packages.
"""

from __future__ import annotations

from .errors import BackendError, BundleError, DataError, GmnerError, InputError
from .records import EntityRecord, ParsedOutput, format_answer, parse_output

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "BundleError",
    "DataError",
    "EntityRecord",
    "GmnerError",
    "InputError",
    "ParsedOutput",
    "__version__",
    "format_answer",
    "parse_output",
]
