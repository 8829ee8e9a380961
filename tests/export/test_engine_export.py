"""``gmner export engine`` without a GPU: everything up to onnxruntime's TensorRT session is
real (the bundle, the limits, the options, the staging, the manifest section and its files);
the session is a stand-in that writes what onnxruntime's TensorRT EP writes (an EP-context
model and an engine file under the relative cache path). No engine was ever built here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from gmner.export.engine import (
    ENGINES_DIR,
    EngineBuild,
    build_engines,
    build_options,
    check_engines,
    describe,
)

from gmner_rt import providers as prov
from gmner_rt.backends import onnxruntime as backend
from gmner_rt.bundle import EngineLimits, load_bundle
from gmner_rt.devices import CudaDevice
from gmner_rt.errors import BackendError, InputError
from gmner_rt.extractor import DEFAULT_BUNDLE
from gmner_rt.tensorrt import TRT_OPTION_NAMES

ORIN = CudaDevice(0, "Orin", "8.7")


class FakeTrtSession:
    """Writes what the TensorRT EP writes when it dumps an EP-context model (embed mode 0)."""

    calls: list[tuple[Path, dict]] = []

    def __init__(self, source: Path, options: dict, nodes=None):
        FakeTrtSession.calls.append((source, options))
        ctx = Path(options["trt_ep_context_file_path"])
        cache = ctx.parent / options["trt_engine_cache_path"]
        cache.mkdir(parents=True, exist_ok=True)
        prefix = options["trt_engine_cache_prefix"]
        (cache / f"{prefix}_TRTKernel_graph_0_sm87.engine").write_bytes(
            b"engine " + source.name.encode()
        )
        ctx.write_bytes(b"ctx " + source.name.encode())
        self.nodes = nodes or {"TensorrtExecutionProvider": 7}

    def get_provider_graph_assignment_info(self):
        class Sub:
            def __init__(self, ep, n):
                self.ep_name, self.n = ep, n

            def get_nodes(self):
                return [None] * self.n

        return [Sub(ep, n) for ep, n in self.nodes.items()]


@pytest.fixture
def bundle_dir(tmp_path):
    shutil.copytree(DEFAULT_BUNDLE, tmp_path / "b")
    FakeTrtSession.calls = []
    return tmp_path / "b"


@pytest.fixture
def on_orin(monkeypatch):
    """This machine as an Orin with TensorRT 10.3 and onnxruntime-gpu's providers."""
    ort = prov.onnxruntime()
    offered = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: offered)
    monkeypatch.setattr(backend, "tensorrt_version", lambda: "10.3.0")
    monkeypatch.setattr(backend, "cuda_device", lambda i: ORIN)


def build(bundle_dir, session=FakeTrtSession, **over):
    config = EngineBuild(bundle=bundle_dir, check_tokens=0, **over)
    return build_engines(config, session=session, device=ORIN, tensorrt="10.3.0")


def test_an_engine_set_is_built_recorded_and_validated(bundle_dir):
    folder = build(bundle_dir, max_batch=2, max_image_tokens=16)
    name = "sm87-trt10.3.0-fp32-mb2-mc1088-mit16"
    assert folder == bundle_dir / ENGINES_DIR / name
    bundle = load_bundle(bundle_dir)  # sizes and hashes of every new file checked
    (engines,) = bundle.manifest.engines
    assert (engines.name, engines.device_name, engines.compute_capability) == (name, "Orin", "8.7")
    assert engines.tensorrt == "10.3.0" and engines.precision == "fp32"
    assert engines.onnxruntime == prov.onnxruntime().__version__
    assert engines.limits == EngineLimits(2, 1088, 16)
    assert engines.profiles["decoder"]["past_key_0"].max == (2, 2, 1087, 32)
    for graph, path in engines.graphs.items():
        assert (bundle_dir / path).read_bytes() == b"ctx " + f"{graph}.onnx".encode()
        engine = bundle_dir / engines.dir / graph / f"{graph}_TRTKernel_graph_0_sm87.engine"
        assert engine.relative_to(bundle_dir).as_posix() in bundle.manifest.files
    assert set(engines.check["build_seconds"]) == {"vision", "embedding", "decoder"}
    assert not list((bundle_dir / ENGINES_DIR).glob(".build-*"))  # no staging left


def test_build_options_follow_onnxruntimes_rules(bundle_dir):
    build(bundle_dir)
    for source, options in FakeTrtSession.calls:
        graph = source.stem
        assert set(options) <= TRT_OPTION_NAMES
        assert options["trt_dump_ep_context_model"] == "True"
        assert options["trt_ep_context_embed_mode"] == "0"
        assert not Path(options["trt_engine_cache_path"]).is_absolute()  # onnxruntime's rule
        assert options["trt_ep_context_file_path"].endswith(f"/{graph}_ctx.onnx")
        assert options["trt_timing_cache_path"] == str(bundle_dir / "trt-cache")
        assert options["trt_profile_max_shapes"]
    assert [s.stem for s, _ in FakeTrtSession.calls] == ["vision", "embedding", "decoder"]
    base = {"device_id": "0"}
    assert (
        build_options(base, "decoder", Path("/s"), Path("/t"))["trt_engine_cache_prefix"]
        == "decoder"
    )


def test_the_runtime_uses_the_set_on_its_device_only(bundle_dir, on_orin, monkeypatch):
    build(bundle_dir)
    bundle = load_bundle(bundle_dir)
    plan = backend.plan(bundle, "auto")
    assert plan.engines is not None and plan.provider == "tensorrt"
    assert plan.files["vision"].name == "vision_ctx.onnx"
    monkeypatch.setattr(backend, "tensorrt_version", lambda: "10.7.0")
    plan = backend.plan(bundle, "auto")
    assert plan.engines is None and plan.provider == "cuda"
    assert any("built with TensorRT 10.3.0, this machine has 10.7.0" in n for n in plan.notes)


