"""Bundle integrity that costs little on a warm start.

Checking every file's sha256 takes seconds for a multi-GB bundle (about 7.5 s for 6 GB at
800 MB/s, more from a cold disk), every time an application starts. So a full check is done
once, and its result is remembered: after every listed file of a bundle has matched its
sha256, a stamp records each file's size, modification time (ns), inode and device, in the
user's cache (``$XDG_CACHE_HOME/gmner/verified/``; bundles may sit in read-only folders). A later
load whose files all still have those facts skips the hashing.

What the cheap check still catches: any file rewritten, replaced, copied over or renamed into
place (new inode or modification time), truncated or grown (size), a different manifest (the
stamp is keyed by the manifest's bytes and the bundle's path). What it does not: bytes changed
in place by something that restores the modification time afterwards, or decay on the disk;
``verify_hashes="full"`` (``load(..., verify_hashes="full")``) hashes everything regardless.

This module knows file system facts only; :mod:`gmner_rt.bundle` decides what to check.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["record", "stamp_path", "unchanged"]


def _facts(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]


def stamp_path(root: Path, manifest: bytes) -> Path:
    """Where the stamp of the bundle at ``root`` with this manifest lives."""
    key = hashlib.sha256(str(root.resolve()).encode() + b"\0" + manifest).hexdigest()[:32]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "gmner" / "verified" / f"{key}.json"


def unchanged(root: Path, manifest: bytes, names: Iterable[str]) -> set[str]:
    """The ``names`` whose files have the facts the stamp recorded after their full check."""
    try:
        stamp = json.loads(stamp_path(root, manifest).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    same = set()
    for name in names:
        try:
            if stamp.get(name) == _facts(root / name):
                same.add(name)
        except OSError:
            continue
    return same


def record(root: Path, manifest: bytes, names: Iterable[str]) -> None:
    """Remembers the facts of ``names`` (each just matched its sha256); a cache that cannot
    be written only costs the next load a full check."""
    target = stamp_path(root, manifest)
    try:
        facts = {name: _facts(root / name) for name in names}
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".stamp.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(facts, fh)
        os.replace(tmp, target)
    except OSError as exc:
        log.debug("integrity stamp not written (%s): the next load hashes again", exc)
