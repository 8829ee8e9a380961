"""Staging folders: a killed export's debris is removed by the next export to the same place,
a running export's is left alone."""

from __future__ import annotations

import os

from gmner.export.staging import _host, move_into_place, remove_stale, staging_dir


def test_debris_of_killed_exports_is_removed(tmp_path):
    out = tmp_path / "bundle"
    dead = tmp_path / f"bundle.tmp-{_host()}-999999-abcd1234"  # no such process here
    dead.mkdir()
    (dead / "decoder.onnx").write_bytes(b"half")
    running = tmp_path / f"bundle.tmp-{_host()}-{os.getpid()}-0000ffff"
    elsewhere = tmp_path / "bundle.tmp-another-host-999999-abcd1234"  # a shared disk
    elsewhere.mkdir()
    running.mkdir()
    other = tmp_path / "other.tmp-999999-abcd1234"
    other.mkdir()
    tmp = staging_dir(out)
    assert not dead.exists() and running.exists() and other.exists() and elsewhere.exists()
    move_into_place(tmp, out)
    assert out.is_dir() and remove_stale(out) == []
