"""Export the vision, embedding and decoder graphs of a loaded Qwen2.5-VL model to ONNX.

The graphs' I/O contract (names, dtypes, symbolic shapes) is declared once here, in
:func:`graph_specs`, and written to the bundle manifest from the same declaration; after
export each file's inputs and outputs are checked against it. Tracing uses the TorchScript
exporter (opset 18) with batch 2, sequence 5 and past 3: dims of size 0 or 1 would be
specialised, and one export takes a fraction of a second (the dynamo exporter takes about 50
times longer on the same graph and gives the same parity; ``exporter="dynamo"`` selects it).
Weights go to one external ``<graph>.onnx.data`` file when a graph's initializers pass
``max_inline_bytes`` (protobuf's limit is 2 GB). This module knows nothing about bundles or
parity checks.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from gmner_rt.vision import vision_indices

from .graphs import DecoderGraph, EmbeddingGraph, VisionGraph

log = logging.getLogger(__name__)

__all__ = [
    "EXPORTERS",
    "GRAPH_NAMES",
    "OPSET",
    "ExportSettings",
    "cast_for_export",
    "export_graphs",
    "graph_specs",
]

OPSET = 18
GRAPH_NAMES = ("vision", "embedding", "decoder")
EXPORTERS = ("torchscript", "dynamo")
TWO_GB = 2_000_000_000
#: The decoder's inputs before its past K/V tensors (its ``forward``'s positional arguments).
DECODER_HEAD_INPUTS = ("inputs_embeds", "attention_mask", "position_ids", "logits_index")
_ONNX_DTYPES = {"float32": torch.float32, "float16": torch.float16}
#: Activations above this in an fp32 probe overflow-risk fp16 (max 65504) after a few layers.
FP16_SAFE_ACTIVATION = 65504.0 / 8


@dataclass(frozen=True)
class ExportSettings:
    """How the graphs are written.

    Attributes:
        dtype: "float32" or "float16" for weights and activations.
        exporter: "torchscript" (default, fast) or "dynamo" (torch.export based).
        max_inline_bytes: a graph whose weights pass this goes to external data.
        fp32_vision_mlps: vision blocks whose MLP stays fp32 in an fp16 export; ``None`` picks
            them with an activation probe (see :func:`cast_for_export`).
    """

    dtype: str = "float32"
    exporter: str = "torchscript"
    max_inline_bytes: int = TWO_GB
    fp32_vision_mlps: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.dtype not in _ONNX_DTYPES:
            raise ValueError(f"dtype: expected one of {sorted(_ONNX_DTYPES)}, got {self.dtype!r}")
        if self.exporter not in EXPORTERS:
            raise ValueError(f"exporter: expected one of {EXPORTERS}, got {self.exporter!r}")
        if self.max_inline_bytes <= 0:
            raise ValueError(f"max_inline_bytes: must be > 0, got {self.max_inline_bytes}")


def _tensor(name: str, dtype: str, shape: Sequence[str | int]) -> dict:
    return {"name": name, "dtype": dtype, "shape": list(shape)}


def graph_specs(config, dtype: str) -> dict[str, dict[str, list[dict]]]:
    """Inputs and outputs of the three graphs for a Qwen2.5-VL ``config`` (the manifest's)."""
    text, vision = config.text_config, config.vision_config
    head_dim = text.hidden_size // text.num_attention_heads
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    kv_past = ["batch", text.num_key_value_heads, "past_sequence", head_dim]
    kv_present = ["batch", text.num_key_value_heads, "total_sequence", head_dim]
    past, present = [], []
    for layer in range(text.num_hidden_layers):
        for kind in ("key", "value"):
            past.append(_tensor(f"past_{kind}_{layer}", dtype, kv_past))
            present.append(_tensor(f"present_{kind}_{layer}", dtype, kv_present))
    return {
        "vision": {
            "inputs": [
                _tensor("pixel_values", "float32", ["num_patches", patch_dim]),
                _tensor("rot_pos_ids", "int64", ["num_patches", 2]),
                _tensor("window_index", "int64", ["num_groups"]),
                _tensor("reverse_index", "int64", ["num_groups"]),
                _tensor("cu_seqlens", "int64", ["num_images_plus_1"]),
                _tensor("cu_window_seqlens", "int64", ["num_windows_plus_1"]),
            ],
            "outputs": [_tensor("image_embeds", dtype, ["num_groups", vision.out_hidden_size])],
        },
        "embedding": {
            "inputs": [_tensor("input_ids", "int64", ["batch", "sequence"])],
            "outputs": [_tensor("inputs_embeds", dtype, ["batch", "sequence", text.hidden_size])],
        },
        "decoder": {
            "inputs": [
                _tensor("inputs_embeds", dtype, ["batch", "sequence", text.hidden_size]),
                _tensor("attention_mask", "int64", ["batch", "total_sequence"]),
                _tensor("position_ids", "int64", [3, "batch", "sequence"]),
                _tensor("logits_index", "int64", ["num_logits"]),
                *past,
            ],
            "outputs": [
                _tensor("logits", dtype, ["batch", "num_logits", text.vocab_size]),
                *present,
            ],
        },
    }


def _vision_probe_activations(model, pixel_args: tuple) -> list[float]:
    """Max |activation| entering and leaving each vision MLP on ``pixel_args`` (fp32 run)."""
    peaks = [0.0] * len(model.model.visual.blocks)
    hooks = []
    for index, block in enumerate(model.model.visual.blocks):

        def hook(_module, inputs, output, index=index):
            peak = max(float(inputs[0].abs().max()), float(output.abs().max()))
            peaks[index] = max(peaks[index], peak)

        hooks.append(block.mlp.down_proj.register_forward_hook(hook))
    try:
        with torch.no_grad():
            VisionGraph(model.model.visual)(*pixel_args)
    finally:
        for handle in hooks:
            handle.remove()
    return peaks


def cast_for_export(model, settings: ExportSettings) -> tuple[int, ...]:
    """Cast ``model`` in place to the export dtype; return the vision MLPs kept in fp32.

    For fp16: every weight goes to fp16 except the MLPs of the vision blocks listed in
    ``settings.fp32_vision_mlps``, or, when that is ``None``, of the last vision block (where
    Qwen2.5-VL-3B's fp16 overflow is reported, docs/export.md) plus every block whose MLP
    activations on a probe image exceed 65504 / 8 in fp32. RMSNorms and softmax compute in
    fp32 whatever the weights' dtype (HF's RMSNorm upcasts; :mod:`.graphs` upcasts scores).
    """
    if settings.dtype == "float32":
        model.float()
        return ()
    keep = settings.fp32_vision_mlps
    if keep is None:
        model.model.visual.float()  # the probe runs the vision tower alone in fp32
        peaks = _vision_probe_activations(model, _vision_args(model.config, torch.float32))
        depth = len(peaks)
        keep = tuple(
            sorted({depth - 1} | {i for i, p in enumerate(peaks) if p > FP16_SAFE_ACTIVATION})
        )
        log.info("vision MLP activation peaks %s; kept in fp32: %s", peaks, keep)
    model.half()
    for index in keep:
        _keep_fp32(model.model.visual.blocks[index].mlp)
    return tuple(keep)


def _keep_fp32(module: torch.nn.Module) -> None:
    """Make ``module`` fp32 inside an fp16 model: inputs cast up, outputs cast back down."""
    module.float()

    def cast_in(_module, args):
        return tuple(a.float() if torch.is_tensor(a) else a for a in args)

    def cast_out(_module, _args, output):
        return output.half()

    module.register_forward_pre_hook(cast_in)
    module.register_forward_hook(cast_out)


def _vision_args(config, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Tracing inputs for the vision graph: two images, several windows each."""
    vision = config.vision_config
    grids = [(1, 8, 12), (1, 12, 8)]
    indices = vision_indices(
        grids,
        merge_size=vision.spatial_merge_size,
        window_size=vision.window_size,
        patch_size=vision.patch_size,
    )
    patches = sum(t * h * w for t, h, w in grids)
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(patches, patch_dim, generator=generator)
    as_tensor = torch.from_numpy
    return (
        pixels,
        as_tensor(indices.rot_pos_ids),
        as_tensor(indices.window_index),
        as_tensor(indices.reverse_index),
        as_tensor(indices.cu_seqlens),
        as_tensor(indices.cu_window_seqlens),
    )


def _embedding_args() -> tuple[torch.Tensor, ...]:
    return (torch.arange(10, dtype=torch.int64).reshape(2, 5),)


def _decoder_args(config, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Tracing inputs: batch 2, sequence 5, past 3, logits of the last 2 positions (no dim of
    size 0 or 1)."""
    text = config.text_config
    batch, length, past = 2, 5, 3
    head_dim = text.hidden_size // text.num_attention_heads
    generator = torch.Generator().manual_seed(0)
    kv = [
        torch.randn(batch, text.num_key_value_heads, past, head_dim, generator=generator).to(dtype)
        for _ in range(2 * text.num_hidden_layers)
    ]
    return (
        torch.randn(batch, length, text.hidden_size, generator=generator).to(dtype),
        torch.ones(batch, past + length, dtype=torch.int64),
        torch.arange(length).repeat(3, batch, 1),
        torch.arange(length - 2, length, dtype=torch.int64),
        *kv,
    )


def _dynamic_axes(spec: dict) -> dict[str, dict[int, str]]:
    axes = {}
    for tensor in spec["inputs"] + spec["outputs"]:
        named = {i: d for i, d in enumerate(tensor["shape"]) if isinstance(d, str)}
        if named:
            axes[tensor["name"]] = named
    return axes


def _dynamo_shapes(spec: dict) -> dict:
    """``dynamic_shapes`` for the dynamo exporter: every symbolic input dim is DYNAMIC."""
    from torch.export import Dim

    shapes = {}
    for tensor in spec["inputs"]:
        shapes[tensor["name"]] = {
            i: Dim.DYNAMIC for i, d in enumerate(tensor["shape"]) if isinstance(d, str)
        }
    return shapes


def _torch_export(module, args, spec: dict, path: Path, settings: ExportSettings) -> None:
    names_in = [t["name"] for t in spec["inputs"]]
    names_out = [t["name"] for t in spec["outputs"]]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        if settings.exporter == "dynamo":
            shapes = _dynamo_shapes(spec)
            # the decoder's *past is one positional tuple for torch.export
            head = len(DECODER_HEAD_INPUTS)
            decoder = names_in[:head] == list(DECODER_HEAD_INPUTS)
            fixed = [shapes[n] for n in names_in[:head]] if decoder else None
            dynamic = (*fixed, tuple(shapes[n] for n in names_in[head:])) if fixed else shapes
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                opset_version=OPSET,
                input_names=names_in,
                output_names=names_out,
                dynamic_shapes=dynamic,
                optimize=True,
            )
            program.save(str(path), external_data=True)
        else:
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                opset_version=OPSET,
                input_names=names_in,
                output_names=names_out,
                dynamic_axes=_dynamic_axes(spec),
                do_constant_folding=True,
            )


