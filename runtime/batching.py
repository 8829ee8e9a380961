"""Dynamic batching: requests from many callers gathered into ``extract_batch`` calls.

A :class:`Batcher` owns one worker thread that runs the extractor (onnxruntime is CPU- or
GPU-bound and releases the GIL), off any event loop. Callers :meth:`~Batcher.submit` a pair
with its decoding options and get a :class:`concurrent.futures.Future`. The worker takes the
oldest waiting request, then gathers more requests with the same options until it holds
``max_batch`` or the oldest has waited ``max_wait_ms``, and runs them as one batch: each
answer equals the request's own ``extract`` (``extract_batch`` changes no row's tokens).
Requests with other options wait for a batch of their own.

A batch that fails on one request's input (an :class:`~gmner_rt.errors.InputError` such as
a text over the token limit) is run again one request at a time, so that only the bad
request gets the error. :meth:`Batcher.close` stops taking requests and finishes every one
it accepted (graceful shutdown).

This module knows nothing about HTTP, Ray or files: it only gathers calls to an extractor.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from gmner_rt.errors import GmnerError, InputError

log = logging.getLogger(__name__)

__all__ = ["BatchConfig", "Batched", "Batcher", "QueueFull", "extract_each"]


class QueueFull(GmnerError):
    """The batcher holds ``max_queue`` waiting requests, or is shutting down: try later."""


@dataclass(frozen=True)
class BatchConfig:
    """How requests are gathered into batches.

    Attributes:
        max_batch: the most requests run as one ``extract_batch`` call (``--max-batch``;
            1 turns batching off).
        max_wait_ms: how long the oldest waiting request may wait for others to join its batch
            (``--max-wait-ms``; 0 runs whatever is waiting at once).
        max_queue: the most requests waiting for the model (the running batch not counted);
            one more is refused with :class:`QueueFull` (``--max-queue``).
    """

    max_batch: int = 8
    max_wait_ms: float = 10.0
    max_queue: int = 64

    def __post_init__(self) -> None:
        for flag, value in (("--max-batch", self.max_batch), ("--max-queue", self.max_queue)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{flag}: expected an integer >= 1, got {value!r}")
        wait = self.max_wait_ms
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= 60_000:
            raise InputError(f"--max-wait-ms: expected a number of ms in [0, 60000], got {wait!r}")


@dataclass(frozen=True)
class Batched:
    """One request's answer and the size of the batch that computed it.

    Attributes:
        extraction: the :class:`gmner_rt.Extraction`.
        batch_size: how many requests ran in that ``extract_batch`` call (1 when run alone).
    """

    extraction: Any
    batch_size: int


@dataclass
class _Pending:
    image: Any
    text: str
    options: dict[str, Any]
    key: tuple
    future: Future
    arrived: float = field(default_factory=time.monotonic)


def _key(options: Mapping[str, Any]) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in options.items()))


def extract_each(
    extractor, pairs: Sequence[tuple[Any, str]], options: Mapping[str, Any]
) -> list[Any]:
    """``extractor.extract_batch(pairs, **options)``, except that when the batch fails on a
    :class:`~gmner_rt.errors.GmnerError`, every pair is run alone: the result list then holds
    that pair's error in its place. Errors that are not gmner's propagate."""
    try:
        return list(extractor.extract_batch(list(pairs), **options))
    except GmnerError as exc:
        if len(pairs) == 1:
            return [exc]
        log.info("a batch of %d failed (%s): running its requests one by one", len(pairs), exc)
    out: list[Any] = []
    for image, text in pairs:
        try:
            out.append(extractor.extract(image, text, **options))
        except GmnerError as exc:
            out.append(exc)
    return out


class Batcher:
    """Gathers concurrent :meth:`submit` calls into ``extractor.extract_batch`` calls run by
    one worker thread (see the module docstring)."""

    def __init__(self, extractor, config: BatchConfig | None = None):
        self.extractor = extractor
        self.config = config or BatchConfig()
        self._queue: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._running = 0
        self.batches = 0
        self.requests = 0
        self.largest_batch = 0
        self._worker = threading.Thread(target=self._loop, name="gmner-batcher", daemon=True)
        self._worker.start()

    # --- callers --------------------------------------------------------------------------

    def submit(self, image, text: str, options: Mapping[str, Any] | None = None) -> Future:
        """Queue one pair; the future gives a :class:`Batched`, or raises the request's
        :class:`~gmner_rt.errors.GmnerError`. Raises :class:`QueueFull` when ``max_queue``
        requests wait already, or after :meth:`close`."""
        options = dict(options or {})
        pending = _Pending(image, text, options, _key(options), Future())
        with self._cond:
            if self._closing:
                raise QueueFull("the server is shutting down")
            if len(self._queue) >= self.config.max_queue:
                raise QueueFull(
                    f"{len(self._queue)} requests are waiting (--max-queue "
                    f"{self.config.max_queue}); retry later"
                )
            self._queue.append(pending)
            self._cond.notify_all()
        return pending.future

    def stats(self) -> dict[str, int]:
        """Requests waiting and running, batches run, requests answered, the largest batch."""
        with self._cond:
            return {
                "waiting": len(self._queue),
                "running": self._running,
                "batches": self.batches,
                "requests": self.requests,
                "largest_batch": self.largest_batch,
            }

    @property
    def closing(self) -> bool:
        return self._closing

    def close(self, timeout: float | None = None) -> bool:
        """Refuse new requests, finish every accepted one, stop the worker. True when the
        worker finished within ``timeout`` seconds (None: wait as long as it takes)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._worker.join(timeout)
        return not self._worker.is_alive()

    # --- the worker -----------------------------------------------------------------------

    def _take(self) -> list[_Pending] | None:
        """The next batch: the oldest request, and others with its options, gathered until
        the batch is full or the oldest has waited max_wait_ms. None when closed and empty."""
        cfg = self.config
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            first = self._queue.popleft()
            batch = [first]
            deadline = first.arrived + cfg.max_wait_ms / 1000
            while True:
                for pending in list(self._queue):
                    if len(batch) >= cfg.max_batch:
                        break
                    if pending.key == first.key:
                        self._queue.remove(pending)
                        batch.append(pending)
                left = deadline - time.monotonic()
                if len(batch) >= cfg.max_batch or left <= 0 or self._closing:
                    break
                self._cond.wait(left)
            self._running = len(batch)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            live = [p for p in batch if p.future.set_running_or_notify_cancel()]
            try:
                if live:
                    self._run(live)
            finally:
                with self._cond:
                    self._running = 0

    def _run(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        try:
            results = extract_each(
                self.extractor, [(p.image, p.text) for p in batch], batch[0].options
            )
        except Exception as exc:  # not gmner's: a bug or a backend crash; every caller hears it
            log.exception("a batch of %d failed", len(batch))
            for p in batch:
                p.future.set_exception(exc)
            return
        ok = sum(not isinstance(r, Exception) for r in results)
        for p, result in zip(batch, results, strict=True):
            if isinstance(result, Exception):
                p.future.set_exception(result)
            else:
                p.future.set_result(Batched(result, len(batch) if ok == len(batch) else 1))
        with self._cond:
            self.batches += 1
            self.requests += len(batch)
            self.largest_batch = max(self.largest_batch, len(batch))
        log.debug("batch of %d in %.3f s", len(batch), time.perf_counter() - started)
