"""The three bundle graphs run by onnxruntime: vision, embedding and one decoder call.

A backend runs graphs on arrays and nothing else: it knows nothing about prompts, images,
tokens or stopping (those are :mod:`gmner_rt.generate`'s). Inputs are numpy; the KV cache is
the list ``[key_0, value_0, key_1, value_1, ...]`` of ``[B, kv_heads, S, d]`` onnxruntime
values that stay where the decoder wrote them (device memory on CUDA): each decoder call binds
the previous call's present tensors as its past (IOBinding), so the cache is never copied to
the host or converted to numpy between steps; only the last position's logits come back.
The graph itself concatenates past and new keys (a static-cache graph is TensorRT's path).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BackendError

log = logging.getLogger(__name__)

__all__ = ["OrtGraphs", "best_providers", "embed", "encode_images", "session"]

#: Preferred execution providers, best first.
PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def best_providers() -> list[str]:
    """The available execution providers in :data:`PROVIDER_ORDER`."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    return [p for p in PROVIDER_ORDER if p in available]


@dataclass(frozen=True)
class KvLayout:
    """Shape facts of the decoder's KV cache."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: np.dtype


def session(path: Path, providers: Sequence[str] | None = None, threads: int | None = None):
    """An onnxruntime session for one graph file, with the options every backend uses
    (``threads`` intra-op threads and one inter-op thread, all graph optimizations) on
    ``providers`` (default: :func:`best_providers`)."""
    import onnxruntime as ort

    if not path.is_file():
        raise BackendError(f"{path}: graph file missing")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(
            str(path), options, providers=list(providers or best_providers())
        )
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise BackendError(f"{path}: onnxruntime could not load it ({exc})") from exc


class OrtGraphs:
    """onnxruntime sessions for ``vision.onnx``, ``embedding.onnx`` and ``decoder.onnx``."""

    def __init__(
        self,
        files: Mapping[str, str | Path],
        kv: KvLayout,
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ):
        self.kv = kv
        self.vision = session(Path(files["vision"]), providers, threads)
        self.embedding = session(Path(files["embedding"]), providers, threads)
        self.decoder = session(Path(files["decoder"]), providers, threads)
        self._past_names = [
            f"past_{kind}_{layer}" for layer in range(kv.num_layers) for kind in ("key", "value")
        ]
        self._present_names = [o.name for o in self.decoder.get_outputs()][1:]
        self.device = "cuda" if self.decoder.get_providers()[0] in _GPU_PROVIDERS else "cpu"

    @classmethod
    def from_bundle(cls, bundle, *, providers=None, threads=None) -> OrtGraphs:
        """Sessions for a validated :class:`gmner_rt.bundle.Bundle`."""
        m = bundle.manifest
        files = {name: bundle.file(spec.file) for name, spec in m.graphs.items()}
        kv = KvLayout(
            m.kv_cache.num_layers,
            m.kv_cache.num_kv_heads,
            m.kv_cache.head_dim,
            np.dtype(m.kv_cache.dtype),
        )
        threads = threads if threads is not None else _env_threads()
        return cls(files, kv, providers=providers, threads=threads)

    def encode_images(self, pixel_values: np.ndarray, indices) -> np.ndarray:
        """``image_embeds [groups, hidden]`` for packed images and their host-side indices."""
        return encode_images(self.vision, pixel_values, indices)

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        """``inputs_embeds [B, T, hidden]`` for ``input_ids [B, T]``."""
        return embed(self.embedding, input_ids)

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        """A KV cache of past length 0."""
        shape = (batch, self.kv.num_kv_heads, 0, self.kv.head_dim)
        return [np.zeros(shape, dtype=self.kv.dtype) for _ in self._past_names]

    def decode(
        self,
        inputs_embeds: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: Sequence[np.ndarray],
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decoder call: ``(logits [B, vocab] of the last position, present cache)``."""
        binding = self.decoder.io_binding()
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(inputs_embeds))
        binding.bind_cpu_input("attention_mask", _int64(attention_mask))
        binding.bind_cpu_input("position_ids", _int64(position_ids))
        for name, value in zip(self._past_names, past, strict=True):
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self._present_names:
            binding.bind_output(name, self.device)
        self.decoder.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy()[:, -1, :], list(outputs[1:])

    @staticmethod
    def cache_to_numpy(past: Sequence) -> list[np.ndarray]:
        """The KV cache as host arrays (for inspection and tests; decoding never needs it)."""
        return [p if isinstance(p, np.ndarray) else p.numpy() for p in past]


def encode_images(vision, pixel_values: np.ndarray, indices) -> np.ndarray:
    """``image_embeds [groups, hidden]`` from a vision-graph session, for packed images and
    their host-side indices (shared by every backend that runs the bundle's vision graph)."""
    feeds = {
        "pixel_values": np.ascontiguousarray(pixel_values, dtype=np.float32),
        "rot_pos_ids": indices.rot_pos_ids,
        "window_index": indices.window_index,
        "reverse_index": indices.reverse_index,
        "cu_seqlens": indices.cu_seqlens,
        "cu_window_seqlens": indices.cu_window_seqlens,
    }
    return vision.run(None, feeds)[0]


def embed(embedding, input_ids: np.ndarray) -> np.ndarray:
    """``inputs_embeds [B, T, hidden]`` from an embedding-graph session."""
    return embedding.run(None, {"input_ids": input_ids.astype(np.int64, copy=False)})[0]


def _int64(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.int64)


def _env_threads() -> int | None:
    value = os.environ.get("GMNER_THREADS")
    if value is None:
        return None
    try:
        threads = int(value)
    except ValueError:
        raise BackendError(f"GMNER_THREADS: expected a positive integer, got {value!r}") from None
    if threads <= 0:
        raise BackendError(f"GMNER_THREADS: expected a positive integer, got {value!r}")
    return threads
