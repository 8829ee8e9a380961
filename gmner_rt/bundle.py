"""The bundle manifest: the one contract between the exporter and the runtime.

A bundle is a directory holding ``manifest.json``, ``tokenizer.json`` and three ONNX graphs
(vision, embedding, decoder), possibly with external data files. This module reads and
validates ``manifest.json`` and checks that every file it lists is present and unchanged
(size and sha256); the runtime reads nothing else about a bundle. The exporter writes the
manifest with :func:`write_manifest` and hashes files with :func:`file_entry`, so both sides
share one definition. Every error is a :class:`~gmner_rt.errors.BundleError` naming the file
and the field path (``model.text.hidden_size``).

This module knows nothing of ONNX, tokenizers or inference: graph files are opaque bytes here,
and tensor names, dtypes and shapes are only what the manifest declares. See docs/bundle.md.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

from . import integrity
from .errors import BundleError
from .records import RECORD_FORMAT_VERSION

__all__ = ["FORMAT", "FORMAT_VERSION", "GRAPH_NAMES", "MANIFEST_NAME", "TOKENIZER_NAME"]
__all__ += ["SUPPORTED_FORMAT_VERSIONS", "Bundle", "FileEntry", "GenerationSpec", "GraphSpec"]
__all__ += ["KvCacheSpec", "Manifest", "ModelInfo", "PromptSpec", "QUANT_SCHEMES"]
__all__ += ["QuantizationSpec", "TensorSpec", "TextConfig", "TokenIds", "VisionConfig"]
__all__ += ["EngineLimits", "EngineSet", "ShapeRange", "ENGINE_PRECISIONS"]
__all__ += ["engine_set_to_dict", "file_entry", "load_bundle", "manifest_to_dict"]
__all__ += ["verify_engine_set"]
__all__ += ["parse_manifest", "write_manifest"]

FORMAT = "gmner-bundle"
#: 2: the decoder takes ``logits_index [num_logits]`` and returns ``logits [batch, num_logits,
#: vocab]`` (verification of drafted tokens in one call); 1: ``logits [batch, 1, vocab]``.
FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"
GRAPH_NAMES = ("vision", "embedding", "decoder")
MODEL_DTYPES = ("float32", "float16")
TENSOR_DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "bool")
KV_LAYOUT = ("batch", "kv_heads", "sequence", "head_dim")
#: Weight-only quantization schemes -> bits per weight.
QUANT_SCHEMES = {"int8": 8, "int4": 4}
#: What a quantized MatMul becomes: onnxruntime's com.microsoft MatMulNBits.
QUANT_OPS = ("MatMulNBits",)
#: MatMulNBits accuracy_level: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations.
QUANT_ACCURACY_LEVELS = (0, 1, 2, 3, 4)
#: Tensors each graph must declare (the decoder also needs one past/present pair per layer).
REQUIRED_IO = {
    "vision": (
        ("pixel_values", "rot_pos_ids", "window_index", "reverse_index", "cu_seqlens")
        + ("cu_window_seqlens",),
        ("image_embeds",),
    ),
    "embedding": (("input_ids",), ("inputs_embeds",)),
    "decoder": (("inputs_embeds", "attention_mask", "position_ids"), ("logits",)),
}
#: Tensors a graph must declare from a format version on (version -> graph -> inputs).
REQUIRED_FROM_VERSION = {2: {"decoder": ("logits_index",)}}
_PLACEHOLDERS = {
    "chat_template": ("{system}", "{image}", "{instruction}"),
    "image": ("{image_pads}",),
    "instruction_think": ("{text}",),
    "instruction_answer_only": ("{text}",),
}
_IMAGE_KEYS = ("patch_size", "merge_size", "temporal_patch_size", "min_pixels")
_IMAGE_KEYS += ("max_pixels", "image_mean", "image_std", "rescale_factor", "resample")
_IMAGE_VS_VISION = {"patch_size": "patch_size", "merge_size": "spatial_merge_size"}
_IMAGE_VS_VISION["temporal_patch_size"] = "temporal_patch_size"
_CHUNK = 1 << 20
#: Precisions an engine set is built in.
ENGINE_PRECISIONS = ("fp32", "fp16")
_ENGINE_NAME = re.compile(r"[A-Za-z0-9._-]+")
_COMPUTE_CAPABILITY = re.compile(r"[0-9]+\.[0-9]+")


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output; a str dim is symbolic (dynamic), an int dim is fixed."""

    name: str
    dtype: str  # one of TENSOR_DTYPES
    shape: tuple[str | int, ...]


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph: its file, its external-data file (or None) and its declared I/O."""

    file: str
    data_file: str | None
    opset: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input(self, name: str) -> TensorSpec:
        """The declared input ``name``; KeyError when the graph has none."""
        return {t.name: t for t in self.inputs}[name]

    def output(self, name: str) -> TensorSpec:
        """The declared output ``name``; KeyError when the graph has none."""
        return {t.name: t for t in self.outputs}[name]


@dataclass(frozen=True)
class TextConfig:
    """The language model's shape (Qwen2.5-VL text config)."""

    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...]  # (t, h, w) rotary pairs; sums to head_dim / 2
    tie_word_embeddings: bool


