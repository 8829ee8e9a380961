"""Provider choice: names and the environment variable, availability errors that say what to
install, the per-graph plans for cpu / cuda / tensorrt (checked up to the onnxruntime call,
with the providers onnxruntime offers replaced), the fallback check, placement, and the CLI
flags. No GPU is needed: the GPU paths are checked through their option dictionaries."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest

import gmner_rt
from gmner_rt import providers as prov
from gmner_rt.backends import onnxruntime as backend
from gmner_rt.bundle import load_bundle, parse_manifest
from gmner_rt.errors import BackendError
from gmner_rt.extractor import DEFAULT_BUNDLE
from gmner_rt.tensorrt import TRT_OPTION_NAMES

ALL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]
CPU = ["CPUExecutionProvider"]
EXAMPLE = next((DEFAULT_BUNDLE.parents[2] / "examples" / "demo").glob("*.png"))


@pytest.fixture
def offered(monkeypatch):
    """Replace what onnxruntime says it offers: ``offered(["CUDAExecutionProvider", ...])``."""
    ort = prov.onnxruntime()

    def set_(names):
        monkeypatch.setattr(ort, "get_available_providers", lambda: list(names))

    return set_


@pytest.fixture
def bundle(tmp_path):
    """A writable copy of the embedded default bundle."""
    shutil.copytree(DEFAULT_BUNDLE, tmp_path / "b")
    return load_bundle(tmp_path / "b")


def test_requested_reads_the_argument_then_the_environment(monkeypatch):
    monkeypatch.delenv(prov.ENV_PROVIDER, raising=False)
    assert prov.requested(None) == "auto"
    assert prov.requested(" CUDA ") == "cuda"
    monkeypatch.setenv(prov.ENV_PROVIDER, "tensorrt")
    assert prov.requested(None) == "tensorrt"
    assert prov.requested("cpu") == "cpu"  # the argument wins


def test_an_unknown_name_is_refused_with_its_source_and_a_suggestion(monkeypatch):
    with pytest.raises(
        BackendError, match=r"provider: unknown provider 'cdua' \(did you mean 'cuda'"
    ):
        prov.requested("cdua")
    monkeypatch.setenv(prov.ENV_PROVIDER, "gpu")
    with pytest.raises(BackendError, match="GMNER_PROVIDER: unknown provider 'gpu'"):
        prov.requested(None)


@pytest.mark.parametrize(
    ("available", "engines", "expected"),
    [
        (CPU, False, "cpu"),
        (CUDA, False, "cuda"),
        (ALL, False, "cuda"),
        (ALL, True, "tensorrt"),
        (CUDA, True, "cuda"),
    ],
)
def test_auto_prefers_cuda_and_takes_tensorrt_only_with_engines(available, engines, expected):
    assert prov.choose("auto", available, engines_here=engines) == expected


def test_asking_for_a_missing_provider_names_what_is_installed(monkeypatch):
    monkeypatch.setattr(prov, "installed_builds", lambda: ["onnxruntime 1.32.0"])
    with pytest.raises(BackendError) as err:
        prov.choose("cuda", CPU)
    text = str(err.value)
    assert "no CUDAExecutionProvider" in text and "it offers CPUExecutionProvider" in text
    assert "installed: onnxruntime 1.32.0" in text and "pip uninstall -y onnxruntime" in text
    assert "pip install onnxruntime-gpu" in text


def test_two_builds_installed_are_named_as_the_cause(monkeypatch):
    builds = ["onnxruntime 1.32.0", "onnxruntime-gpu 1.31.1"]
    monkeypatch.setattr(prov, "installed_builds", lambda: builds)
    message = prov.unavailable_message("cuda", CPU)
    assert "Several onnxruntime builds" in message
    assert (
        "pip uninstall -y onnxruntime onnxruntime-gpu, then pip install onnxruntime-gpu" in message
    )


def test_a_gpu_build_without_the_provider_points_at_the_libraries(monkeypatch):
    monkeypatch.setattr(prov, "installed_builds", lambda: ["onnxruntime-gpu 1.31.1"])
    assert "library path" in prov.unavailable_message("tensorrt", CUDA)


def test_load_refuses_a_missing_provider_before_reading_the_bundle(monkeypatch, offered):
    offered(CPU)

    def no_read(*_a, **_k):
        raise AssertionError("the bundle was read before the provider was checked")

    monkeypatch.setattr("gmner_rt.extractor.load_bundle", no_read)
    with pytest.raises(BackendError, match="provider 'cuda'"):
        gmner_rt.load(provider="cuda")
    with pytest.raises(BackendError, match="provider 'tensorrt'"):
        gmner_rt.load(provider="tensorrt")


def test_cpu_load_reports_its_provider_and_placement():
    extractor = gmner_rt.load(provider="cpu")
    assert extractor.provider == "cpu"
    assert extractor.backend.providers()["decoder"] == CPU
    placement = extractor.placement()
    assert set(placement) == {"vision", "embedding", "decoder"}
    ort = prov.onnxruntime()
    if hasattr(ort.InferenceSession, "get_provider_graph_assignment_info"):
        assert set(placement["decoder"]) == {"CPUExecutionProvider"}
        assert placement["decoder"]["CPUExecutionProvider"] > 10
    else:  # onnxruntime < 1.23 cannot say
        assert placement["decoder"] is None


def test_legacy_providers_still_work_with_a_deprecation_warning(offered, caplog):
    with pytest.warns(DeprecationWarning, match="provider='cpu'"):
        extractor = gmner_rt.load(providers=["CPUExecutionProvider"])
    assert extractor.provider == "cpu"
    offered(CPU)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(BackendError, match="unknown execution provider 'Bogus'"):
            gmner_rt.load(providers=["Bogus"])
        with pytest.raises(BackendError, match="provider 'cuda': the installed onnxruntime"):
            gmner_rt.load(providers=["CUDAExecutionProvider"])
        # onnxruntime's reading of a list: the first available, but no longer silently
        with caplog.at_level("WARNING"):
            extractor = gmner_rt.load(providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert extractor.provider == "cpu"
    assert "CUDAExecutionProvider not available here" in caplog.text


def test_names_are_read_as_people_write_them():
    assert prov.requested("CPUExecutionProvider") == "cpu"
    assert prov.requested("TensorRT") == "tensorrt"
    with pytest.raises(BackendError, match="unknown provider 'gpu' \\(did you mean 'cuda'"):
        prov.requested("gpu")


def test_device_and_options_unused_on_the_cpu_are_warned_about(bundle, offered, caplog):
    offered(CPU)
    with caplog.at_level("WARNING"):
        backend.plan(bundle, "cpu", device_id=3, provider_options={"foo": "bar"})
    assert "device_id 3 unused: running on the CPU" in caplog.text
    assert "provider options foo go to onnxruntime's CPU provider" in caplog.text


def test_cuda_plan_passes_the_device_and_the_users_options(bundle, offered):
    offered(CUDA)
    plan = backend.plan(bundle, "cuda", provider_options={"gpu_mem_limit": 2**30}, device_id=1)
    assert plan.provider == "cuda" and plan.limits is None and plan.engines is None
    for graph, entries in plan.providers.items():
        assert entries == [
            ("CUDAExecutionProvider", {"device_id": "1", "gpu_mem_limit": str(2**30)}),
            "CPUExecutionProvider",
        ], graph
        assert plan.files[graph] == bundle.path / f"{graph}.onnx"


def test_tensorrt_plan_has_profiles_caches_and_a_cuda_fallback(bundle, offered):
    offered(ALL)
    plan = backend.plan(bundle, "tensorrt", provider_options={"trt_max_workspace_size": 1 << 30})
    assert plan.provider == "tensorrt" and plan.limits is not None
    for graph, entries in plan.providers.items():
        (name, options), fallback, cpu = entries
        assert name == "TensorrtExecutionProvider"
        assert (
            fallback == ("CUDAExecutionProvider", {"device_id": "0"})
            and cpu == "CPUExecutionProvider"
        )
        assert set(options) <= TRT_OPTION_NAMES
        assert options["trt_max_workspace_size"] == str(1 << 30)
        assert options["trt_engine_cache_path"] == str(bundle.path / "trt-cache")
        assert options["trt_timing_cache_path"] == str(bundle.path / "trt-cache")
        digest = options["trt_engine_cache_prefix"].split("-")[1]
        assert options["trt_engine_cache_prefix"] == f"{graph}-{digest}-fp32-mb1-mc1088-mit36"
        assert options["trt_fp16_enable"] == "False"  # an fp32 bundle
        assert options["trt_profile_min_shapes"] and options["trt_profile_max_shapes"]
    assert any("builds engines for the ONNX graphs on first use" in n for n in plan.notes)


def test_cached_engines_are_keyed_by_the_graphs_files_and_the_limits(bundle):
    from gmner_rt import tensorrt as trt

    m = bundle.manifest
    limits = trt.default_limits(m)
    first = trt.cache_prefix(m, "decoder", limits, False)
    assert trt.cache_prefix(m, "decoder", limits, True) != first
    wider = trt.resolve_limits(m, max_batch=2)
    assert trt.cache_prefix(m, "decoder", wider, False) != first
    data = json.loads((bundle.path / "manifest.json").read_text())
    data["files"]["decoder.onnx"]["sha256"] = "f" * 64  # re-exported: new weights
    assert trt.cache_prefix(parse_manifest(data), "decoder", limits, False) != first


def test_the_engine_cache_folder_is_created_or_named_in_an_error(bundle, monkeypatch, tmp_path):
    monkeypatch.setattr(backend.os, "access", lambda *_: False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "deep" / "cache"))
    assert backend.trt_cache_dir(bundle).is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    with pytest.raises(BackendError, match="TensorRT engine cache .*: cannot create it"):
        backend.trt_cache_dir(bundle)


def test_auto_routes_trt_options_to_tensorrt_and_the_rest_to_cuda(bundle, offered):
    offered(CUDA)
    options = {"gpu_mem_limit": "1", "trt_max_workspace_size": "2"}
    plan = backend.plan(bundle, "auto", provider_options=options)
    assert plan.provider == "cuda"
    assert plan.providers["decoder"][0] == (
        "CUDAExecutionProvider",
        {"device_id": "0", "gpu_mem_limit": "1"},
    )
    assert any("trt_max_workspace_size unused: auto chose CUDA" in n for n in plan.notes)
    offered(CPU)
    plan = backend.plan(bundle, "auto", provider_options=options)
    assert plan.providers["decoder"] == ["CPUExecutionProvider"]
    assert any("unused: auto chose the CPU" in n for n in plan.notes)


def test_tensorrt_options_are_checked_by_name(bundle, offered):
    offered(ALL)
    with pytest.raises(BackendError, match="not TensorRT execution provider options: trt_fp16"):
        backend.plan(bundle, "tensorrt", provider_options={"trt_fp16": "1"})


def test_a_read_only_bundle_caches_engines_in_the_users_cache(bundle, monkeypatch, tmp_path):
    monkeypatch.setattr(backend.os, "access", lambda *_: False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cache = backend.trt_cache_dir(bundle)
    assert cache.parent == tmp_path / "cache" / "gmner" / "trt" and len(cache.name) == 16


def test_a_bad_device_id_is_refused(bundle, offered):
    offered(CUDA)
    with pytest.raises(BackendError, match="device_id: expected a non-negative integer"):
        backend.plan(bundle, "cuda", device_id=-1)


def test_a_provider_onnxruntime_did_not_start_is_an_error(monkeypatch):
    ort = prov.onnxruntime()

    class Fallen:  # what onnxruntime returns after "EP Error ... Falling back to CPU"
        def __init__(self, *_a, **_k):
            pass

        def get_providers(self):
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(ort, "InferenceSession", Fallen)
    with pytest.raises(BackendError, match="could not start CUDAExecutionProvider and fell back"):
        backend.session(DEFAULT_BUNDLE / "embedding.onnx", [("CUDAExecutionProvider", {})])


def test_module_level_extract_caches_per_provider(monkeypatch):
    loads = []

    class Fake:
        def extract(self, image, text, **options):
            return (image, text)

    def fake_load(bundle, **options):
        loads.append(options)
        return Fake()

    monkeypatch.setattr(gmner_rt, "load", fake_load)
    monkeypatch.setattr(gmner_rt, "_EXTRACTORS", __import__("collections").OrderedDict())
    monkeypatch.delenv(prov.ENV_PROVIDER, raising=False)
    gmner_rt.extract("a.png", "t", provider="cpu")
    gmner_rt.extract("a.png", "t", provider="cpu")
    assert len(loads) == 1
    gmner_rt.extract("a.png", "t", provider="cuda")
    gmner_rt.extract("a.png", "t", provider="cpu", device_id=1)
    gmner_rt.extract("a.png", "t", provider="cpu", provider_options={"arena": "1"})
    monkeypatch.setenv(prov.ENV_PROVIDER, "cuda")
    gmner_rt.extract("a.png", "t")  # the environment says cuda: the cuda extractor again
    assert [o["provider"] for o in loads] == ["cpu", "cuda", "cpu", "cpu"]


def test_cli_provider_flags(capsys, caplog):
    from gmner.runtime.cli import main

    offered_gpu = "CUDAExecutionProvider" in prov.onnxruntime().get_available_providers()
    args = ["extract", "--image", str(EXAMPLE), "--text", "Zentro meets Alice"]
    assert main([*args, "--provider", "CPU", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"records"' in out and json.loads(out)["records"]
    assert main([*args, "--provider-option", "nothing"]) == 2
    assert "--provider-option: expected KEY=VALUE, got 'nothing'" in caplog.text
    if not offered_gpu:
        assert main([*args, "--provider", "cuda"]) == 2
        assert (
            "provider 'cuda': the installed onnxruntime has no CUDAExecutionProvider" in caplog.text
        )


def test_every_runtime_command_takes_the_provider_flags():
    from gmner.runtime.cli import build_parser

    for command in ("extract", "eval", "demo"):
        parser = build_parser(command)
        sub = next(a for a in parser._actions if a.dest == "command").choices[command]
        flags = {o for a in sub._actions for o in a.option_strings}
        assert {"--provider", "--provider-option", "--device-id", "--threads"} <= flags, command
    pytest.importorskip("gmner.bench.peers", reason="gmner-bench (./bench)")
    bench = build_parser("bench")
    sub = next(a for a in bench._actions if a.dest == "command").choices["bench"]
    assert {"--provider", "--device-id"} <= {o for a in sub._actions for o in a.option_strings}


def test_eval_refuses_provider_flags_without_a_bundle(tmp_path):
    from gmner.runtime.cli import main

    pred = tmp_path / "p.jsonl"
    pred.write_text("")
    code = main(["eval", "--data", str(tmp_path), "--pred", str(pred), "--provider", "cpu"])
    assert code == 2


def test_placement_counts_nodes_per_provider():
    class Sub:
        def __init__(self, ep, n):
            self.ep_name, self._n = ep, n

        def get_nodes(self):
            return [object()] * self._n

    class Sess:
        def get_provider_graph_assignment_info(self):
            return [
                Sub("CUDAExecutionProvider", 3),
                Sub("CPUExecutionProvider", 1),
                Sub("CUDAExecutionProvider", 2),
            ]

    assert backend.placement(Sess()) == {"CUDAExecutionProvider": 5, "CPUExecutionProvider": 1}
    assert backend.placement(object()) is None


def test_a_gpu_run_with_compute_nodes_on_the_cpu_is_warned_about(caplog):
    from gmner_rt.extractor import _log_placement

    class Backend:
        def __init__(self, ops):
            self.ops = ops

        def placement(self):
            return {"decoder": {"CUDAExecutionProvider": 90, "CPUExecutionProvider": 4}}

        def cpu_ops(self):
            return {"decoder": self.ops}

        def sessions(self):
            return {}

    b = load_bundle(DEFAULT_BUNDLE, verify_hashes=False)
    with caplog.at_level("INFO"):
        _log_placement(Path("b"), b, Backend({"MatMul": 3, "Shape": 1}), "cuda")
    assert "decoder: compute nodes run on the CPU, not on cuda: MatMul x3" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):
        _log_placement(Path("b"), b, Backend({"Shape": 3, "Gather": 1}), "cuda")
    assert "WARNING" not in caplog.text and "4 shape/index nodes on the CPU" in caplog.text


def test_readable_json_keeps_numbers_on_one_line_and_strings_intact():
    from gmner.runtime.extract import readable_json

    data = {
        "raw": "Paris|LOC|[10,20,30,40]\n[1, 2]",
        "records": [{"boxes": [[1, 2, 3, 4], [5, 6, 7, 8]], "spans": [[0, 5]]}],
        "token_ids": list(range(40)),
        "timings": {"total": 0.25, "scale": [-1.5e-05, 2.0]},
        "empty": [],
    }
    text = readable_json(data)
    assert json.loads(text) == data
    assert '"token_ids": [0, 1, 2,' in text and "[1, 2, 3, 4]" in text
    assert text.count("\n") < 25


def test_a_missing_extra_names_what_to_install(monkeypatch, caplog):
    from gmner.runtime import cli

    class Needs:
        def add_arguments(self, parser):
            pass

        def run(self, args):
            raise ModuleNotFoundError("No module named 'onnx'", name="onnx")

    monkeypatch.setattr(cli, "_load", lambda name: Needs())
    assert cli.main(["extract"]) == 2
    assert "gmner extract needs the package 'onnx', which is not installed" in caplog.text
    assert "pip install '.[export]' from gmner's source folder" in caplog.text


@pytest.mark.gpu
@pytest.mark.parametrize("think", ["on", "off"])
def test_cuda_decodes_the_tokens_the_cpu_decodes(think):
    """On a GPU machine: the embedded default (fp32) gives the same greedy tokens on the CUDA
    provider as on the CPU, and every graph's compute runs on CUDA."""
    cpu = gmner_rt.load(provider="cpu")
    cuda = gmner_rt.load(provider="cuda")
    assert cuda.provider == "cuda"
    for graph, ops in cuda.backend.cpu_ops().items():
        if ops is not None:
            assert not set(ops) & {"MatMul", "Gemm", "Softmax"}, (graph, ops)
    texts = ["Zentro meets Velmora", "Quillon and Alice in Paris"]
    for text in texts:
        a = cpu.extract(EXAMPLE, text, think=think, max_new_tokens=120)
        b = cuda.extract(EXAMPLE, text, think=think, max_new_tokens=120)
        assert a.token_ids == b.token_ids and a.records == b.records


def test_the_extractor_cache_is_bounded_and_names_the_default_once(monkeypatch):
    from collections import OrderedDict

    loads = []

    class Fake:
        def extract(self, image, text, **options):
            return text

    monkeypatch.setattr(gmner_rt, "load", lambda bundle, **o: loads.append(bundle) or Fake())
    monkeypatch.setattr(gmner_rt, "_EXTRACTORS", OrderedDict())
    gmner_rt.extract("a.png", "t", provider="cpu")
    gmner_rt.extract("a.png", "t", provider="cpu", bundle=DEFAULT_BUNDLE)
    assert len(loads) == 1  # the default, named or not, is one extractor
    for device in range(1, 8):
        gmner_rt.extract("a.png", "t", provider="cpu", device_id=device)
    assert len(gmner_rt._EXTRACTORS) == gmner_rt._KEEP
