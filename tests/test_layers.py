"""The tree's one direction: every import, function-level ones included, points down the layers

    gmner_rt  <-  gmner.train  <-  gmner.export  <-  gmner.runtime  <-  gmner.bench

(the runtime library; training; export, which merges trained adapters; the commands and the
pipelines that chain the others; the benchmarks against peers, a package of their own). The
folders train/, export/, runtime/ and bench/ install as gmner.train, ... (pyproject.toml), so
their imports are resolved to those names here, relative ones included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: folder -> (package name, layer); a module may import its own layer or lower ones.
LAYERS = {
    "gmner_rt": ("gmner_rt", 0),
    "train": ("gmner.train", 1),
    "export": ("gmner.export", 2),
    "runtime": ("gmner.runtime", 3),
    "examples": ("gmner.examples", 3),
    "bench": ("gmner.bench", 4),
}
#: Packages the runtime library never imports (it runs on devices without them).
NOT_IN_RUNTIME = ("torch", "transformers", "peft", "accelerate", "safetensors", "onnx")


def _modules():
    for folder, (package, layer) in LAYERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join([package, *parts])
            is_package = path.name == "__init__.py"
            yield path, name.removesuffix(".__init__"), is_package, layer


def _targets(tree: ast.AST, module: str, is_package: bool):
    """(line, imported module) for every import in ``tree``, relative ones made absolute."""
    base = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                target = ".".join(anchor + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield node.lineno, target
            for alias in node.names:  # "from gmner import train" imports gmner.train
                yield node.lineno, f"{target}.{alias.name}"


def _layer_of(target: str) -> int | None:
    for package, layer in LAYERS.values():
        if target == package or target.startswith(package + "."):
            return layer
    return None


def violations() -> list[str]:
    found = []
    names = {package: folder for folder, (package, _) in LAYERS.items()}
    for path, module, is_package, layer in _modules():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for line, target in _targets(tree, module, is_package):
            where = f"{path.relative_to(ROOT)}:{line}"
            theirs = _layer_of(target)
            if theirs is not None and theirs > layer:
                package = next(p for p in names if target == p or target.startswith(p + "."))
                found.append(f"{where}: {module} imports {target}, a layer above ({package})")
            if layer == 0 and target.split(".")[0] in NOT_IN_RUNTIME:
                found.append(f"{where}: the runtime library imports {target}")
    return found


def test_every_import_points_down_the_layers():
    assert violations() == []


def test_the_check_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    """The check itself: an upward import hidden in a function, written relative or absolute,
    is found with its file and line."""
    fake = tmp_path / "train"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "bad.py").write_text(
        "def f():\n"
        "    from ..runtime.cli import main\n"
        "    import gmner.export.build\n"
        "    from gmner import runtime\n"
        "    return main\n"
    )
    rt = tmp_path / "gmner_rt"
    rt.mkdir()
    (rt / "x.py").write_text("def g():\n    import torch.nn\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    monkeypatch.setattr(
        __import__(__name__), "LAYERS", {"gmner_rt": ("gmner_rt", 0), "train": ("gmner.train", 1)}
    )
    for folder in ("export", "runtime"):
        (tmp_path / folder).mkdir()
    monkeypatch.setitem(LAYERS, "export", ("gmner.export", 2))
    monkeypatch.setitem(LAYERS, "runtime", ("gmner.runtime", 3))
    found = violations()
    assert any(
        f.startswith("train/bad.py:2: gmner.train.bad imports gmner.runtime.cli") for f in found
    )
    assert any(f.startswith("train/bad.py:3:") and "gmner.export.build" in f for f in found)
    assert any(f.startswith("train/bad.py:4:") and "gmner.runtime" in f for f in found)
    assert any(f.startswith("gmner_rt/x.py:2: the runtime library imports torch.nn") for f in found)


@pytest.mark.parametrize("folder", sorted(LAYERS))
def test_every_layer_folder_exists(folder):
    assert (ROOT / folder).is_dir()
