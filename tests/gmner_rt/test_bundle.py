"""Bundle manifest: a valid fake bundle round-trips; each kind of damage is named in the error."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path

import pytest

from gmner_rt.bundle import (
    FORMAT,
    MANIFEST_NAME,
    Bundle,
    Manifest,
    file_entry,
    load_bundle,
    manifest_to_dict,
    parse_manifest,
    write_manifest,
)
from gmner_rt.errors import BundleError
from gmner_rt.records import RECORD_FORMAT_VERSION

LAYERS = 2
VOCAB = 1000
#: The bundle's files: dummy bytes (the validator never parses ONNX).
FILES = {
    "vision.onnx": b"vision graph",
    "embedding.onnx": b"embedding graph",
    "decoder.onnx": b"decoder graph",
    "decoder.onnx.data": bytes(range(256)) * 4,
    "tokenizer.json": b'{"version": "1.0"}',
}
DELETE = object()


def _tensor(name: str, dtype: str, shape: list) -> dict:
    return {"name": name, "dtype": dtype, "shape": shape}


def _graph(file: str, inputs: list, outputs: list, data_file: str | None = None) -> dict:
    return {"file": file, "data_file": data_file, "opset": 18, "inputs": inputs, "outputs": outputs}


def _decoder() -> dict:
    kv = ["batch", 2, "past_sequence", 16]
    present = ["batch", 2, "total_sequence", 16]
    inputs = [
        _tensor("inputs_embeds", "float32", ["batch", "sequence", 64]),
        _tensor("attention_mask", "int64", ["batch", "total_sequence"]),
        _tensor("position_ids", "int64", [3, "batch", "sequence"]),
    ]
    outputs = [_tensor("logits", "float32", ["batch", 1, VOCAB])]
    for i in range(LAYERS):
        inputs += [
            _tensor(f"past_key_{i}", "float32", kv),
            _tensor(f"past_value_{i}", "float32", kv),
        ]
        outputs += [
            _tensor(f"present_key_{i}", "float32", present),
            _tensor(f"present_value_{i}", "float32", present),
        ]
    return _graph("decoder.onnx", inputs, outputs, data_file="decoder.onnx.data")


def _vision() -> dict:
    index = ["window_index", "reverse_index", "cu_seqlens", "cu_window_seqlens"]
    inputs = [
        _tensor("pixel_values", "float32", ["num_patches", 1176]),
        _tensor("rot_pos_ids", "int64", ["num_patches", 2]),
        *(_tensor(name, "int64", [f"{name}_len"]) for name in index),
    ]
    return _graph("vision.onnx", inputs, [_tensor("image_embeds", "float32", ["num_groups", 64])])


def make_manifest(files: dict[str, bytes] = FILES) -> dict:
    """A small valid manifest (2 layers, hidden 64, head_dim 16) listing ``files``."""
    entries = {
        n: {"size": len(b), "sha256": hashlib.sha256(b).hexdigest()} for n, b in files.items()
    }
    return {
        "format": FORMAT,
        "format_version": 1,
        "created_utc": "2026-11-24T12:00:00Z",
        "model": {
            "name": "tiny-gmner",
            "source_model": "tiny-qwen2.5-vl",
            "adapter": None,
            "dtype": "float32",
            "text": {
                "hidden_size": 64,
                "num_layers": LAYERS,
                "num_attention_heads": 4,
                "num_kv_heads": 2,
                "head_dim": 16,
                "intermediate_size": 128,
                "vocab_size": VOCAB,
                "rms_norm_eps": 1e-6,
                "rope_theta": 1000000.0,
                "mrope_section": [2, 3, 3],
                "tie_word_embeddings": True,
            },
            "vision": {
                "hidden_size": 32,
                "depth": 2,
                "num_heads": 2,
                "out_hidden_size": 64,
                "window_size": 112,
                "fullatt_block_indexes": [1],
                "patch_size": 14,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "max_image_tokens": None,
            },
        },
        "kv_cache": {
            "layout": ["batch", "kv_heads", "sequence", "head_dim"],
            "num_layers": LAYERS,
            "num_kv_heads": 2,
            "head_dim": 16,
            "dtype": "float32",
            "past_key": "past_key_{layer}",
            "past_value": "past_value_{layer}",
            "present_key": "present_key_{layer}",
            "present_value": "present_value_{layer}",
        },
        "graphs": {
            "vision": _vision(),
            "embedding": _graph(
                "embedding.onnx",
                [_tensor("input_ids", "int64", ["batch", "sequence"])],
                [_tensor("inputs_embeds", "float32", ["batch", "sequence", 64])],
            ),
            "decoder": _decoder(),
        },
        "tokens": {
            "image_pad_id": 900,
            "vision_start_id": 901,
            "vision_end_id": 902,
            "im_start_id": 903,
            "im_end_id": 904,
            "endoftext_id": 905,
            "pad_id": 905,
            "eos_ids": [904, 905],
        },
        "image_processor": {
            "patch_size": 14,
            "merge_size": 2,
            "temporal_patch_size": 2,
            "min_pixels": 3136,
            "max_pixels": 1003520,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "rescale_factor": 0.00392156862745098,
            "resample": "bicubic",
        },
        "prompt": {
            "system": "You are a helpful assistant.",
            "chat_template": "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
            "{image}{instruction}<|im_end|>\n<|im_start|>assistant\n",
            "image": "<|vision_start|>{image_pads}<|vision_end|>",
            "instruction_think": "Think, then answer.\nText: {text}",
            "instruction_answer_only": "Answer.\nText: {text}",
        },
        "labels": ["PER", "LOC", "ORG", "OTHER"],
        "record_format_version": RECORD_FORMAT_VERSION,
        "generation": {
            "stop_strings": ["</answer>"],
            "think_open": "<think>",
            "think_close": "</think>",
            "answer_open": "<answer>",
            "answer_close": "</answer>",
            "default_max_new_tokens": 256,
        },
        "files": entries,
        "exporter": {"gmner": "0.1.0", "torch": "2.13.0", "transformers": "5.23.0", "onnx": None},
        "parity": {"max_abs_logit_diff": 1.2e-6, "greedy_tokens_equal": True},
    }


def parse_path(field: str) -> tuple:
    """``'graphs.decoder.inputs[0].shape'`` or ``'files["a.onnx"].size'`` as a key tuple."""
    parts = re.findall(r'\["([^"]*)"\]|\[(\d+)\]|([^.\[\]]+)', field)
    return tuple(quoted or (int(index) if index else plain) for quoted, index, plain in parts)


def edit(data: dict, field: str, value: object = DELETE) -> dict:
    """``data`` with the value at ``field`` (a field path as errors write it) set or deleted."""
    *parents, last = parse_path(field)
    node = data
    for key in parents:
        node = node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return data


def damage(field: str, value: object = DELETE) -> str:
    """The error message parse_manifest gives for a valid manifest damaged at ``field``."""
    with pytest.raises(BundleError) as info:
        parse_manifest(edit(make_manifest(), field, value))
    return str(info.value)


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    for name, content in FILES.items():
        (tmp_path / name).write_bytes(content)
    write_manifest(tmp_path, make_manifest())
    return tmp_path


# --- valid bundles ----------------------------------------------------------------------------


def test_round_trip_is_exact():
    data = make_manifest()
    manifest = parse_manifest(data)
    assert isinstance(manifest, Manifest)
    assert manifest_to_dict(manifest) == data  # lists stay lists: [1] != (1,)


def test_load_bundle_reads_what_write_manifest_wrote(bundle_dir: Path):
    bundle = load_bundle(bundle_dir)
    assert isinstance(bundle, Bundle)
    assert manifest_to_dict(bundle.manifest) == make_manifest()
    decoder = bundle.manifest.graphs["decoder"]
    assert bundle.file(decoder.file) == bundle_dir / "decoder.onnx"
    assert decoder.input("past_key_1").shape == ("batch", 2, "past_sequence", 16)
    assert decoder.output("logits").dtype == "float32"
    kv = bundle.manifest.kv_cache
    assert (kv.past_key_name(1), kv.present_value_name(0)) == ("past_key_1", "present_value_0")
    assert bundle.manifest.model.text.mrope_section == (2, 3, 3)
    with pytest.raises(KeyError, match="nope"):
        decoder.input("nope")
    with pytest.raises(BundleError, match="'secret.txt' is not listed in manifest.json"):
        bundle.file("secret.txt")


def test_written_manifest_has_sorted_keys_and_indent_2(bundle_dir: Path):
    text = (bundle_dir / MANIFEST_NAME).read_text(encoding="utf-8")
    assert text == json.dumps(make_manifest(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    assert sorted(p.name for p in bundle_dir.iterdir()) == sorted([*FILES, MANIFEST_NAME])


def test_unknown_top_level_key_lands_in_extra():
    data = make_manifest()
    data["plugins"] = {"tensorrt": {"file": "decoder.engine"}}
    manifest = parse_manifest(data)
    assert manifest.extra == {"plugins": {"tensorrt": {"file": "decoder.engine"}}}
    assert manifest_to_dict(manifest) == data


def test_parsed_manifest_does_not_alias_the_input():
    data = make_manifest()
    manifest = parse_manifest(data)
    data["parity"]["max_abs_logit_diff"] = 99.0
    data["image_processor"]["image_mean"][0] = 99.0
    assert manifest.parity["max_abs_logit_diff"] == 1.2e-6
    assert manifest.image_processor["image_mean"][0] != 99.0


def test_nullable_fields_accept_values():
    data = make_manifest()
    edit(data, "model.vision.max_image_tokens", 2048)
    edit(data, "model.adapter", "runs/lora-r32")
    edit(data, "parity", None)
    manifest = parse_manifest(data)
    assert manifest.model.vision.max_image_tokens == 2048
    assert manifest.parity is None
    assert manifest_to_dict(manifest) == data


def test_file_entry_streams_large_files(tmp_path: Path):
    content = bytes(range(251)) * 10_000  # 2.4 MiB: several 1 MiB chunks
    path = tmp_path / "big.bin"
    path.write_bytes(content)
    assert file_entry(path) == {"size": len(content), "sha256": hashlib.sha256(content).hexdigest()}


# --- schema damage ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field",
    [
        "format",
        "created_utc",
        "model",
        "model.dtype",
        "model.text.vocab_size",
        "model.vision.depth",
        "kv_cache.past_key",
        "graphs.decoder",
        "graphs.vision.opset",
        "graphs.embedding.inputs[0].dtype",
        "tokens.eos_ids",
        "image_processor.max_pixels",
        "prompt.system",
        "labels",
        "record_format_version",
        "generation.answer_close",
        'files["decoder.onnx"].sha256',
        "exporter",
        "parity",
    ],
)
def test_missing_key_is_named(field: str):
    assert damage(field) == f"manifest.json: {field}: required field missing"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("model.text.hidden_size", -1, "expected a positive integer, got -1"),
        ("model.text.hidden_size", True, "expected a positive integer, got true"),
        ("model.text.num_layers", 2.0, "expected a positive integer, got 2.0"),
        ("tokens.eos_ids[0]", False, "expected a non-negative integer, got false"),
        ("format_version", True, "expected a positive integer, got true"),
        ("model.text.rms_norm_eps", "1e-6", 'expected a positive number, got "1e-6"'),
        ("model.text.rope_theta", float("nan"), "expected a positive number, got NaN"),
        ("model.text.tie_word_embeddings", 1, "expected true or false, got 1"),
        ("model.adapter", 3, "expected a non-empty string or null, got 3"),
        ("model.text", [], "expected an object, got []"),
        ("model.dtype", "bf16", "expected one of float32, float16, got 'bf16'"),
        ("graphs.vision.inputs[1].dtype", "float64", "expected one of float32, float16, bfloat16"),
        ("graphs.decoder.inputs", {}, "expected a list, got {}"),
        ("graphs.decoder.inputs[0].shape[0]", -1, "expected a dimension (a non-empty string"),
        ("graphs.decoder.inputs[0].shape[1]", "", "expected a dimension (a non-empty string"),
        ("image_processor.image_mean", [0.5, 0.5], "expected a list of 3, got [0.5, 0.5]"),
        ("image_processor.image_std[2]", 0, "expected a positive number, got 0"),
        ('files["decoder.onnx"].sha256', "ABC", 'expected 64 lowercase hex digits, got "ABC"'),
        ('files["decoder.onnx"].size', -5, "expected a non-negative integer, got -5"),
        ("exporter.torch", 2, "expected a string or null, got 2"),
        ("parity", [], "expected an object or null, got []"),
    ],
)
def test_wrong_type_is_named(field: str, value: object, message: str):
    assert f"manifest.json: {field}: {message}" in damage(field, value)


@pytest.mark.parametrize(
    ("field", "hint"),
    [
        ("model.text.hidden_sise", "did you mean 'hidden_size'?"),
        ("kv_cache.quantized", "known: layout, num_layers"),
        ("graphs.audio", "known: vision, embedding, decoder"),
        ("graphs.decoder.inputs[0].optional", "known: name, dtype, shape"),
        ('files["decoder.onnx"].md5', "known: size, sha256"),
        ("image_processor.do_resize", "known: patch_size"),
    ],
)
def test_unknown_key_inside_a_section_is_an_error(field: str, hint: str):
    assert f"manifest.json: {field}: unknown key ({hint}" in damage(field, 1)


def test_free_form_sections_take_any_key():
    data = make_manifest()
    data["exporter"]["onnxscript"] = "0.3.0"
    data["parity"]["per_layer"] = {"0": [1e-7, 2e-7]}
    assert manifest_to_dict(parse_manifest(data)) == data


def test_wrong_format_is_refused():
    message = damage("format", "onnxruntime-genai")
    assert "format: expected 'gmner-bundle', got 'onnxruntime-genai': not a gmner bundle" in message


def test_unknown_format_version_says_what_to_do():
    data = edit(make_manifest(), "format_version", 3)
    data["model"] = "a v3 layout this reader cannot know"
    with pytest.raises(BundleError) as info:
        parse_manifest(data, source="b/manifest.json")
    assert str(info.value) == (
        "b/manifest.json: format_version 3 is not supported by this gmner_rt (supports 1, 2); "
        "upgrade gmner_rt or re-export"
    )


def _with_logits_index(data: dict) -> dict:
    """``data`` as format 2: the decoder takes ``logits_index`` and returns K positions."""
    data = edit(copy.deepcopy(data), "format_version", 2)
    decoder = data["graphs"]["decoder"]
    decoder["inputs"].insert(3, _tensor("logits_index", "int64", ["num_logits"]))
    decoder["outputs"][0]["shape"] = ["batch", "num_logits", VOCAB]
    return data


def test_format_1_and_2_both_load_and_2_needs_logits_index():
    v1 = make_manifest()
    assert parse_manifest(v1).format_version == 1
    assert Bundle(Path("b"), parse_manifest(v1)).verifies_drafts is False
    v2 = _with_logits_index(v1)
    assert Bundle(Path("b"), parse_manifest(v2)).verifies_drafts is True
    assert parse_manifest(v2).graphs["decoder"].output("logits").shape == (
        "batch",
        "num_logits",
        VOCAB,
    )
    without = edit(make_manifest(), "format_version", 2)  # a v2 decoder lacking the input
    with pytest.raises(BundleError, match="graphs.decoder.inputs: missing required tensors: "):
        parse_manifest(without)


def test_non_object_manifest_is_refused():
    with pytest.raises(BundleError, match=r"manifest.json: expected an object, got \[\]"):
        parse_manifest([])  # type: ignore[arg-type]


def _without(graph: str, side: str, name: str):
    def cut(data: dict) -> None:
        tensors = data["graphs"][graph][side]
        tensors[:] = [t for t in tensors if t["name"] != name]

    return cut


def _set(field: str, value: object):
    return lambda data: edit(data, field, value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_set("kv_cache.num_layers", 3), "kv_cache.num_layers: expected model.text.num_layers = 2"),
        (
            _set("kv_cache.head_dim", 8),
            "kv_cache.head_dim: expected model.text.head_dim = 16, got 8",
        ),
        (_set("kv_cache.dtype", "float16"), 'kv_cache.dtype: expected model.dtype = "float32"'),
        (_set("kv_cache.layout", ["batch", "sequence", "kv_heads", "head_dim"]), "kv_cache.layout"),
        (_set("kv_cache.past_key", "past_key"), "kv_cache.past_key: missing placeholder '{layer}'"),
        (
            _set("model.text.hidden_size", 60),
            "hidden_size: expected num_attention_heads * head_dim",
        ),
        (
            _set("model.text.mrope_section", [2, 2, 2]),
            "mrope_section: sums to 6, expected head_dim / 2 = 8",
        ),
        (_set("model.text.mrope_section", [4, 4]), "model.text.mrope_section: expected 3 sections"),
        (_set("model.text.num_kv_heads", 3), "model.text.num_kv_heads: must divide"),
        (_set("model.vision.fullatt_block_indexes", [0, 2]), "fullatt_block_indexes: each index"),
        (_set("image_processor.min_pixels", 2_000_000), "min_pixels: 2000000 exceeds max_pixels"),
        (_set("image_processor.merge_size", 3), "merge_size: expected model.vision.spatial_merge"),
        (_set("tokens.image_pad_id", VOCAB), "image_pad_id: id 1000 is outside the vocabulary"),
        (_set("tokens.eos_ids", [904, 5000]), "tokens.eos_ids: id 5000 is outside"),
        (_set("tokens.eos_ids", []), "tokens.eos_ids: expected at least one id"),
        (_set("labels", ["PER", "LOC", "PER"]), "labels[2]: duplicate label 'PER'"),
        (_set("labels", ["PER", "A|B"]), "labels[1]: 'A|B' is blank or holds '|' or ';'"),
        (_set("labels", ["PER", "A;B"]), "labels[1]: 'A;B' is blank"),
        (_set("labels", ["PER", "  "]), "labels[1]: '  ' is blank"),
        (_set("labels", []), "labels: expected at least one label"),
        (_set("record_format_version", RECORD_FORMAT_VERSION + 1), "record_format_version: the"),
        (
            _set("prompt.chat_template", "{system}{instruction}"),
            "chat_template: missing placeholder",
        ),
        (
            _set("prompt.image", "<|vision_start|>"),
            "prompt.image: missing placeholder '{image_pads}'",
        ),
        (
            _set("prompt.instruction_think", "Go."),
            "instruction_think: missing placeholder '{text}'",
        ),
        (_without("decoder", "inputs", "past_key_1"), "graphs.decoder.inputs: missing required"),
        (_without("decoder", "outputs", "present_value_0"), "tensors: present_value_0"),
        (_without("decoder", "inputs", "position_ids"), "tensors: position_ids"),
        (_without("vision", "inputs", "reverse_index"), "graphs.vision.inputs: missing required"),
        (_without("embedding", "outputs", "inputs_embeds"), "graphs.embedding.outputs: missing"),
        (_set("graphs.decoder.inputs[1].name", "inputs_embeds"), "inputs[1].name: 'inputs_embeds'"),
    ],
)
def test_inconsistent_manifest_is_named(change, message: str):
    data = make_manifest()
    change(data)
    with pytest.raises(BundleError) as info:
        parse_manifest(data)
    assert message in str(info.value)


_ENTRY = {"size": 1, "sha256": "0" * 64}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("graphs.vision.file", "other.onnx", "'other.onnx' is not listed in files"),
        ("graphs.decoder.data_file", "weights.bin", "'weights.bin' is not listed in files"),
        (
            "graphs.vision.file",
            "../vision.onnx",
            "'../vision.onnx' is not a plain relative path inside the bundle",
        ),
        ("graphs.vision.file", "/abs/vision.onnx", "'/abs/vision.onnx' is an absolute path"),
        ("graphs.vision.file", "sub\\vision.onnx", "'sub\\\\vision.onnx' contains a backslash"),
        (
            'files["../evil.onnx"]',
            _ENTRY,
            "file name is not a plain relative path inside the bundle",
        ),
        ('files["C:/evil.onnx"]', _ENTRY, "file name is an absolute path"),
        ('files["a//b"]', _ENTRY, "file name is not a plain relative path inside the bundle"),
        ('files["manifest.json"]', _ENTRY, "manifest.json does not list itself"),
    ],
)
def test_bad_file_names_are_refused(field: str, value: object, message: str):
    assert damage(field, value) == f"manifest.json: {field}: {message}"


def test_tokenizer_must_be_listed():
    assert "files: 'tokenizer.json' is not listed" in damage('files["tokenizer.json"]')


# --- files on disk ------------------------------------------------------------------------------


def test_missing_manifest(tmp_path: Path):
    with pytest.raises(
        BundleError, match=f"{tmp_path} is not a gmner bundle: manifest.json missing"
    ):
        load_bundle(tmp_path)


def test_invalid_json_names_the_line(bundle_dir: Path):
    (bundle_dir / MANIFEST_NAME).write_text('{\n  "format": "gmner-bundle",\n  oops\n}\n')
    with pytest.raises(BundleError, match=r"manifest.json: invalid JSON at line 3, column 3"):
        load_bundle(bundle_dir)


def test_schema_error_names_the_bundle_manifest(bundle_dir: Path):
    data = edit(make_manifest(), "model.text.hidden_size", -1)
    (bundle_dir / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(BundleError) as info:
        load_bundle(bundle_dir)
    assert str(info.value) == (
        f"{bundle_dir}/manifest.json: model.text.hidden_size: expected a positive integer, got -1"
    )


def test_changed_byte_fails_the_sha256(bundle_dir: Path):
    path = bundle_dir / "decoder.onnx"
    path.write_bytes(b"Decoder graph")  # same size, one byte changed
    with pytest.raises(BundleError) as info:
        load_bundle(bundle_dir)
    listed = hashlib.sha256(FILES["decoder.onnx"]).hexdigest()[:8]
    actual = hashlib.sha256(b"Decoder graph").hexdigest()[:8]
    assert str(info.value) == (
        f"{path}: sha256 mismatch (manifest {listed}..., file {actual}...): "
        "the file changed after export"
    )


def test_verify_hashes_false_skips_hashing_but_checks_size(bundle_dir: Path):
    path = bundle_dir / "decoder.onnx.data"
    path.write_bytes(bytes(reversed(FILES["decoder.onnx.data"])))
    assert load_bundle(bundle_dir, verify_hashes=False).path == bundle_dir
    path.write_bytes(FILES["decoder.onnx.data"][:-1])
    with pytest.raises(BundleError, match="size 1023 bytes, manifest says 1024"):
        load_bundle(bundle_dir, verify_hashes=False)


def test_truncated_file_fails_the_size(bundle_dir: Path):
    path = bundle_dir / "vision.onnx"
    path.write_bytes(FILES["vision.onnx"][:4])
    with pytest.raises(BundleError) as info:
        load_bundle(bundle_dir)
    assert str(info.value).startswith(
        f"{path}: size 4 bytes, manifest says 12: the file is truncated"
    )


def test_missing_file(bundle_dir: Path):
    (bundle_dir / "decoder.onnx").unlink()
    with pytest.raises(BundleError) as info:
        load_bundle(bundle_dir)
    assert str(info.value) == f"{bundle_dir}/decoder.onnx: listed in manifest.json but missing"


def test_write_manifest_refuses_an_invalid_dict_and_leaves_nothing(tmp_path: Path):
    data = edit(make_manifest(), "labels", ["PER", "PER"])
    with pytest.raises(BundleError, match=r"labels\[1\]: duplicate label"):
        write_manifest(tmp_path, data)
    assert list(tmp_path.iterdir()) == []


def test_write_manifest_replaces_an_existing_manifest(bundle_dir: Path):
    data = copy.deepcopy(make_manifest())
    data["parity"] = None
    write_manifest(bundle_dir, data)
    assert load_bundle(bundle_dir).manifest.parity is None
    assert sorted(p.name for p in bundle_dir.iterdir()) == sorted([*FILES, MANIFEST_NAME])


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("image_processor", "max_pixels", 10**12),
        ("image_processor", "min_pixels", 10**12),
        ("model.text", "num_layers", 40000),
        ("model.text", "vocab_size", 10**9),
        ("model.vision", "patch_size", 10**6),
        ("generation", "default_max_new_tokens", 10**7),
    ],
)
def test_sizes_past_their_upper_bound_are_refused(section, key, value):
    data = make_manifest()
    target = data
    for part in section.split("."):
        target = target[part]
    target[key] = value
    with pytest.raises(BundleError, match=f"{section}.{key}: {value} is over the upper bound"):
        parse_manifest(data)


def test_a_huge_layer_count_is_refused_quickly():
    import time

    data = make_manifest()
    data["model"]["text"]["num_layers"] = 40000
    started = time.perf_counter()
    with pytest.raises(BundleError):
        parse_manifest(data)
    assert time.perf_counter() - started < 1.0


def test_a_graph_file_that_is_another_graph_fails_at_load(tmp_path):
    import shutil

    import gmner_rt
    from gmner_rt.bundle import write_manifest
    from gmner_rt.extractor import DEFAULT_BUNDLE

    shutil.copytree(DEFAULT_BUNDLE, tmp_path / "b")
    data = json.loads((tmp_path / "b" / "manifest.json").read_text())
    data["graphs"]["decoder"]["file"] = "vision.onnx"
    write_manifest(tmp_path / "b", data)
    with pytest.raises(BundleError, match=r"graphs.decoder \(vision.onnx\): its inputs are not"):
        gmner_rt.load(tmp_path / "b", provider="cpu")


def test_a_warm_load_skips_hashing_until_a_file_changes(tmp_path, monkeypatch):
    import shutil

    from gmner_rt import bundle as bundle_module
    from gmner_rt.extractor import DEFAULT_BUNDLE

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    shutil.copytree(DEFAULT_BUNDLE, tmp_path / "b")
    hashed = []
    real = bundle_module.file_entry
    monkeypatch.setattr(bundle_module, "file_entry", lambda p: hashed.append(p) or real(p))
    load_bundle(tmp_path / "b")
    files = len(load_bundle(tmp_path / "b", verify_hashes=False).manifest.files)
    assert len(hashed) == files == 4  # the first load: every file
    hashed.clear()
    load_bundle(tmp_path / "b")
    assert hashed == []  # warm: sizes, times and inodes unchanged
    load_bundle(tmp_path / "b", verify_hashes="full")
    assert len(hashed) == files
    hashed.clear()
    tok = tmp_path / "b" / "tokenizer.json"
    data = tok.read_bytes()
    tok.write_bytes(data[:-2] + b"  ")  # same size, other bytes, a new modification time
    with pytest.raises(BundleError, match="tokenizer.json: sha256 mismatch"):
        load_bundle(tmp_path / "b")
    assert [p.name for p in hashed] == ["tokenizer.json"]  # the others are still known
    with pytest.raises(BundleError, match="verify_hashes: expected True, False or 'full'"):
        load_bundle(tmp_path / "b", verify_hashes="yes")


def test_a_rewrite_that_restores_the_modification_time_is_still_caught(tmp_path, monkeypatch):
    import os
    import shutil

    from gmner_rt import integrity
    from gmner_rt.extractor import DEFAULT_BUNDLE

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    shutil.copytree(DEFAULT_BUNDLE, tmp_path / "b")
    load_bundle(tmp_path / "b")  # the full check, stamped
    vision = tmp_path / "b" / "vision.onnx"
    st = vision.stat()
    data = bytearray(vision.read_bytes())
    data[-1] ^= 0xFF
    vision.write_bytes(bytes(data))
    os.utime(vision, ns=(st.st_atime_ns, st.st_mtime_ns))  # the old time, put back
    with pytest.raises(BundleError, match="vision.onnx: sha256 mismatch"):
        load_bundle(tmp_path / "b")
    stamp = integrity.stamp_path(tmp_path / "b", (tmp_path / "b/manifest.json").read_bytes())
    stamp.write_text("[1, 2]")  # valid JSON, not a stamp: ignored, the files are hashed
    with pytest.raises(BundleError, match="sha256 mismatch"):
        load_bundle(tmp_path / "b")
