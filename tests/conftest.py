"""Shared fixtures: the checked-in data subsets and the full shared data (when present)."""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
V2_SUBSET = FIXTURES / "twitter-gmner-v2"
V1_QUIRKS = FIXTURES / "twitter-gmner-v1-quirks"
#: The full Twitter-GMNER v2.0 annotations, in ../shared/data next to the repository.
SHARED_DATA = Path(__file__).parents[2] / "shared" / "data" / "twitter-gmner-v2"


def _has_cuda_provider() -> bool:
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run where onnxruntime has the CUDA provider (the lent GPU
    machine, with onnxruntime-gpu: scripts/gpu_check.sh runs them), and skip elsewhere."""
    if _has_cuda_provider():
        return
    skip = pytest.mark.skip(reason="needs onnxruntime's CUDA provider (onnxruntime-gpu, a GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def v2_subset() -> Path:
    """A small verbatim subset of Twitter-GMNER v2.0 (train and dev), see fixtures/README.md."""
    return V2_SUBSET


@pytest.fixture(scope="session")
def v1_quirks() -> Path:
    """A hand-made folder exercising the reader's quirks (BOM, CRLF, IOBES, ...)."""
    return V1_QUIRKS


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The full Twitter-GMNER v2.0 annotations; the test is skipped when they are absent."""
    if not (SHARED_DATA / "txt" / "train.txt").is_file():
        pytest.skip(f"full Twitter-GMNER data not found at {SHARED_DATA}")
    return SHARED_DATA


# The tiny model, a LoRA adapter trained on it, and its exported fp32 bundle: built once per
# test session and shared by the export and runtime tests (torch is needed to build them).


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """A random tiny Qwen2.5-VL directory (``gmner tiny-model``, seed 0)."""
    pytest.importorskip("torch")
    from gmner.train.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", seed=0)


@pytest.fixture(scope="session")
def adapter(tiny, tmp_path_factory) -> Path:
    """A LoRA adapter trained for 3 steps (lr 5e-3) on the fixture: merged weights differ."""
    from gmner.train.config import load_config
    from gmner.train.loop import train
    from PIL import Image

    from gmner_rt.data import load_split

    images = tmp_path_factory.mktemp("images")
    for t in [*load_split(V2_SUBSET, "train"), *load_split(V2_SUBSET, "dev")]:
        w, h = t.image_size or (320, 240)
        Image.new("RGB", (w, h), (40, 90, 150)).save(images / f"{t.img_id}.jpg")
    run = tmp_path_factory.mktemp("run")
    settings = {
        "model.path": str(tiny),
        "data.dir": str(V2_SUBSET),
        "data.images": str(images),
        "data.use_cot": False,
        "output.dir": str(run),
        "optim.batch_size": 2,
        "optim.grad_accum": 1,
        "optim.epochs": 1,
        "data.limit": 6,
        "eval.enabled": False,
        "model.min_pixels": 56 * 56,
        "model.max_pixels": 224 * 224,
        "optim.lr": 5e-3,
    }
    train(load_config(None, settings))
    return run / "checkpoints" / (run / "latest").read_text().strip()


@pytest.fixture(scope="session")
def tiny_bundle(tiny, adapter, tmp_path_factory) -> Path:
    """``gmner export`` of tiny + adapter in fp32, parity checked."""
    pytest.importorskip("onnx")
    from gmner.export.build import BundleOptions, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "fp32"
    return export_bundle(BundleOptions(model=tiny, adapter=adapter, out=out))


@pytest.fixture(scope="session")
def base_bundle(tiny, tmp_path_factory) -> Path:
    """``gmner export`` of the random tiny model alone (no adapter), fp32."""
    pytest.importorskip("onnx")
    from gmner.export.build import BundleOptions, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "base"
    return export_bundle(BundleOptions(model=tiny, adapter=None, out=out))


def _rewrite_manifest_as_format_1(bundle: Path) -> None:
    """The manifest of ``bundle`` (its decoder already rewritten to take no
    ``logits_index`` and return one position's logits) as format 1 describes it."""
    import json

    from gmner_rt.bundle import file_entry, write_manifest

    data = json.loads((bundle / "manifest.json").read_text())
    data["format_version"] = 1
    decoder = data["graphs"]["decoder"]
    decoder["inputs"] = [t for t in decoder["inputs"] if t["name"] != "logits_index"]
    decoder["outputs"][0]["shape"][1] = 1
    data["files"]["decoder.onnx"] = file_entry(bundle / "decoder.onnx")
    write_manifest(bundle, data)


@pytest.fixture(scope="session")
def manifest_as_format_1():
    """Rewrites a bundle's manifest as format 1 (tests that make format-1 bundles)."""
    return _rewrite_manifest_as_format_1
