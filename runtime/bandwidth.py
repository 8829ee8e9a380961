"""This machine's memory bandwidth, measured the way a decode step reads memory.

A decode step at batch 1 reads every decoder weight once, so its ceiling is the bandwidth
over the bytes per token (the roofline). This module measures that bandwidth with a large
fp32 matrix-vector product, by numpy's BLAS and by an onnxruntime ``MatMul`` (the decoder's
own kernel); a plain sum is compute-bound on these cores and would understate it. It knows
nothing about models or systems (``bench.py`` relates the figures to them).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["BandwidthProbe", "measure_bandwidth"]


class BandwidthProbe:
    """Memory bandwidth in GB/s, measured as often as needed: a ``[1, 4096] x [4096, N]``
    fp32 matrix-vector product over a ``megabytes`` matrix on ``threads`` threads (default:
    every core), by numpy's BLAS and (when the ``onnx`` package is there) by an onnxruntime
    ``MatMul``; median of ``runs`` after a warm-up. The matrix is allocated once, so a
    measurement takes about a second and can be taken right before and after each system,
    or :meth:`once` between two decode steps: on a shared machine the bandwidth drifts by tens
    of percent over minutes."""

    def __init__(self, megabytes: int = 1024, runs: int = 8, threads: int | None = None):
        if megabytes < 1:
            raise ValueError(f"bandwidth probe: megabytes must be >= 1, got {megabytes}")
        rows = 4096
        cols = max(1, megabytes * 2**20 // (4 * rows))
        self.runs = runs
        self.weights = np.full((rows, cols), 0.5, dtype=np.float32)  # every page resident
        self.x = np.full((1, rows), 0.25, dtype=np.float32)
        self.session = _matvec_session(self.weights, threads or os.cpu_count() or 1)

    def _median_seconds(self, call) -> float:
        call()
        times = []
        for _ in range(self.runs):
            started = time.perf_counter()
            call()
            times.append(time.perf_counter() - started)
        return float(np.median(times))

    def _onnxruntime(self) -> None:
        self.session.run(None, {"x": self.x})

    def measure(self) -> dict[str, float]:
        """GB/s per method (``numpy_matvec``, ``onnxruntime_matmul``)."""
        nbytes = self.weights.nbytes
        out = {"numpy_matvec": nbytes / self._median_seconds(lambda: self.x @ self.weights) / 1e9}
        if self.session is not None:
            out["onnxruntime_matmul"] = nbytes / self._median_seconds(self._onnxruntime) / 1e9
        return out

    def once(self) -> float:
        """GB/s of one product by onnxruntime (numpy without ``onnx``), timed right after an
        untimed one that wakes the threads: cheap enough to take between two decode steps."""
        call = self._onnxruntime if self.session is not None else self._numpy
        call()
        started = time.perf_counter()
        call()
        return self.weights.nbytes / (time.perf_counter() - started) / 1e9

    def _numpy(self) -> None:
        self.x @ self.weights  # noqa: B018 (the product is the measurement)


def measure_bandwidth(megabytes: int = 1024) -> float:
    """One measurement of :class:`BandwidthProbe`: the larger of its methods, GB/s."""
    return max(BandwidthProbe(megabytes).measure().values())


def _matvec_session(weights: np.ndarray, threads: int):
    """An onnxruntime session computing ``x @ weights`` on ``threads`` threads (None without
    the ``onnx`` package)."""
    try:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ModuleNotFoundError:
        return None
    rows, cols = weights.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "matvec",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cols])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.graph.initializer.append(numpy_helper.from_array(weights, "w"))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # Idle threads sleep at once instead of spinning, so a probe taken between two decode
    # steps leaves no busy threads behind to slow the next step.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    with tempfile.TemporaryDirectory(prefix="gmner-bw-") as tmp:
        path = Path(tmp) / "matvec.onnx"
        onnx.save(model, str(path), save_as_external_data=True, location="matvec.data")
        del model
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
