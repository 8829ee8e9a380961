"""One exception tree for everything gmner raises on purpose.

Every error names what is wrong: the file, the field or the value. Callers catch
:class:`GmnerError` for all of them, or a subclass for one kind.
"""

from __future__ import annotations

__all__ = ["BackendError", "BundleError", "DataError", "GmnerError", "InputError"]


class GmnerError(Exception):
    """Base of every error gmner raises on purpose."""


class InputError(GmnerError, ValueError):
    """A caller's input is unusable (an image, a text, a predictions file, a flag)."""


class DataError(GmnerError, ValueError):
    """A dataset file is missing or malformed; the message names the file and line."""


class BundleError(GmnerError):
    """An exported bundle is missing, damaged or of another format version."""


class BackendError(GmnerError, RuntimeError):
    """An inference backend is unavailable or failed."""
