"""TensorRT readiness of the exported graphs, checked on the CPU (export/tensorrt_ready.py)."""

from __future__ import annotations

import json
import shutil

import pytest

onnx = pytest.importorskip("onnx")
from gmner.export.tensorrt_ready import SUPPORTED_OPS, bundle_problems, graph_problems  # noqa: E402
from gmner.runtime.cli import main  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from gmner_rt.bundle import file_entry  # noqa: E402

DEFAULT_BUNDLE = "gmner_rt/models/default"


def _model(nodes, inputs, outputs, initializers=(), opset=18, domains=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
    return helper.make_model(graph, opset_imports=opsets)


def _vector(name, elem=TensorProto.FLOAT, shape=("n",)):
    return helper.make_tensor_value_info(name, elem, list(shape))


def _clean():
    return _model(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")], [_vector("x")], [_vector("y")]
    )


def test_a_plain_graph_has_no_problem():
    assert graph_problems(_clean(), "g") == []


def test_the_shipped_and_the_freshly_exported_bundles_are_ready(tiny_bundle):
    """Every graph `gmner export` writes goes through TensorRT's parser rules (fp bundles)."""
    assert bundle_problems(DEFAULT_BUNDLE) == []
    assert bundle_problems(tiny_bundle) == []


def test_every_operator_of_the_exported_graphs_is_in_the_supported_set(tiny_bundle):
    ops = set()
    for name in ("vision", "embedding", "decoder"):
        model = onnx.load(str(tiny_bundle / f"{name}.onnx"), load_external_data=False)
        ops |= {node.op_type for node in model.graph.node}
    assert ops <= SUPPORTED_OPS
    assert {"MatMul", "Softmax", "Concat"} <= ops  # the check really read the graphs


@pytest.mark.parametrize(
    ("build", "where", "what"),
    [
        (
            lambda: _model(
                [helper.make_node("MatMulNBits", ["x"], ["y"], name="q", domain="com.microsoft")],
                [_vector("x")],
                [_vector("y")],
                domains=["com.microsoft"],
            ),
            "MatMulNBits 'q'",
            "domain 'com.microsoft'",
        ),
        (
            lambda: _model(
                [helper.make_node("If", ["c"], ["y"], name="branch")],
                [_vector("c", TensorProto.BOOL, ())],
                [_vector("y")],
            ),
            "If 'branch'",
            "control flow",
        ),
        (
            lambda: _model(
                [helper.make_node("NonZero", ["x"], ["y"], name="nz")],
                [_vector("x")],
                [_vector("y", TensorProto.INT64, (1, "m"))],
            ),
            "NonZero 'nz'",
            "not verified",
        ),
        (
            lambda: _model(
                [helper.make_node("Unsqueeze", ["x", "axes"], ["y"], name="u")],
                [_vector("x"), _vector("axes", TensorProto.INT64, (1,))],
                [_vector("y", shape=(1, "n"))],
            ),
            "Unsqueeze 'u'",
            "input 1 ('axes') must be a constant",
        ),
        (
            lambda: _model(
                [helper.make_node("Relu", ["x"], ["y"], name="relu")],
                [_vector("x", TensorProto.DOUBLE)],
                [_vector("y", TensorProto.DOUBLE)],
            ),
            "input 'x'",
            "type DOUBLE",
        ),
        (
            lambda: _model(
                [helper.make_node("Relu", ["x"], ["y"], name="relu")],
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                [_vector("y")],
            ),
            "input 'x'",
            "no static rank",
        ),
        (
            lambda: _model(
                [helper.make_node("Relu", ["x"], ["y"], name="relu")],
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
                [_vector("y")],
            ),
            "input 'x'",
            "dimension 0 has neither a size nor a name",
        ),
        (
            lambda: _model(
                [helper.make_node("Cast", ["x"], ["y"], name="c", to=TensorProto.DOUBLE)],
                [_vector("x")],
                [_vector("y")],
            ),
            "Cast 'c'",
            "casts to DOUBLE",
        ),
        (lambda: _model(_clean().graph.node, [_vector("x")], [_vector("y")], opset=21), "model",
         "opset 21"),
    ],
)  # fmt: skip
def test_each_problem_names_the_node_and_the_reason(build, where, what):
    problems = graph_problems(build(), "decoder")
    assert len(problems) >= 1
    text = [str(p) for p in problems]
    assert any(t.startswith(f"decoder: {where}: ") and what in t for t in text), text


def test_a_constant_node_satisfies_a_constant_input():
    axes = helper.make_node(
        "Constant",
        [],
        ["axes"],
        value=helper.make_tensor("v", TensorProto.INT64, [1], [0]),
        name="axes",
    )
    model = _model(
        [axes, helper.make_node("Unsqueeze", ["x", "axes"], ["y"], name="u")],
        [_vector("x")],
        [_vector("y", shape=(1, "n"))],
    )
    assert graph_problems(model) == []


def test_trt_check_command_exit_codes(tmp_path, caplog):
    assert main(["export", "trt-check", "--bundle", DEFAULT_BUNDLE]) == 0
    bad = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, bad)
    model = onnx.load(str(bad / "embedding.onnx"))
    model.graph.node[0].domain = "com.microsoft"
    onnx.save(model, str(bad / "embedding.onnx"))
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["files"]["embedding.onnx"] = file_entry(bad / "embedding.onnx")
    (bad / "manifest.json").write_text(json.dumps(manifest))
    assert main(["export", "trt-check", "--bundle", str(bad)]) == 1
    assert "embedding: Gather" in caplog.text and "com.microsoft" in caplog.text
