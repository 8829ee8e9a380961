"""Checkpoint averaging (gmner.train.average)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from gmner.train.average import average_checkpoints  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from gmner_rt.errors import InputError  # noqa: E402


def _checkpoint(folder, scale: float, step: int):
    folder.mkdir(parents=True)
    save_file(
        {
            "w": torch.full((2, 3), scale, dtype=torch.float32),
            "h": torch.full((4,), scale, dtype=torch.bfloat16),
            "steps": torch.tensor([step], dtype=torch.int64),
        },
        str(folder / "model.safetensors"),
    )
    save_file({"w": torch.full((2, 3), 2 * scale)}, str(folder / "trainable.safetensors"))
    (folder / "config.json").write_text(f'{{"step": {step}}}', encoding="utf-8")
    return folder


def test_mean_of_float_tensors_other_files_from_the_last(tmp_path):
    ckpts = [_checkpoint(tmp_path / f"step-{k}", float(k), k) for k in (1, 2, 6)]
    out = average_checkpoints(ckpts, tmp_path / "avg")
    model = load_file(str(out / "model.safetensors"))
    assert torch.equal(model["w"], torch.full((2, 3), 3.0))
    assert model["h"].dtype == torch.bfloat16 and torch.equal(model["h"].float(), torch.full((4,), 3.0))
    assert model["steps"].tolist() == [6]  # integers are not averaged: the last one's
    assert torch.equal(load_file(str(out / "trainable.safetensors"))["w"], torch.full((2, 3), 6.0))
    assert (out / "config.json").read_text(encoding="utf-8") == '{"step": 6}'


def test_mismatched_checkpoints_and_a_taken_folder_are_refused(tmp_path):
    a = _checkpoint(tmp_path / "a", 1.0, 1)
    b = tmp_path / "b"
    b.mkdir()
    save_file({"w": torch.zeros(3, 2)}, str(b / "model.safetensors"))
    with pytest.raises(InputError, match="holds other tensors"):
        average_checkpoints([a, b], tmp_path / "avg")
    with pytest.raises(InputError, match="not found"):
        average_checkpoints([a, tmp_path / "gone"], tmp_path / "avg")
    with pytest.raises(InputError, match="exists"):
        average_checkpoints([a], a)
    assert not (tmp_path / "avg").exists() and not (tmp_path / "avg.tmp").exists()
