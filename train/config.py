"""Training configuration: one frozen dataclass tree, loadable from YAML, overridable by flags.

Every leaf becomes a flag named by its path (``--optim.lr 1e-4``, ``--lora.r 16``,
``--grbp.enabled false``); a YAML file (``--config run.yaml``) gives the same tree. Defaults are
the E2E-GMNER paper's recipe. The resolved tree is saved beside every checkpoint.

This module knows nothing about torch or models.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from gmner_rt.prompt import PROMPT_STYLES

from .augment import GRBPConfig
from .sft import PAPER_MAX_PIXELS, PAPER_MIN_PIXELS

__all__ = [
    "TrainConfig",
    "add_config_flags",
    "checkpoint_config",
    "config_from_args",
    "load_config",
    "save_config",
]

#: LoRA targets: the language model's attention and MLP projections only (a plain name list
#: would also hit the vision tower's MLP).
LANGUAGE_MODEL_TARGETS = (
    r"^(?!.*visual).*(?:language_model|model\.layers).*\."
    r"(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
)


def _check(ok: bool, flag: str, message: str, value: object) -> None:
    if not ok:
        raise ValueError(f"--{flag} {message}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """The base model and how it is run.

    Attributes:
        path: local Qwen2.5-VL directory (``--model.path``).
        dtype: auto (bf16 where supported, else fp32), float32, bfloat16 or float16.
        device: auto (cuda, then mps, then cpu), cuda, mps or cpu.
        min_pixels / max_pixels: image area bounds the model sees (paper: 256..1024 x 28 x 28).
        gradient_checkpointing: auto (on for CUDA), on or off.
    """

    path: str = ""
    dtype: str = "auto"
    device: str = "auto"
    min_pixels: int = PAPER_MIN_PIXELS
    max_pixels: int = PAPER_MAX_PIXELS
    gradient_checkpointing: str = "auto"

    def __post_init__(self) -> None:
        _check(
            self.dtype in ("auto", "float32", "bfloat16", "float16"),
            "model.dtype",
            "must be auto, float32, bfloat16 or float16",
            self.dtype,
        )
        _check(
            self.device in ("auto", "cuda", "mps", "cpu"),
            "model.device",
            "must be auto, cuda, mps or cpu",
            self.device,
        )
        _check(
            0 < self.min_pixels <= self.max_pixels,
            "model.min_pixels",
            "must be positive and <= model.max_pixels",
            self.min_pixels,
        )
        _check(
            self.gradient_checkpointing in ("auto", "on", "off"),
            "model.gradient_checkpointing",
            "must be auto, on or off",
            self.gradient_checkpointing,
        )


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter (paper: r 32, alpha 64, dropout 0.05 on the language model).

    Attributes:
        enabled: False trains every language-model weight instead (full fine-tuning).
        r: rank. alpha: scaling numerator. dropout: dropout on the LoRA input.
        target_modules: regex of module names to adapt.
        train_vision: with full fine-tuning, train the vision tower too (the paper freezes
            it; a model trained from scratch, such as the demo's, needs it).
    """

    enabled: bool = True
    r: int = 32
    alpha: int = 64
    dropout: float = 0.05
    target_modules: str = LANGUAGE_MODEL_TARGETS
    train_vision: bool = False

    def __post_init__(self) -> None:
        _check(
            not (self.enabled and self.train_vision),
            "lora.train_vision",
            "needs lora.enabled false (full fine-tuning)",
            self.train_vision,
        )
        _check(self.r > 0, "lora.r", "must be > 0", self.r)
        _check(self.alpha > 0, "lora.alpha", "must be > 0", self.alpha)
        _check(0 <= self.dropout < 1, "lora.dropout", "must be in [0, 1)", self.dropout)


@dataclass(frozen=True)
class OptimConfig:
    """Optimisation (paper: AdamW lr 5e-4, wd 0.1, 3 % warmup, cosine, 10 epochs, 2 x 8).

    Attributes:
        lr: peak learning rate. weight_decay: AdamW decay. warmup_ratio: share of steps.
        scheduler: cosine or constant (after warmup). epochs: passes over the data.
        batch_size: examples per micro-batch. grad_accum: micro-batches per optimizer step
            and process: a data-parallel run's step takes batch_size x grad_accum x world
            size examples (the same step as one process with grad_accum x world size).
        max_grad_norm: gradient clipping (0 disables). max_length: token limit of an example.
        seed: seeds shuffling, dropout, LoRA init and GRBP. max_steps: stop early (0: off).
        vision_lr_scale: the vision tower's learning rate as a multiple of ``lr`` when it is
            trained (``lora.train_vision``); a model trained from scratch needs it well below
            1, or the tower's output grows into a large constant that carries no image.
    """

    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"
    epochs: int = 10
    batch_size: int = 2
    grad_accum: int = 8
    max_grad_norm: float = 1.0
    max_length: int = 2048
    seed: int = 42
    max_steps: int = 0
    vision_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", "must be > 0", self.lr)
        _check(
            self.vision_lr_scale > 0,
            "optim.vision_lr_scale",
            "must be > 0",
            self.vision_lr_scale,
        )
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0", self.weight_decay)
        _check(
            0 <= self.warmup_ratio < 1, "optim.warmup_ratio", "must be in [0, 1)", self.warmup_ratio
        )
        _check(
            self.scheduler in ("cosine", "constant"),
            "optim.scheduler",
            "must be cosine or constant",
            self.scheduler,
        )
        for name in ("epochs", "batch_size", "grad_accum", "max_length"):
            _check(getattr(self, name) > 0, f"optim.{name}", "must be > 0", getattr(self, name))
        _check(self.max_steps >= 0, "optim.max_steps", "must be >= 0", self.max_steps)