@dataclass(frozen=True)
class VisionConfig:
    """The vision tower's shape; max_image_tokens caps merged image tokens (None: no cap)."""

    hidden_size: int
    depth: int
    num_heads: int
    out_hidden_size: int
    window_size: int
    fullatt_block_indexes: tuple[int, ...]
    patch_size: int
    spatial_merge_size: int
    temporal_patch_size: int
    max_image_tokens: int | None


@dataclass(frozen=True)
class ModelInfo:
    """What was exported: names, LoRA adapter (or None), graph dtype and shapes."""

    name: str
    source_model: str
    adapter: str | None
    dtype: str  # one of MODEL_DTYPES
    text: TextConfig
    vision: VisionConfig


@dataclass(frozen=True)
class KvCacheSpec:
    """The decoder's KV cache; tensor names are templates with a ``{layer}`` placeholder."""

    layout: tuple[str, ...]  # always KV_LAYOUT
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    past_key: str
    past_value: str
    present_key: str
    present_value: str

    def past_key_name(self, layer: int) -> str:
        return self.past_key.replace("{layer}", str(layer))

    def past_value_name(self, layer: int) -> str:
        return self.past_value.replace("{layer}", str(layer))

    def present_key_name(self, layer: int) -> str:
        return self.present_key.replace("{layer}", str(layer))

    def present_value_name(self, layer: int) -> str:
        return self.present_value.replace("{layer}", str(layer))


@dataclass(frozen=True)
class TokenIds:
    """Special token ids of the bundle's tokenizer; generation stops at any of eos_ids."""

    image_pad_id: int
    vision_start_id: int
    vision_end_id: int
    im_start_id: int
    im_end_id: int
    endoftext_id: int
    pad_id: int
    eos_ids: tuple[int, ...]


@dataclass(frozen=True)
class PromptSpec:
    """Prompt texts; placeholders are filled with ``str.replace``, never ``str.format``."""

    system: str
    chat_template: str  # {system}, {image}, {instruction}
    image: str  # {image_pads}
    instruction_think: str  # {text}
    instruction_answer_only: str  # {text}


@dataclass(frozen=True)
class GenerationSpec:
    """Stop strings, the answer's tags and the default generation budget."""

    stop_strings: tuple[str, ...]
    think_open: str
    think_close: str
    answer_open: str
    answer_close: str
    default_max_new_tokens: int


@dataclass(frozen=True)
class QuantizationSpec:
    """Weight-only quantization of the MatMul weights of some graphs (no section: none).

    Activations, the KV cache and every graph input and output keep ``model.dtype``; only
    constant MatMul weights are stored in ``bits`` bits, one scale (and, asymmetric, one zero
    point) per ``block_size`` weights along the reduction axis.
    """

    scheme: str  # one of QUANT_SCHEMES
    op: str  # one of QUANT_OPS: the node each quantized MatMul became
    graphs: tuple[str, ...]  # the quantized graphs, of GRAPH_NAMES
    bits: int  # QUANT_SCHEMES[scheme]
    block_size: int  # a power of two >= 16
    symmetric: bool  # no zero points
    accuracy_level: int  # one of QUANT_ACCURACY_LEVELS (a compute hint to onnxruntime)
    lm_head: bool  # the LM head's MatMul is quantized too
    matmuls: int  # MatMul nodes quantized
    bytes_before: int  # size of the quantized graphs' files (and data files) before
    bytes_after: int  # ... and after
    accuracy: dict[str, float] | None  # measured figures: metric name -> number


@dataclass(frozen=True)
class EngineLimits:
    """The shape limits TensorRT engines are built for; requests must stay inside them.

    Attributes:
        max_batch: pairs decoded together.
        max_context: prompt (image tokens included) + generated tokens, per row.
        max_image_tokens: merged image tokens per image.
    """

    max_batch: int
    max_context: int
    max_image_tokens: int


