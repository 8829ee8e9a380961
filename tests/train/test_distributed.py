"""Data-parallel training on the CPU: two processes launched by torchrun (gloo) train the tiny
model as one process does with the same global batch, write each log row and checkpoint
once, shard dev / test generation, and resume exactly after being stopped. Kept short for
CI: 6 tweets, 2 epochs of 2 optimizer steps (the second one short: one rank runs a
weight-0 micro-batch)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from gmner.train.config import load_config, save_config  # noqa: E402
from gmner.train.distributed import step_plan  # noqa: E402
from gmner.train.loop import latest_checkpoint, train  # noqa: E402
from PIL import Image  # noqa: E402

from gmner_rt.data import load_split  # noqa: E402

pytestmark = pytest.mark.slow
FIXTURE = Path(__file__).parents[1] / "fixtures" / "twitter-gmner-v2"
#: Relative tolerance of the two-process losses against one process's: the same sums in
#: another order (DDP's gradient average, the loss all-reduce) in float32.
RTOL = 1e-4


def test_step_plan_splits_each_step_between_ranks():
    # 5 micro-batches from the second on, 2 per rank and step, 2 ranks
    plans = [step_plan(6, 1, 4, r, 2) for r in (0, 1)]
    assert [(s.size, s.batches, s.real) for s in plans[0]] == [(4, (1, 3), True), (1, (5,), True)]
    assert [(s.size, s.batches, s.real) for s in plans[1]] == [(4, (2, 4), True), (1, (5,), False)]
    # the union over ranks is what one process with accumulation 4 runs
    single = step_plan(6, 1, 4, 0, 1)
    assert [sorted(a.batches + b.batches) for a, b in zip(*plans, strict=True) if b.real] == [
        list(s.batches) for s in single if s.size > 1
    ]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for t in [*load_split(FIXTURE, "train"), *load_split(FIXTURE, "dev")]:
        w, h = t.image_size or (320, 240)
        Image.new("RGB", (w, h), (30 + len(t.text) % 200, 90, 150)).save(folder / f"{t.img_id}.jpg")
    return folder


def _cfg(tiny: Path, images: Path, out: Path, grad_accum: int):
    return load_config(
        None,
        {
            "model.path": str(tiny),
            "data.dir": str(FIXTURE),
            "data.images": str(images),
            "data.use_cot": False,
            "data.limit": 6,
            "data.test_split": "dev",
            "output.dir": str(out),
            "output.save_every": 1,
            "optim.batch_size": 2,
            "optim.grad_accum": grad_accum,
            "optim.epochs": 2,
            "optim.lr": 5e-3,
            "optim.warmup_ratio": 0.0,
            "optim.scheduler": "constant",
            "lora.dropout": 0.0,  # dropout draws differ per rank
            "eval.max_new_tokens": 4,
            "model.min_pixels": 56 * 56,
            "model.max_pixels": 224 * 224,
        },
    )


def _torchrun(*args: str) -> None:
    """Two processes on this machine (a free port picked by the standalone rendezvous)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


def _gmner() -> str:
    """The ``gmner`` console script: torchrun runs it as it runs any script."""
    found = shutil.which("gmner", path=str(Path(sys.executable).parent)) or shutil.which("gmner")
    assert found, "the gmner console script is not installed"
    return found


def _pred_ids(path: Path) -> list[str]:
    return [json.loads(line)["img_id"] for line in path.read_text().splitlines()]


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_procs(tiny, images, tmp_path_factory) -> Path:
    """An uninterrupted run of `torchrun --nproc_per_node 2 gmner train`: batch 2 x
    accumulation 1 x 2 processes."""
    run = tmp_path_factory.mktemp("ddp") / "run"
    config = run.parent / "run.yaml"
    save_config(_cfg(tiny, images, run, grad_accum=1), config)
    _torchrun(_gmner(), "train", "--config", str(config))
    return run


def test_two_processes_follow_one_with_the_same_global_batch(two_procs, tiny, images, tmp_path):
    one = train(_cfg(tiny, images, tmp_path / "one", grad_accum=2))
    rows = _rows(two_procs)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]  # one writer: each step logged once
    assert [r["loss"] for r in steps] == pytest.approx(one.losses, rel=RTOL)
    # every step's tokens are the whole global batch's, the weight-0 micro-batch left out
    assert [r["tokens"] for r in steps] == [
        r["tokens"] for r in _rows(tmp_path / "one") if "tokens" in r
    ]
    # generation was sharded and gathered: all dev tweets predicted, in order, scored once
    dev = [r for r in rows if "dev_gmner_f1" in r]
    assert [r["step"] for r in dev] == [2, 4]
    ids = _pred_ids(two_procs / "test_pred.jsonl")
    ones = _pred_ids(tmp_path / "one" / "test_pred.jsonl")
    assert ids == ones and len(ids) == 6
    assert (two_procs / "best" / "adapter_config.json").is_file()
    assert (two_procs / "test_scores.json").is_file()
    ours = torch.load(latest_checkpoint(two_procs) / "trainer_state.pt", weights_only=False)
    ranks = ours["rank_rng"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])


def test_two_processes_stopped_and_resumed_match_the_uninterrupted_run(
    two_procs, tiny, images, tmp_path
):
    run = tmp_path / "run"
    config = tmp_path / "run.yaml"
    save_config(_cfg(tiny, images, run, grad_accum=1), config)
    stop = tmp_path / "stop.py"
    stop.write_text(
        "import sys\n"
        "from gmner.train.config import load_config\n"
        "from gmner.train.loop import train\n"
        "train(load_config(sys.argv[1]), stop_after_steps=3)\n"
    )
    _torchrun(str(stop), str(config))
    assert latest_checkpoint(run).name == "step-000003"
    _torchrun(_gmner(), "train", "--config", str(config), "--resume")
    ours, theirs = _rows(run), _rows(two_procs)
    assert [r["step"] for r in ours] == [r["step"] for r in theirs]
    assert [r["loss"] for r in ours if "loss" in r] == [r["loss"] for r in theirs if "loss" in r]
    assert [r.get("dev_gmner_f1") for r in ours] == [r.get("dev_gmner_f1") for r in theirs]
