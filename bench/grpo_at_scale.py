"""GRPO steps at real scale (``python -m gmner.bench.train_at_scale --stage grpo``).

Starts from a genuine SFT checkpoint made by one step of ``gmner train``'s loop (batch 1, no
accumulation: the cheapest way to get ``RUN/checkpoints/step-1`` with the LoRA adapter and the
``config.yaml`` the stage inherits), then runs :func:`gmner.train.grpo.train_grpo` for a few
steps with a real run's settings (8 completions per prompt, 2 prompts per step, 256 new
tokens, beta 0.04, bf16, gradient checkpointing) and summarises what each step cost: TRL's
step time, the wall time between steps, the time spent sampling, generated and total tokens,
and peak GPU memory.

This module only observes the stage: it listens to the stage's per-step log line (to sample
the clock and ``torch.cuda.max_memory_allocated`` and to rewrite the summary after every step,
so a run cut short by a time limit still leaves its figures) and times TRL's ``_generate``.
It knows nothing of how the model, the data or the prompts are made; the command line and the
model and data builders are :mod:`gmner.bench.train_at_scale`'s.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: The summary's file in the working folder.
SUMMARY = "real_scale_grpo.json"
#: The logger and message with which train_grpo announces each optimizer step.
STEP_LOGGER, STEP_MESSAGE = "gmner.train.grpo", "grpo step %d/%d"


@dataclass(frozen=True)
class GrpoBench:
    """The stage's settings (flags of the same names)."""

    steps: int = 3
    group_size: int = 8
    prompts: int = 2
    max_new_tokens: int = 256
    beta: float = 0.04
    warmup: int = 1


class StepWatch(logging.Handler):
    """Per optimizer step: wall clock, peak GPU memory so far, and the seconds TRL's
    ``_generate`` took during the step; calls ``on_step`` after each. The first step's clock
    starts when its sampling does (model loading and TRL's set-up left out)."""

    def __init__(self, cuda: bool, on_step=None) -> None:
        super().__init__()
        self.cuda, self.on_step = cuda, on_step
        self.rows: list[dict] = []
        self.generation_s = 0.0
        self.last: float | None = None

    def generated(self, started: float, seconds: float) -> None:
        if self.last is None:
            self.last = started
        self.generation_s += seconds

    def emit(self, record: logging.LogRecord) -> None:
        if not str(record.msg).startswith(STEP_MESSAGE):
            return
        now = time.perf_counter()
        row = {
            "step": int(record.args[0]),
            "wall_s": now - (self.last if self.last is not None else now),
            "generation_s": self.generation_s,
            "peak_gpu_gib": _peak_gpu_gib() if self.cuda else None,
        }
        self.rows.append(row)
        self.last, self.generation_s = now, 0.0
        if self.on_step is not None:
            self.on_step()


def _peak_gpu_gib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@contextlib.contextmanager
def listening(watch: StepWatch):
    """``watch`` on the stage's logger, at INFO whatever the logging set-up (the step lines
    are INFO records)."""
    logger = logging.getLogger(STEP_LOGGER)
    level = logger.level
    logger.addHandler(watch)
    if not logger.isEnabledFor(logging.INFO):
        logger.setLevel(logging.INFO)
    try:
        yield watch
    finally:
        logger.removeHandler(watch)
        logger.setLevel(level)