@dataclass(frozen=True)
class ShapeRange:
    """One input's optimization profile: its smallest, optimal and largest shapes."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class EngineSet:
    """TensorRT engines of the three graphs, built on one kind of GPU (``gmner export engine``)
    and stored as onnxruntime EP-context models in the folder ``dir`` of the bundle.

    Attributes:
        name: the folder's name, which carries the build profile.
        dir: the folder, relative to the bundle.
        device_name: the GPU that built them ("NVIDIA H100 80GB HBM3", "Orin").
        compute_capability: its architecture, "major.minor"; engines run only on it.
        tensorrt: the TensorRT version that built them; engines run only with it.
        onnxruntime: the onnxruntime version that wrote the EP-context models.
        precision: "fp16" or "fp32" (TensorRT's kernels).
        limits: the limits of the profiles.
        graphs: graph name -> its EP-context model (a file listed in ``files``).
        profiles: graph name -> input name -> the profile it was built with.
        created_utc: build time.
        check: free-form: the build's check against the ONNX graphs on the CPU, or None.
    """

    name: str
    dir: str
    device_name: str
    compute_capability: str
    tensorrt: str
    onnxruntime: str
    precision: str
    limits: EngineLimits
    graphs: dict[str, str]
    profiles: dict[str, dict[str, ShapeRange]]
    created_utc: str
    check: dict[str, Any] | None


@dataclass(frozen=True)
class FileEntry:
    """Size in bytes and lowercase hex sha256 of one bundle file."""

    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """A validated manifest.json. Treat the dicts as read-only."""

    format_version: int
    created_utc: str
    model: ModelInfo
    kv_cache: KvCacheSpec
    graphs: dict[str, GraphSpec]  # exactly GRAPH_NAMES
    tokens: TokenIds
    image_processor: dict[str, Any]  # validated here; the image settings class reads it
    prompt: PromptSpec
    labels: tuple[str, ...]
    record_format_version: int
    generation: GenerationSpec
    files: dict[str, FileEntry]  # every bundle file but manifest.json
    exporter: dict[str, str | None]  # free-form: package versions
    parity: dict[str, Any] | None  # free-form: the export-time parity report
    quantization: QuantizationSpec | None  # optional; None when the graphs are not quantized
    engines: tuple[EngineSet, ...]  # optional; () when no TensorRT engines were built
    extra: dict[str, Any]  # unknown top-level keys, kept for newer readers


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle: its directory and its validated manifest."""

    path: Path
    manifest: Manifest

    @property
    def verifies_drafts(self) -> bool:
        """Whether the decoder returns the logits of several positions in one call (format
        version 2: ``logits_index``), which speculative decoding needs to verify drafts."""
        return self.manifest.format_version >= 2

    def file(self, name: str) -> Path:
        """The path of a file the manifest lists (e.g. ``graphs["decoder"].file``)."""
        if name not in self.manifest.files:
            raise BundleError(f"{self.path}: {name!r} is not listed in {MANIFEST_NAME}")
        return self.path / name


# --- the field reader -----------------------------------------------------------------------


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is not 1


def _is_number(v: object) -> bool:
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v))


_KINDS = {
    "int": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "int0": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "float": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "number": (_is_number, "a number"),
    "str": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "str0": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "dim": (
        lambda v: (isinstance(v, str) and v != "") or (_is_int(v) and v >= 0),
        "a dimension (a non-empty string or a non-negative integer)",
    ),
    "sha256": (
        lambda v: isinstance(v, str) and len(v) == 64 and set(v) <= set("0123456789abcdef"),
        "64 lowercase hex digits",
    ),
    "object": (lambda v: isinstance(v, dict), "an object"),
}
#: Dataclass annotations -> the kind of their list items (read by :func:`_read`).
_ITEM_KINDS = {"tuple[int, ...]": "int0", "tuple[str, ...]": "str", "tuple[str | int, ...]": "dim"}


