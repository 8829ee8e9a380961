"""Weight-only int8 / int4 quantization of a decoder graph (onnxruntime's MatMulNBits).

Every MatMul whose weight is a constant initializer (the seven projections of each layer and,
unless told otherwise, the LM head) becomes a ``com.microsoft.MatMulNBits`` node: the weight
stored in 8 or 4 bits with one scale (and, asymmetric, one zero point) per ``block_size``
weights along the reduction axis, rounded to nearest, no calibration data. Everything else
keeps its dtype: activations, the KV cache, norms, rotary embedding, attention (its MatMuls
multiply two activations) and the graph's inputs and outputs, so a quantized decoder is a
drop-in for the fp one.

This module rewrites one ONNX file and reports what it did. It knows nothing about bundles,
manifests or accuracy checks (:mod:`.quantized_bundle` does).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import onnx

log = logging.getLogger(__name__)

__all__ = [
    "ACCURACY_LEVELS",
    "SCHEMES",
    "QuantSettings",
    "lm_head_matmul",
    "quantize_decoder",
    "weight_matmuls",
]

#: ``--quant`` schemes -> bits per weight.
SCHEMES = {"int8": 8, "int4": 4}
#: MatMulNBits ``accuracy_level``: the compute type of its CPU kernel. 0 leaves it unset
#: (activation dtype), 1 fp32, 2 fp16, 3 bf16, 4 int8 (activations quantized per block on the
#: fly, integer dot products). CUDA ignores it.
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
TWO_GB = 2_000_000_000
#: Ops between the LM head's MatMul and the ``logits`` output that do not change values.
_PASS_THROUGH = ("Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten")
_QUANTIZER_LOGGER = "onnxruntime.quantization.matmul_nbits_quantizer"


@dataclass(frozen=True)
class QuantSettings:
    """How the decoder's MatMul weights are quantized (``gmner export --quant ...``).

    Attributes:
        scheme: ``"int8"`` or ``"int4"`` (``--quant``).
        block_size: weights sharing one scale along the reduction axis, a power of two >= 16
            (``--block-size``). Smaller blocks are more accurate and store more scales: at 32 a
            4-bit weight costs 5 bits with its fp32 scale (4.5 with an fp16 one).
        quant_lm_head: quantize the LM head too (``--quant-lm-head/--no-quant-lm-head``). With
            tied embeddings at Qwen2.5-0.5B it holds 136 M of the 494 M quantized weights.
        accuracy_level: MatMulNBits's CPU compute type (``--accuracy-level``, see
            :data:`ACCURACY_LEVELS`). The default 4 quantizes activations to int8 on the fly;
            at level 0 the CPU kernel dequantizes the weights on every call, which makes int4
            prefill no faster than fp32 and int8 decode about 40 times slower than at level 4
            (figures in docs/export.md).
        symmetric: no zero points, scales only (``--symmetric/--no-symmetric``).
    """

    scheme: str
    block_size: int = 32
    quant_lm_head: bool = True
    accuracy_level: int = 4
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"--quant: expected one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        size = self.block_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 16 or size & (size - 1):
            raise ValueError(f"--block-size: expected a power of two >= 16, got {size!r}")
        if self.accuracy_level not in ACCURACY_LEVELS:
            levels = ", ".join(map(str, ACCURACY_LEVELS))
            raise ValueError(
                f"--accuracy-level: expected one of {levels}, got {self.accuracy_level!r}"
            )

    @property
    def bits(self) -> int:
        return SCHEMES[self.scheme]


def weight_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The MatMul nodes whose second input (the weight) is a constant initializer."""
    constants = {t.name for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in constants]


def lm_head_matmul(model: onnx.ModelProto, output: str = "logits") -> onnx.NodeProto:
    """The MatMul (or MatMulNBits) node that computes ``output``, found by walking back from
    the graph output through value-preserving ops (a Cast, a Reshape)."""
    producers = {name: node for node in model.graph.node for name in node.output}
    name, seen = output, []
    while (node := producers.get(name)) is not None:
        if node.op_type in ("MatMul", "MatMulNBits"):
            return node
        seen.append(node.op_type)
        if node.op_type not in _PASS_THROUGH:
            break
        name = node.input[0]
    path = " <- ".join([output, *seen]) if seen else output
    raise ValueError(f"decoder graph: no MatMul computes {output!r} (walked back: {path})")