def _set_io_shapes(proto: onnx.ModelProto, spec: dict) -> None:
    """Give graph inputs/outputs the spec's dim names (exporters invent their own)."""
    declared = {t["name"]: t for t in spec["inputs"] + spec["outputs"]}
    for value in list(proto.graph.input) + list(proto.graph.output):
        tensor = declared.get(value.name)
        if tensor is None:
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(tensor["shape"]):
            raise RuntimeError(
                f"{value.name}: exported rank {len(dims)}, declared {len(tensor['shape'])}"
            )
        for dim, want in zip(dims, tensor["shape"], strict=True):
            if isinstance(want, str):
                dim.dim_param = want
            else:
                dim.dim_value = want


_ELEM_TYPES = {
    "float32": onnx.TensorProto.FLOAT,
    "float16": onnx.TensorProto.FLOAT16,
    "int64": onnx.TensorProto.INT64,
}


def _check_io(proto: onnx.ModelProto, spec: dict, path: Path) -> None:
    """The exported file's inputs and outputs are the declared ones, in order, with dtypes."""
    for kind, values in (("inputs", proto.graph.input), ("outputs", proto.graph.output)):
        got = [(v.name, v.type.tensor_type.elem_type) for v in values]
        want = [(t["name"], _ELEM_TYPES[t["dtype"]]) for t in spec[kind]]
        if got != want:
            raise RuntimeError(f"{path}: exported {kind} {got} differ from the declared {want}")


