"""Checkpoints survive a kill at any moment: a step written twice is never removed before its
replacement is in place, ``--resume`` finds the newest complete checkpoint or stops with an
error (never a silent restart), debris of killed writes is cleaned, and the metrics log holds
each step once after a resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from gmner.train import loop  # noqa: E402
from gmner.train.config import load_config  # noqa: E402
from gmner.train.loop import (  # noqa: E402
    CHECKPOINT_FILES,
    Position,
    latest_checkpoint,
    remove_debris,
    save_checkpoint,
    trim_metrics,
)

from gmner_rt.errors import InputError  # noqa: E402


def _complete(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in CHECKPOINT_FILES:
        (folder / name).write_text("x")
    return folder


class _Saves:
    """Stand-ins with the save methods save_checkpoint calls."""

    def save_pretrained(self, path):
        (Path(path) / "weights").write_text("w")

    def named_parameters(self):
        return [("w", torch.nn.Parameter(torch.zeros(2)))]

    def state_dict(self):
        return {}


def _save(run: Path, step: int, epoch: int = 0) -> Path:
    fake = _Saves()
    cfg = load_config(None, {})
    return save_checkpoint(run, fake, fake, fake, fake, Position(step=step, epoch=epoch), cfg)


def test_a_kill_while_a_step_is_rewritten_leaves_a_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _save(run, 5)
    real = os.replace
    calls = []

    def killed(src, dst):  # the process dies after moving the old folder aside
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(loop.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(run, 5, epoch=1)
    monkeypatch.setattr(loop.os, "replace", real)
    assert not (run / "checkpoints" / "step-000005").exists()
    found = latest_checkpoint(run)
    assert found is not None and found.name.startswith("step-000005.old-")
    assert json.loads((found / "position.json").read_text())["step"] == 5
    remove_debris(run)  # what a resume does first: the step comes back under its own name
    assert latest_checkpoint(run) == run / "checkpoints" / "step-000005"


def test_rewriting_a_step_keeps_one_folder_and_the_newest_position(tmp_path):
    run = tmp_path / "run"
    _save(run, 3)
    _save(run, 3, epoch=1)
    folders = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert folders == ["step-000003"]
    assert json.loads((run / "checkpoints/step-000003/position.json").read_text())["epoch"] == 1
    assert latest_checkpoint(run) == run / "checkpoints" / "step-000003"


def test_resume_takes_the_newest_complete_checkpoint(tmp_path):
    run = tmp_path / "run"
    _complete(run / "checkpoints" / "step-000002")
    _complete(run / "checkpoints" / "step-000004")
    (run / "checkpoints" / "step-000006").mkdir()  # a broken one: no files
    (run / "latest").write_text("step-000006")
    assert latest_checkpoint(run) == run / "checkpoints" / "step-000004"


def test_resume_without_any_complete_checkpoint_stops(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-000006").mkdir(parents=True)
    (run / "latest").write_text("step-000006")
    with pytest.raises(InputError, match="--resume found no complete checkpoint"):
        latest_checkpoint(run)
    assert latest_checkpoint(tmp_path / "new") is None  # a run that never wrote one


def test_debris_of_killed_writes_is_removed(tmp_path):
    run = tmp_path / "run"
    stale = run / "checkpoints" / "step-000002.tmp-999999"
    stale.mkdir(parents=True)
    ours = run / "checkpoints" / f"step-000004.tmp-{os.getpid()}"
    ours.mkdir()
    remove_debris(run)
    assert not stale.exists() and ours.exists()


def test_a_resumed_run_cuts_the_log_back_to_its_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 5)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (run / "metrics.jsonl").write_text(text + '{"step": 5, "lo')  # a torn last line
    trim_metrics(run, Position(step=4, metrics_bytes=len(text)))
    assert (run / "metrics.jsonl").read_text() == text
    # a checkpoint written before the byte count: rows up to its step, torn lines dropped
    (run / "metrics.jsonl").write_text(text + '{"step": 5, "lo')
    trim_metrics(run, Position(step=2))
    kept = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in kept] == [1, 2]


def test_a_step_moved_aside_by_a_kill_is_restored_or_removed(tmp_path):
    run = tmp_path / "run"
    old = _complete(run / "checkpoints" / "step-000003.old-4242")
    remove_debris(run)
    assert not old.exists() and (run / "checkpoints" / "step-000003").is_dir()
    again = _complete(run / "checkpoints" / "step-000003.old-4243")
    remove_debris(run)  # the replacement is complete: the old copy goes
    assert not again.exists() and (run / "checkpoints" / "step-000003").is_dir()
