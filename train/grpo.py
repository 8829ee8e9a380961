"""The reinforcement stage after SFT: GRPO with TRL's ``GRPOTrainer``, rewarded by gmner's
own metrics (``gmner train --stage grpo --grpo.init SFT_CHECKPOINT``).

This module adapts gmner to TRL and nothing more: the prompts are the project's
(:func:`gmner.train.dataset.prompt_messages`, the same ids as SFT and the runtime, checked per
tweet), the reward is :func:`gmner_rt.metrics.reward` against the gold records in model pixels,
the optimizer takes the project's parameter groups, and the run folder keeps gmner's layout
(``config.yaml`` in every checkpoint, a ``latest`` pointer, ``metrics.jsonl``, ``best/`` by dev
GMNER F1, ``test_scores.json``), so ``gmner export --adapter RUN/checkpoints/checkpoint-N``
reads a GRPO checkpoint as it reads an SFT one. Sampling, the group-normalised advantages, the
clipped policy-gradient loss, the KL term to the starting model and checkpoint / resume
(optimizer, scheduler, RNG and data position) are TRL's and transformers' Trainer's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from gmner_rt.errors import InputError
from gmner_rt.geometry import ImageGeometry
from gmner_rt.metrics import reward
from gmner_rt.records import EntityRecord

from .config import TrainConfig, save_config
from .dataset import _to_model, load_image, prompt_messages, row_records
from .loop import (
    Position,
    _evaluate_epoch,
    _final_test,
    _log_metrics,
    load_rows,
    load_trainable,
    param_groups,
    remove_debris,
    trainable_state,
    trim_metrics,
)
from .modeling import (
    is_full_checkpoint,
    library_deprecations_filtered,
    load_model_and_processor,
    resolve_device,
    resolve_dtype,
)

log = logging.getLogger(__name__)

__all__ = ["GrpoResult", "gold_json", "grpo_rows", "reward_function", "train_grpo"]

#: Where TRL writes its checkpoints (``checkpoint-N``) inside the run folder.
CHECKPOINTS = "checkpoints"
#: The stage's position (best dev F1 and its step, the metrics log's length), in each checkpoint.
POSITION = "gmner_position.json"
#: The trainable weights under the live model's names, in each checkpoint (what a resume of a
#: fully fine-tuned run loads).
TRAINABLE = "trainable.safetensors"


@dataclass(frozen=True)
class GrpoResult:
    """What a GRPO run did: optimizer steps, the last checkpoint, the best dev step."""

    steps: int
    last: Path | None
    best_step: int
    best_f1: float


def _require_trl():
    try:
        import trl  # noqa: F401
        from datasets import Dataset  # noqa: F401
    except ImportError as exc:
        raise InputError(
            "gmner train --stage grpo needs TRL and datasets: pip install 'gmner[grpo]'"
        ) from exc


# ---------------------------------------------------------------------------------------------
# Data: prompts (the project's), gold for the reward (model pixels)
# ---------------------------------------------------------------------------------------------


def gold_json(row: dict, cfg: TrainConfig) -> str:
    """The row's gold records with boxes in model pixels (what a completion's boxes are
    in), as JSON: ``[[mention, type, [[x1, y1, x2, y2], ...] | null], ...]``."""
    w, h = row["image_size"]
    geo = ImageGeometry.for_image(
        w, h, min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels
    )
    records = (_to_model(r, geo, w, h) for r in row_records(row))
    return json.dumps([[r.mention, r.type, r.boxes] for r in records])


def _gold_records(text: str) -> list[EntityRecord]:
    return [
        EntityRecord(m, t, tuple(tuple(b) for b in boxes) if boxes else None)
        for m, t, boxes in json.loads(text)
    ]


def _literal_special_tokens(processor, text: str) -> bool:
    """True when ``text`` holds a control token's spelling (``<|im_end|>``...): TRL renders
    prompts with the chat template, which would read it as the control token, where gmner's
    SFT and runtime keep it text (:mod:`gmner_rt.text_ids`)."""
    tok = processor.tokenizer
    special = set(tok.all_special_ids) | {
        i for i, t in tok.added_tokens_decoder.items() if getattr(t, "special", False)
    }
    return any(i in special for i in tok(text, add_special_tokens=False)["input_ids"])


def grpo_rows(rows: list[dict], processor, cfg: TrainConfig) -> list[dict]:
    """TRL's dataset rows: the conversational prompt (an image placeholder where the image
    goes), the image path, the gold JSON. Tweets whose text spells a control token are left
    out, named in the log (their prompt ids would differ from SFT's)."""
    out, dropped = [], []
    for row in rows:
        if _literal_special_tokens(processor, row["text"]):
            dropped.append(row["id"])
            continue
        messages = prompt_messages(
            row, None, cfg.data.use_cot, cfg.data.prompt, cfg.data.system_prompt
        )
        out.append(
            {
                "prompt": [_placeholder(m) for m in messages],
                "image": row["images"][0],
                "gold": gold_json(row, cfg),
                "id": row["id"],
            }
        )
    if dropped:
        log.warning(
            "grpo: %d tweet(s) left out: their text spells a control token, which TRL's "
            "prompt rendering would not keep as text: %s",
            len(dropped),
            ", ".join(dropped[:10]),
        )
    return out


def _placeholder(message: dict) -> dict:
    """A message with its image part reduced to TRL's placeholder (the image itself travels
    in the dataset's ``image`` column and is loaded when a batch is drawn)."""
    content = message["content"]
    if isinstance(content, list):
        content = [{"type": "image"} if p.get("type") == "image" else p for p in content]
    return {**message, "content": content}


def _dataset(rows: list[dict]):
    """A ``datasets.Dataset`` whose images load on access, as gmner loads them (EXIF
    orientation applied, RGB)."""
    from datasets import Dataset

    def load(batch: dict) -> dict:
        return {**batch, "image": [load_image(p) for p in batch["image"]]}

    return Dataset.from_list(rows).with_transform(load)


def reward_function(cfg: TrainConfig):
    """TRL's reward callable: :func:`gmner_rt.metrics.reward` of each completion against its
    tweet's gold, with the configured weights."""
    weights = cfg.reward

    def gmner_reward(completions, gold, **_) -> list[float]:
        pairs = zip(completions, gold, strict=True)
        return [reward(_text(c), _gold_records(g), weights) for c, g in pairs]

    return gmner_reward


def _text(completion) -> str:
    """A completion's text: TRL gives conversational completions as message lists."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if isinstance(m, dict))


# ---------------------------------------------------------------------------------------------
# Model, optimizer, trainer
# ---------------------------------------------------------------------------------------------


def load_policy(cfg: TrainConfig, device: str):
    """The policy to train and its processor: the SFT checkpoint ``grpo.init`` (LoRA adapter
    on ``model.path``, trainable; or a fully fine-tuned model with SFT's trainable set)."""
    init = Path(cfg.grpo.init)
    if not init.is_dir():
        raise InputError(f"--grpo.init: {init} is not a checkpoint folder")
    dtype = resolve_dtype(cfg.model.dtype, torch.device(device))
    pixels = {"min_pixels": cfg.model.min_pixels, "max_pixels": cfg.model.max_pixels}
    if is_full_checkpoint(init):
        if cfg.lora.enabled:
            raise InputError(
                f"--grpo.init: {init} is a fully fine-tuned model, but lora.enabled is true; "
                "pass --lora.enabled false"
            )
        model, processor = load_model_and_processor(init, dtype=dtype, device=device, **pixels)
        for name, p in model.named_parameters():
            p.requires_grad = cfg.lora.train_vision or "visual" not in name
        return model, processor
    if not (init / "adapter_config.json").is_file():
        raise InputError(
            f"--grpo.init: {init} holds neither a LoRA adapter (adapter_config.json) nor a "
            "model (config.json)"
        )
    from peft import PeftModel

    model, processor = load_model_and_processor(
        cfg.model.path, dtype=dtype, device=device, **pixels
    )
    with library_deprecations_filtered():
        model = PeftModel.from_pretrained(model, str(init), is_trainable=True)
    return model, processor


def _optimizer(model, cfg: TrainConfig):
    """AdamW on the project's parameter groups (the vision tower at its scale) at the
    stage's constant learning rate."""
    groups = param_groups(model, replace(cfg, optim=replace(cfg.optim, lr=cfg.grpo.lr)))
    opt = torch.optim.AdamW(groups, weight_decay=cfg.optim.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


#: Vision control tokens a completion must never hold: sampled, they would make the model read
#: the completion as the start of another image (Qwen2.5-VL's M-RoPE positions count them).
VISION_TOKENS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


def vision_token_ids(model) -> list[int]:
    config = getattr(model, "config", None)
    ids = (getattr(config, name, None) for name in VISION_TOKENS)
    return sorted({i for i in ids if isinstance(i, int)})


def trl_args(cfg: TrainConfig, run: Path, device: str, suppress: list[int]):
    """TRL's configuration from gmner's: one process, no accumulation, a checkpoint every
    ``grpo.save_every`` steps (and at the last), the trainer's log kept in metrics.jsonl;
    ``suppress``: token ids sampling never draws."""
    from trl import GRPOConfig

    g = cfg.grpo
    cuda_bf16 = (
        device.startswith("cuda")
        and resolve_dtype(cfg.model.dtype, torch.device(device)) == torch.bfloat16
    )
    return GRPOConfig(
        output_dir=str(run / CHECKPOINTS),
        per_device_train_batch_size=g.prompts * g.group_size,
        num_generations=g.group_size,
        gradient_accumulation_steps=1,
        num_iterations=g.iterations,
        max_completion_length=g.max_new_tokens,
        temperature=g.temperature,
        beta=g.beta,
        epsilon=g.epsilon,
        loss_type=g.loss,
        learning_rate=g.lr,
        max_steps=g.steps,
        max_grad_norm=cfg.optim.max_grad_norm or 1e9,
        save_strategy="steps",
        save_steps=g.save_every or g.steps,
        save_only_model=False,
        logging_steps=1,
        report_to=["tensorboard"] if cfg.output.tensorboard else [],
        seed=cfg.optim.seed,
        data_seed=cfg.optim.seed,
        use_cpu=device == "cpu",
        bf16=cuda_bf16,
        dataloader_num_workers=cfg.data.num_workers,
        remove_unused_columns=False,
        disable_tqdm=True,
        generation_kwargs={"suppress_tokens": suppress},
        **_checkpointing(GRPOConfig, cfg, device),
    )


def _checkpointing(config_class, cfg: TrainConfig, device: str) -> dict:
    """Activation checkpointing as the SFT loop decides it, under the field name this
    transformers has (``activation_checkpointing``; older ones: ``gradient_checkpointing``)."""
    on = cfg.model.gradient_checkpointing == "on" or (
        cfg.model.gradient_checkpointing == "auto" and device.startswith("cuda")
    )
    names = {f.name for f in dataclasses.fields(config_class)}
    return {
        "activation_checkpointing"
        if "activation_checkpointing" in names
        else "gradient_checkpointing": on
    }


def _trainer_class():
    """TRL's trainer with one change: the order of the prompts in each epoch is drawn from
    (seed, epoch). TRL's sampler seeds one generator once and draws each epoch's order from
    where the last left it, so a run resumed after its first epoch would repeat the first
    epoch's order; the Trainer calls ``set_epoch`` at each epoch's start, and this sampler
    reseeds there, so a resumed run draws the orders the uninterrupted one drew."""
    from trl import GRPOTrainer
    from trl.trainer.utils import RepeatSampler

    class EpochSeededSampler(RepeatSampler):
        def set_epoch(self, epoch: int) -> None:
            if self.shuffle:
                self.generator.manual_seed(int(self.seed or 0) * 1_000_003 + epoch)

    class Trainer(GRPOTrainer):
        def _get_train_sampler(self, dataset=None):
            sampler = super()._get_train_sampler(dataset)
            if type(sampler) is not RepeatSampler:  # a TRL that samples otherwise
                raise RuntimeError(f"TRL's train sampler is {type(sampler).__name__}")
            sampler.__class__ = EpochSeededSampler
            return sampler

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            # A fully fine-tuned checkpoint's model.safetensors is in the original layout,
            # whose names the live model does not load (transformers 5 leaves them all
            # missing); gmner's trainable.safetensors holds the live names.
            trainable = Path(resume_from_checkpoint) / TRAINABLE
            if is_peft(model or self.model) or not trainable.is_file():
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            load_trainable(model or self.model, trainable)

    return Trainer


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


# ---------------------------------------------------------------------------------------------
# gmner's run folder around TRL's checkpoints
# ---------------------------------------------------------------------------------------------


def _callback(cfg: TrainConfig, run: Path, processor, rows: dict, stop_after: int | None):
    """A transformers callback: each TRL log row into metrics.jsonl; at each checkpoint
    gmner's config and position beside TRL's files, the ``latest`` pointer, and (with
    eval.enabled) dev scored and ``best/`` kept; an optional stop after a step (tests)."""
    from transformers import TrainerCallback

    class GmnerRun(TrainerCallback):
        def __init__(self) -> None:
            self.pos = Position()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                _log_metrics(run, {"step": state.global_step, **_numbers(logs)})
                log.info(
                    "grpo step %d/%d: reward %.4f (std %.4f), loss %.4g, kl %.4g, %.1f s",
                    state.global_step,
                    state.max_steps,
                    logs.get("reward", float("nan")),
                    logs.get("reward_std", float("nan")),
                    logs["loss"],
                    logs.get("kl", float("nan")),
                    logs.get("step_time", float("nan")),
                )

        def on_step_end(self, args, state, control, **kwargs):
            if stop_after is not None and state.global_step >= stop_after:
                control.should_save = True
                control.should_training_stop = True
            elif state.global_step >= state.max_steps:
                control.should_save = True  # the last step always leaves a checkpoint
            return control

        def on_save(self, args, state, control, model=None, **kwargs):
            folder = run / CHECKPOINTS / f"checkpoint-{state.global_step}"
            self.pos.step, self.pos.epoch = state.global_step, int(state.epoch or 0)
            save_file(trainable_state(model), folder / TRAINABLE)
            dev = rows.get(cfg.data.dev_split)
            if cfg.eval.enabled and dev:
                with torch.random.fork_rng():  # scoring never moves the sampling stream
                    _evaluate_epoch(model, processor, dev, cfg, run, self.pos, None)
                model.train()
            save_config(cfg, folder / "config.yaml")
            metrics = run / "metrics.jsonl"
            self.pos.metrics_bytes = metrics.stat().st_size if metrics.is_file() else 0
            (folder / POSITION).write_text(json.dumps(vars(self.pos), indent=1))
            (run / "latest.tmp").write_text(folder.name, encoding="utf-8")
            (run / "latest.tmp").replace(run / "latest")

    return GmnerRun()


def _numbers(logs: dict) -> dict:
    return {k: v for k, v in logs.items() if isinstance(v, int | float)}


def last_checkpoint(run: Path) -> Path | None:
    """The newest complete TRL checkpoint of ``run`` (one with gmner's position written)."""
    folder = run / CHECKPOINTS
    found = [
        (int(p.name.split("-")[1]), p)
        for p in (folder.glob("checkpoint-*") if folder.is_dir() else ())
        if p.name.split("-")[1].isdigit() and (p / POSITION).is_file()
    ]
    return max(found)[1] if found else None


def _check_run_folder(cfg: TrainConfig, run: Path, resume: bool) -> None:
    init = Path(cfg.grpo.init).resolve()
    if init == run.resolve() or run.resolve() in init.parents:
        raise InputError(
            f"--out: the grpo stage needs a run folder of its own, not {run}, which holds "
            f"its starting checkpoint {init}"
        )
    if not resume and any((run / CHECKPOINTS).glob("checkpoint-*")):
        raise InputError(
            f"--out: {run} already holds a grpo run's checkpoints; pass --resume to continue "
            "it, or another --out for a new run"
        )


def _check_one_process(device: str) -> None:
    """The stage runs in one process on one device (TRL would split the prompts between
    processes, and every process would write the run folder)."""
    from . import distributed

    if distributed.launched_world_size() > 1:
        raise InputError(
            "the grpo stage runs in one process: launch it without torchrun / accelerate"
        )
    if device.startswith("cuda") and (":" in device or torch.cuda.device_count() > 1):
        raise InputError(
            f"--model.device {device}: the grpo stage runs on one GPU, the first visible: "
            "choose it with CUDA_VISIBLE_DEVICES and pass --model.device cuda"
        )


def _check_dtype(cfg: TrainConfig, device: str) -> None:
    if resolve_dtype(cfg.model.dtype, torch.device(device)) == torch.float16:
        raise InputError(
            "--model.dtype float16: the grpo stage trains in bfloat16 or float32 (float16 "
            "weights under AdamW without a loss scaler lose their updates)"
        )


def train_grpo(
    cfg: TrainConfig, *, resume: bool = False, stop_after_steps: int | None = None
) -> GrpoResult:
    """Run (or resume) the GRPO stage of ``cfg`` in ``cfg.output.dir``; the best dev
    checkpoint (with eval.enabled) is then scored on the test split."""
    _require_trl()
    run = Path(cfg.output.dir)
    _check_run_folder(cfg, run, resume)
    device = str(resolve_device(cfg.model.device))
    _check_one_process(device)
    _check_dtype(cfg, device)
    run.mkdir(parents=True, exist_ok=True)
    rows = load_rows(cfg)
    model, processor = load_policy(cfg, device)
    # TRL left-pads prompt ids and pads the image fields with the tokenizer's side: both left
    processor.tokenizer.padding_side = "left"
    train_rows = grpo_rows(rows[cfg.data.train_split], processor, cfg)
    if not train_rows:
        raise InputError(f"{cfg.data.dir}: the {cfg.data.train_split} split has no usable tweet")
    remove_debris(run)
    ckpt = last_checkpoint(run) if resume else None
    callback = _callback(cfg, run, processor, rows, stop_after_steps)
    if ckpt is not None:
        callback.pos = Position(**json.loads((ckpt / POSITION).read_text(encoding="utf-8")))
        trim_metrics(run, callback.pos)
        log.info("resuming the grpo stage from %s (step %d)", ckpt, callback.pos.step)
    elif (run / "metrics.jsonl").exists():
        (run / "metrics.jsonl").unlink()
    save_config(cfg, run / "config.yaml")
    from transformers import PrinterCallback

    with library_deprecations_filtered():
        trainer = _trainer_class()(
            model=model,
            reward_funcs=reward_function(cfg),
            args=trl_args(cfg, run, device, vision_token_ids(model)),
            train_dataset=_dataset(train_rows),
            processing_class=processor,
            optimizers=_optimizer(model, cfg),
            callbacks=[callback],
        )
        trainer.remove_callback(PrinterCallback)  # the log goes to metrics.jsonl and logging
        trainer.train(resume_from_checkpoint=str(ckpt) if ckpt is not None else None)
    pos = callback.pos
    if stop_after_steps is None:
        _best_to_test(model, processor, rows, cfg, run, pos)
    last = last_checkpoint(run)
    return GrpoResult(trainer.state.global_step, last, pos.best_step, pos.best_f1)


def _best_to_test(model, processor, rows, cfg: TrainConfig, run: Path, pos: Position) -> None:
    """The test split scored once, with the best dev checkpoint's weights (SFT's rule)."""
    if (run / "best").is_dir():
        log.info("grpo: best dev GMNER F1 %.4f at step %d", pos.best_f1, pos.best_step)
    _final_test(model, processor, rows, cfg, run, pos, None)
