"""Training configuration: one frozen dataclass tree, loadable from YAML, overridable by flags.

Every leaf becomes a flag named by its path (``--optim.lr 1e-4``, ``--lora.r 16``,
``--grbp.enabled false``); a YAML file (``--config run.yaml``) gives the same tree. Defaults are
the E2E-GMNER paper's recipe. The resolved tree is saved beside every checkpoint.

This module knows nothing about torch or models.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from gmner_rt.metrics import PROTOCOLS, RewardWeights
from gmner_rt.prompt import PROMPT_STYLES

from .augment import DISTRIBUTIONS, GRBPConfig
from .sft import PAPER_MAX_PIXELS, PAPER_MIN_PIXELS

__all__ = [
    "RECIPES",
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


#: Leaves that take one of a fixed set of values: their flags offer these as choices, and
#: validation (YAML files included) checks them.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "model.device": ("auto", "cuda", "mps", "cpu"),
    "model.gradient_checkpointing": ("auto", "on", "off"),
    "optim.scheduler": ("cosine", "constant"),
    "data.prompt": PROMPT_STYLES,
    "eval.protocol": PROTOCOLS,
    "grbp.distribution": DISTRIBUTIONS,
    "stage": ("sft", "grpo"),
    "grpo.loss": ("dapo", "grpo", "dr_grpo", "bnpo"),
    "reward.protocol": PROTOCOLS,
}


def _check_choice(flag: str, value: object) -> None:
    allowed = CHOICES[flag]
    _check(value in allowed, flag, f"must be one of {', '.join(allowed)}", value)


@dataclass(frozen=True)
class ModelConfig:
    """The base model and how it is run.

    Attributes:
        path: local Qwen2.5-VL directory (``gmner train --model``).
        dtype: auto (bf16 where supported, else fp32), float32, bfloat16 or float16.
        device: auto (cuda, then mps, then cpu), cuda, mps or cpu.
        min_pixels: smallest image area the model sees (paper: 256 x 28 x 28).
        max_pixels: largest image area the model sees (paper: 1024 x 28 x 28).
        gradient_checkpointing: auto (on for CUDA), on or off.
    """

    path: str = ""
    dtype: str = "auto"
    device: str = "auto"
    min_pixels: int = PAPER_MIN_PIXELS
    max_pixels: int = PAPER_MAX_PIXELS
    gradient_checkpointing: str = "auto"

    def __post_init__(self) -> None:
        _check_choice("model.dtype", self.dtype)
        _check_choice("model.device", self.device)
        _check(
            0 < self.min_pixels <= self.max_pixels,
            "model.min_pixels",
            "must be positive and <= model.max_pixels",
            self.min_pixels,
        )
        _check_choice("model.gradient_checkpointing", self.gradient_checkpointing)


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter (paper: r 32, alpha 64, dropout 0.05 on the language model).

    Attributes:
        enabled: False trains every language-model weight instead (full fine-tuning).
        r: LoRA rank.
        alpha: LoRA scaling numerator (the update is scaled by alpha / r).
        dropout: dropout on the LoRA input.
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
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_ratio: share of the optimizer steps spent warming up.
        scheduler: cosine or constant (after warmup).
        epochs: passes over the training data.
        batch_size: examples per micro-batch.
        grad_accum: micro-batches per optimizer step and process: a data-parallel run's step
            takes batch_size x grad_accum x world size examples (the same step as one
            process with grad_accum x world size).
        max_grad_norm: gradient clipping (0 disables).
        max_length: token limit of an example.
        seed: seeds shuffling, dropout, LoRA init and GRBP.
        max_steps: stop after this many optimizer steps (0: off).
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
        _check_choice("optim.scheduler", self.scheduler)
        for name in ("epochs", "batch_size", "grad_accum", "max_length"):
            _check(getattr(self, name) > 0, f"optim.{name}", "must be > 0", getattr(self, name))
        _check(self.max_steps >= 0, "optim.max_steps", "must be >= 0", self.max_steps)


@dataclass(frozen=True)
class DataConfig:
    """Where examples come from.

    Attributes:
        dir: Twitter-GMNER folder (txt/, xml/).
        images: image folders, comma-separated.
        cot: reasoning JSONL (``gmner cot``); empty: tweets get an empty think block.
        use_cot: False trains answer-only targets (``--no-cot``).
        train_split: the training split's name.
        dev_split: the dev split's name ('' skips dev evaluation).
        test_split: the test split's name ('' skips the final test).
        limit: use only the first N tweets of each split (0: all), for smoke runs.
        skip_missing_images: leave out tweets whose image is missing.
        prompt: prompt style (system prompt and instruction), one of
            :data:`gmner_rt.prompt.PROMPT_STYLES`: ``full`` (the default, for pretrained
            models), ``compact`` (a one-line task tag, for a model trained from scratch on this
            task) or ``reference`` (the E2E-GMNER reference code's texts). ``gmner export``
            writes the style the checkpoint was trained with into the bundle.
        system_prompt: a system prompt replacing the style's ('' keeps the style's; the
            reference's ``--system_prompt``); exported with the checkpoint.
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
    system_prompt: str = ""
    num_workers: int = 0

    def __post_init__(self) -> None:
        _check(self.limit >= 0, "data.limit", "must be >= 0", self.limit)
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0", self.num_workers)
        _check_choice("data.prompt", self.prompt)


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation after each epoch (dev) and at the end (test at the best dev checkpoint).

    Attributes:
        enabled: run dev evaluation after each epoch.
        max_new_tokens: generation budget per tweet.
        batch_size: tweets per generation batch.
        protocol: the metrics protocol that selects the best dev checkpoint: ``hindex``
            (default; the H-Index rule of README's Metrics section) or ``e2e`` (the
            reference's evaluator, on the raw model-space text). Both are computed and logged
            every epoch.
    """

    enabled: bool = True
    max_new_tokens: int = 512
    batch_size: int = 4
    protocol: str = "hindex"

    def __post_init__(self) -> None:
        _check(self.max_new_tokens > 0, "eval.max_new_tokens", "must be > 0", self.max_new_tokens)
        _check_choice("eval.protocol", self.protocol)


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
class GrpoConfig:
    """The reinforcement stage after SFT (``--stage grpo``, :mod:`gmner.train.grpo`): for each
    prompt a group of sampled completions, each rewarded by :func:`gmner_rt.metrics.reward`
    (weights in the ``reward`` section), advantages normalised within the group, a clipped
    policy-gradient loss with a KL term to the starting model (TRL's GRPOTrainer).

    Attributes:
        init: the SFT checkpoint the stage starts from: a LoRA adapter folder
            (``RUN/checkpoints/step-N`` or ``RUN/best``) or a fully fine-tuned one; its
            ``config.yaml`` (model, prompt, pixels, LoRA) is the stage's starting
            configuration, which --config and flags override.
        group_size: completions sampled per prompt (the group an advantage is relative to).
        prompts: prompts per optimizer step (a step scores prompts x group_size completions).
        temperature: sampling temperature of the completions.
        beta: weight of the KL term to the starting model (0 drops the term and the
            reference model).
        epsilon: the policy ratio's clip range, [1 - epsilon, 1 + epsilon].
        iterations: optimizer steps taken on each generated batch (above 1 the clip acts).
        loss: TRL's loss normalisation: dapo (tokens of the whole batch; TRL's default),
            grpo (per completion, then per batch), dr_grpo (a constant), bnpo (tokens of the
            local batch).
        lr: learning rate (constant; AdamW, weight decay and the vision tower's scale from
            the optim section).
        steps: optimizer steps of the stage.
        max_new_tokens: token budget of a sampled completion (a completion cut there earns
            the unclosed-answer penalty).
        save_every: checkpoint every N steps (and at the last); dev is scored at each when
            eval.enabled, and the best is kept in best/.
    """

    init: str = ""
    group_size: int = 8
    prompts: int = 2
    temperature: float = 1.0
    beta: float = 0.04
    epsilon: float = 0.2
    iterations: int = 1
    loss: str = "dapo"
    lr: float = 1e-5
    steps: int = 200
    max_new_tokens: int = 512
    save_every: int = 50

    def __post_init__(self) -> None:
        _check(self.group_size >= 2, "grpo.group_size", "must be >= 2", self.group_size)
        for name in ("prompts", "iterations", "steps", "max_new_tokens"):
            _check(getattr(self, name) > 0, f"grpo.{name}", "must be > 0", getattr(self, name))
        _check(self.temperature > 0, "grpo.temperature", "must be > 0", self.temperature)
        _check(self.beta >= 0, "grpo.beta", "must be >= 0", self.beta)
        _check(0 < self.epsilon < 1, "grpo.epsilon", "must be in (0, 1)", self.epsilon)
        _check(self.lr > 0, "grpo.lr", "must be > 0", self.lr)
        _check(self.save_every >= 0, "grpo.save_every", "must be >= 0", self.save_every)
        _check_choice("grpo.loss", self.loss)
        # TRL keeps a generated batch in memory for its iterations and a checkpoint does not
        # hold it: a run saved inside that cycle would generate anew when resumed
        for name in ("save_every", "steps"):
            value = getattr(self, name)
            _check(
                value % self.iterations == 0,
                f"grpo.{name}",
                f"must be a multiple of grpo.iterations ({self.iterations})",
                value,
            )


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; saved as ``config.yaml`` beside each checkpoint.

    Attributes:
        stage: sft (supervised fine-tuning, the paper's recipe) or grpo (the reinforcement
            stage after it, from grpo.init; see the grpo and reward sections).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    grbp: GRBPConfig = field(default_factory=GRBPConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    stage: str = "sft"
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    reward: RewardWeights = field(default_factory=RewardWeights)

    def __post_init__(self) -> None:
        _check_choice("stage", self.stage)
        _check(
            self.stage != "grpo" or bool(self.grpo.init),
            "grpo.init",
            "must name the SFT checkpoint the grpo stage starts from",
            self.grpo.init,
        )


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
            try:
                kwargs[name] = _parse_bool(value) if isinstance(value, str) else bool(value)
            except argparse.ArgumentTypeError as exc:
                raise ValueError(f"{prefix}{name}: {exc}") from None
        elif hint is int and (
            isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())
        ):
            raise ValueError(f"{prefix}{name}: expected int, got {value!r}")
        else:
            try:
                kwargs[name] = hint(value)
            except (TypeError, ValueError):
                raise ValueError(
                    f"{prefix}{name}: expected {hint.__name__}, got {value!r}"
                ) from None
    return cls(**kwargs)


#: Shipped recipes (``gmner train --recipe NAME``): YAML files beside this module.
RECIPE_DIR = Path(__file__).with_name("recipes")
RECIPES = tuple(sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")))


def recipe_path(name: str) -> Path:
    """The YAML file of shipped recipe ``name``; ``ValueError`` naming the choices."""
    if name not in RECIPES:
        raise ValueError(f"--recipe: expected one of {', '.join(RECIPES)}, got {name!r}")
    return RECIPE_DIR / f"{name}.yaml"


def _read_tree(path: str | Path) -> dict:
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({exc})") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return loaded


def _merge_tree(base: dict, top: dict) -> dict:
    """``top`` laid over ``base``, section by section."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge_tree(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(
    path: str | Path | None = None,
    overrides: dict | None = None,
    *,
    recipe: str | None = None,
    inherit: str | Path | None = None,
) -> TrainConfig:
    """A config from a shipped recipe (optional), then an earlier run's saved config
    (``inherit``, optional: the grpo stage starts from its SFT checkpoint's), then a YAML file
    (optional), then ``{"optim.lr": 1e-4, ...}`` overrides, each laid over the one before."""
    tree: dict = _read_tree(recipe_path(recipe)) if recipe is not None else {}
    if inherit is not None:
        tree = _merge_tree(tree, _read_tree(inherit))
    if path is not None:
        tree = _merge_tree(tree, _read_tree(path))
        try:  # a bad value in the file: named with the file
            _build(TrainConfig, copy.deepcopy(tree))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    for dotted, value in (overrides or {}).items():
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return _build(TrainConfig, tree)


def checkpoint_config(checkpoint: str | Path | None) -> Path | None:
    """The training config saved with a checkpoint: its own ``config.yaml``, else its run
    folder's (``RUN/checkpoints/step-N`` or ``RUN/best`` -> ``RUN/config.yaml``); None when
    there is none."""
    if checkpoint is None:
        return None
    checkpoint = Path(checkpoint)
    if (checkpoint / "config.yaml").is_file():
        return checkpoint / "config.yaml"
    if checkpoint.name == "best":
        run = checkpoint.parent
    elif checkpoint.parent.name == "checkpoints":
        run = checkpoint.parent.parent
    else:  # a folder of its own (a plain PEFT adapter): no run around it
        return None
    return run / "config.yaml" if (run / "config.yaml").is_file() else None


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
            yield f"{prefix}{f.name}", hint, f, cls


_ROLE = re.compile(r":\w+:`~?([^`]*)`")
_ATTRIBUTE = re.compile(r"^ {8}(\w+(?: / \w+)*): (.*)$")


def field_docs(cls: type) -> dict[str, str]:
    """Each field's text from the ``Attributes:`` section of ``cls``'s docstring (one
    ``name: text`` entry per field, continued by deeper-indented lines)."""
    docs: dict[str, str] = {}
    current: list[str] | None = None
    inside = False
    for line in (cls.__doc__ or "").splitlines():
        if line.strip() == "Attributes:":
            inside = True
            continue
        if not inside:
            continue
        match = _ATTRIBUTE.match(line)
        if match:
            current = [match.group(2).strip()]
            for name in match.group(1).split(" / "):
                docs[name] = current  # type: ignore[assignment]
        elif current is not None and line.startswith(" " * 12):
            current.append(line.strip())
        elif line.strip():
            current = None
    return {name: " ".join(parts) for name, parts in docs.items()}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--section.field`` flag per leaf of :class:`TrainConfig` (default: unset), its
    help the field's docstring, its choices those of :data:`CHOICES`."""
    group = parser.add_argument_group(
        "configuration (every leaf of the config tree; also settable in --config YAML)"
    )
    docs: dict[type, dict[str, str]] = {}
    for dotted, hint, f, owner in _leaves(TrainConfig):
        kind = _parse_bool if hint is bool else hint
        text = docs.setdefault(owner, field_docs(owner)).get(f.name, "")
        text = _ROLE.sub(r"\1", text).replace("%", "%%").replace("``", "")
        choices = CHOICES.get(dotted)
        group.add_argument(
            f"--{dotted}",
            dest=f"cfg:{dotted}",
            type=kind,
            default=None,
            choices=choices,
            metavar="{" + ",".join(choices) + "}" if choices else hint.__name__.upper(),
            help=f"{text} (default: {_default(f)!s})".lstrip(),
        )


def _default(f: dataclasses.Field) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    return "..."


def config_from_args(
    args: argparse.Namespace,
    config_path: str | Path | None = None,
    recipe: str | None = None,
    inherit: str | Path | None = None,
) -> TrainConfig:
    """The config of a command line: the recipe, the inherited run config, the YAML file,
    then every flag given."""
    overrides = {
        key[len("cfg:") :]: value
        for key, value in vars(args).items()
        if key.startswith("cfg:") and value is not None
    }
    return load_config(config_path, overrides, recipe=recipe, inherit=inherit)
