"""Training micro-batches built in DataLoader workers, in the order exact resume needs.

An example is keyed by ``(epoch, index)``: its encoding (image load, processor, tokenization,
the GRBP draw seeded by (seed, epoch, index)) depends on the key alone, so it is the same
whichever worker builds it, and persistent workers need no ``set_epoch`` (the epoch travels
in the key). :class:`MicroBatches` yields the keys of one epoch's micro-batches from a given
position on (a resumed run starts mid-epoch), for this rank only (see
:func:`gmner.train.distributed.step_plan`). Batches come back padded, with their token count
taken from the host-side lengths, pinned on CUDA.

This module knows nothing about models, optimisation or checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .dataset import ExampleSettings, collate, encode_example

Key = tuple[int, int]  # (epoch, row index)


def epoch_order(seed: int, epoch: int, n_rows: int) -> np.ndarray:
    """The rows of an epoch in training order (the same in every process)."""
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


def micro_batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class TrainExamples(Dataset):
    """Training examples keyed by ``(epoch, index)``."""

    def __init__(self, processor, rows: Sequence[dict], settings: ExampleSettings) -> None:
        self.processor, self.rows, self.settings = processor, rows, settings

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: Key) -> dict:
        epoch, index = key
        return encode_example(
            self.processor, self.rows[index], self.settings, epoch=epoch, index=index
        )


class MicroBatches(Sampler):
    """The keys of the micro-batches this rank runs, from :meth:`start`'s position on."""

    def __init__(self, seed: int, n_rows: int, batch_size: int) -> None:
        self.seed, self.n_rows, self.batch_size = seed, n_rows, batch_size
        self.keys: list[list[Key]] = []

    def start(self, epoch: int, numbers: Sequence[int]) -> None:
        """The next iteration yields micro-batches ``numbers`` of ``epoch``."""
        batches = micro_batches(epoch_order(self.seed, epoch, self.n_rows), self.batch_size)
        self.keys = [[(epoch, int(i)) for i in batches[n]] for n in numbers]

    def __iter__(self) -> Iterator[list[Key]]:
        return iter(list(self.keys))

    def __len__(self) -> int:
        return len(self.keys)


class Collate:
    """Pads a micro-batch for training; also returns its token count (host-side lengths)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: list[dict]) -> tuple[dict, int]:
        return collate(examples, self.pad_id), sum(len(e["input_ids"]) for e in examples)


def train_loader(
    dataset: TrainExamples,
    sampler: MicroBatches,
    pad_id: int,
    *,
    num_workers: int,
    device: torch.device,
    seed: int,
) -> DataLoader:
    """A DataLoader over ``sampler``'s micro-batches: ``num_workers`` processes (0: in this
    one) that stay up between epochs, each two micro-batches ahead, pinning on CUDA. Its
    own generator seeds the workers, so building an iterator draws nothing from torch's
    global RNG (dropout draws stay those of an uninterrupted run)."""
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=Collate(pad_id),
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch on ``device``; copies from pinned memory do not block the host."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
