"""Bundle integrity that costs little on a warm start.

Checking every file's sha256 takes seconds for a multi-GB bundle (about 7.5 s for 6 GB at
800 MB/s, more from a cold disk), every time an application starts. So a full check is done
once, and its result is remembered: after every listed file of a bundle has matched its
sha256, a stamp records each file's size, modification time (ns), inode and device, in the
user's cache (``$XDG_CACHE_HOME/gmner/verified/``; bundles may sit in read-only folders). A later
load whose files all still have those facts skips the hashing.

What the cheap check still catches: any file rewritten, replaced, copied over or renamed into
place (a new inode, modification or change time; the change time cannot be set back, so a
rewrite that restores the modification time is caught too), truncated or grown, a different
manifest (the stamp is keyed by the manifest's bytes and the bundle's path). What it does not:
decay on the disk, or a change made by someone who can set the clock. ``verify_hashes="full"``
hashes everything regardless. Files modified in the last two seconds are not stamped (a
same-size rewrite within one tick of a coarse clock would otherwise pass), and a file that
changes while it is hashed is not stamped either.

This module knows file system facts only; :mod:`gmner_rt.bundle` decides what to check.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["facts", "record", "stamp_path", "unchanged"]


#: Files changed this recently are not stamped: on a file system with coarse timestamps a
#: rewrite of the same size within the same tick would keep them.
_SETTLE_NS = 2_000_000_000


def facts(path: Path) -> list[int] | None:
    """What identifies a file's bytes without reading them: size, modification and change
    times (ns; the change time cannot be set back by a user), inode, device; None if gone."""
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def stamp_path(root: Path, manifest: bytes) -> Path:
    """Where the stamp of the bundle at ``root`` with this manifest lives."""
    key = hashlib.sha256(str(root.resolve()).encode() + b"\0" + manifest).hexdigest()[:32]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "gmner" / "verified" / f"{key}.json"


def unchanged(root: Path, manifest: bytes, names: Iterable[str]) -> dict[str, list[int]]:
    """The ``names`` whose files still have the facts the stamp recorded after their full
    check, with those facts."""
    try:
        stamp = json.loads(stamp_path(root, manifest).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(stamp, dict):
        return {}
    return {
        name: stamp[name]
        for name in names
        if stamp.get(name) is not None and stamp.get(name) == facts(root / name)
    }


def record(root: Path, manifest: bytes, known: dict[str, list[int]]) -> None:
    """Remembers ``known`` (file -> facts taken before it matched its sha256, unchanged after),
    leaving out files changed in the last seconds; a cache that cannot be written only costs
    the next load a full check."""
    now = time.time_ns()
    settled = {n: f for n, f in known.items() if now - f[1] > _SETTLE_NS}
    if not settled:
        return
    target = stamp_path(root, manifest)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".stamp.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(settled, fh)
        os.replace(tmp, target)
    except OSError as exc:
        log.debug("integrity stamp not written (%s): the next load hashes again", exc)
