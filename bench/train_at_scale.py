"""Real-scale training steps on a GPU (not run in CI): a random Qwen2.5-VL-3B, the paper's recipe.

    python -m gmner.bench.train_at_scale --work /tmp/rs-train [--steps 20] [--model DIR]
        [--num-workers 4] [--profile DIR]
    python -m gmner.bench.train_at_scale --stage grpo --work /tmp/rs-grpo [--steps 3]
        [--group-size 8] [--prompts 2] [--max-new-tokens 256] [--beta 0.04]

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

``--stage grpo`` times the reinforcement stage instead (:mod:`gmner.bench.grpo_at_scale`):
one SFT step makes the starting checkpoint, then ``--steps`` GRPO steps run with a real run's
settings; the summary (step time, generated and total tokens/s, peak GPU memory) goes to
``WORK/real_scale_grpo.json``, rewritten after each step. It needs TRL and datasets
(``gmner[grpo]``; ``scripts/grpo-gpu-deps.sh`` packs them for the GPU machine).

Figures from a run are recorded in ``docs/benchmarks.md``. Without CUDA it exits with a clear
error; ``--device cpu --preset tiny`` (with small ``--max-side`` and token budgets) runs the
same path on the CPU with the tiny model, to check the bench itself.
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


def _build_model(out: Path, preset: str) -> float:
    from gmner.runtime.cli import main

    started = time.perf_counter()
    if main(["tiny-model", "--preset", preset, "--out", str(out)]) != 0:
        raise SystemExit(f"gmner tiny-model --preset {preset} failed")
    return time.perf_counter() - started


def _write_data(out: Path, tweets: int, max_side: int = MAX_SIDE) -> None:
    from gmner.train.synth import SynthConfig, write_synth

    low = min(MIN_SIDE, max_side)
    write_synth(
        out, SynthConfig(seed=0, train=tweets, dev=0, test=0, min_side=low, max_side=max_side)
    )


def _summary(rows: list[dict], warmup: int) -> dict:
    """Figures over the steps after ``warmup`` (the first steps pay for kernel selection)."""
    timed = rows[warmup:] or rows
    seconds = sum(r["step_time_s"] for r in timed)
    tokens = sum(r["tokens"] for r in timed)
    peaks = [r["peak_gpu_gib"] for r in rows if "peak_gpu_gib" in r]
    return {
        "steps": len(rows),
        "timed_steps": len(timed),
        "step_time_s_median": round(statistics.median(r["step_time_s"] for r in timed), 3),
        "tokens_per_step_mean": round(tokens / len(timed), 1),
        "tokens_per_s": round(tokens / seconds, 1),
        "peak_gpu_gib": round(max(peaks), 2) if peaks else None,  # None: a CPU run
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="working folder")
    parser.add_argument("--model", type=Path, help="model directory (default: build one)")
    parser.add_argument("--stage", choices=("sft", "grpo"), default="sft", help="what to time")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: sft 20, grpo 3)")
    parser.add_argument("--warmup", type=int, help="steps left out of the rates (sft 2, grpo 1)")
    parser.add_argument(
        "--num-workers", type=int, default=4, help="DataLoader workers (data.num_workers)"
    )
    parser.add_argument("--profile", type=Path, help="sft: record a profiler trace here")
    parser.add_argument("--profile-steps", type=int, default=3, help="steps the trace records")
    parser.add_argument("--top", type=int, default=30, help="ops in the printed table")
    grpo = parser.add_argument_group("grpo", "the stage's settings (a real run's by default)")
    grpo.add_argument("--group-size", type=int, default=8, help="completions per prompt")
    grpo.add_argument("--prompts", type=int, default=2, help="prompts per step")
    grpo.add_argument("--max-new-tokens", type=int, default=256, help="tokens per completion")
    grpo.add_argument("--beta", type=float, default=0.04, help="weight of the KL term")
    check = parser.add_argument_group("checking the bench itself on the CPU")
    check.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="default cuda")
    check.add_argument(
        "--preset", default=PRESET, help=f"gmner tiny-model preset (default {PRESET}; tiny)"
    )
    check.add_argument(
        "--max-side", type=int, default=MAX_SIDE, help=f"largest image side (default {MAX_SIDE})"
    )
    return parser


def _sft_config(args, model: Path, run: Path, **overrides):
    from gmner.train.config import load_config

    cuda = args.device == "cuda"
    return load_config(
        None,
        {
            "model.path": str(model),
            "model.device": args.device,
            "model.dtype": "bfloat16" if cuda else "float32",
            "model.gradient_checkpointing": "on",
            "data.dir": str(args.work / "data"),
            "data.images": str(args.work / "data" / "images"),
            "data.cot": str(args.work / "data" / "cot.jsonl"),
            "optim.max_steps": args.steps,
            "data.num_workers": args.num_workers,
            "eval.enabled": False,
            "output.dir": str(run),
            **overrides,
        },
    )


def _prepare(args, summary: dict, model: Path, tweets: int) -> None:
    """The model (built unless --model names one) and the synthetic data (unless written)."""
    if not (model / "config.json").is_file():
        summary["build_s"] = round(_build_model(model, args.preset), 1)
    if not (args.work / "data" / "cot.jsonl").is_file():
        _write_data(args.work / "data", tweets, args.max_side)


def _sft(args, summary: dict) -> dict:
    import torch
    from gmner.train.loop import train

    model = args.model or args.work / "model"
    cfg = _sft_config(args, model, args.work / "run")
    _prepare(args, summary, model, cfg.optim.batch_size * cfg.optim.grad_accum * args.steps)
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
    (args.work / "real_scale_train.json").write_text(json.dumps(summary, indent=1))
    return summary


def _grpo(args, summary: dict) -> dict:
    """One SFT step for a starting checkpoint, then the GRPO stage (:mod:`.grpo_at_scale`)."""
    import torch
    import transformers
    import trl

    from .grpo_at_scale import GrpoBench, grpo_config, run_grpo, sft_start

    bench = GrpoBench(
        steps=args.steps,
        group_size=args.group_size,
        prompts=args.prompts,
        max_new_tokens=args.max_new_tokens,
        beta=args.beta,
        warmup=args.warmup,
    )
    model = args.model or args.work / "model"
    _prepare(args, summary, model, max(8, bench.prompts * bench.steps))
    summary.update(torch=torch.__version__, transformers=transformers.__version__)
    summary["trl"] = trl.__version__
    started = time.perf_counter()
    one = {"optim.max_steps": 1, "optim.batch_size": 1, "optim.grad_accum": 1}
    start = sft_start(_sft_config(args, model, args.work / "sft-start", **one))
    summary["sft_start_s"] = round(time.perf_counter() - started, 1)
    cfg = grpo_config(start, args.work / "grpo-run", bench, args.device, args.num_workers)
    return run_grpo(cfg, args.work, summary, bench)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    grpo = args.stage == "grpo"
    args.steps = args.steps or (3 if grpo else 20)
    args.warmup = (1 if grpo else 2) if args.warmup is None else args.warmup
    if grpo and args.profile:
        raise SystemExit("real_scale: --profile records sft steps only (drop it or --stage grpo)")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "real_scale: no CUDA device; this check needs a GPU "
            "(--device cpu --preset tiny checks the bench itself)"
        )
    if grpo:
        _require_trl()
    args.work.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "none (cpu)"
    summary: dict = {"stage": args.stage, "preset": args.preset, "gpu": gpu}
    summary = _grpo(args, summary) if grpo else _sft(args, summary)
    sys.stdout.write(json.dumps(summary, indent=1) + "\n")
    return 0


def _require_trl() -> None:
    try:
        import datasets  # noqa: F401
        import trl  # noqa: F401
    except ImportError as exc:
        raise SystemExit(
            f"real_scale --stage grpo: {exc.name} is missing: pip install 'gmner[grpo]' "
            "(on the GPU machine: scripts/grpo-gpu-deps.sh, docs/benchmarks.md)"
        ) from exc


if __name__ == "__main__":
    raise SystemExit(main())
