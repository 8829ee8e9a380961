"""Load a Qwen2.5-VL model directory: THE one loader for training, export and evaluation.

It works on a real Qwen2.5-VL-3B/7B checkpoint and on a tiny one from
:mod:`gmner.train.tiny_model`, from a local directory only (nothing is downloaded), and without
torchvision: images go through transformers' PIL image processor, and the processor has no
video part. It knows nothing about GMNER records, prompts or LoRA.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin

from gmner_rt.errors import GmnerError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

__all__ = [
    "DTYPES",
    "GmnerQwenProcessor",
    "ModelDirError",
    "check_model_dir",
    "check_processor_dir",
    "load_model_and_processor",
    "load_processor",
    "pil_image_processor",
    "resolve_dtype",
]

#: Accepted ``dtype`` names and their torch dtypes ("auto" is resolved per device).
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

#: Files of a Qwen2.5-VL directory; each tuple lists alternatives, any one of which suffices.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json + merges.txt")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


class ModelDirError(GmnerError, FileNotFoundError):
    """A model directory lacks a file it needs; the message names the directory and file."""


class GmnerQwenProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without a video processor, so torchvision is not needed.

    ``ProcessorMixin`` derives the processor's parts (what ``save_pretrained`` writes and
    ``from_pretrained`` loads) from the ``__init__`` signature: image processor and tokenizer.
    Calling it with ``videos=`` is not supported.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        if tokenizer is None:
            raise ValueError("GmnerQwenProcessor needs a tokenizer")
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(
            self, image_processor, tokenizer, chat_template=chat_template, **kwargs
        )


def resolve_dtype(
    dtype: str | torch.dtype | None, device: str | torch.device = "cpu"
) -> torch.dtype:
    """The torch dtype for ``dtype`` ("auto", "float32", "bfloat16", "float16" or a dtype).

    ``None`` and "auto" mean bfloat16 on a CUDA device that supports it, else float32.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        dev = torch.device(device)
        if dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected auto or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def _has_image_processor_config(model_dir: Path) -> bool:
    if (model_dir / "preprocessor_config.json").is_file():
        return True
    processor_file = model_dir / "processor_config.json"
    return processor_file.is_file() and "image_processor" in _read_json(processor_file)


def _has_chat_template(model_dir: Path) -> bool:
    if any((model_dir / name).is_file() for name in CHAT_TEMPLATE_FILES):
        return True
    tokenizer_config = model_dir / "tokenizer_config.json"
    return tokenizer_config.is_file() and "chat_template" in _read_json(tokenizer_config)


def is_full_checkpoint(path: Path) -> bool:
    """True for a fully fine-tuned model folder (weights and config.json, no LoRA adapter)."""
    return (path / "config.json").is_file() and not (path / "adapter_config.json").is_file()


