"""TensorRT through onnxruntime, checked up to the onnxruntime call: the profile arithmetic
(against the runtime's own window layout), the option dictionaries (against the option names
onnxruntime's TensorRT EP documents), the limits and their errors, the manifest's ``engines``
section and its validation, the choice and refusal of engine sets, and the runtime keeping
requests inside the profiles."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
from PIL import Image

from gmner_rt import tensorrt as trt
from gmner_rt.backends.onnxruntime import OrtGraphs
from gmner_rt.bundle import (
    EngineLimits,
    load_bundle,
    manifest_to_dict,
    parse_manifest,
)
from gmner_rt.devices import CudaDevice, version_from_int
from gmner_rt.errors import BackendError, BundleError, InputError
from gmner_rt.extractor import DEFAULT_BUNDLE, Extractor
from gmner_rt.vision import vision_indices

MANIFEST = json.loads((DEFAULT_BUNDLE / "manifest.json").read_text())
H100 = CudaDevice(0, "NVIDIA H100 80GB HBM3", "9.0")
ORIN = CudaDevice(0, "Orin", "8.7")


def manifest(data=None):
    return parse_manifest(copy.deepcopy(data or MANIFEST))


def engine_entry(name="sm90-trt10.9.0-fp32-mb2-mc1024-mit36", **over):
    m = manifest()
    limits = EngineLimits(2, 1024, 36)
    profiles = {
        g: {n: {"min": list(r.min), "opt": list(r.opt), "max": list(r.max)} for n, r in p.items()}
        for g, p in trt.profiles(m, limits).items()
    }
    entry = {
        "name": name,
        "dir": f"engines/{name}",
        "device": {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"},
        "versions": {"tensorrt": "10.9.0", "onnxruntime": "1.32.0"},
        "precision": "fp32",
        "limits": {"max_batch": 2, "max_context": 1024, "max_image_tokens": 36},
        "graphs": {g: f"engines/{name}/{g}_ctx.onnx" for g in ("vision", "embedding", "decoder")},
        "profiles": profiles,
        "created_utc": "2026-12-06T12:00:00Z",
        "check": {"agree_tokens": 16},
    }
    entry.update(over)
    return entry


def with_engines(*entries):
    data = copy.deepcopy(MANIFEST)
    for e in entries:
        for path in e["graphs"].values():
            data["files"][path] = {"size": 10, "sha256": "0" * 64}
    data["engines"] = list(entries)
    return data


# --- profiles -----------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [1, 4, 16, 36, 37, 100, 257])
@pytest.mark.parametrize("window", [1, 2, 4])
def test_max_windows_bounds_every_grid_and_is_reached(tokens, window):
    merge = 2
    counts = []
    for h in range(1, tokens + 1):
        for w in range(1, tokens // h + 1):
            grid = (1, h * merge, w * merge)
            idx = vision_indices([grid], merge_size=merge, window_size=window * 28, patch_size=14)
            counts.append(len(idx.cu_window_seqlens) - 1)
    assert max(counts) == trt.max_windows(tokens, window)


def test_every_dynamic_input_has_a_profile_within_the_limits():
    m = manifest()
    limits = EngineLimits(max_batch=3, max_context=700, max_image_tokens=36)
    profiles = trt.profiles(m, limits)
    for graph, spec in m.graphs.items():
        dynamic = {t.name for t in spec.inputs if any(isinstance(d, str) for d in t.shape)}
        assert set(profiles[graph]) == dynamic, graph
        for tensor in spec.inputs:
            if tensor.name not in dynamic:
                continue
            r = profiles[graph][tensor.name]
            for axis, dim in enumerate(tensor.shape):
                assert r.min[axis] <= r.opt[axis] <= r.max[axis]
                if isinstance(dim, int):
                    assert r.min[axis] == r.max[axis] == dim
    dec = profiles["decoder"]
    assert dec["past_key_0"].min == (1, 2, 0, 32) and dec["past_key_0"].max == (3, 2, 699, 32)
    assert dec["attention_mask"].max == (3, 700) and dec["inputs_embeds"].opt == (1, 1, 128)
    assert profiles["vision"]["pixel_values"].max == (3 * 36 * 4, 1176)
    assert profiles["vision"]["cu_seqlens"].max == (4,)


def test_the_default_prompt_fits_the_default_profiles():
    """Every shipped example, prompt + generation budget, is inside the default limits."""
    extractor = Extractor(load_bundle(DEFAULT_BUNDLE, verify_hashes=False), None)
    limits = trt.default_limits(extractor.bundle.manifest)
    rows = [
        json.loads(line)
        for line in (DEFAULT_BUNDLE.parents[2] / "examples/demo/examples.jsonl")
        .read_text()
        .splitlines()
    ]
    for row in rows:
        image = DEFAULT_BUNDLE.parents[2] / "examples/demo" / row["image"]
        batch = extractor.prompt_batch([(image, row["text"])])
        new = extractor.bundle.manifest.generation.default_max_new_tokens
        assert batch.input_ids.shape[1] + new <= limits.max_context
    assert limits.max_context % 64 == 0 and limits.max_batch == 1


def test_profile_options_are_the_documented_string_form():
    m = manifest()
    options = trt.profile_options(trt.profiles(m, EngineLimits(1, 128, 16))["embedding"])
    assert options == {
        "trt_profile_min_shapes": "input_ids:1x1",
        "trt_profile_opt_shapes": "input_ids:1x1",
        "trt_profile_max_shapes": "input_ids:1x128",
    }
    decoder = trt.profile_options(trt.profiles(m, EngineLimits(1, 128, 16))["decoder"])
    for key, shapes in decoder.items():
        for item in shapes.split(","):  # name:AxBxC, as onnxruntime's ParseProfileShapes reads
            name, dims = item.split(":")
            assert name and all(d.isdigit() for d in dims.split("x")), (key, item)


def test_session_options_use_only_documented_names():
    m = manifest()
    settings = trt.TrtSettings(trt.default_limits(m), device_id=2, cache_dir=DEFAULT_BUNDLE)
    for graph, options in trt.session_options(m, settings).items():
        assert set(options) <= trt.TRT_OPTION_NAMES, graph
        assert options["device_id"] == "2" and options["trt_fp16_enable"] == "False"
        assert all(isinstance(v, str) for v in options.values())


def test_fp16_follows_the_bundle_unless_asked():
    data = copy.deepcopy(MANIFEST)
    data["model"]["dtype"] = data["kv_cache"]["dtype"] = "float16"
    for g in data["graphs"].values():
        for t in g["inputs"] + g["outputs"]:
            if t["dtype"] == "float32":
                t["dtype"] = "float16"
    m = parse_manifest(data)
    limits = trt.default_limits(m)
    assert trt.session_options(m, trt.TrtSettings(limits))["decoder"]["trt_fp16_enable"] == "True"
    off = trt.TrtSettings(limits, fp16=False)
    assert trt.session_options(m, off)["decoder"]["trt_fp16_enable"] == "False"


def test_an_unknown_dimension_name_is_named():
    data = copy.deepcopy(MANIFEST)
    data["graphs"]["embedding"]["inputs"][0]["shape"] = ["batch", "tokens"]
    with pytest.raises(BundleError, match="input_ids: dimension 'tokens' has no TensorRT profile"):
        trt.profiles(parse_manifest(data), EngineLimits(1, 64, 4))


def test_limits_default_and_errors_name_the_flags():
    m = manifest()
    assert trt.image_token_cap(m) == 36  # max_pixels 28224 / 28^2
    limits = trt.resolve_limits(m, max_batch=4, max_image_tokens=16)
    assert limits == EngineLimits(4, math.ceil((16 + 512 + 512) / 64) * 64, 16)
    with pytest.raises(InputError, match="--max-image-tokens: 37 is more than"):
        trt.resolve_limits(m, max_image_tokens=37)
    with pytest.raises(InputError, match="--max-batch: expected a positive integer, got 0"):
        trt.resolve_limits(m, max_batch=0)
    with pytest.raises(InputError, match="--max-context: 30 leaves no room"):
        trt.resolve_limits(m, max_context=30)


def test_tensorrt_versions_from_the_library_integer():
    assert version_from_int(100300) == "10.3.0"
    assert version_from_int(101302) == "10.13.2"
    assert version_from_int(8601) == "8.6.1"


def test_engine_set_names_carry_the_build_profile():
    name = trt.engine_set_name(ORIN, "10.3.0", "fp16", EngineLimits(1, 2048, 1024))
    assert name == "sm87-trt10.3.0-fp16-mb1-mc2048-mit1024"


# --- the manifest section -------------------------------------------------------------------


def test_an_engines_section_parses_and_round_trips():
    data = with_engines(engine_entry())
    m = parse_manifest(copy.deepcopy(data))
    (e,) = m.engines
    assert (e.compute_capability, e.tensorrt, e.precision) == ("9.0", "10.9.0", "fp32")
    assert e.limits == EngineLimits(2, 1024, 36)
    assert e.profiles["decoder"]["past_key_0"].max == (2, 2, 1023, 32)
    assert manifest_to_dict(m) == data
    assert manifest().engines == ()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"device": {"name": "x", "compute_capability": "sm90"}},
            "compute_capability: expected major.minor",
        ),
        ({"name": "a b"}, "engines[0].name: 'a b' is not a plain folder name"),
        ({"precision": "int8"}, "engines[0].precision: expected one of fp32, fp16"),
        ({"graphs": {"vision": "other/v.onnx", "embedding": "x", "decoder": "y"}}, "is not inside"),
        (
            {"limits": {"max_batch": 1, "max_context": 100, "max_image_tokens": 99}},
            "exceeds the 36 image tokens",
        ),
        (
            {"limits": {"max_batch": 0, "max_context": 100, "max_image_tokens": 9}},
            "max_batch: expected a positive integer",
        ),
        ({"versions": {"tensorrt": "10.9.0"}}, "versions.onnxruntime: required field missing"),
        (
            {"profiles": {"decoder": {"nope": {"min": [1], "opt": [1], "max": [1]}}}},
            "has no input 'nope'",
        ),
        (
            {
                "profiles": {
                    "embedding": {"input_ids": {"min": [1, 9], "opt": [1, 1], "max": [1, 9]}}
                }
            },
            "expected min <= opt <= max",
        ),
        (
            {"profiles": {"embedding": {"input_ids": {"min": [1], "opt": [1], "max": [1]}}}},
            "expected a list of 2",
        ),
        (
            {
                "profiles": {
                    "vision": {"pixel_values": {"min": [4, 1], "opt": [4, 1], "max": [4, 1]}}
                }
            },
            "fixed at 1176",
        ),
        ({"profiles": {"tokenizer": {}}}, "profiles.tokenizer: expected one of vision"),
        ({"spare": 1}, "engines[0].spare: unknown key"),
    ],
)
def test_a_bad_engines_entry_is_refused_with_its_field(change, message):
    with pytest.raises(BundleError, match=message.replace("[", r"\[").replace("(", r"\(")):
        parse_manifest(with_engines(engine_entry(**change)))


def test_an_engine_file_must_be_listed_and_names_unique():
    data = with_engines(engine_entry())
    del data["files"]["engines/sm90-trt10.9.0-fp32-mb2-mc1024-mit36/decoder_ctx.onnx"]
    with pytest.raises(BundleError, match="decoder_ctx.onnx' is not listed in files"):
        parse_manifest(data)
    with pytest.raises(BundleError, match="listed twice"):
        parse_manifest(with_engines(engine_entry(), engine_entry()))


# --- choosing a set -------------------------------------------------------------------------


def test_engines_are_used_only_where_they_were_built():
    sets = parse_manifest(
        with_engines(
            engine_entry(),
            engine_entry("orin", device={"name": "Orin", "compute_capability": "8.7"}),
        )
    ).engines
    chosen, reasons = trt.match_engines(sets, ORIN, "10.9.0", "1.32.1")
    assert chosen.name == "orin"
    assert reasons == [
        "engines sm90-trt10.9.0-fp32-mb2-mc1024-mit36: built for compute capability 9.0 "
        "(NVIDIA H100 80GB HBM3), this GPU is 8.7 (Orin)"
    ]
    chosen, reasons = trt.match_engines(sets[:1], H100, "10.3.0", "1.32.0")
    assert chosen is None and "built with TensorRT 10.9.0, this machine has 10.3.0" in reasons[0]
    chosen, reasons = trt.match_engines(sets[:1], H100, "10.9.0", "1.31.0")
    assert chosen is None and "built with onnxruntime 1.32.0, this one is 1.31.0" in reasons[0]
    chosen, reasons = trt.match_engines(sets[:1], None, None, "1.32.0")
    assert chosen is None and "no CUDA device" in reasons[0]
    assert trt.match_engines(sets[:1], H100, "10.9.0", "1.32.7")[0] is sets[0]


def test_plan_uses_matching_engines_and_says_why_it_refuses_others(tmp_path, monkeypatch):
    import shutil

    from gmner_rt import providers as prov
    from gmner_rt.backends import onnxruntime as backend

    shutil.copytree(DEFAULT_BUNDLE, tmp_path / "b")
    entry = engine_entry()
    for path in entry["graphs"].values():
        (tmp_path / "b" / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "b" / path).write_bytes(b"x" * 10)
    data = with_engines(entry)
    for path in entry["graphs"].values():
        data["files"][path] = {
            "size": 10,
            "sha256": __import__("hashlib").sha256(b"x" * 10).hexdigest(),
        }
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(data))
    bundle = load_bundle(tmp_path / "b")
    ort = prov.onnxruntime()
    monkeypatch.setattr(
        ort,
        "get_available_providers",
        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    monkeypatch.setattr(ort, "__version__", "1.32.0")
    monkeypatch.setattr(backend, "tensorrt_version", lambda: "10.9.0")
    monkeypatch.setattr(backend, "cuda_device", lambda i: H100)
    plan = backend.plan(bundle, "auto")
    assert plan.provider == "tensorrt" and plan.engines.name == entry["name"]
    assert plan.limits == EngineLimits(2, 1024, 36)
    assert plan.files["decoder"] == bundle.path / entry["graphs"]["decoder"]
    monkeypatch.setattr(backend, "cuda_device", lambda i: ORIN)
    plan = backend.plan(bundle, "auto")
    assert plan.provider == "cuda" and plan.engines is None
    assert any("compute capability 9.0" in n for n in plan.notes)
    plan = backend.plan(bundle, "tensorrt")  # asked for: the ONNX graphs on the TensorRT EP
    assert plan.provider == "tensorrt" and plan.engines is None
    assert plan.files["decoder"] == bundle.path / "decoder.onnx"


# --- the runtime inside the limits ----------------------------------------------------------


@pytest.fixture(scope="module")
def cpu_graphs():
    return load_bundle(DEFAULT_BUNDLE), OrtGraphs.from_bundle(load_bundle(DEFAULT_BUNDLE))


def _limited(bundle, graphs, limits):
    limited = OrtGraphs.__new__(OrtGraphs)
    limited.__dict__.update(graphs.__dict__)
    limited.limits = limits
    return Extractor(bundle, limited)


def _pairs(n):
    rng = np.random.default_rng(0)
    texts = ["Zentro meets Alice in Paris", "Nothing here", "Velmora and Zentro", "Quillon"]
    return [
        (Image.fromarray(rng.integers(0, 255, (168, 168, 3), dtype=np.uint8)), texts[i % 4])
        for i in range(n)
    ]


def test_batches_are_split_to_the_profiles_batch(cpu_graphs):
    bundle, graphs = cpu_graphs
    pairs = _pairs(3)
    free = Extractor(bundle, graphs).extract_batch(pairs, think="on", max_new_tokens=40)
    calls = []
    limited = _limited(bundle, graphs, EngineLimits(1, 1024, 36))
    original = limited._extract_chunk
    limited._extract_chunk = lambda chunk, *a: calls.append(len(chunk)) or original(chunk, *a)
    split = limited.extract_batch(pairs, think="on", max_new_tokens=40)
    assert calls == [1, 1, 1]
    assert [r.token_ids for r in split] == [r.token_ids for r in free]


def test_a_prompt_past_the_context_is_refused_with_a_hint(cpu_graphs):
    bundle, graphs = cpu_graphs
    limited = _limited(bundle, graphs, EngineLimits(1, 120, 36))
    with pytest.raises(
        InputError,
        match=r"exceeds the TensorRT profiles' context of 120: use max_new_tokens <= \d+",
    ):
        limited.extract(*_pairs(1)[0], max_new_tokens=100)


def test_images_are_kept_inside_the_profiles_image_tokens(cpu_graphs):
    bundle, graphs = cpu_graphs
    limited = _limited(bundle, graphs, EngineLimits(1, 1024, 16))
    assert limited.image_settings.max_pixels == 16 * 28 * 28
    request = limited._prepare(Image.new("RGB", (640, 480)), "Zentro", True)
    assert request.grid[1] * request.grid[2] // 4 <= 16
    with pytest.raises(
        InputError, match="image 5600x28 gives 56 image tokens; the TensorRT profiles allow 16"
    ):
        limited._prepare(Image.new("RGB", (28 * 200, 28)), "Zentro", True)  # aspect 200


def test_unknown_options_in_engine_plans_fail_early():
    with pytest.raises(BackendError, match="trt_fp16_enabled"):
        trt.check_option_names({"trt_fp16_enabled": "1"}, source="x")


class _Recording:
    """A backend that records every shape it is fed, as TensorRT's profiles see them."""

    def __init__(self, graphs, limits):
        self.graphs, self.limits, self.kv = graphs, limits, graphs.kv
        self.decoder = graphs.decoder
        self.fed: list[tuple[str, str, tuple[int, ...]]] = []

    def encode_images(self, pixel_values, indices):
        for name, value in (
            ("pixel_values", pixel_values),
            ("rot_pos_ids", indices.rot_pos_ids),
            ("window_index", indices.window_index),
            ("reverse_index", indices.reverse_index),
            ("cu_seqlens", indices.cu_seqlens),
            ("cu_window_seqlens", indices.cu_window_seqlens),
        ):
            self.fed.append(("vision", name, tuple(value.shape)))
        return self.graphs.encode_images(pixel_values, indices)

    def embed(self, input_ids):
        self.fed.append(("embedding", "input_ids", tuple(input_ids.shape)))
        return self.graphs.embed(input_ids)

    def empty_cache(self, batch):
        return self.graphs.empty_cache(batch)

    def decode(self, embeds, mask, positions, past):
        self.fed.append(("decoder", "inputs_embeds", tuple(embeds.shape)))
        self.fed.append(("decoder", "attention_mask", tuple(mask.shape)))
        self.fed.append(("decoder", "position_ids", tuple(positions.shape)))
        first = past[0] if isinstance(past[0], np.ndarray) else past[0].numpy()
        self.fed.append(("decoder", "past_key_0", tuple(first.shape)))
        return self.graphs.decode(embeds, mask, positions, past)