def test_a_second_build_of_the_same_name_needs_replace(bundle_dir):
    build(bundle_dir)
    with pytest.raises(InputError, match="an engine set of that name exists; pass --replace"):
        build(bundle_dir)
    build(bundle_dir, replace=True)
    build(bundle_dir, max_batch=2)
    names = [e.name for e in load_bundle(bundle_dir).manifest.engines]
    assert names == ["sm87-trt10.3.0-fp32-mb1-mc1088-mit36", "sm87-trt10.3.0-fp32-mb2-mc1088-mit36"]


def test_nodes_outside_tensorrt_fail_the_build_and_leave_nothing(bundle_dir):
    def partial(source, options):
        return FakeTrtSession(
            source, options, {"TensorrtExecutionProvider": 5, "CPUExecutionProvider": 2}
        )

    before = (bundle_dir / "manifest.json").read_text()
    with pytest.raises(BackendError, match="vision: TensorRT did not take the whole graph"):
        build(bundle_dir, session=partial)
    assert (bundle_dir / "manifest.json").read_text() == before
    assert not any((bundle_dir / ENGINES_DIR).iterdir())


def test_a_missing_ep_context_model_is_named(bundle_dir):
    class NoDump(FakeTrtSession):
        def __init__(self, source, options):
            super().__init__(source, options)
            Path(options["trt_ep_context_file_path"]).unlink()

    with pytest.raises(
        BackendError,
        match=r"vision: onnxruntime wrote no EP-context model .*vision_ctx.onnx \(found vision/",
    ):
        build(bundle_dir, session=NoDump)


def test_a_builder_error_names_the_graph(bundle_dir):
    def fails(source, options):
        raise RuntimeError("[TensorRT EP] could not parse Foo")

    with pytest.raises(
        BackendError,
        match=r"vision: TensorRT could not build its engine \(\[TensorRT EP\] could not parse Foo",
    ):
        build(bundle_dir, session=fails)


def test_without_the_tensorrt_provider_the_error_says_what_to_install(bundle_dir, monkeypatch):
    ort = prov.onnxruntime()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(
        BackendError,
        match="provider 'tensorrt': the installed onnxruntime has no TensorrtExecutionProvider",
    ):
        build_engines(EngineBuild(bundle=bundle_dir))


def test_a_quantized_bundle_is_refused(bundle_dir, tmp_path):
    pytest.importorskip("onnx")
    from gmner.export.quantize import QuantSettings
    from gmner.export.quantized_bundle import quantize_bundle

    build(bundle_dir)  # and its engines are not carried into the quantized copy
    out = quantize_bundle(bundle_dir, tmp_path / "q", QuantSettings("int8"), verify=False)
    quantized = load_bundle(out)
    assert quantized.manifest.engines == () and not (out / ENGINES_DIR).exists()
    with pytest.raises(
        InputError, match="its decoder is quantized .* build engines from the fp16 bundle"
    ):
        build(out)


def test_dry_run_describes_the_build_without_a_gpu(bundle_dir, capsys):
    from gmner.runtime.cli import main

    described = describe(EngineBuild(bundle=bundle_dir, max_context=2048))
    assert described["limits"] == {"max_batch": 1, "max_context": 2048, "max_image_tokens": 36}
    assert set(described["options"]) == {"vision", "embedding", "decoder"}
    assert (
        main(["export", "engine", "--bundle", str(bundle_dir), "--max-batch", "4", "--dry-run"])
        == 0
    )
    shown = json.loads(capsys.readouterr().out)
    assert shown["limits"]["max_batch"] == 4
    assert shown["name"].endswith("-fp32-mb4-mc1088-mit36")


def test_bad_flags_are_named(bundle_dir):
    with pytest.raises(InputError, match="--precision: expected fp16 or fp32, got 'int8'"):
        EngineBuild(bundle=bundle_dir, precision="int8")
    with pytest.raises(InputError, match="--max-context: 10 leaves no room"):
        build(bundle_dir, max_context=10)


def test_the_engine_check_compares_greedy_tokens(bundle_dir):
    """The check's mechanics, run on the CPU with the ONNX graphs standing in for engines."""
    bundle = load_bundle(bundle_dir)
    files = {g: bundle.file(s.file) for g, s in bundle.manifest.graphs.items()}
    cpu = {g: ["CPUExecutionProvider"] for g in files}
    check = check_engines(bundle, files, cpu, EngineLimits(1, 1088, 36), 12)
    assert check["identical"] and check["agree_tokens"] >= 1 and check["probe_tokens"] == 12


def test_engine_files_are_checked_only_for_the_set_in_use(bundle_dir, on_orin):
    folder = build(bundle_dir)
    ctx = folder / "decoder_ctx.onnx"
    ctx.write_bytes(b"x" * ctx.stat().st_size)  # same size, other bytes
    bundle = load_bundle(bundle_dir)  # loads: engine files are not checked here
    plan = backend.plan(bundle, "auto")
    assert plan.engines is None and plan.provider == "cuda"
    assert any("sha256 mismatch" in n for n in plan.notes)
    shutil.rmtree(folder)  # deleted to save space: the bundle still loads and runs
    plan = backend.plan(load_bundle(bundle_dir), "auto")
    assert plan.engines is None and any("missing" in n for n in plan.notes)
