"""Data-parallel training: the process group a launcher set up, and who does what in it.

``torchrun --nproc_per_node N`` (and ``accelerate launch``, which runs torchrun) starts N
copies of the trainer with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in their environment.
:func:`session` joins them into one process group (NCCL on CUDA, each rank on
``cuda:LOCAL_RANK``; gloo on the CPU) and leaves it when training ends; without those
variables, or with ``WORLD_SIZE`` 1, it is a no-op and training runs as a single process.

Gradients are averaged by torch's ``DistributedDataParallel``; this module only says which
micro-batches a rank takes (:func:`step_plan`), gathers evaluation outputs and RNG states,
and tells rank 0, the one writer of checkpoints and logs, apart (:func:`is_main`). It knows
nothing about models, data or checkpoints.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How long a collective waits for the other ranks (dev generation included).
TIMEOUT = datetime.timedelta(minutes=60)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True on the rank that writes checkpoints, logs and predictions (rank 0)."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def launched_world_size() -> int:
    """The world size a launcher asked for (``WORLD_SIZE``; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[torch.device]:
    """Join the launcher's process group for the duration of a run; yields this rank's
    device (``cuda:LOCAL_RANK`` when ``device`` is CUDA). A group set up by the caller is
    used as it is and left open."""
    if launched_world_size() <= 1 or dist.is_initialized():
        yield _local_device(device) if world_size() > 1 else device
        return
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"--model.device {device.type}: data-parallel runs need cuda or cpu")
    device = _local_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        timeout=TIMEOUT,
        **({"device_id": device} if device.type == "cuda" else {}),
    )
    log.info("rank %d of %d on %s", rank(), world_size(), device)
    try:
        yield device
    finally:
        dist.destroy_process_group()


def _local_device(device: torch.device) -> torch.device:
    if device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def seed_rank(seed: int) -> None:
    """Give ranks other than 0 their own torch RNG stream (LoRA dropout draws differ per
    rank); rank 0 keeps the single-process stream."""
    if rank() > 0:
        torch.manual_seed(int(np.random.SeedSequence([seed, rank()]).generate_state(1)[0]))


# ---------------------------------------------------------------------------------------------
# Which micro-batches a rank takes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepShare:
    """One optimizer step as one rank sees it.

    Attributes:
        size: micro-batches the whole step consumes (all ranks together).
        batches: the epoch's micro-batch numbers this rank runs, in order.
        real: False for a rank with no share of a short last step: it runs the step's
            first micro-batch with its loss times 0, since every rank must join the
            gradient all-reduce.
    """

    size: int
    batches: tuple[int, ...]
    real: bool = True


def step_plan(n_batches: int, start: int, per_step: int, rank: int, world: int) -> list[StepShare]:
    """The steps that consume micro-batches ``start..n_batches-1`` of an epoch, ``per_step``
    (grad_accum x world size) at a time, the last step possibly shorter; rank ``r`` takes
    the step's micro-batches ``r, r + world, ...``. The union over ranks is exactly what one
    process with grad_accum x world size takes; with each micro-batch loss weighted
    ``world / size`` (:func:`scale_loss`) and DDP's average over ranks, so is the gradient."""
    plan = []
    for first in range(start, n_batches, per_step):
        group = range(first, min(first + per_step, n_batches))
        mine = tuple(group[rank::world])
        plan.append(StepShare(len(group), mine) if mine else StepShare(len(group), (first,), False))
    return plan


def scale_loss(loss: torch.Tensor, share: StepShare) -> torch.Tensor:
    """A micro-batch loss as backward takes it: ``loss * world / size`` (``loss / size`` in a
    single process, bit for bit), 0 for a rank without a share."""
    return loss * (world_size() if share.real else 0) / share.size


# ---------------------------------------------------------------------------------------------
# Gathering
# ---------------------------------------------------------------------------------------------


def all_gather(value: T) -> list[T]:
    """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
    if world_size() == 1:
        return [value]
    out: list = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def step_totals(loss: torch.Tensor, tokens: int) -> tuple[float, int]:
    """A step's loss and token count summed over ranks: one all-reduce, and the one read
    of the device per optimizer step."""
    if world_size() == 1:
        return loss.item(), tokens
    both = torch.stack([loss.double(), torch.tensor(tokens, dtype=torch.float64).to(loss.device)])
    dist.all_reduce(both)
    total, count = both.tolist()
    return total, round(count)


def data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` wrapped in DistributedDataParallel when there are several ranks (it
    averages gradients over them), else itself. Buffers are constants here (rotary
    frequencies): not broadcast at every forward."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        broadcast_buffers=False,
    )


def no_sync(model: torch.nn.Module, sync: bool):
    """A context in which backward accumulates locally (``sync`` False, DDP only)."""
    if sync or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def sharded(rows: Sequence[T], fn: Callable[[Sequence[T]], dict]) -> dict:
    """``fn`` run on this rank's rows (``rows[rank::world]``), the dicts of every rank merged
    in ``rows``' order, on every rank; ``fn(rows)`` itself in a single process. ``rows``
    are dicts with an ``id`` key; ``fn`` returns a dict keyed by those ids."""
    if world_size() == 1:
        return fn(rows)
    merged: dict = {}
    for part in all_gather(fn(rows[rank() :: world_size()])):
        merged.update(part)
    return {row["id"]: merged[row["id"]] for row in rows if row["id"] in merged}


def rng_state(device: torch.device) -> dict:
    """This rank's torch RNG state (and its CUDA device's)."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
