"""Kills at random moments (SIGKILL, no clean-up): the trainer resumed after two kills ends
with the losses, metrics and weights of an uninterrupted run; an export killed mid-way leaves
nothing that stops the next export to the same folder. Kept short for CI: the tiny model, four
optimizer steps, one export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from gmner.train.config import load_config, save_config  # noqa: E402
from gmner.train.loop import latest_checkpoint  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from gmner_rt.data import load_split  # noqa: E402

pytestmark = pytest.mark.slow
FIXTURE = Path(__file__).parents[1] / "fixtures" / "twitter-gmner-v2"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for t in [*load_split(FIXTURE, "train"), *load_split(FIXTURE, "dev")]:
        w, h = t.image_size or (320, 240)
        Image.new("RGB", (w, h), (30 + len(t.text) % 200, 90, 150)).save(folder / f"{t.img_id}.jpg")
    return folder


def _cfg(tiny: Path, images: Path, out: Path):
    return load_config(
        None,
        {
            "model.path": str(tiny),
            "data.dir": str(FIXTURE),
            "data.images": str(images),
            "data.use_cot": False,
            "output.dir": str(out),
            "output.save_every": 1,
            "optim.batch_size": 2,
            "optim.grad_accum": 2,
            "optim.epochs": 2,
            "data.limit": 8,
            "eval.enabled": False,
            "lora.dropout": 0.3,
            "model.min_pixels": 56 * 56,
            "model.max_pixels": 224 * 224,
        },
    )


def _start(code: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def _kill_when(proc: subprocess.Popen, ready, delay: float, limit: float = 120.0) -> None:
    """SIGKILL ``proc`` ``delay`` seconds after ``ready()`` first holds (or when it ends)."""
    started = time.monotonic()
    while not ready() and proc.poll() is None and time.monotonic() - started < limit:
        time.sleep(0.02)
    time.sleep(delay)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _steps_logged(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _losses(run: Path) -> list[float]:
    path = run / "metrics.jsonl"
    return [json.loads(line)["loss"] for line in path.read_text().splitlines() if line.strip()]


def test_training_killed_twice_resumes_to_the_uninterrupted_result(tiny, images, tmp_path):
    # Every run trains in a fresh process, as a user's does: a test session's own process may
    # have had torch's threads set by an earlier test, and an explicit torch.set_num_threads,
    # even to the same count, changes the last bits of CPU kernels' sums.
    save_config(_cfg(tiny, images, tmp_path / "a"), tmp_path / "a.yaml")
    run = tmp_path / "b"
    cfg = _cfg(tiny, images, run)
    save_config(cfg, tmp_path / "b.yaml")

    def code(yaml: Path) -> str:
        return (
            "from gmner.train.config import load_config; from gmner.train.loop import train; "
            f"train(load_config({str(yaml)!r}), resume=True)"
        )

    assert _start(code(tmp_path / "a.yaml")).wait(300) == 0
    reference_losses = _losses(tmp_path / "a")
    code = code(tmp_path / "b.yaml")
    rng = np.random.default_rng(7)
    cut = []
    for target in (1, 2, 3):  # once the first, second, third step is logged, plus 0-80 ms
        proc = _start(code)
        _kill_when(proc, lambda t=target: len(_steps_logged(run)) >= t, float(rng.uniform(0, 0.08)))
        last = latest_checkpoint(run)
        cut.append(json.loads((last / "position.json").read_text())["step"] if last else 0)
    assert cut[0] < 4  # the first kill did cut the run short
    assert _start(code).wait(300) == 0  # the last resume runs to the end
    assert len(reference_losses) == 4 and _losses(run)[-1] == reference_losses[-1]
    assert _steps_logged(run) == _steps_logged(tmp_path / "a")  # each step logged once
    ours = load_file(latest_checkpoint(run) / "trainable.safetensors")
    theirs = load_file(latest_checkpoint(tmp_path / "a") / "trainable.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not list((run / "checkpoints").glob("*.tmp-*"))
    assert not list((run / "checkpoints").glob("*.old-*"))


def test_an_export_killed_midway_does_not_block_the_next(tiny, tmp_path):
    pytest.importorskip("onnx")
    out = tmp_path / "bundle"
    code = (
        "import sys; from gmner.runtime.cli import main; "
        f"sys.exit(main(['export', '--model', {str(tiny)!r}, '--out', {str(out)!r}]))"
    )
    proc = _start(code)
    _kill_when(proc, lambda: any(tmp_path.glob("bundle.tmp-*/*.onnx")), 0.1)
    assert not out.exists() or not any(out.iterdir())  # nothing half-written in place
    from gmner.runtime.cli import main

    assert main(["export", "--model", str(tiny), "--out", str(out), "--no-verify"]) == 0
    assert (out / "manifest.json").is_file()
    assert not list(tmp_path.glob("bundle.tmp-*"))  # the killed export's debris is gone
