"""Whether a bundle's ONNX graphs can go through TensorRT's ONNX parser, checked on a CPU.

TensorRT engines are built on the device that runs them, often a Jetson, and building takes
minutes there; a graph the parser refuses should fail here, at export, with the graph, node and
reason named. This module reads graph protos only (no weights, no TensorRT, no GPU) and checks
what TensorRT 10's parser needs (onnx-tensorrt's operator support matrix):

- opsets TensorRT 10 reads (9 to 20) and only the default ONNX domain: no ``com.microsoft``
  contrib ops (onnxruntime's MatMulNBits, GroupQueryAttention, ...);
- no control flow (``If``, ``Loop``, ``Scan``): a data-dependent branch cannot become one engine;
- operators from :data:`SUPPORTED_OPS`, the ones TensorRT 10 parses that exporters emit; any
  other is reported as unverified rather than guessed at;
- inputs that TensorRT wants constant (``Slice`` axes, ``Unsqueeze`` axes, ``TopK``'s K,
  float ``Range`` bounds) are initializers or ``Constant`` outputs;
- graph inputs and outputs of static rank, every dimension a number or a named symbol (what an
  optimization profile binds), and tensor types TensorRT has (no double, no string).

It knows nothing about engines, profiles or devices: those are the engine builder's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto

from gmner_rt.bundle import load_bundle

log = logging.getLogger(__name__)

__all__ = ["SUPPORTED_OPS", "Problem", "bundle_problems", "graph_problems", "log_readiness"]

#: ONNX opsets TensorRT 10's parser reads.
TENSORRT_OPSETS = range(9, 21)

#: Operators TensorRT 10's ONNX parser supports (onnx-tensorrt ``docs/operators.md``), limited
#: to those torch's exporters emit for transformer graphs. Anything else is reported.
SUPPORTED_OPS = frozenset(
    {
        "Abs", "Add", "And", "ArgMax", "ArgMin", "Cast", "Ceil", "Clip", "Concat", "Constant",
        "ConstantOfShape", "Conv", "Cos", "CumSum", "Div", "Einsum", "Equal", "Erf", "Exp",
        "Expand", "Flatten", "Floor", "Gather", "GatherElements", "GatherND", "Gemm", "Greater",
        "GreaterOrEqual", "Identity", "LayerNormalization", "Less", "LessOrEqual", "Log",
        "LogSoftmax", "MatMul", "Max", "Min", "Mul", "Neg", "Not", "Or", "Pad", "Pow", "Range",
        "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "Relu", "Reshape",
        "Resize", "ScatterElements", "ScatterND", "Shape", "Sigmoid", "Sign", "Sin", "Slice",
        "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Tanh", "Tile", "TopK", "Transpose",
        "Unsqueeze", "Where", "Xor",
    }
)  # fmt: skip

#: Control-flow operators: parseable, but a data-dependent branch has no place in an engine.
CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})

#: Per operator, the input positions TensorRT needs as build-time constants.
CONSTANT_INPUTS = {"Slice": (3,), "Unsqueeze": (1,), "Squeeze": (1,), "TopK": (1,)}

#: Tensor element types TensorRT has (int64 is narrowed to int32 by the parser).
TENSOR_TYPES = frozenset(
    {
        TensorProto.FLOAT,
        TensorProto.FLOAT16,
        TensorProto.BFLOAT16,
        TensorProto.INT32,
        TensorProto.INT64,
        TensorProto.INT8,
        TensorProto.UINT8,
        TensorProto.BOOL,
    }
)


@dataclass(frozen=True)
class Problem:
    """One reason TensorRT's parser would refuse a graph.

    Attributes:
        graph: the bundle graph ("vision", "embedding", "decoder") or the file name.
        where: the node (``op_type 'name'``), the input or output, or ``"model"``.
        what: what is wrong, in words.
    """

    graph: str
    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.graph}: {self.where}: {self.what}"


def _type_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(elem_type)


def _opset_problems(model: onnx.ModelProto, graph: str) -> list[Problem]:
    out = []
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            if opset.version not in TENSORRT_OPSETS:
                what = (
                    f"opset {opset.version}; TensorRT 10 reads opsets "
                    f"{TENSORRT_OPSETS.start} to {TENSORRT_OPSETS.stop - 1}"
                )
                out.append(Problem(graph, "model", what))
    return out


def _io_problems(model: onnx.ModelProto, graph: str) -> list[Problem]:
    out = []
    initializers = {t.name for t in model.graph.initializer}
    values = [("input", v) for v in model.graph.input if v.name not in initializers]
    values += [("output", v) for v in model.graph.output]
    for kind, value in values:
        where = f"{kind} {value.name!r}"
        tensor = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            out.append(Problem(graph, where, "not a tensor"))
            continue
        if tensor.elem_type not in TENSOR_TYPES:
            out.append(Problem(graph, where, f"type {_type_name(tensor.elem_type)}"))
        if not tensor.HasField("shape"):
            out.append(Problem(graph, where, "no static rank (shape unknown)"))
            continue
        for axis, dim in enumerate(tensor.shape.dim):
            if not dim.HasField("dim_value") and not dim.dim_param:
                what = f"dimension {axis} has neither a size nor a name"
                out.append(Problem(graph, where, what))
    return out


def _constant_names(model: onnx.ModelProto) -> set[str]:
    names = {t.name for t in model.graph.initializer}
    names.update(out for n in model.graph.node if n.op_type == "Constant" for out in n.output)
    return names


def _node_problems(model: onnx.ModelProto, graph: str) -> list[Problem]:
    out = []
    constants = _constant_names(model)
    for node in model.graph.node:
        where = f"{node.op_type} {node.name!r}"
        if node.domain not in ("", "ai.onnx"):
            what = f"operator of domain {node.domain!r}, which TensorRT's parser does not have"
            out.append(Problem(graph, where, what))
            continue
        if node.op_type in CONTROL_FLOW:
            out.append(Problem(graph, where, "control flow (a data-dependent branch)"))
            continue
        if node.op_type not in SUPPORTED_OPS:
            out.append(Problem(graph, where, "operator not verified for TensorRT's parser"))
            continue
        for index in CONSTANT_INPUTS.get(node.op_type, ()):
            if index < len(node.input) and node.input[index] not in ("", *constants):
                what = f"input {index} ({node.input[index]!r}) must be a constant for TensorRT"
                out.append(Problem(graph, where, what))
        if node.op_type == "Cast":
            to = next(a.i for a in node.attribute if a.name == "to")
            if to not in TENSOR_TYPES:
                out.append(Problem(graph, where, f"casts to {_type_name(to)}"))
    return out


def graph_problems(model: onnx.ModelProto, graph: str = "graph") -> list[Problem]:
    """Every reason TensorRT 10's ONNX parser would refuse ``model``; empty when none."""
    problems = _opset_problems(model, graph) + _io_problems(model, graph)
    problems += _node_problems(model, graph)
    for tensor in model.graph.initializer:
        if tensor.data_type not in TENSOR_TYPES:
            what = f"type {_type_name(tensor.data_type)}"
            problems.append(Problem(graph, f"initializer {tensor.name!r}", what))
    return problems


def bundle_problems(bundle_dir: str | Path) -> list[Problem]:
    """:func:`graph_problems` for each graph of a bundle (protos only: weights stay on disk)."""
    bundle = load_bundle(bundle_dir, verify_hashes=False)
    problems = []
    for name, spec in bundle.manifest.graphs.items():
        model = onnx.load(str(bundle.file(spec.file)), load_external_data=False)
        problems += graph_problems(model, name)
    return problems


def log_readiness(bundle_dir: str | Path) -> list[Problem]:
    """Check a bundle and log the outcome: one line when ready, else each problem."""
    problems = bundle_problems(bundle_dir)
    if not problems:
        log.info("%s: every graph passes TensorRT's parser requirements", bundle_dir)
    for problem in problems[:20]:
        log.warning("%s: not TensorRT-ready: %s", bundle_dir, problem)
    if len(problems) > 20:
        log.warning("%s: ... and %d more", bundle_dir, len(problems) - 20)
    return problems