def check_model_dir(model_dir: str | Path, *, weights: bool = True) -> Path:
    """Check that ``model_dir`` is a complete Qwen2.5-VL directory; return it as a Path.

    Raises :class:`ModelDirError` (a ``FileNotFoundError``) naming the first missing file,
    or ``ValueError`` when config.json describes another model type.
    """
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelDirError(f"model directory {path} does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelDirError(f"{path}: missing config.json")
    model_type = _read_json(config_file).get("model_type")
    if model_type != "qwen2_5_vl":
        raise ValueError(f"{config_file}: model_type is {model_type!r}, expected 'qwen2_5_vl'")
    check_processor_dir(path)
    if weights and not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ModelDirError(f"{path}: missing weights ({' or '.join(WEIGHT_FILES)})")
    return path


def check_processor_dir(processor_dir: str | Path) -> Path:
    """Check that ``processor_dir`` holds a processor (tokenizer, image processor, template).

    A training checkpoint's adapter directory is one (it has no config.json); so is every
    model directory. Raises :class:`ModelDirError` naming the first missing file.
    """
    path = Path(processor_dir)
    if not path.is_dir():
        raise ModelDirError(f"directory {path} does not exist")
    has_bpe_files = (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
    if not ((path / "tokenizer.json").is_file() or has_bpe_files):
        raise ModelDirError(f"{path}: missing tokenizer files ({' or '.join(TOKENIZER_FILES)})")
    if not (path / "tokenizer_config.json").is_file():
        raise ModelDirError(f"{path}: missing tokenizer_config.json")
    if not _has_image_processor_config(path):
        raise ModelDirError(
            f"{path}: missing preprocessor_config.json (or processor_config.json "
            "with an image_processor entry)"
        )
    if not _has_chat_template(path):
        raise ModelDirError(
            f"{path}: missing chat template ({' or '.join(CHAT_TEMPLATE_FILES)}, "
            "or chat_template in tokenizer_config.json)"
        )
    return path


def _check_pixels(min_pixels: int | None, max_pixels: int | None) -> None:
    for flag, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if value is not None and value <= 0:
            raise ValueError(f"{flag} must be positive, got {value}")
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        raise ValueError(f"min_pixels ({min_pixels}) must not exceed max_pixels ({max_pixels})")


def pil_image_processor(
    image_processor, *, min_pixels: int | None = None, max_pixels: int | None = None
) -> Qwen2VLImageProcessorPil:
    """A PIL-backend copy of a Qwen2-VL image processor, with optional new pixel bounds."""
    _check_pixels(min_pixels, max_pixels)
    settings = image_processor.to_dict()
    for key in ("image_processor_type", "processor_class", "auto_map"):
        settings.pop(key, None)
    size = dict(settings.pop("size", None) or {})
    # Legacy keys (Qwen's preprocessor_config.json) would override ``size`` in __init__.
    for legacy, key in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
        if settings.get(legacy) is not None:
            size[key] = settings[legacy]
        settings.pop(legacy, None)
    if min_pixels is not None:
        size["shortest_edge"] = min_pixels
    if max_pixels is not None:
        size["longest_edge"] = max_pixels
    if size.get("shortest_edge", 0) > size.get("longest_edge", float("inf")):
        raise ValueError(
            f"min_pixels ({size['shortest_edge']}) must not exceed max_pixels "
            f"({size['longest_edge']})"
        )
    return Qwen2VLImageProcessorPil(size=size, **settings)


def load_processor(
    model_dir: str | Path,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    config_dir: str | Path | None = None,
) -> GmnerQwenProcessor:
    """The processor of ``model_dir`` (tokenizer, PIL image processor, chat template).

    ``model_dir`` may be a model directory or a processor-only one (a training checkpoint);
    its token ids are checked against ``config_dir``'s config.json (default: ``model_dir``'s).
    """
    path = check_processor_dir(model_dir)
    config_path = Path(config_dir) if config_dir is not None else path
    processor = GmnerQwenProcessor.from_pretrained(path, local_files_only=True)
    processor.image_processor = pil_image_processor(
        processor.image_processor, min_pixels=min_pixels, max_pixels=max_pixels
    )
    if (config_path / "config.json").is_file():
        _check_token_ids(processor.tokenizer, config_path)
    elif config_dir is None:
        raise ModelDirError(f"{path}: missing config.json (pass the base model's directory)")
    return processor


def _check_token_ids(tokenizer: PreTrainedTokenizerBase, model_dir: Path) -> None:
    """The tokenizer must know the vision tokens that config.json refers to."""
    config = _read_json(model_dir / "config.json")
    for key, token in (
        ("image_token_id", "<|image_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
    ):
        expected = config.get(key)
        actual = tokenizer.convert_tokens_to_ids(token)
        if expected is not None and actual != expected:
            raise ValueError(
                f"{model_dir / 'config.json'}: {key} is {expected} but the "
                f"tokenizer maps {token} to {actual}"
            )


def load_model_and_processor(
    model_dir: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> tuple[Qwen2_5_VLForConditionalGeneration, GmnerQwenProcessor]:
    """Load ``Qwen2_5_VLForConditionalGeneration`` and its processor from a local directory.

    Args:
        model_dir: a Qwen2.5-VL directory (config.json, weights, tokenizer, image processor
            config, chat template).
        dtype: "auto" / None (bf16 on CUDA with bf16 support, else fp32), "float32",
            "bfloat16", "float16" or a torch dtype.
        device: where the model goes ("cpu", "cuda", "cuda:1", ...).
        min_pixels, max_pixels: override the image processor's pixel bounds.

    Returns:
        ``(model, processor)``; the model is in eval mode.
    """
    path = check_model_dir(model_dir)
    processor = load_processor(path, min_pixels=min_pixels, max_pixels=max_pixels)
    torch_dtype = resolve_dtype(dtype, device)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, dtype=torch_dtype, local_files_only=True
    )
    model.to(device).eval()
    if model.config.text_config.vocab_size < len(processor.tokenizer):
        raise ValueError(
            f"{path / 'config.json'}: vocab_size {model.config.text_config.vocab_size}"
            f" is smaller than the tokenizer ({len(processor.tokenizer)} tokens)"
        )
    log.info(
        "loaded %s (%s, %s) with %d-token tokenizer",
        path,
        torch_dtype,
        device,
        len(processor.tokenizer),
    )
    return model, processor


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA, else Apple's MPS, else the CPU; any other name as torch reads it."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


#: Deprecation notices transformers and peft raise about their own internals (peft asks for
#: ``is_gradient_checkpointing``; generation passes ``past_key_values``): nothing a user can act
#: on, so they are filtered where they arise, and nowhere else.
_LIBRARY_DEPRECATIONS = (
    r"`is_gradient_checkpointing` is deprecated",
    r"`past_key_values` is deprecated",
)


@contextlib.contextmanager
def library_deprecations_filtered() -> Iterator[None]:
    """Run a block with :data:`_LIBRARY_DEPRECATIONS` ignored (other warnings still show)."""
    with warnings.catch_warnings():
        for message in _LIBRARY_DEPRECATIONS:
            warnings.filterwarnings("ignore", message=message, category=FutureWarning)
        yield
