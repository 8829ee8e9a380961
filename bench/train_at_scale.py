"""Real-scale training step on a GPU (not run in CI): a random Qwen2.5-VL-3B, the paper's recipe.

    python -m gmner.bench.train_at_scale --work /tmp/rs-train [--steps 20] [--model DIR]
        [--num-workers 4] [--profile DIR]

Builds a random-weight model with the real 3B configuration (``gmner tiny-model --preset
qwen2.5-vl-3b``, bf16) unless ``--model`` names one, writes synthetic tweets whose images
span the paper's pixel range (so the image token counts are the real ones, up to 1024), and
runs ``gmner train``'s loop on CUDA with the paper's settings: LoRA r 32 / alpha 64 on the
language model, bf16, gradient checkpointing, batch 2 x accumulation 8, max length 2048, for
``--steps`` optimizer steps, examples built by ``--num-workers`` DataLoader workers. It prints
one JSON summary (step times, tokens/s, peak GPU memory) and writes it to
``WORK/real_scale_train.json``. ``--profile DIR`` records a ``torch.profiler`` trace of
``--profile-steps`` steps after the warm-up (``DIR/trace.json``, for Perfetto or
chrome://tracing) and prints the ops that took the most device time (``DIR/top_ops.txt``).
Figures from a run are recorded in ``docs/benchmarks.md``. Without CUDA it exits with a clear
error.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

PRESET = "qwen2.5-vl-3b"
#: Synthetic image sides: smart_resize with the paper's pixel bounds gives 256 to 1024 tokens.
MIN_SIDE, MAX_SIDE = 448, 1400


def _build_model(out: Path) -> float:
    from gmner.runtime.cli import main

    started = time.perf_counter()
    if main(["tiny-model", "--preset", PRESET, "--out", str(out)]) != 0:
        raise SystemExit(f"gmner tiny-model --preset {PRESET} failed")
    return time.perf_counter() - started


def _write_data(out: Path, tweets: int) -> None:
    from gmner.train.synth import SynthConfig, write_synth

    write_synth(
        out, SynthConfig(seed=0, train=tweets, dev=0, test=0, min_side=MIN_SIDE, max_side=MAX_SIDE)
    )


def _summary(rows: list[dict], warmup: int) -> dict:
    """Figures over the steps after ``warmup`` (the first steps pay for kernel selection)."""
    timed = rows[warmup:] or rows
    seconds = sum(r["step_time_s"] for r in timed)
    tokens = sum(r["tokens"] for r in timed)
    return {
        "steps": len(rows),
        "timed_steps": len(timed),
        "step_time_s_median": round(statistics.median(r["step_time_s"] for r in timed), 3),
        "tokens_per_step_mean": round(tokens / len(timed), 1),
        "tokens_per_s": round(tokens / seconds, 1),
        "peak_gpu_gib": round(max(r["peak_gpu_gib"] for r in rows), 2),
        "first_step_s": round(rows[0]["step_time_s"], 2),
        "losses": [round(r["loss"], 4) for r in rows],
    }


def profiled_train(cfg, out: Path, *, skip: int, active: int, top: int) -> str:
    """Train ``cfg`` under ``torch.profiler``, recording optimizer steps ``skip + 1`` to
    ``skip + active`` (CPU and, where there is one, CUDA activity). Writes
    ``out/trace.json`` and ``out/top_ops.txt``, the table of the ``top`` ops by total device
    time (CPU time without CUDA), and returns that table."""
    import torch
    from gmner.train.loop import train
    from torch.profiler import ProfilerActivity, profile, schedule

    cuda = torch.cuda.is_available() and cfg.model.device != "cpu"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    out.mkdir(parents=True, exist_ok=True)
    plan = schedule(wait=max(0, skip - 1), warmup=min(1, skip), active=active, repeat=1)
    with profile(
        activities=activities,
        schedule=plan,
        on_trace_ready=lambda p: p.export_chrome_trace(str(out / "trace.json")),
        record_shapes=True,
    ) as prof:
        train(cfg, on_step=lambda pos: prof.step())
    table = prof.key_averages().table(
        sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=top
    )
    (out / "top_ops.txt").write_text(table + "\n", encoding="utf-8")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="working folder")
    parser.add_argument("--model", type=Path, help="model directory (default: build one)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the rates")
    parser.add_argument(
        "--num-workers", type=int, default=4, help="DataLoader workers (data.num_workers)"
    )
    parser.add_argument("--profile", type=Path, help="record a profiler trace into this folder")
    parser.add_argument("--profile-steps", type=int, default=3, help="steps the trace records")
    parser.add_argument("--top", type=int, default=30, help="ops in the printed table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("real_scale: no CUDA device; this check needs a GPU")
    from gmner.train.config import load_config
    from gmner.train.loop import train

    args.work.mkdir(parents=True, exist_ok=True)
    summary: dict = {"preset": PRESET, "gpu": torch.cuda.get_device_name(0)}
    model = args.model or args.work / "model"
    if not (model / "config.json").is_file():
        summary["build_s"] = round(_build_model(model), 1)
    cfg = load_config(
        None,
        {
            "model.path": str(model),
            "model.device": "cuda",
            "model.dtype": "bfloat16",
            "model.gradient_checkpointing": "on",
            "data.dir": str(args.work / "data"),
            "data.images": str(args.work / "data" / "images"),
            "data.cot": str(args.work / "data" / "cot.jsonl"),
            "optim.max_steps": args.steps,
            "data.num_workers": args.num_workers,
            "eval.enabled": False,
            "output.dir": str(args.work / "run"),
        },
    )
    per_step = cfg.optim.batch_size * cfg.optim.grad_accum
    if not (args.work / "data" / "cot.jsonl").is_file():
        _write_data(args.work / "data", per_step * args.steps)
    started = time.perf_counter()
    if args.profile:
        table = profiled_train(
            cfg, args.profile, skip=args.warmup, active=args.profile_steps, top=args.top
        )
        sys.stdout.write(table + "\n")
        summary["profile"] = str(args.profile)
    else:
        train(cfg)
    summary["train_s"] = round(time.perf_counter() - started, 1)
    rows = [
        json.loads(line)
        for line in (args.work / "run" / "metrics.jsonl").read_text().splitlines()
        if '"step_time_s"' in line
    ]
    summary.update(
        {
            "batch": f"{cfg.optim.batch_size} x {cfg.optim.grad_accum}",
            "num_workers": cfg.data.num_workers,
            "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha},
            "pixels": [cfg.model.min_pixels, cfg.model.max_pixels],
            "torch": torch.__version__,
            **_summary(rows, args.warmup),
        }
    )
    text = json.dumps(summary, indent=1)
    (args.work / "real_scale_train.json").write_text(text, encoding="utf-8")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
