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

__all__ = ["BandwidthProbe", "GpuBandwidthProbe", "SPEC_BANDWIDTH_GB_S", "measure_bandwidth"]
__all__ += ["spec_bandwidth"]

#: Peak memory bandwidth (GB/s) from NVIDIA's data sheets, by a part of the device's name;
#: the roofline falls back to it (labelled "spec") where no measurement can be taken.
SPEC_BANDWIDTH_GB_S = {
    "H200": 4800.0,
    "H100 80GB HBM3": 3350.0,  # SXM
    "H100 NVL": 3900.0,
    "H100 PCIe": 2000.0,
    "A100-SXM4-80GB": 2039.0,
    "A100 80GB PCIe": 1935.0,
    "A100-SXM4-40GB": 1555.0,
    "L40S": 864.0,
    "L4": 300.0,
    "RTX 4090": 1008.0,
    "Orin": 204.8,  # AGX Orin 32/64 GB; Orin NX 102.4, Orin Nano 68 (102 in Super mode)
}


def spec_bandwidth(device_name: str) -> float | None:
    """The data-sheet bandwidth of the GPU named ``device_name`` (None: not in the table)."""
    for key, value in SPEC_BANDWIDTH_GB_S.items():
        if key.lower() in device_name.lower():
            return value
    return None


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


class GpuBandwidthProbe:
    """GPU memory bandwidth in GB/s: the same matrix-vector product as :class:`BandwidthProbe`,
    by onnxruntime's CUDA provider (cuBLAS) on device ``device_id``, the weights resident on
    the GPU; what a batch-1 decode step does. Needs onnxruntime-gpu and the ``onnx`` package."""

    def __init__(self, megabytes: int = 1024, runs: int = 20, device_id: int = 0):
        if megabytes < 1:
            raise ValueError(f"bandwidth probe: megabytes must be >= 1, got {megabytes}")
        rows = 4096
        cols = max(1, megabytes * 2**20 // (4 * rows))
        self.runs = runs
        self.nbytes = rows * cols * 4
        weights = np.full((rows, cols), 0.5, dtype=np.float32)
        self.session = _matvec_session(
            weights, 1, [("CUDAExecutionProvider", {"device_id": str(device_id)})]
        )
        if self.session is None:
            raise RuntimeError("the GPU bandwidth probe needs the onnx package")
        self.x = np.full((1, rows), 0.25, dtype=np.float32)

    def measure(self) -> dict[str, float]:
        """GB/s (``onnxruntime_cuda_matmul``): median of ``runs`` after a warm-up; each run
        waits for the GPU (onnxruntime's ``run`` returns the result on the host)."""
        self.session.run(None, {"x": self.x})
        times = []
        for _ in range(self.runs):
            started = time.perf_counter()
            self.session.run(None, {"x": self.x})
            times.append(time.perf_counter() - started)
        return {"onnxruntime_cuda_matmul": self.nbytes / float(np.median(times)) / 1e9}


def _matvec_session(weights: np.ndarray, threads: int, providers=None):
    """An onnxruntime session computing ``x @ weights`` on ``threads`` threads and
    ``providers`` (default: the CPU); None without the ``onnx`` package."""
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
        return ort.InferenceSession(
            str(path), options, providers=providers or ["CPUExecutionProvider"]
        )