def _external_files(model: onnx.ModelProto) -> set[str]:
    return {
        entry.value
        for tensor in model.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }


def _load(path: Path) -> tuple[onnx.ModelProto, int]:
    """The model with its weights, and the bytes of its file plus its external data files."""
    model = onnx.load(str(path), load_external_data=False)
    size = path.stat().st_size + sum(
        (path.parent / f).stat().st_size for f in _external_files(model)
    )
    onnx.load_external_data_for_model(model, str(path.parent))
    return model, size


def _quantizer_class():
    """onnxruntime's ``MatMulNBitsQuantizer``, imported without its side effects: the module
    calls ``logging.basicConfig(level=INFO)`` on import (a root handler where none was set)
    and logs two INFO lines for every node of the graph."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)
    logging.getLogger(_QUANTIZER_LOGGER).setLevel(logging.WARNING)
    return MatMulNBitsQuantizer


def _save(model: onnx.ModelProto, dst: Path, max_inline_bytes: int) -> str | None:
    """Write ``dst``, its weights in ``dst.name + ".data"`` when they pass the threshold."""
    weights = sum(t.ByteSize() for t in model.graph.initializer)
    data_file = dst.name + ".data" if weights > max_inline_bytes else None
    if data_file:
        (dst.parent / data_file).unlink(missing_ok=True)
    onnx.save_model(
        model,
        str(dst),
        save_as_external_data=data_file is not None,
        all_tensors_to_one_file=True,
        location=data_file,
        size_threshold=1024,
    )
    return data_file


def quantize_decoder(
    src: Path, dst: Path, settings: QuantSettings, *, max_inline_bytes: int = TWO_GB
) -> dict:
    """Write ``src`` (a decoder graph) with its constant-weight MatMuls quantized as ``dst``.

    Weights go to one external file ``dst.name + ".data"`` when they pass
    ``max_inline_bytes`` (protobuf's limit is 2 GB). Returns the facts of the manifest's
    ``quantization`` section (``scheme``, ``op``, ``bits``, ``block_size``, ``symmetric``,
    ``accuracy_level``, ``lm_head``, ``matmuls``, ``bytes_before``, ``bytes_after``) and
    ``data_file``, the external data file's name or None.
    """
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError(f"{src}: quantize into a new file, not over the source")
    model, bytes_before = _load(src)
    if any(n.op_type == "MatMulNBits" for n in model.graph.node):
        raise ValueError(f"{src}: already quantized (it holds MatMulNBits nodes)")
    targets = weight_matmuls(model)
    head = lm_head_matmul(model)
    if any(not n.name for n in targets) or len({n.name for n in targets}) != len(targets):
        raise ValueError(f"{src}: MatMul nodes without unique names cannot be selected")
    excluded = [] if settings.quant_lm_head else [head.name]
    quantizer = _quantizer_class()(
        model,
        bits=settings.bits,
        block_size=settings.block_size,
        is_symmetric=settings.symmetric,
        accuracy_level=settings.accuracy_level,
        nodes_to_exclude=excluded,
        op_types_to_quantize=("MatMul",),
    )
    quantizer.process()
    quantized = quantizer.model.model
    count = sum(n.op_type == "MatMulNBits" for n in quantized.graph.node)
    if count != len(targets) - len(excluded):
        skipped = len(targets) - len(excluded) - count
        raise RuntimeError(f"{src}: {skipped} weight MatMuls were left unquantized")
    data_file = _save(quantized, dst, max_inline_bytes)
    bytes_after = dst.stat().st_size + ((dst.parent / data_file).stat().st_size if data_file else 0)
    log.info(
        "%s: %d MatMuls to %s (block %d, lm_head %s): %.1f MB -> %.1f MB",
        dst,
        count,
        settings.scheme,
        settings.block_size,
        "quantized" if settings.quant_lm_head else "kept",
        bytes_before / 1e6,
        bytes_after / 1e6,
    )
    return {
        "scheme": settings.scheme,
        "op": "MatMulNBits",
        "bits": settings.bits,
        "block_size": settings.block_size,
        "symmetric": settings.symmetric,
        "accuracy_level": settings.accuracy_level,
        "lm_head": settings.quant_lm_head,
        "matmuls": count,
        "bytes_before": bytes_before,
        "bytes_after": bytes_after,
        "data_file": data_file,
    }
