"""Real-scale training step on a GPU (not run in CI): a random Qwen2.5-VL-3B, the paper's recipe.

    python -m gmner.bench.train_at_scale --work /tmp/rs-train [--steps 20] [--model DIR]

Builds a random-weight model with the real 3B configuration (``gmner tiny-model --preset
qwen2.5-vl-3b``, bf16) unless ``--model`` names one, writes synthetic tweets whose images
span the paper's pixel range (so the image token counts are the real ones, up to 1024), and
runs ``gmner train``'s loop on CUDA with the paper's settings: LoRA r 32 / alpha 64 on the
language model, bf16, gradient checkpointing, batch 2 x accumulation 8, max length 2048, for
``--steps`` optimizer steps. It prints one JSON summary (step times, tokens/s, peak GPU memory)
and writes it to ``WORK/real_scale_train.json``. Figures from a run are recorded in
``docs/benchmarks.md``. Without CUDA it exits with a clear error.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="working folder")
    parser.add_argument("--model", type=Path, help="model directory (default: build one)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the rates")
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
            "eval.enabled": False,
            "output.dir": str(args.work / "run"),
        },
    )
    per_step = cfg.optim.batch_size * cfg.optim.grad_accum
    if not (args.work / "data" / "cot.jsonl").is_file():
        _write_data(args.work / "data", per_step * args.steps)
    started = time.perf_counter()
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