@dataclass(frozen=True)
class DataConfig:
    """Where examples come from.

    Attributes:
        dir: Twitter-GMNER folder (txt/, xml/). images: image folders, comma-separated.
        cot: reasoning JSONL; empty trains without reasoning unless ``cot`` is off anyway.
        use_cot: False trains answer-only targets (``--no-cot``).
        train_split / dev_split / test_split: split names ('' skips dev or test).
        limit: use only the first N tweets of each split (0: all), for smoke runs.
        skip_missing_images: leave out tweets whose image is missing.
        prompt: instruction wording, one of :data:`gmner_rt.prompt.PROMPT_STYLES`: ``full``
            (the default, for pretrained models) or ``compact`` (a one-line task tag, for a
            model trained from scratch on this task). ``gmner export`` writes the style the
            checkpoint was trained with into the bundle.
        num_workers: DataLoader processes that build training examples (image load,
            processor, tokenization, GRBP) ahead of the step; 0 builds them in the training
            process. An example depends on (seed, epoch, index) alone, so the losses are
            the same for any value. The reference recipe uses 4 on a GPU.
    """

    dir: str = ""
    images: str = ""
    cot: str = ""
    use_cot: bool = True
    train_split: str = "train"
    dev_split: str = "dev"
    test_split: str = "test"
    limit: int = 0
    skip_missing_images: bool = False
    prompt: str = "full"
    num_workers: int = 0

    def __post_init__(self) -> None:
        _check(self.limit >= 0, "data.limit", "must be >= 0", self.limit)
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0", self.num_workers)
        _check(
            self.prompt in PROMPT_STYLES,
            "data.prompt",
            f"must be one of {PROMPT_STYLES}",
            self.prompt,
        )


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation after each epoch (dev) and at the end (test at the best dev checkpoint).

    Attributes:
        enabled: run dev evaluation after each epoch.
        max_new_tokens: generation budget per tweet. batch_size: generation batch.
        protocol: metrics protocol (hindex or e2e).
    """

    enabled: bool = True
    max_new_tokens: int = 512
    batch_size: int = 4
    protocol: str = "hindex"

    def __post_init__(self) -> None:
        _check(self.max_new_tokens > 0, "eval.max_new_tokens", "must be > 0", self.max_new_tokens)
        _check(
            self.protocol in ("hindex", "e2e"),
            "eval.protocol",
            "must be hindex or e2e",
            self.protocol,
        )


@dataclass(frozen=True)
class OutputConfig:
    """Where a run writes.

    Attributes:
        dir: run folder (checkpoints, metrics.jsonl, predictions).
        save_every: also checkpoint every N optimizer steps (0: only at epoch ends).
        tensorboard: also log to TensorBoard (needs the tensorboard package).
    """

    dir: str = "runs/gmner"
    save_every: int = 0
    tensorboard: bool = False


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; saved as ``config.yaml`` beside each checkpoint."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    grbp: GRBPConfig = field(default_factory=GRBPConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# ---------------------------------------------------------------------------------------------
# YAML and flags
# ---------------------------------------------------------------------------------------------


def _leaf_type(cls: type, name: str) -> type:
    hint = typing.get_type_hints(cls)[name]
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _parse_bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _build(cls: type, values: dict, prefix: str = ""):
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown configuration key(s): {', '.join(prefix + k for k in unknown)}")
    kwargs = {}
    for name, value in values.items():
        hint = _leaf_type(cls, name)
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ValueError(f"configuration key {prefix}{name} must be a mapping")
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        elif hint is bool:
            kwargs[name] = _parse_bool(value) if isinstance(value, str) else bool(value)
        else:
            kwargs[name] = hint(value)
    return cls(**kwargs)


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """A config from a YAML file (optional) with ``{"optim.lr": 1e-4, ...}`` overrides."""
    tree: dict = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        tree = loaded
    for dotted, value in (overrides or {}).items():
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return _build(TrainConfig, tree)


def checkpoint_config(checkpoint: str | Path | None) -> Path | None:
    """The training config saved with a checkpoint: its own ``config.yaml``, else its run
    folder's (``RUN/checkpoints/step-N`` -> ``RUN/config.yaml``); None when there is none."""
    if checkpoint is None:
        return None
    checkpoint = Path(checkpoint)
    for path in (checkpoint / "config.yaml", checkpoint.parent.parent / "config.yaml"):
        if path.is_file():
            return path
    return None


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(
        yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), encoding="utf-8"
    )


def _leaves(cls: type, prefix: str = ""):
    for f in fields(cls):
        hint = _leaf_type(cls, f.name)
        if dataclasses.is_dataclass(hint):
            yield from _leaves(hint, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hint, f


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--section.field`` flag per leaf of :class:`TrainConfig` (default: unset)."""
    group = parser.add_argument_group("configuration (any leaf of the config tree)")
    for dotted, hint, f in _leaves(TrainConfig):
        kind = _parse_bool if hint is bool else hint
        group.add_argument(
            f"--{dotted}",
            dest=f"cfg:{dotted}",
            type=kind,
            default=None,
            metavar=hint.__name__.upper(),
            help=f"(default: {_default(f)})",
        )


def _default(f: dataclasses.Field) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    return "..."


def config_from_args(
    args: argparse.Namespace, config_path: str | Path | None = None
) -> TrainConfig:
    """The config of a command line: the YAML file, then every flag that was given."""
    overrides = {
        key[len("cfg:") :]: value
        for key, value in vars(args).items()
        if key.startswith("cfg:") and value is not None
    }
    return load_config(config_path, overrides)
