"""Installing gmner: the wheel carries what the runtime commands need (the default model, the
demo examples, the Jetson page), and pip never puts the CPU ``onnxruntime`` over an installed
``onnxruntime-gpu``. pip resolves offline against stand-in wheels built here (a fake
``onnxruntime-gpu`` that provides the ``onnxruntime`` package, and fakes of the other
dependencies), in a new empty virtual environment; ``--dry-run --report`` says what it would
install."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def make_wheel(folder: Path, dist: str, version: str, files: dict[str, str]) -> Path:
    """A minimal pure-Python wheel of distribution ``dist`` holding ``files``."""
    norm = dist.replace("-", "_")
    info = f"{norm}-{version}.dist-info"
    contents = {
        **{k: v.encode() for k, v in files.items()},
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = [_record_line(n, d) for n, d in contents.items()] + [f"{info}/RECORD,,"]
    contents[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = folder / f"{norm}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in contents.items():
            zf.writestr(name, data)
    return path


def _pip(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PIP_CONSTRAINT", None)
    return subprocess.run(
        [sys.executable, "-m", "pip", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    """gmner's own wheel and stand-ins for every dependency, in one folder."""
    pytest.importorskip("setuptools", minversion="77")  # builds without isolation
    house = tmp_path_factory.mktemp("wheels")
    # built from a copy of the sources: setuptools writes build/ and *.egg-info/ into the tree
    source = tmp_path_factory.mktemp("source") / "gmner"
    skip = shutil.ignore_patterns(
        ".git", ".venv*", "build", "out", "runs", "*.egg-info", "__pycache__"
    )
    shutil.copytree(ROOT, source, ignore=skip)
    built = _pip(
        "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(house), str(source), cwd=house
    )
    assert built.returncode == 0, built.stderr
    fake_ort = {"onnxruntime/__init__.py": "__version__ = '1.99.0'\n"}
    make_wheel(house, "onnxruntime-gpu", "1.99.0", fake_ort)
    make_wheel(house, "onnxruntime", "1.99.0", fake_ort)
    for dist in ("numpy", "pillow", "tokenizers"):
        make_wheel(house, dist, "99.0.0", {f"{dist}_standin.py": ""})
    return house


@pytest.fixture(scope="module")
def gpu_env(wheelhouse, tmp_path_factory) -> Path:
    """A new virtual environment that already has (a stand-in of) onnxruntime-gpu."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    done = _pip(
        "--python", str(python), "install", "-q", "--no-index", "--find-links", str(wheelhouse),
        "onnxruntime-gpu", cwd=wheelhouse,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return python


def _would_install(python: Path, wheelhouse: Path, requirement: str) -> dict[str, str]:
    report = wheelhouse / "report.json"
    done = _pip(
        "--python", str(python), "install", "--dry-run", "--quiet", "--report", str(report),
        "--no-index", "--find-links", str(wheelhouse), requirement, cwd=wheelhouse,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    items = json.loads(report.read_text())["install"]
    return {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in items}


@pytest.mark.parametrize("requirement", ["gmner", "gmner[gpu]"])
def test_installing_gmner_never_pulls_the_cpu_onnxruntime_over_the_gpu_one(
    gpu_env, wheelhouse, requirement
):
    planned = _would_install(gpu_env, wheelhouse, requirement)
    assert "gmner" in planned
    assert "onnxruntime" not in planned, planned
    assert "onnxruntime-gpu" not in planned  # already there: kept as it is


def test_the_cpu_extra_does_pull_onnxruntime(gpu_env, wheelhouse):
    """The control: the same resolution does install the CPU build when asked for."""
    assert "onnxruntime" in _would_install(gpu_env, wheelhouse, "gmner[cpu]")


def test_the_wheel_carries_the_model_the_examples_and_the_jetson_page(wheelhouse):
    (wheel,) = wheelhouse.glob("gmner-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "gmner_rt/models/default/manifest.json",
        "gmner_rt/models/default/decoder.onnx",
        "gmner/examples/demo/examples.jsonl",
        "gmner/runtime/jetson/README.md",
        "gmner/runtime/jetson/Dockerfile",
        "gmner_rt/models/default/README.md",  # the bundle's model card
        "gmner/__main__.py",  # python -m gmner
        "gmner/train/recipes/reference.yaml",  # gmner train --recipe reference
    ):
        assert needed in names, needed
    examples = [
        json.loads(line)
        for line in (ROOT / "examples/demo/examples.jsonl").read_text().splitlines()
    ]
    for row in examples:
        assert f"gmner/examples/demo/{row['image']}" in names
    metadata = (
        zipfile.ZipFile(wheel)
        .read(next(n for n in names if n.endswith(".dist-info/METADATA")))
        .decode()
    )
    assert "Requires-Python: >=3.10" in metadata
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    base = [r for r in requires if "extra ==" not in r]
    assert not any("onnxruntime" in r for r in base), base