@contextlib.contextmanager
def timed_generation(watch: StepWatch):
    """Adds the seconds of each call of TRL's ``GRPOTrainer._generate`` (prompt rendering and
    sampling of one step's completions) to ``watch``; restores the method on exit."""
    from trl import GRPOTrainer

    original = GRPOTrainer._generate

    def _generate(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            watch.generated(started, time.perf_counter() - started)

    GRPOTrainer._generate = _generate
    try:
        yield watch
    finally:
        GRPOTrainer._generate = original


def sft_start(sft_cfg) -> Path:
    """One step of gmner's SFT loop (``sft_cfg``, whose ``optim.max_steps`` is 1): its
    checkpoint, a LoRA adapter with ``config.yaml``, is where the stage starts."""
    from gmner.train.loop import train

    train(sft_cfg)
    run = Path(sft_cfg.output.dir)
    return run / "checkpoints" / (run / "latest").read_text(encoding="utf-8").strip()


def grpo_config(start: Path, run: Path, bench: GrpoBench, device: str, workers: int):
    """The stage's configuration: the SFT checkpoint's, with the bench's settings."""
    from gmner.train.config import checkpoint_config, load_config

    overrides = {
        "stage": "grpo",
        "grpo.init": str(start),
        "grpo.steps": bench.steps,
        "grpo.group_size": bench.group_size,
        "grpo.prompts": bench.prompts,
        "grpo.max_new_tokens": bench.max_new_tokens,
        "grpo.beta": bench.beta,
        "grpo.save_every": 0,  # one checkpoint, at the last step
        "model.device": device,
        "model.dtype": "bfloat16" if device == "cuda" else "float32",
        "model.gradient_checkpointing": "on",
        "data.num_workers": workers,
        "eval.enabled": False,
        "output.dir": str(run),
    }
    return load_config(None, overrides, inherit=checkpoint_config(start))


def run_grpo(cfg, work: Path, summary: dict, bench: GrpoBench) -> dict:
    """Run the stage of ``cfg``, rewriting ``work/real_scale_grpo.json`` after each step;
    returns the final summary."""
    import torch
    from gmner.train.grpo import train_grpo

    cuda = cfg.model.device == "cuda"
    run = Path(cfg.output.dir)
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        summary["gpu_allocated_at_start_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    settings = {
        "group_size": bench.group_size,
        "prompts": bench.prompts,
        "completions_per_step": bench.group_size * bench.prompts,
        "max_new_tokens": bench.max_new_tokens,
        "beta": bench.beta,
        "lr": cfg.grpo.lr,
        "loss": cfg.grpo.loss,
        "dtype": cfg.model.dtype,
        "gradient_checkpointing": cfg.model.gradient_checkpointing,
        "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha},
        "pixels": [cfg.model.min_pixels, cfg.model.max_pixels],
    }
    summary["settings"] = settings

    def write() -> dict:
        done = {**summary, **grpo_summary(watch.rows, _trl_rows(run), bench)}
        (work / SUMMARY).write_text(json.dumps(done, indent=1), encoding="utf-8")
        return done

    watch = StepWatch(cuda=cuda, on_step=write)
    started = time.perf_counter()
    with listening(watch), timed_generation(watch):
        train_grpo(cfg)
    if not watch.rows:
        log.warning("real_scale: no %r line was logged; the summary has no steps", STEP_MESSAGE)
    summary["grpo_s"] = round(time.perf_counter() - started, 1)
    summary["peak_rss_gib"] = round(_peak_rss_gib(), 2)
    return write()


def _trl_rows(run: Path) -> dict[int, dict]:
    """TRL's log rows of the stage (metrics.jsonl), by step."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines())
    return {r["step"]: r for r in rows if "loss" in r}


def step_rows(watched: list[dict], trl: dict[int, dict], bench: GrpoBench) -> list[dict]:
    """One row per step: the bench's observations joined with TRL's log. ``num_tokens`` is
    TRL's running count of prompt and completion tokens (each prompt counted once per
    completion, image tokens included), so a step's tokens are its difference."""
    rows, seen = [], 0
    for w in watched:
        t = trl.get(w["step"], {})
        total = t.get("num_tokens", math.nan) - seen
        seen = t.get("num_tokens", seen)
        rows.append(
            {
                **w,
                "step_time_s": t.get("step_time", math.nan),
                "generated_tokens": t.get("completions/mean_length", math.nan)
                * bench.group_size
                * bench.prompts,
                "total_tokens": total,
                "completion_mean_length": t.get("completions/mean_length", math.nan),
                "clipped_ratio": t.get("completions/clipped_ratio", math.nan),
                "reward": t.get("reward", math.nan),
                "loss": t.get("loss", math.nan),
                "kl": t.get("kl", math.nan),
            }
        )
    return rows


def grpo_summary(watched: list[dict], trl: dict[int, dict], bench: GrpoBench) -> dict:
    """Figures over the steps after ``bench.warmup`` (all of them when there are no more)."""
    rows = step_rows(watched, trl, bench)
    if not rows:
        return {"steps": 0}
    timed = rows[bench.warmup :] or rows
    peaks = [r["peak_gpu_gib"] for r in rows if r["peak_gpu_gib"] is not None]
    generated = sum(r["generated_tokens"] for r in timed)
    return {
        "steps": len(rows),
        "timed_steps": len(timed),
        "step_time_s_median": _r(statistics.median(r["step_time_s"] for r in timed), 3),
        "wall_step_s_median": _r(statistics.median(r["wall_s"] for r in timed), 3),
        "generation_s_median": _r(statistics.median(r["generation_s"] for r in timed), 3),
        "generation_share": _r(
            sum(r["generation_s"] for r in timed) / sum(r["wall_s"] for r in timed), 3
        ),
        "generated_tokens_per_step_mean": _r(generated / len(timed), 1),
        "total_tokens_per_step_mean": _r(sum(r["total_tokens"] for r in timed) / len(timed), 1),
        "generated_tokens_per_s": _r(generated / sum(r["generation_s"] for r in timed), 1),
        "total_tokens_per_s": _r(
            sum(r["total_tokens"] for r in timed) / sum(r["wall_s"] for r in timed), 1
        ),
        "peak_gpu_gib": _r(max(peaks), 2) if peaks else None,
        "first_step_s": _r(rows[0]["wall_s"], 2),
        "per_step": [{k: _r(v, 4) for k, v in r.items()} for r in rows],
    }


def _r(value, digits: int):
    return round(value, digits) if isinstance(value, float) else value