@pytest.mark.parametrize("constrained", [True, False])
def test_every_shape_fed_stays_inside_the_profiles(cpu_graphs, constrained):
    """A batch under tight limits (3 rows, a context just large enough, jump-forward asked
    for): every input the backend is fed is within the TensorRT profiles' min and max."""
    bundle, graphs = cpu_graphs
    probe = Extractor(bundle, graphs).prompt_batch(_pairs(3), think=True)
    new = 60
    limits = EngineLimits(
        max_batch=3, max_context=probe.input_ids.shape[1] + new, max_image_tokens=36
    )
    recording = _Recording(graphs, limits)
    extractor = Extractor(bundle, recording)
    rng = np.random.default_rng(1)

    def scramble(logits, _state):  # row 0 rambles to the limit while the others answer
        logits = logits.copy()  # with forced runs: the rows' steps misalign
        logits[0] = rng.normal(size=logits.shape[1]).astype(logits.dtype) * 20
        return logits

    extractor.extract_batch(
        _pairs(3), think="on", constrained=constrained, max_new_tokens=new, logits_hook=scramble
    )
    profile = trt.profiles(bundle.manifest, limits)
    assert len(recording.fed) > 20
    for graph, name, shape in recording.fed:
        r = profile[graph][name]
        assert all(lo <= d <= hi for lo, d, hi in zip(r.min, shape, r.max, strict=True)), (
            graph,
            name,
            shape,
            r,
        )


def test_jump_forward_is_off_for_batches_under_the_profiles(cpu_graphs, monkeypatch):
    """In a batch, rows' forced runs are padded to the longest, so the cache can grow by more
    than the tokens made: under TensorRT's limits, jump-forward runs for single rows only."""
    import gmner_rt.extractor as ex

    bundle, graphs = cpu_graphs
    seen = []
    real = ex.RequestConstraint

    def spy(grammar, table, *, think_budget=None, jump_forward=True):
        seen.append(jump_forward)
        return real(grammar, table, think_budget=think_budget, jump_forward=jump_forward)

    monkeypatch.setattr(ex, "RequestConstraint", spy)
    limited = _limited(bundle, graphs, EngineLimits(3, 1024, 36))
    limited.extract_batch(_pairs(3), max_new_tokens=30)
    assert seen == [False, False, False]
    seen.clear()
    limited.extract(*_pairs(1)[0], max_new_tokens=30)
    Extractor(bundle, graphs).extract_batch(_pairs(2), max_new_tokens=30)
    assert seen == [True, True, True]
