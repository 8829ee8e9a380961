"""The training loop: LoRA SFT with GRBP and CoT targets, evaluation per epoch, exact resume.

A run folder holds ``checkpoints/step-N/`` (adapter, processor, ``config.yaml``, trainable
weights, optimizer / scheduler / RNG state and the data position), a ``latest`` pointer,
``best/`` (the adapter with the best dev GMNER F1), ``metrics.jsonl`` and predictions.
Checkpoints are written to a temporary folder and renamed, so a kill never leaves a broken
one. Data order and GRBP draws derive from (seed, epoch, index) and the torch RNG state is
saved, so a resumed run takes the same steps with the same losses as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gmner_rt import progress
from gmner_rt.data import load_split
from gmner_rt.errors import InputError

from . import distributed
from .config import TrainConfig, save_config
from .data_loader import MicroBatches, TrainExamples, to_device, train_loader
from .dataset import ExampleSettings, example_settings
from .evaluate import mean_loss, score_rows
from .modeling import (
    library_deprecations_filtered,
    load_model_and_processor,
    resolve_device,
    resolve_dtype,
)
from .sft import SftConfig, build_rows, load_cot

log = logging.getLogger(__name__)


@dataclass
class Position:
    """Where training stands: next epoch / batch to run, optimizer steps done, best dev F1."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    best_f1: float = -1.0
    best_step: int = -1
    losses: list[float] = field(default_factory=list)
    #: bytes of metrics.jsonl when the checkpoint was written (a resume cuts the log back to
    #: them); None in checkpoints written before it was recorded
    metrics_bytes: int | None = None


# ---------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------


def load_rows(cfg: TrainConfig) -> dict[str, list[dict]]:
    """Training rows per split (train, and dev / test when present)."""
    if not cfg.data.dir or not cfg.data.images:
        raise InputError("training needs --data DIR and --images DIR (data.dir, data.images)")
    sft = SftConfig(
        image_dirs=tuple(Path(p) for p in cfg.data.images.split(",")),
        min_pixels=cfg.model.min_pixels,
        max_pixels=cfg.model.max_pixels,
        skip_missing_images=cfg.data.skip_missing_images,
        prompt=cfg.data.prompt,
        system_prompt=cfg.data.system_prompt,
    )
    cot = load_cot(cfg.data.cot) if cfg.data.use_cot and cfg.data.cot else None
    if cfg.data.use_cot and not cfg.data.cot:
        log.warning(
            "no --cot file: the prompt asks for reasoning and every target's think block "
            "will be empty; pass --cot FILE (written by gmner cot) for reasoning targets, or "
            "--no-cot for answer-only prompts and targets"
        )
    rows: dict[str, list[dict]] = {}
    for split in dict.fromkeys((cfg.data.train_split, cfg.data.dev_split, cfg.data.test_split)):
        if not split or (split != cfg.data.train_split and not _has_split(cfg.data.dir, split)):
            continue
        tweets = load_split(cfg.data.dir, split)
        if cfg.data.limit:
            tweets = tweets[: cfg.data.limit]
        rows[split], report = build_rows(tweets, sft, cot)
        log.info(
            "%s: %d examples (%d with reasoning, %d missing images)",
            split,
            report.rows,
            report.with_think,
            report.missing_images,
        )
    return rows


def _has_split(data_dir: str, split: str) -> bool:
    root = Path(data_dir)
    return (root / "txt" / f"{split}.txt").is_file() or (root / f"{split}.txt").is_file()


