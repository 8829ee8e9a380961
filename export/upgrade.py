"""``gmner export upgrade``: a format-1 bundle as format 2, without its checkpoint.

Format 2 (:mod:`gmner_rt.bundle`) differs from format 1 in one place: the decoder takes
``logits_index [num_logits]`` and returns the logits of those positions, where a format-1
decoder slices the last one. The upgrade makes exactly that change to the graph (the ``Slice``
of the final hidden states before the LM head becomes a ``Gather`` on ``logits_index``) and
to the manifest, then proves it: on probe inputs the new decoder's logits for the last
position equal the old decoder's bit for bit, and the logits of several positions equal those
of the old decoder run on each prefix. Weights are untouched (external data files are copied
as they are). For a bundle whose checkpoint is at hand, ``gmner export`` writes format 2
directly. This module knows nothing about torch.
"""

from __future__ import annotations

import logging
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from gmner_rt.bundle import file_entry, load_bundle, manifest_to_dict, write_manifest
from gmner_rt.errors import InputError

from .card import write_card
from .staging import move_into_place, staging_dir

log = logging.getLogger(__name__)

__all__ = ["upgrade_bundle"]

#: Largest difference, relative to the largest logit, between one call over T positions and
#: T calls over the prefixes (the export's parity tolerances).
TOLERANCE = {"float32": 1e-4, "float16": 2e-2}
LOGITS_INDEX = {"name": "logits_index", "dtype": "int64", "shape": ["num_logits"]}


def upgrade_bundle(src: str | Path, out: str | Path) -> Path:
    """Write the format-1 bundle ``src`` as the format-2 bundle ``out``; return ``out``."""
    src, out = Path(src), Path(out)
    source = load_bundle(src)
    m = source.manifest
    if m.format_version != 1:
        raise InputError(f"{src}: format {m.format_version} already; nothing to upgrade")
    if m.quantization is not None:
        raise InputError(f"{src}: quantized; upgrade its fp source bundle, then quantize that")
    decoder = m.graphs["decoder"]
    engine_dirs = tuple(e.dir + "/" for e in m.engines)  # built for the old graph: left out
    tmp = staging_dir(out)
    try:
        for name in m.files:
            if name != decoder.file and not name.startswith(engine_dirs):
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source.file(name), tmp / name)
        _gather_logits(source.file(decoder.file), tmp / decoder.file)
        data = manifest_to_dict(m)
        data.pop("engines", None)  # built for the old graph
        data["files"] = {k: v for k, v in data["files"].items() if not k.startswith(engine_dirs)}
        data["format_version"] = 2
        data["created_utc"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        graph = data["graphs"]["decoder"]
        graph["inputs"].insert(3, dict(LOGITS_INDEX))
        logits = next(o for o in graph["outputs"] if o["name"] == "logits")
        logits["shape"][1] = "num_logits"
        data["files"][decoder.file] = file_entry(tmp / decoder.file)
        data.setdefault("provenance", {})["upgraded_from_format"] = 1
        write_manifest(tmp, data)
        upgraded = load_bundle(tmp)
        check_upgrade(source, upgraded)
        write_card(tmp, upgraded.manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    move_into_place(tmp, out)
    log.info("%s: format 2 written to %s (logits of chosen positions)", src, out)
    return out


def _gather_logits(src: Path, dst: Path) -> None:
    """The decoder graph with its last-position ``Slice`` before the LM head replaced by a
    ``Gather`` on a new ``logits_index`` input (weights left where they are)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    name, seen = "logits", 0
    while name in producers and producers[name].op_type != "Slice":
        name = next((i for i in producers[name].input if i in producers), "")
        seen += 1
        if seen > 8:
            break
    if name not in producers or producers[name].op_type != "Slice":
        raise InputError(f"{src}: no last-position Slice before the logits; not a gmner decoder")
    node = producers[name]
    index = list(graph.node).index(node)
    graph.node.remove(node)
    graph.node.insert(
        index, helper.make_node("Gather", [node.input[0], "logits_index"], [node.output[0]], axis=1)
    )
    position = next(i for i, v in enumerate(graph.input) if v.name == "position_ids") + 1
    graph.input.insert(
        position, helper.make_tensor_value_info("logits_index", TensorProto.INT64, ["num_logits"])
    )
    _drop_unused(graph)  # the Slice's bounds
    out = next(o for o in graph.output if o.name == "logits")
    out.type.tensor_type.shape.dim[1].Clear()
    out.type.tensor_type.shape.dim[1].dim_param = "num_logits"
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))


def _drop_unused(graph) -> None:
    """Remove Constant nodes and initializers that no node or output reads any more."""
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]
        for node in dead:
            graph.node.remove(node)
        unread = [t for t in graph.initializer if t.name not in used]
        for tensor in unread:
            graph.initializer.remove(tensor)
        if not dead and not unread:
            return


def check_upgrade(old, new, length: int = 6, seed: int = 0) -> None:
    """The upgraded decoder against the old one on a random prompt of ``length`` tokens:
    the last position's logits bit for bit, and every position's logits equal to the old
    decoder's on that prefix (to float tolerance). Raises ``InputError`` when they differ."""
    import onnxruntime as ort

    def session(bundle):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        path = bundle.file(bundle.manifest.graphs["decoder"].file)
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    m = old.manifest
    text, kv = m.model.text, m.kv_cache
    dtype = np.float16 if m.model.dtype == "float16" else np.float32
    rng = np.random.default_rng(seed)
    embeds = rng.standard_normal((1, length, text.hidden_size)).astype(dtype)
    empty = np.zeros((1, kv.num_kv_heads, 0, kv.head_dim), dtype=dtype)
    past = {}
    for layer in range(kv.num_layers):
        past[kv.past_key.format(layer=layer)] = empty
        past[kv.past_value.format(layer=layer)] = empty

    def feed(t: int) -> dict:
        positions = np.broadcast_to(np.arange(t, dtype=np.int64), (3, 1, t)).copy()
        return {
            "inputs_embeds": embeds[:, :t],
            "attention_mask": np.ones((1, t), dtype=np.int64),
            "position_ids": positions,
            **past,
        }

    before, after = session(old), session(new)
    reference = [before.run(["logits"], feed(t))[0][0, -1] for t in range(1, length + 1)]
    last = after.run(["logits"], {**feed(length), "logits_index": np.array([length - 1])})[0]
    if not np.array_equal(last[0, 0], reference[-1]):
        raise InputError("upgrade check: the last position's logits differ from format 1's")
    every = after.run(["logits"], {**feed(length), "logits_index": np.arange(length)})[0]
    for t, expected in enumerate(reference):  # other shapes, other sums: the export's tolerance
        scale = max(float(np.abs(expected).max()), 1.0)
        if float(np.abs(every[0, t] - expected).max()) > TOLERANCE[m.model.dtype] * scale:
            raise InputError(f"upgrade check: position {t}'s logits differ from format 1's")
