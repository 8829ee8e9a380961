"""Bundles are built in a temporary sibling directory and moved into place when complete.

A failed export or quantization then leaves no half-written bundle behind. This module knows
only directories.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import socket
import uuid
from pathlib import Path

from gmner_rt.errors import InputError

log = logging.getLogger(__name__)

__all__ = ["move_into_place", "remove_stale", "staging_dir"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _host() -> str:
    """This machine's name as a staging folder may hold it (letters, digits, ``-``, ``.``)."""
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "host"


def remove_stale(out: Path) -> list[Path]:
    """Deletes the staging folders of ``out`` that killed exports on this machine left (their
    process is gone; folders of other machines sharing the disk are left alone); returns
    them."""
    removed = []
    prefix = f"{out.name}.tmp-{_host()}-"
    pattern = glob.escape(out.name) + ".tmp-*"
    for path in out.parent.glob(pattern) if out.parent.is_dir() else ():
        if not path.name.startswith(prefix):
            continue
        pid = path.name[len(prefix) :].split("-", 1)[0]
        if path.is_dir() and pid.isdigit() and not _alive(int(pid)):
            log.info("removing %s, left by an export that was stopped", path)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def staging_dir(out: Path) -> Path:
    """A new empty sibling of ``out``; ``out`` must not exist or be an empty directory. Staging
    folders of killed exports of the same ``out`` are removed first."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: exists and is not an empty directory; choose a new --out")
    remove_stale(out)
    tmp = out.with_name(f"{out.name}.tmp-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)  # not mkdtemp: its mode 0700 would become the bundle's
    return tmp


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out`` (an empty ``out`` is replaced)."""
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
