"""``gmner export upgrade``: a format-1 bundle (decoder slicing the last position, as
exporters before format 2 wrote it) becomes format 2, checked, and speculates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("onnx")

from gmner.export.upgrade import upgrade_bundle  # noqa: E402
from gmner.runtime.cli import main as gmner_main  # noqa: E402

import gmner_rt  # noqa: E402
from gmner_rt.bundle import file_entry, write_manifest  # noqa: E402
from gmner_rt.errors import InputError  # noqa: E402


def _as_old_format_1(bundle: Path, out: Path, rewrite_manifest) -> Path:
    """``bundle`` as the format-1 exporter wrote it: ``Slice(hidden, -1:)`` before the LM
    head, no ``logits_index`` input, logits ``[B, 1, vocab]``."""
    import onnx
    from onnx import TensorProto, helper

    shutil.copytree(bundle, out)
    model = onnx.load(str(out / "decoder.onnx"))
    graph = model.graph
    gather = next(n for n in graph.node if n.op_type == "Gather" and "logits_index" in n.input)
    index = list(graph.node).index(gather)
    graph.node.remove(gather)
    for name, value in (("v1_start", -1), ("v1_end", 2**62), ("v1_axis", 1)):
        graph.initializer.append(helper.make_tensor(name, TensorProto.INT64, [1], [value]))
    graph.node.insert(
        index,
        helper.make_node(
            "Slice", [gather.input[0], "v1_start", "v1_end", "v1_axis"], [gather.output[0]]
        ),
    )
    graph.input.remove(next(i for i in graph.input if i.name == "logits_index"))
    logits = next(o for o in graph.output if o.name == "logits")
    logits.type.tensor_type.shape.dim[1].Clear()
    logits.type.tensor_type.shape.dim[1].dim_value = 1
    onnx.save(model, str(out / "decoder.onnx"))
    rewrite_manifest(out)
    return out


def test_upgrade_gives_a_format_2_bundle_with_the_same_tokens(
    tiny_bundle, tmp_path, caplog, manifest_as_format_1
):
    old = _as_old_format_1(tiny_bundle, tmp_path / "v1", manifest_as_format_1)
    assert (
        gmner_main(["export", "upgrade", "--bundle", str(old), "--out", str(tmp_path / "v2")]) == 0
    )
    new = gmner_rt.load(tmp_path / "v2")
    assert new.bundle.manifest.format_version == 2 and new.bundle.verifies_drafts
    assert "Upgraded from bundle format 1" in (tmp_path / "v2" / "README.md").read_text()
    reference = gmner_rt.load(tiny_bundle)
    image = next((Path(__file__).parents[2] / "examples" / "demo").glob("*.png"))
    for speculate in (False, True):
        ours = new.extract(image, "Zentro meets Lake Ormond", think="on", constrained=False,
                           max_new_tokens=48, speculate=speculate)  # fmt: skip
        theirs = reference.extract(image, "Zentro meets Lake Ormond", think="on",
                                   constrained=False, max_new_tokens=48)  # fmt: skip
        assert ours.token_ids == theirs.token_ids
    with pytest.raises(InputError, match="already; nothing to upgrade"):
        upgrade_bundle(tmp_path / "v2", tmp_path / "again")


def test_upgrade_refuses_a_decoder_it_does_not_know(tiny_bundle, tmp_path, manifest_as_format_1):
    import onnx

    old = _as_old_format_1(tiny_bundle, tmp_path / "v1", manifest_as_format_1)
    model = onnx.load(str(old / "decoder.onnx"))
    for node in model.graph.node:
        if node.op_type == "Slice":
            node.op_type = "Identity"
            del node.input[1:]
    onnx.save(model, str(old / "decoder.onnx"))
    data = json.loads((old / "manifest.json").read_text())
    data["files"]["decoder.onnx"] = file_entry(old / "decoder.onnx")
    write_manifest(old, data)
    with pytest.raises(InputError, match="no last-position Slice"):
        upgrade_bundle(old, tmp_path / "v2")
    assert not (tmp_path / "v2").exists()