def prepare_model(cfg: TrainConfig, device: torch.device):
    """Base model + processor, with LoRA (or full fine-tuning of the language model)."""
    dtype = resolve_dtype(cfg.model.dtype, device)
    model, processor = load_model_and_processor(
        cfg.model.path,
        dtype=dtype,
        device=str(device),
        min_pixels=cfg.model.min_pixels,
        max_pixels=cfg.model.max_pixels,
    )
    torch.manual_seed(cfg.optim.seed)
    if cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
            task_type="CAUSAL_LM",
        )
        with library_deprecations_filtered():
            model = get_peft_model(model, lora)
    else:
        for name, p in model.named_parameters():
            p.requires_grad = cfg.lora.train_vision or "visual" not in name
    checkpointing = cfg.model.gradient_checkpointing
    if checkpointing == "on" or (checkpointing == "auto" and device.type == "cuda"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model, processor


def param_groups(model, cfg: TrainConfig) -> list[dict]:
    """The trainable parameters: the vision tower's at ``lr * vision_lr_scale``, the rest at
    ``lr`` (empty groups left out)."""
    vision, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (vision if "visual" in name else rest).append(p)
    groups = [
        {"params": rest, "lr": cfg.optim.lr},
        {"params": vision, "lr": cfg.optim.lr * cfg.optim.vision_lr_scale},
    ]
    return [g for g in groups if g["params"]]


def make_optimizer(model, cfg: TrainConfig, total_steps: int):
    opt = torch.optim.AdamW(param_groups(model, cfg), weight_decay=cfg.optim.weight_decay)
    warmup = math.ceil(cfg.optim.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.optim.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad
    }


def save_checkpoint(
    run: Path,
    model,
    processor,
    opt,
    sched,
    pos: Position,
    cfg: TrainConfig,
    *,
    rank_rng: list[dict] | None = None,
) -> Path:
    """Write ``checkpoints/step-N`` atomically and point ``latest`` at it. ``rank_rng``: every
    rank's RNG state in a data-parallel run (:func:`distributed.rng_state`)."""
    final = run / "checkpoints" / f"step-{pos.step:06d}"
    tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)  # the adapter alone with LoRA, the model without
    processor.save_pretrained(tmp)
    save_config(cfg, tmp / "config.yaml")
    save_file(trainable_state(model), tmp / "trainable.safetensors")
    torch.save(
        {
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "rank_rng": rank_rng,
        },
        tmp / "trainer_state.pt",
    )
    metrics = run / "metrics.jsonl"
    pos.metrics_bytes = metrics.stat().st_size if metrics.is_file() else 0
    (tmp / "position.json").write_text(json.dumps(vars(pos), indent=1), encoding="utf-8")
    # A step written twice (save_every, then the epoch's end): the old folder is moved aside,
    # never deleted, before the new one is in place, so a kill at any moment leaves a complete
    # checkpoint that latest_checkpoint finds.
    old = final.with_name(final.name + f".old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _write_atomic(run / "latest", final.name)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def load_trainable(model, path: Path) -> None:
    """Copies the weights of ``path`` (``trainable_state``'s names) into the model's
    trainable parameters; the file must hold exactly those."""
    state = load_file(path)
    params = dict(model.named_parameters())
    missing = sorted(set(state) ^ {n for n, p in params.items() if p.requires_grad})
    if missing:
        raise InputError(f"{path}: trainable weights do not match this model: {missing[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def load_checkpoint(ckpt: Path, model, opt, sched) -> Position:
    load_trainable(model, ckpt / "trainable.safetensors")
    trainer = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    opt.load_state_dict(trainer["optimizer"])
    sched.load_state_dict(trainer["scheduler"])
    _restore_rng(trainer, next(model.parameters()).device)
    return Position(**json.loads((ckpt / "position.json").read_text(encoding="utf-8")))


def _restore_rng(trainer: dict, device: torch.device) -> None:
    """Each rank's RNG state as the checkpoint saved it. A checkpoint from a run with another
    number of ranks gives rank 0 its stream and leaves the others their own seeds."""
    world, ranks = distributed.world_size(), trainer.get("rank_rng") or []
    if world > 1 and len(ranks) == world:
        distributed.set_rng_state(ranks[distributed.rank()], device)
        return
    if world > 1 or ranks:
        log.warning(
            "checkpoint written by %d process(es), resumed by %d: dropout draws differ from "
            "an uninterrupted run",
            max(1, len(ranks)),
            world,
        )
    if distributed.is_main():
        torch.set_rng_state(trainer["torch_rng"])
        if trainer["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(trainer["cuda_rng"])


#: The files every complete checkpoint holds (written last: position.json).
CHECKPOINT_FILES = ("trainable.safetensors", "trainer_state.pt", "position.json")
_STEP_DIR = re.compile(r"step-(\d+)(?:\.old-\d+)?")


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in CHECKPOINT_FILES)


def latest_checkpoint(run: Path) -> Path | None:
    """The checkpoint ``--resume`` continues from: the one ``latest`` names when it is
    complete, else the newest complete one (a step moved aside by a kill counts); None for a
    run that never wrote one. A run whose checkpoints are all broken is an error, never a
    silent restart from step 0."""
    pointer, folder = run / "latest", run / "checkpoints"
    named = folder / pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else None
    if named is not None and named.is_dir() and _complete(named):
        return named
    found = [
        (int(m.group(1)), not p.name.startswith(f"step-{m.group(1)}.old"), p)
        for p in (folder.iterdir() if folder.is_dir() else ())
        if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir() and _complete(p)
    ]
    if found:
        newest = max(found)[2]
        log.warning(
            "%s: latest names %s, which is incomplete; resuming from %s", run, named, newest
        )
        return newest
    started = folder.is_dir() and any(_STEP_DIR.fullmatch(p.name) for p in folder.iterdir())
    if named is not None or started:
        raise InputError(
            f"{run}: --resume found no complete checkpoint in {folder} (latest names "
            f"{named}); start a new run with another --output.dir, or delete this one"
        )
    return None


def remove_debris(run: Path) -> None:
    """Cleans what killed checkpoint writes left: temporary folders are deleted; a step moved
    aside (``step-N.old-PID``) is deleted when its replacement is complete, else moved back."""
    folder = run / "checkpoints"
    if not folder.is_dir():
        return
    for path in folder.glob("step-*.tmp-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid():
            log.info("removing %s, left by a run that was stopped", path)
            shutil.rmtree(path, ignore_errors=True)
    for path in folder.glob("step-*.old-*"):
        final = folder / path.name.split(".old-")[0]
        if final.is_dir() and _complete(final):
            shutil.rmtree(path, ignore_errors=True)
        elif not final.exists() and _complete(path):
            log.info("restoring %s, moved aside by a run that was stopped", final)
            os.replace(path, final)


def trim_metrics(run: Path, pos: Position) -> None:
    """Cuts the metrics log back to where it was when ``pos`` was saved: a resumed run logs
    the later rows again (steps, and dev evaluations of the same step), and a kill may have
    torn the last line. Checkpoints without the byte count fall back to keeping the rows of
    steps up to ``pos.step``."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return
    if pos.metrics_bytes is not None:
        with path.open("r+b") as fh:
            fh.truncate(min(pos.metrics_bytes, path.stat().st_size))
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            if json.loads(line).get("step", 0) <= pos.step:
                kept.append(line)
        except ValueError:  # a torn last line
            continue
    _write_atomic(path, "".join(line + "\n" for line in kept))


# ---------------------------------------------------------------------------------------------
# Loop
# ---------------------------------------------------------------------------------------------


def _log_metrics(run: Path, row: dict, writer=None) -> None:
    if not distributed.is_main():  # one writer
        return
    with (run / "metrics.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    if writer is not None:
        for key, value in row.items():
            if isinstance(value, int | float) and key != "step":
                writer.add_scalar(key, value, row.get("step", 0))


def _eval_settings(cfg: TrainConfig) -> ExampleSettings:
    """Example settings for evaluation: never perturbed."""
    return replace(example_settings(cfg), grbp=replace(cfg.grbp, enabled=False))


def _score_split(model, processor, rows, cfg: TrainConfig, pred_path: Path):
    """Reports by protocol (both are computed; ``eval.protocol`` selects)."""
    return score_rows(
        model,
        processor,
        rows,
        _eval_settings(cfg),
        max_new_tokens=cfg.eval.max_new_tokens,
        batch_size=cfg.eval.batch_size,
        pred_path=pred_path,
    )


def _scores_row(split: str, reports: dict, selected: str) -> dict:
    """Metrics-log fields of one evaluation: the selecting protocol's F1s under plain names
    (``dev_gmner_f1``), every protocol's under its own (``dev_e2e_gmner_f1``)."""
    chosen = reports[selected]
    row = {
        f"{split}_protocol": selected,
        f"{split}_gmner_f1": chosen.gmner.f1,
        f"{split}_mner_f1": chosen.mner.f1,
        f"{split}_eeg_f1": chosen.eeg.f1,
        f"{split}_malformed": chosen.malformed,
    }
    for protocol, report in reports.items():
        for task in ("gmner", "mner", "eeg"):
            row[f"{split}_{protocol}_{task}_f1"] = getattr(report, task).f1
    return row


def _scores_json(reports: dict, selected: str) -> str:
    """The selecting protocol's report, with every protocol's under ``protocols``."""
    data = reports[selected].as_dict()
    data["protocols"] = {p: r.as_dict() for p, r in reports.items()}
    return json.dumps(data, indent=1)


def _evaluate_epoch(model, processor, rows, cfg, run, pos, writer) -> None:
    dev_loss = mean_loss(model, processor, rows, _eval_settings(cfg), cfg.optim.batch_size)
    reports = _score_split(model, processor, rows, cfg, run / f"dev_pred_step{pos.step}.jsonl")
    report = reports[cfg.eval.protocol]
    f1 = report.gmner.f1
    log.info(
        "epoch %d step %d: dev loss %.4f; %s",
        pos.epoch,
        pos.step,
        dev_loss,
        "; ".join(
            f"{p}{' (selects)' if p == cfg.eval.protocol else ''} GMNER F1 {r.gmner.f1:.4f}, "
            f"MNER F1 {r.mner.f1:.4f}, EEG F1 {r.eeg.f1:.4f}"
            for p, r in reports.items()
        ),
    )
    _log_metrics(
        run,
        {
            "step": pos.step,
            "epoch": pos.epoch,
            "dev_loss": dev_loss,
            **_scores_row("dev", reports, cfg.eval.protocol),
        },
        writer,
    )
    if f1 > pos.best_f1:  # the same on every rank: all of them scored all outputs
        pos.best_f1, pos.best_step = f1, pos.step
        if not distributed.is_main():
            return
        tmp = run / "best.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        save_config(cfg, tmp / "config.yaml")  # best/ describes itself, as checkpoints do
        (tmp / "dev_scores.json").write_text(_scores_json(reports, cfg.eval.protocol))
        shutil.rmtree(run / "best", ignore_errors=True)
        os.replace(tmp, run / "best")


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    stop_after_steps: int | None = None,
    on_step: Callable[[Position], None] | None = None,
) -> Position:
    """Run (or resume) training; returns the final position (losses per optimizer step).

    Launched by ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1), the processes
    train data-parallel (:mod:`gmner.train.distributed`); rank 0 alone writes to the run
    folder, which every rank must see. ``stop_after_steps`` stops right after that step's
    checkpoint, as a kill would; ``on_step`` is called after each optimizer step (a
    profiler's ``step``).
    """
    with distributed.session(resolve_device(cfg.model.device)) as device:
        return _train(cfg, device, resume, stop_after_steps, on_step)


def _train(cfg: TrainConfig, device, resume, stop_after_steps, on_step) -> Position:
    run = Path(cfg.output.dir)
    run.mkdir(parents=True, exist_ok=True)
    rank, world, main = distributed.rank(), distributed.world_size(), distributed.is_main()
    rows = load_rows(cfg)
    train_rows = rows[cfg.data.train_split]
    model, processor = prepare_model(cfg, device)
    distributed.seed_rank(cfg.optim.seed)
    model.train()
    n_batches = math.ceil(len(train_rows) / cfg.optim.batch_size)
    per_step = cfg.optim.grad_accum * world  # micro-batches per optimizer step, all ranks
    steps_per_epoch = math.ceil(n_batches / per_step)
    total = cfg.optim.max_steps or steps_per_epoch * cfg.optim.epochs
    opt, sched = make_optimizer(model, cfg, total)
    pos = Position()
    if main:
        remove_debris(run)
    distributed.barrier()
    ckpt = latest_checkpoint(run) if resume else None
    if ckpt is not None:
        pos = load_checkpoint(ckpt, model, opt, sched)
        if main:
            trim_metrics(run, pos)
        log.info("resumed from %s (step %d)", ckpt, pos.step)
    elif resume and main:  # nothing to resume from: rows of an attempt killed before a save
        trim_metrics(run, Position(metrics_bytes=0))
    if main:
        save_config(cfg, run / "config.yaml")
    writer = _tensorboard(run) if cfg.output.tensorboard and main else None
    trained = distributed.data_parallel(model, device)
    autocast = device.type == "cuda" and resolve_dtype(cfg.model.dtype, device) != torch.float32
    sampler = MicroBatches(cfg.optim.seed, len(train_rows), cfg.optim.batch_size)
    loader = train_loader(
        TrainExamples(processor, train_rows, example_settings(cfg)),
        sampler,
        processor.tokenizer.pad_token_id,
        num_workers=cfg.data.num_workers,
        device=device,
        seed=cfg.optim.seed,
    )
    bar = progress.Progress(total, "train", "step", initial=pos.step, enabled=main)
    saved = pos.step if ckpt is not None else -1
    try:
        while pos.epoch < cfg.optim.epochs:
            if pos.step >= total and pos.batch == 0:
                break
            plan = distributed.step_plan(n_batches, pos.batch, per_step, rank, world)
            plan = plan[: max(0, total - pos.step)]  # nothing loaded past max_steps
            sampler.start(pos.epoch, [n for share in plan for n in share.batches])
            micro = iter(loader)
            t0 = time.perf_counter()
            for share in plan:
                model.train()
                running, tokens = torch.zeros((), device=device), 0
                for k in range(len(share.batches)):
                    batch, count = next(micro)
                    with distributed.no_sync(trained, sync=k == len(share.batches) - 1):
                        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                            loss = trained(**to_device(batch, device)).loss
                        distributed.scale_loss(loss, share).backward()
                    if share.real:
                        running += loss.detach() / share.size
                        tokens += count  # counted on the host
                if cfg.optim.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(
                        [p for p in model.parameters() if p.requires_grad], cfg.optim.max_grad_norm
                    )
                lr = sched.get_last_lr()[0]
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step_loss, tokens = distributed.step_totals(running, tokens)
                pos.batch += share.size
                pos.step += 1
                pos.losses.append(step_loss)
                bar.update(1, loss=step_loss)
                _log_metrics(run, _step_row(pos, step_loss, lr, tokens, t0, device), writer)
                if on_step is not None:
                    on_step(pos)
                t0 = time.perf_counter()
                if cfg.output.save_every and pos.step % cfg.output.save_every == 0:
                    _save(run, model, processor, opt, sched, pos, cfg, device)
                    saved = pos.step
                if stop_after_steps is not None and pos.step >= stop_after_steps:
                    return pos
            if pos.batch >= n_batches:  # also a resumed run saved at its epoch's last step
                pos.epoch, pos.batch = pos.epoch + 1, 0
                dev = rows.get(cfg.data.dev_split)
                if cfg.eval.enabled and dev:
                    _evaluate_epoch(model, processor, dev, cfg, run, pos, writer)
                _save(run, model, processor, opt, sched, pos, cfg, device)
                saved = pos.step
            elif pos.step >= total:  # max_steps ended the run inside an epoch
                break
    finally:
        bar.close()
    if saved != pos.step:  # a run shorter than an epoch still leaves a usable checkpoint
        _save(run, model, processor, opt, sched, pos, cfg, device)
    _final_test(model, processor, rows, cfg, run, pos, writer)
    return pos


def _save(run: Path, model, processor, opt, sched, pos: Position, cfg, device) -> None:
    """A checkpoint written by rank 0 with every rank's RNG state; the other ranks wait for
    it (so ``best/`` and checkpoints are complete when any rank reads them)."""
    states = distributed.all_gather(distributed.rng_state(device))
    if distributed.is_main():
        save_checkpoint(
            run,
            model,
            processor,
            opt,
            sched,
            pos,
            cfg,
            rank_rng=states if len(states) > 1 else None,
        )
    distributed.barrier()


def _step_row(pos: Position, loss: float, lr: float, tokens: int, t0: float, device) -> dict:
    """The metrics log's row for one optimizer step: loss, learning rate, time, tokens (the
    batches' non-padding tokens, image tokens included) and, on CUDA, the peak memory that
    torch has allocated since the start."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    row = {
        "step": pos.step,
        "epoch": pos.epoch,
        "loss": loss,
        "lr": lr,
        "step_time_s": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds if seconds > 0 else None,
    }
    if device.type == "cuda":
        row["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def _final_test(model, processor, rows, cfg, run, pos, writer) -> None:
    """Score the test split with the best dev adapter (the protocol the field reports)."""
    test = rows.get(cfg.data.test_split)
    if not test or not cfg.eval.enabled:
        return
    best = run / "best" / "trainable.safetensors"
    if best.is_file():
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in load_file(best).items():
                params[name].copy_(value)
    reports = _score_split(model, processor, test, cfg, run / "test_pred.jsonl")
    if distributed.is_main():
        (run / "test_scores.json").write_text(_scores_json(reports, cfg.eval.protocol))
    log.info(
        "test (best dev step %d): %s",
        pos.best_step,
        "; ".join(
            f"{p} GMNER F1 {r.gmner.f1:.4f}, MNER F1 {r.mner.f1:.4f}, EEG F1 {r.eeg.f1:.4f}"
            for p, r in reports.items()
        ),
    )
    _log_metrics(run, {"step": pos.step, **_scores_row("test", reports, cfg.eval.protocol)}, writer)


def _tensorboard(run: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise InputError("--output.tensorboard needs the tensorboard package") from exc
    return SummaryWriter(str(run / "tensorboard"))