def _show(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= 60 else text[:57] + "..."


def _join(at: str, key: str) -> str:
    if not at or not key:
        return at or key
    return f"{at}.{key}" if key.isidentifier() else f"{at}[{json.dumps(key)}]"


class _Fields:
    """One JSON object of the manifest: typed reads that raise errors naming the field path."""

    def __init__(self, data: object, at: str, source: str, keys: tuple[str, ...] | None):
        self.at, self.source = at, source
        if not isinstance(data, dict):
            raise self.error(at, f"expected an object, got {_show(data)}")
        self.data: dict[str, Any] = data
        for key in data if keys is not None else ():
            if key not in keys:
                near = difflib.get_close_matches(str(key), keys, n=1)
                hint = f"did you mean {near[0]!r}?" if near else f"known: {', '.join(keys)}"
                raise self.error(_join(at, key), f"unknown key ({hint})")

    def error(self, at: str, message: str) -> BundleError:
        return BundleError(f"{self.source}: {at}: {message}" if at else f"{self.source}: {message}")

    def check(self, ok: bool, key: str, message: str) -> None:
        if not ok:
            raise self.error(_join(self.at, key), message)

    def equal(self, key: str, value: Any, expected: Any, what: str = "") -> None:
        message = f"expected {what + ' = ' if what else ''}{_show(expected)}, got {_show(value)}"
        self.check(value == expected, key, message)

    def one_of(self, key: str, value: str, options: tuple[str, ...]) -> None:
        self.check(value in options, key, f"expected one of {', '.join(options)}, got {value!r}")

    def raw(self, key: str) -> Any:
        self.check(key in self.data, key, "required field missing")
        return self.data[key]

    def value(self, key: str, kind: str, *, nullable: bool = False) -> Any:
        return self._expect(self.raw(key), _join(self.at, key), kind, nullable)

    def list_(self, key: str, kind: str, *, length: int | None = None) -> tuple:
        items, at = self.raw(key), _join(self.at, key)
        if not isinstance(items, list) or (length is not None and len(items) != length):
            size = "a list" if length is None else f"a list of {length}"
            raise self.error(at, f"expected {size}, got {_show(items)}")
        return tuple(self._expect(v, f"{at}[{i}]", kind, False) for i, v in enumerate(items))

    def section(self, key: str, keys: tuple[str, ...] | None) -> _Fields:
        return _Fields(self.raw(key), _join(self.at, key), self.source, keys)

    def sections(self, key: str, keys: tuple[str, ...]) -> list[_Fields]:
        at = _join(self.at, key)
        return [
            _Fields(v, f"{at}[{i}]", self.source, keys)
            for i, v in enumerate(self.list_(key, "object"))
        ]

    def _expect(self, value: Any, at: str, kind: str, nullable: bool) -> Any:
        if value is None and nullable:
            return None
        test, what = _KINDS[kind]
        if not test(value):
            raise self.error(
                at, f"expected {what}{' or null' if nullable else ''}, got {_show(value)}"
            )
        return value


def _keys(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def _read(f: _Fields, cls: type, *, skip: tuple[str, ...] = (), ints: str = "int") -> dict:
    """Reads each field of dataclass ``cls`` by its annotation; the caller reads ``skip``."""
    out = {}
    for field in fields(cls):
        base = str(field.type).removesuffix(" | None")
        if field.name in skip:
            continue
        if base in _ITEM_KINDS:
            out[field.name] = f.list_(field.name, _ITEM_KINDS[base])
        else:
            kind = ints if base == "int" else base
            out[field.name] = f.value(field.name, kind, nullable=base != field.type)
    return out


def _path_problem(name: str) -> str | None:
    if "\\" in name:
        return "contains a backslash"
    if name.startswith("/") or name[1:2] == ":":
        return "is an absolute path"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "is not a plain relative path inside the bundle"
    return None


# --- sections ---------------------------------------------------------------------------------


#: Upper bounds of sizes, far above any Qwen2.5-VL (72B included): a manifest past them is
#: damaged or hostile, and loading it would exhaust memory or time before any error.
UPPER_BOUNDS = {
    "text": {
        "hidden_size": 65536,
        "num_layers": 512,
        "num_attention_heads": 1024,
        "num_kv_heads": 1024,
        "head_dim": 1024,
        "intermediate_size": 1 << 20,
        "vocab_size": 1 << 22,
    },
    "vision": {
        "hidden_size": 65536,
        "depth": 512,
        "num_heads": 1024,
        "out_hidden_size": 65536,
        "window_size": 8192,
        "patch_size": 64,
        "spatial_merge_size": 8,
        "temporal_patch_size": 8,
        "max_image_tokens": 1 << 20,
    },
    # the largest image the model reads: Qwen2.5-VL's processor allows 16384 x 28 x 28 pixels
    "image_processor": {"min_pixels": 1 << 26, "max_pixels": 1 << 26, "patch_size": 64},
    "generation": {"default_max_new_tokens": 1 << 16},
}


def _bounded(f: _Fields, values: dict[str, Any], bounds: dict[str, int]) -> None:
    for key, limit in bounds.items():
        value = values.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            f.check(value <= limit, key, f"{value} is over the upper bound {limit}")


def _model(f: _Fields) -> ModelInfo:
    t = f.section("text", _keys(TextConfig))
    _bounded(t, t.data, UPPER_BOUNDS["text"])
    text = TextConfig(**_read(t, TextConfig))
    heads, d, mrope = text.num_attention_heads, text.head_dim, text.mrope_section
    t.equal("hidden_size", text.hidden_size, heads * d, "num_attention_heads * head_dim")
    t.check(heads % text.num_kv_heads == 0, "num_kv_heads", "must divide num_attention_heads")
    t.check(len(mrope) == 3, "mrope_section", "expected 3 sections (t, h, w)")
    half = f"head_dim / 2 = {d / 2:g}"
    t.check(2 * sum(mrope) == d, "mrope_section", f"sums to {sum(mrope)}, expected {half}")
    v = f.section("vision", _keys(VisionConfig))
    _bounded(v, v.data, UPPER_BOUNDS["vision"])
    vision = VisionConfig(**_read(v, VisionConfig))
    v.check(vision.hidden_size % vision.num_heads == 0, "num_heads", "must divide hidden_size")
    deep = all(i < vision.depth for i in vision.fullatt_block_indexes)
    v.check(deep, "fullatt_block_indexes", f"each index must be < depth {vision.depth}")
    model = ModelInfo(**_read(f, ModelInfo, skip=("text", "vision")), text=text, vision=vision)
    f.one_of("dtype", model.dtype, MODEL_DTYPES)
    return model


def _kv_cache(f: _Fields, model: ModelInfo) -> KvCacheSpec:
    kv = KvCacheSpec(**_read(f, KvCacheSpec))
    f.equal("layout", list(kv.layout), list(KV_LAYOUT))
    for key in ("num_layers", "num_kv_heads", "head_dim"):
        f.equal(key, getattr(kv, key), getattr(model.text, key), f"model.text.{key}")
    f.equal("dtype", kv.dtype, model.dtype, "model.dtype")
    for key in ("past_key", "past_value", "present_key", "present_value"):
        f.check("{layer}" in getattr(kv, key), key, "missing placeholder '{layer}'")
    return kv


def _tensors(g: _Fields, key: str) -> tuple[TensorSpec, ...]:
    specs: list[TensorSpec] = []
    seen: set[str] = set()
    for t in g.sections(key, _keys(TensorSpec)):
        spec = TensorSpec(**_read(t, TensorSpec))
        t.one_of("dtype", spec.dtype, TENSOR_DTYPES)
        t.check(spec.name not in seen, "name", f"{spec.name!r} declared twice")
        seen.add(spec.name)
        specs.append(spec)
    return tuple(specs)


def _required_io(
    name: str, kv: KvCacheSpec, version: int
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    inputs, outputs = REQUIRED_IO[name]
    for since, graphs in REQUIRED_FROM_VERSION.items():
        if version >= since:
            inputs += graphs.get(name, ())
    if name == "decoder":
        for i in range(kv.num_layers):
            inputs += (kv.past_key_name(i), kv.past_value_name(i))
            outputs += (kv.present_key_name(i), kv.present_value_name(i))
    return inputs, outputs


def _graph(
    g: _Fields, name: str, kv: KvCacheSpec, files: dict[str, FileEntry], version: int
) -> GraphSpec:
    ins, outs = _tensors(g, "inputs"), _tensors(g, "outputs")
    spec = GraphSpec(**_read(g, GraphSpec, skip=("inputs", "outputs")), inputs=ins, outputs=outs)
    for key in ("file", "data_file"):
        if (value := getattr(spec, key)) is not None:
            g.check(_path_problem(value) is None, key, f"{value!r} {_path_problem(value)}")
            g.check(value in files, key, f"{value!r} is not listed in files")
    need_in, need_out = _required_io(name, kv, version)
    for key, declared, required in (("inputs", ins, need_in), ("outputs", outs, need_out)):
        names = {s.name for s in declared}
        missing = [n for n in required if n not in names]
        g.check(not missing, key, f"missing required tensors: {', '.join(missing)}")
    return spec


def _generation(f: _Fields) -> GenerationSpec:
    _bounded(f, f.data, UPPER_BOUNDS["generation"])
    return GenerationSpec(**_read(f, GenerationSpec))


def _tokens(f: _Fields, vocab_size: int) -> TokenIds:
    tokens = TokenIds(**_read(f, TokenIds, ints="int0"))
    f.check(len(tokens.eos_ids) > 0, "eos_ids", "expected at least one id")
    vocabulary = f"the vocabulary [0, {vocab_size})"
    for key in _keys(TokenIds):
        value = getattr(tokens, key)
        for token in value if isinstance(value, tuple) else (value,):
            f.check(token < vocab_size, key, f"id {token} is outside {vocabulary}")
    return tokens


def _image_processor(f: _Fields, vision: VisionConfig) -> dict[str, Any]:
    for key in ("patch_size", "merge_size", "temporal_patch_size", "min_pixels", "max_pixels"):
        f.value(key, "int")
    _bounded(f, f.data, UPPER_BOUNDS["image_processor"])
    f.list_("image_mean", "number", length=3)
    f.list_("image_std", "float", length=3)
    f.value("rescale_factor", "float")
    f.value("resample", "str")
    low, high = f.data["min_pixels"], f.data["max_pixels"]
    f.check(low <= high, "min_pixels", f"{low} exceeds max_pixels {high}")
    for key, ours in _IMAGE_VS_VISION.items():
        f.equal(key, f.data[key], getattr(vision, ours), f"model.vision.{ours}")
    return copy.deepcopy(f.data)


def _prompt(f: _Fields) -> PromptSpec:
    prompt = PromptSpec(system=f.value("system", "str0"), **_read(f, PromptSpec, skip=("system",)))
    for key, needed in _PLACEHOLDERS.items():
        for mark in needed:
            f.check(mark in getattr(prompt, key), key, f"missing placeholder {mark!r}")
    return prompt


def _labels(f: _Fields) -> tuple[str, ...]:
    labels = f.list_("labels", "str")
    f.check(len(labels) > 0, "labels", "expected at least one label")
    for i, label in enumerate(labels):
        plain = label.strip() != "" and not set(label) & set("|;")
        f.check(plain, f"labels[{i}]", f"{label!r} is blank or holds '|' or ';'")
        f.check(label not in labels[:i], f"labels[{i}]", f"duplicate label {label!r}")
    return labels


def _files(f: _Fields) -> dict[str, FileEntry]:
    files = {}
    for name in f.data:
        f.check(_path_problem(name) is None, name, f"file name {_path_problem(name)}")
        f.check(name != MANIFEST_NAME, name, f"{MANIFEST_NAME} does not list itself")
        e = f.section(name, _keys(FileEntry))
        files[name] = FileEntry(size=e.value("size", "int0"), sha256=e.value("sha256", "sha256"))
    f.check(TOKENIZER_NAME in files, "", f"{TOKENIZER_NAME!r} is not listed")
    return files


def _quantization(f: _Fields) -> QuantizationSpec:
    skip = ("accuracy_level", "accuracy")
    q = QuantizationSpec(
        **_read(f, QuantizationSpec, skip=skip),
        accuracy_level=f.value("accuracy_level", "int0"),
        accuracy=_accuracy(f),
    )
    f.one_of("scheme", q.scheme, tuple(QUANT_SCHEMES))
    f.one_of("op", q.op, QUANT_OPS)
    f.check(len(q.graphs) > 0, "graphs", "expected at least one graph")
    at = _join(f.at, "graphs")
    for i, name in enumerate(q.graphs):
        if name not in GRAPH_NAMES:
            raise f.error(f"{at}[{i}]", f"expected one of {', '.join(GRAPH_NAMES)}, got {name!r}")
        if name in q.graphs[:i]:
            raise f.error(f"{at}[{i}]", f"{name!r} listed twice")
    f.equal("bits", q.bits, QUANT_SCHEMES[q.scheme], f"{q.scheme} bits")
    power = q.block_size >= 16 and q.block_size & (q.block_size - 1) == 0
    f.check(power, "block_size", f"expected a power of two >= 16, got {q.block_size}")
    levels = ", ".join(map(str, QUANT_ACCURACY_LEVELS))
    ok = q.accuracy_level in QUANT_ACCURACY_LEVELS
    f.check(ok, "accuracy_level", f"expected one of {levels}, got {q.accuracy_level}")
    return q


def _accuracy(f: _Fields) -> dict[str, float] | None:
    if f.value("accuracy", "object", nullable=True) is None:
        return None
    figures = f.section("accuracy", None)
    return {key: figures.value(key, "number") for key in figures.data}


def _engine_limits(f: _Fields, image_tokens: int) -> EngineLimits:
    limits = EngineLimits(**_read(f, EngineLimits))
    f.check(
        limits.max_image_tokens <= image_tokens,
        "max_image_tokens",
        f"{limits.max_image_tokens} exceeds the {image_tokens} image tokens max_pixels allows",
    )
    f.check(
        limits.max_context > limits.max_image_tokens, "max_context", "not above the image tokens"
    )
    return limits


def _shape_range(f: _Fields, declared: TensorSpec) -> ShapeRange:
    rank = len(declared.shape)
    bounds = [f.list_(key, "int0", length=rank) for key in ("min", "opt", "max")]
    for axis, dim in enumerate(declared.shape):
        low, opt, high = (b[axis] for b in bounds)
        f.check(
            low <= opt <= high,
            "opt",
            f"axis {axis}: expected min <= opt <= max, got {low}, {opt}, {high}",
        )
        if isinstance(dim, int):
            f.check(low == high == dim, "max", f"axis {axis} is fixed at {dim} in the graph")
    return ShapeRange(*bounds)


def _engine_profiles(f: _Fields, graphs: dict[str, GraphSpec]) -> dict[str, dict[str, ShapeRange]]:
    out = {}
    for name in f.data:
        f.check(name in graphs, name, f"expected one of {', '.join(GRAPH_NAMES)}")
        g = f.section(name, None)
        inputs = {t.name: t for t in graphs[name].inputs}
        out[name] = {}
        for tensor in g.data:
            g.check(tensor in inputs, tensor, f"{graphs[name].file} has no input {tensor!r}")
            out[name][tensor] = _shape_range(
                g.section(tensor, ("min", "opt", "max")), inputs[tensor]
            )
    return out


def _engine_set(
    f: _Fields, graphs: dict[str, GraphSpec], files: dict[str, FileEntry], image_tokens: int
) -> EngineSet:
    name, folder = f.value("name", "str"), f.value("dir", "str")
    f.check(
        bool(_ENGINE_NAME.fullmatch(name)) and name not in (".", ".."),
        "name",
        f"{name!r} is not a plain folder name",
    )
    f.check(_path_problem(folder) is None, "dir", f"{folder!r} {_path_problem(folder)}")
    device = f.section("device", ("name", "compute_capability"))
    cc = device.value("compute_capability", "str")
    device.check(
        bool(_COMPUTE_CAPABILITY.fullmatch(cc)),
        "compute_capability",
        f"expected major.minor, got {cc!r}",
    )
    versions = f.section("versions", ("tensorrt", "onnxruntime"))
    precision = f.value("precision", "str")
    f.one_of("precision", precision, ENGINE_PRECISIONS)
    g = f.section("graphs", GRAPH_NAMES)
    paths = {}
    for graph in GRAPH_NAMES:
        path = g.value(graph, "str")
        g.check(path.startswith(folder + "/"), graph, f"{path!r} is not inside {folder!r}")
        g.check(_path_problem(path) is None, graph, f"{path!r} {_path_problem(path)}")
        g.check(path in files, graph, f"{path!r} is not listed in files")
        paths[graph] = path
    return EngineSet(
        name=name,
        dir=folder,
        device_name=device.value("name", "str"),
        compute_capability=cc,
        tensorrt=versions.value("tensorrt", "str"),
        onnxruntime=versions.value("onnxruntime", "str"),
        precision=precision,
        limits=_engine_limits(f.section("limits", _keys(EngineLimits)), image_tokens),
        graphs=paths,
        profiles=_engine_profiles(f.section("profiles", None), graphs),
        created_utc=f.value("created_utc", "str"),
        check=copy.deepcopy(f.value("check", "object", nullable=True)),
    )


_ENGINE_KEYS = ("name", "dir", "device", "versions", "precision", "limits", "graphs")
_ENGINE_KEYS += ("profiles", "created_utc", "check")


def _engines(
    f: _Fields, graphs: dict[str, GraphSpec], files: dict[str, FileEntry], image_tokens: int
) -> tuple[EngineSet, ...]:
    if f.data.get("engines") is None:
        return ()
    sets = tuple(
        _engine_set(e, graphs, files, image_tokens) for e in f.sections("engines", _ENGINE_KEYS)
    )
    names = [e.name for e in sets]
    for i, name in enumerate(names):
        f.check(name not in names[:i], f"engines[{i}]", f"engine set {name!r} listed twice")
    return sets


def _image_tokens(model: ModelInfo, image_processor: dict[str, Any]) -> int:
    """Merged image tokens of the largest image max_pixels admits (or the vision cap)."""
    v = model.vision
    cap = max(1, image_processor["max_pixels"] // (v.patch_size * v.spatial_merge_size) ** 2)
    return min(cap, v.max_image_tokens) if v.max_image_tokens else cap


# --- public API -----------------------------------------------------------------------------


def _check_versions(f: _Fields) -> int:
    fmt = f.value("format", "str")
    f.check(fmt == FORMAT, "format", f"expected {FORMAT!r}, got {fmt!r}: not a gmner bundle")
    version = f.value("format_version", "int")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        supported = ", ".join(map(str, SUPPORTED_FORMAT_VERSIONS))
        message = f"format_version {version} is not supported by this gmner_rt"
        raise f.error("", f"{message} (supports {supported}); upgrade gmner_rt or re-export")
    records = f.value("record_format_version", "int")
    ours = RECORD_FORMAT_VERSION
    message = f"the model writes record format {records}, this gmner_rt reads {ours}"
    f.check(records == ours, "record_format_version", f"{message}; re-export or upgrade gmner_rt")
    return version


def parse_manifest(data: dict, *, source: str = MANIFEST_NAME) -> Manifest:
    """Validates a decoded manifest; errors start with ``source`` and name the field path."""
    f = _Fields(data, "", source, None)
    version = _check_versions(f)
    model = _model(f.section("model", _keys(ModelInfo)))
    kv = _kv_cache(f.section("kv_cache", _keys(KvCacheSpec)), model)
    files = _files(f.section("files", None))
    g = f.section("graphs", GRAPH_NAMES)
    exporter = f.section("exporter", None)
    known = {"format", *_keys(Manifest)} - {"extra"}
    graphs = {n: _graph(g.section(n, _keys(GraphSpec)), n, kv, files, version) for n in GRAPH_NAMES}
    image_processor = _image_processor(f.section("image_processor", _IMAGE_KEYS), model.vision)
    return Manifest(
        format_version=version,
        created_utc=f.value("created_utc", "str"),
        model=model,
        kv_cache=kv,
        graphs=graphs,
        tokens=_tokens(f.section("tokens", _keys(TokenIds)), model.text.vocab_size),
        image_processor=image_processor,
        prompt=_prompt(f.section("prompt", _keys(PromptSpec))),
        labels=_labels(f),
        record_format_version=f.data["record_format_version"],
        generation=_generation(f.section("generation", _keys(GenerationSpec))),
        files=files,
        exporter={key: exporter.value(key, "str0", nullable=True) for key in exporter.data},
        parity=copy.deepcopy(f.value("parity", "object", nullable=True)),
        quantization=None
        if f.data.get("quantization") is None
        else _quantization(f.section("quantization", _keys(QuantizationSpec))),
        engines=_engines(f, graphs, files, _image_tokens(model, image_processor)),
        extra={key: copy.deepcopy(value) for key, value in data.items() if key not in known},
    )


def _plain(value: Any) -> Any:
    if is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    return value


def manifest_to_dict(manifest: Manifest) -> dict[str, Any]:
    """The JSON form of ``manifest``: ``manifest_to_dict(parse_manifest(d)) == d`` (a
    ``"quantization": null`` comes back absent, as unquantized exports write it)."""
    data = _plain(manifest)
    extra = data.pop("extra")
    if data["quantization"] is None:
        del data["quantization"]
    data["engines"] = [engine_set_to_dict(e) for e in manifest.engines]
    if not data["engines"]:
        del data["engines"]
    return {"format": FORMAT, **data, **extra}


def engine_set_to_dict(engine: EngineSet) -> dict[str, Any]:
    """The JSON form of one ``engines`` entry (what :func:`parse_manifest` reads back)."""
    return {
        "name": engine.name,
        "dir": engine.dir,
        "device": {"name": engine.device_name, "compute_capability": engine.compute_capability},
        "versions": {"tensorrt": engine.tensorrt, "onnxruntime": engine.onnxruntime},
        "precision": engine.precision,
        "limits": _plain(engine.limits),
        "graphs": dict(engine.graphs),
        "profiles": _plain(engine.profiles),
        "created_utc": engine.created_utc,
        "check": copy.deepcopy(engine.check),
    }


def file_entry(path: str | os.PathLike) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of a file, read in 1 MiB chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def _read_json(path: Path, raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except json.JSONDecodeError as e:
        raise BundleError(
            f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from None
    except UnicodeDecodeError as e:
        raise BundleError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise BundleError(f"{path}: nested too deeply to be a manifest") from None
    except ValueError as e:  # e.g. an integer of thousands of digits
        raise BundleError(f"{path}: not a readable manifest ({e})") from None


def _verify_file(path: Path, entry: FileEntry, verify_hash: bool) -> None:
    if not path.is_file():
        raise BundleError(f"{path}: listed in {MANIFEST_NAME} but missing")
    size = path.stat().st_size
    if size != entry.size:
        why = "the file is truncated or changed after export"
        raise BundleError(f"{path}: size {size} bytes, manifest says {entry.size}: {why}")
    if verify_hash and (digest := file_entry(path)["sha256"]) != entry.sha256:
        hashes = f"manifest {entry.sha256[:8]}..., file {digest[:8]}..."
        raise BundleError(f"{path}: sha256 mismatch ({hashes}): the file changed after export")


#: Files that mark a folder as a training checkpoint, an adapter or a model (not a bundle).
_CHECKPOINT_MARKS = ("adapter_config.json", "trainable.safetensors", "position.json")
_MODEL_MARKS = ("config.json", "model.safetensors", "model.safetensors.index.json")


def _hint(root: Path) -> str:
    """What to do when ``root`` is a training output or a model, not a bundle."""
    if not root.is_dir():
        return f" ({root} does not exist)" if not root.exists() else f" ({root} is a file)"
    names = {p.name for p in root.iterdir()}
    if names & set(_CHECKPOINT_MARKS) or (root / "checkpoints").is_dir():
        return (
            f"; {root} is a training checkpoint or run: make a bundle from it with "
            f"gmner export --model BASE_MODEL_DIR --adapter {root} --out BUNDLE_DIR"
        )
    if names & set(_MODEL_MARKS):
        return (
            f"; {root} is a model folder: make a bundle from it with "
            f"gmner export --model {root} --out BUNDLE_DIR"
        )
    return ""


def load_bundle(path: str | os.PathLike, *, verify_hashes: bool | str = True) -> Bundle:
    """Reads and validates ``path/manifest.json`` and checks every listed file (except those
    of TensorRT engine sets, :func:`verify_engine_set`): its size always, and its sha256

    - ``verify_hashes=True``: unless a full check of this bundle already passed and the file
      is unchanged since (:mod:`gmner_rt.integrity`: size, modification time, inode);
    - ``"full"``: always (hashing a multi-GB bundle takes seconds);
    - ``False``: never.
    """
    if verify_hashes not in (True, False, "full"):
        raise BundleError(f"verify_hashes: expected True, False or 'full', got {verify_hashes!r}")
    root = Path(path)
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise BundleError(f"{root} is not a gmner bundle: {MANIFEST_NAME} missing{_hint(root)}")
    raw = manifest_path.read_bytes()  # read once: parsed, and the key of the integrity stamp
    manifest = parse_manifest(_read_json(manifest_path, raw), source=str(manifest_path))
    engine_dirs = tuple(e.dir + "/" for e in manifest.engines)
    names = [n for n in manifest.files if not n.startswith(engine_dirs)]  # sets: when chosen
    _verify_files(root, raw, manifest, names, verify_hashes)
    return Bundle(root, manifest)


def _verify_files(
    root: Path, raw: bytes, manifest: Manifest, names: list[str], verify_hashes: bool | str
) -> None:
    """Sizes always; sha256 as ``verify_hashes`` says, skipping files the integrity stamp
    knows unchanged (with True), and stamping the ones that hashed right and did not change
    while they were read."""
    known = integrity.unchanged(root, raw, names) if verify_hashes is True else {}
    checked = {}
    for name in names:
        hash_it = bool(verify_hashes) and name not in known
        before = integrity.facts(root / name) if hash_it else None
        _verify_file(root / name, manifest.files[name], hash_it)
        if hash_it and before is not None and integrity.facts(root / name) == before:
            checked[name] = before
    if checked:
        integrity.record(root, raw, {**known, **checked})


def verify_engine_set(bundle: Bundle, engine: EngineSet, *, verify_hashes: bool = True) -> None:
    """Checks the files of one engine set like :func:`load_bundle` checks the others (engine
    sets are checked only when one is about to be used: they are large, and a set for another
    GPU may have been deleted to save space)."""
    names = [n for n in bundle.manifest.files if n.startswith(engine.dir + "/")]
    raw = (bundle.path / MANIFEST_NAME).read_bytes()
    _verify_files(bundle.path, raw, bundle.manifest, names, verify_hashes)


def write_manifest(bundle_dir: str | os.PathLike, data: dict) -> Path:
    """Validates ``data`` and writes it as ``bundle_dir/manifest.json``, atomically."""
    target = Path(bundle_dir) / MANIFEST_NAME
    parse_manifest(data, source=str(target))
    text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".manifest.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
