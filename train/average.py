"""Checkpoint averaging: the element-wise mean of the weights of several checkpoints of one
run, written as a checkpoint ``gmner export`` takes like any other.

Averaging the last few checkpoints of a run (e.g. one every 250 steps over the last quarter)
smooths the step-to-step noise of the final weights; the demo recipe uses it. Weight files
are averaged tensor by tensor in float64 and stored in their own dtype; integer tensors and
the files that are not weights (config, processor, tokenizer) come from the last checkpoint.
This module knows nothing about models or training: it reads and writes safetensors files.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gmner_rt.errors import InputError

__all__ = ["WEIGHT_FILES", "average_checkpoints"]

log = logging.getLogger(__name__)

#: The weight files of a checkpoint (full model, LoRA adapter, trainer's trainable copy).
WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors", "trainable.safetensors")


def average_checkpoints(checkpoints: Sequence[str | Path], out: str | Path) -> Path:
    """Write the mean of ``checkpoints`` to ``out`` (a new folder); return it.

    Raises:
        InputError: fewer than one checkpoint, a missing folder, or checkpoints whose weight
            files or tensor names and shapes differ.
    """
    paths = [Path(p) for p in checkpoints]
    if not paths:
        raise InputError("average_checkpoints: no checkpoint given")
    missing = [str(p) for p in paths if not p.is_dir()]
    if missing:
        raise InputError(f"average_checkpoints: not found: {', '.join(missing)}")
    out = Path(out)
    if out.exists():
        raise InputError(f"{out}: exists; choose a new folder for the averaged checkpoint")
    names = [n for n in WEIGHT_FILES if (paths[-1] / n).is_file()]
    if not names:
        raise InputError(f"{paths[-1]}: no weight file ({', '.join(WEIGHT_FILES)})")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(paths[-1], tmp)
        for name in names:
            save_file(_mean([p / name for p in paths]), str(tmp / name))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, out)
    log.info(
        "averaged %d checkpoints (%s .. %s) into %s", len(paths), paths[0].name, paths[-1].name, out
    )
    return out


def _mean(files: Sequence[Path]) -> dict:
    """Float tensors averaged over ``files``; the others as in the last file."""
    last = load_file(str(files[-1]))
    total = {k: v.to(torch.float64) for k, v in last.items() if v.is_floating_point()}
    for path in files[:-1]:
        if not path.is_file():
            raise InputError(f"{path}: missing; every checkpoint must have the same weight files")
        tensors = load_file(str(path))
        if tensors.keys() != last.keys():
            raise InputError(f"{path}: holds other tensors than {files[-1]}")
        for key, value in tensors.items():
            if value.shape != last[key].shape:
                raise InputError(f"{path}: {key} has shape {value.shape}, not {last[key].shape}")
            if key in total:
                total[key] += value.to(torch.float64)
    return {
        k: (total[k] / len(files)).to(v.dtype).contiguous() if k in total else v
        for k, v in last.items()
    }
