"""Bundles are built in a temporary sibling directory and moved into place when complete.

A failed export or quantization then leaves no half-written bundle behind. This module knows
only directories.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from gmner_rt.errors import InputError

__all__ = ["move_into_place", "staging_dir"]


def staging_dir(out: Path) -> Path:
    """A new empty sibling of ``out``; ``out`` must not exist or be an empty directory."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: exists and is not an empty directory; choose a new --out")
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)  # not mkdtemp: its mode 0700 would become the bundle's
    return tmp


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out`` (an empty ``out`` is replaced)."""
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