def _weights_bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def _finalize(path: Path, spec: dict, external: bool) -> str | None:
    """Rewrite ``path`` with the declared I/O shapes and its weights inline or in one file."""
    proto = onnx.load(str(path), load_external_data=True)
    _set_io_shapes(proto, spec)
    _check_io(proto, spec, path)
    stale = {
        Path(t.external_data[0].value).name
        for t in proto.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL and t.external_data
    }
    for leftover in path.parent.iterdir():
        if leftover != path and (leftover.name in stale or leftover.name == path.name + ".data"):
            leftover.unlink()
    data_file = path.name + ".data" if external else None
    onnx.save_model(
        proto,
        str(path),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=data_file,
        size_threshold=1024,
    )
    return data_file


def _export_one(name, module, args, spec, out_dir: Path, settings: ExportSettings) -> dict:
    scratch = out_dir / f".{name}-export"
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / f"{name}.onnx"
    _torch_export(module, args, spec, path, settings)
    external = _weights_bytes(module) > settings.max_inline_bytes
    data_file = _finalize(path, spec, external)
    final = out_dir / path.name
    path.replace(final)
    if data_file:
        (scratch / data_file).replace(out_dir / data_file)
    for leftover in scratch.iterdir():
        leftover.unlink()
    scratch.rmdir()
    log.info("exported %s (%s)", final, "external data" if data_file else "inline weights")
    return {"file": final.name, "data_file": data_file, "opset": OPSET, **spec}


def export_graphs(model, out_dir: str | Path, settings: ExportSettings) -> dict[str, dict]:
    """Write ``vision.onnx``, ``embedding.onnx``, ``decoder.onnx`` for an already cast model.

    Returns the manifest's ``graphs`` section: per graph its file, external data file (or
    None), opset, inputs and outputs.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = _ONNX_DTYPES[settings.dtype]
    specs = graph_specs(model.config, settings.dtype)
    modules = {
        "vision": (VisionGraph(model.model.visual), _vision_args(model.config, dtype)),
        "embedding": (
            EmbeddingGraph(model.model.language_model.embed_tokens),
            _embedding_args(),
        ),
        "decoder": (DecoderGraph(model), _decoder_args(model.config, dtype)),
    }
    graphs = {}
    for name in GRAPH_NAMES:
        module, args = modules[name]
        graphs[name] = _export_one(name, module.eval(), args, specs[name], out, settings)
    return graphs
