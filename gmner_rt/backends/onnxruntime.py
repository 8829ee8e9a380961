"""The three bundle graphs run by onnxruntime: vision, embedding and one decoder call.

A backend runs graphs on arrays and nothing else: it knows nothing about prompts, images,
tokens or stopping (those are :mod:`gmner_rt.generate`'s). Inputs are numpy; the KV cache is
the list ``[key_0, value_0, key_1, value_1, ...]`` of ``[B, kv_heads, S, d]`` onnxruntime
values that stay where the decoder wrote them (device memory on CUDA): each decoder call binds
the previous call's present tensors as its past (IOBinding), so the cache is never copied to
the host or converted to numpy between steps; only the logits asked for come back (the last
position's, or with a format-2 decoder the last K, to verify drafted tokens).
The graph itself concatenates past and new keys (a static-cache graph is TensorRT's path).

Which execution provider each graph runs on is decided by :func:`plan` (the user's choice,
checked by :mod:`gmner_rt.providers`; TensorRT options and prebuilt engines from
:mod:`gmner_rt.tensorrt`); every session records where onnxruntime placed its nodes, so a
graph that silently runs partly on the CPU is visible (:meth:`OrtGraphs.placement`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import providers as prov
from .. import tensorrt as trt
from ..bundle import Bundle, EngineLimits, EngineSet, verify_engine_set
from ..devices import cuda_device, tensorrt_version
from ..errors import BackendError, BundleError

log = logging.getLogger(__name__)

__all__ = ["OrtGraphs", "ProviderPlan", "embed", "encode_images", "plan", "session"]

_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
#: Session config entry that makes onnxruntime record which provider runs each node (>= 1.23).
_RECORD_PLACEMENT = "session.record_ep_graph_assignment_info"

#: One entry of onnxruntime's ``providers`` list: a name, or a name with its options.
ProviderEntry = str | tuple[str, dict[str, str]]


@dataclass(frozen=True)
class ProviderPlan:
    """Where and how each graph runs.

    Attributes:
        provider: the provider chosen: "cpu", "cuda" or "tensorrt".
        device_id: the CUDA device (GPU providers).
        files: graph name -> the file its session loads (the ONNX graph, or an engine set's
            EP-context model).
        providers: graph name -> onnxruntime's providers list, options included.
        limits: shapes the sessions accept (TensorRT profiles); None: any.
        engines: the prebuilt engine set in use, or None.
        notes: what the user should know (why engines were not used, where caches go).
    """

    provider: str
    device_id: int
    files: dict[str, Path]
    providers: dict[str, list[ProviderEntry]]
    limits: EngineLimits | None = None
    engines: EngineSet | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


def plan(
    bundle: Bundle,
    provider: str | None = None,
    *,
    provider_options: Mapping[str, Any] | None = None,
    device_id: int = 0,
    limits: EngineLimits | None = None,
    legacy_providers: Sequence[str] | None = None,
    verify_hashes: bool | str = True,
) -> ProviderPlan:
    """The :class:`ProviderPlan` for ``bundle``: the provider asked for (``provider``, else
    ``$GMNER_PROVIDER``, else "auto"), checked against what onnxruntime offers here.

    ``limits`` sets the TensorRT profiles of the ONNX graphs (default
    :func:`gmner_rt.tensorrt.default_limits`); prebuilt engines bring their own. The files of
    the engine set chosen are checked here (sizes, and sha256 with ``verify_hashes``); a set
    whose files are missing or changed is not used, with the reason in ``notes``.
    """
    ort = prov.onnxruntime()
    if not isinstance(device_id, int) or isinstance(device_id, bool) or device_id < 0:
        raise BackendError(f"device_id: expected a non-negative integer, got {device_id!r}")
    available = ort.get_available_providers()
    options = prov.string_options(provider_options, source="provider_options")
    if legacy_providers is not None:
        warnings.warn(
            "gmner_rt.load(providers=[...]) is deprecated; pass provider='cpu'|'cuda'|"
            "'tensorrt'|'auto' (and provider_options=, device_id=)",
            DeprecationWarning,
            stacklevel=3,
        )
        if provider is not None:
            raise BackendError("providers: give provider= or the deprecated providers=, not both")
        name = prov.legacy_providers(legacy_providers, available)
    else:
        name = prov.requested(provider)
    engines, notes = None, []
    if name in ("auto", "tensorrt") and bundle.manifest.engines:
        engines, refused = trt.match_engines(
            bundle.manifest.engines, cuda_device(device_id), tensorrt_version(), ort.__version__
        )
        notes += refused
    if engines is not None:
        engines = _usable(bundle, engines, verify_hashes, notes)
    chosen = prov.choose(name, available, engines_here=engines is not None)
    user = _route_options(options, name, chosen, notes)
    files = {g: bundle.file(spec.file) for g, spec in bundle.manifest.graphs.items()}
    cuda = {"device_id": str(device_id), **user["cuda"]}
    cpu: list[ProviderEntry] = [("CPUExecutionProvider", user["cpu"])] if user["cpu"] else []
    cpu = cpu or ["CPUExecutionProvider"]
    if chosen == "cpu":
        if device_id:
            log.warning("device_id %d unused: running on the CPU", device_id)
        if user["cpu"]:
            log.warning(
                "provider options %s go to onnxruntime's CPU provider, which ignores names it "
                "does not know",
                ", ".join(user["cpu"]),
            )
        return ProviderPlan("cpu", device_id, files, {g: cpu for g in files}, notes=tuple(notes))
    if chosen == "cuda":
        entry = ("CUDAExecutionProvider", cuda)
        return ProviderPlan(
            "cuda", device_id, files, {g: [entry, *cpu] for g in files}, notes=tuple(notes)
        )
    trt.check_option_names(user["tensorrt"], source="provider_options")
    fallback = ("CUDAExecutionProvider", cuda) if prov.ORT_NAMES["cuda"] in available else None
    tail = [fallback, *cpu] if fallback else cpu
    if engines is not None:
        files = {g: bundle.path / path for g, path in engines.graphs.items()}
        entry = ("TensorrtExecutionProvider", {"device_id": str(device_id), **user["tensorrt"]})
        notes.append(f"TensorRT engines {engines.name} ({engines.device_name})")
        return ProviderPlan(
            "tensorrt",
            device_id,
            files,
            {g: [entry, *tail] for g in files},
            limits=engines.limits,
            engines=engines,
            notes=tuple(notes),
        )
    limits = limits or trt.default_limits(bundle.manifest)
    cache = trt_cache_dir(bundle)
    settings = trt.TrtSettings(limits, device_id=device_id, cache_dir=cache)
    per_graph = trt.session_options(bundle.manifest, settings)
    notes.append(f"TensorRT builds engines for the ONNX graphs on first use, cached in {cache}")
    return ProviderPlan(
        "tensorrt",
        device_id,
        files,
        {
            g: [("TensorrtExecutionProvider", {**per_graph[g], **user["tensorrt"]}), *tail]
            for g in files
        },
        limits=limits,
        notes=tuple(notes),
    )


def _route_options(
    options: dict[str, str], asked: str, chosen: str, notes: list[str]
) -> dict[str, dict[str, str]]:
    """The user's provider options per provider entry. Asked for by name, they go to that
    provider; with "auto", ``trt_*`` options go to TensorRT and the others to CUDA (which is
    TensorRT's fallback too), so options written for CUDA keep working once engines exist."""
    out: dict[str, dict[str, str]] = {"cpu": {}, "cuda": {}, "tensorrt": {}}
    if asked != "auto":
        out[asked] = dict(options)
        return out
    out["tensorrt"] = {k: v for k, v in options.items() if k.startswith("trt_")}
    out["cuda"] = {k: v for k, v in options.items() if not k.startswith("trt_")}
    if chosen == "cpu" and options:
        notes.append(f"provider options {', '.join(options)} unused: auto chose the CPU")
    if chosen == "cuda" and out["tensorrt"]:
        notes.append(f"provider options {', '.join(out['tensorrt'])} unused: auto chose CUDA")
    return out


def _usable(bundle: Bundle, engines: EngineSet, verify_hashes: bool, notes: list[str]):
    """``engines`` when its files are all there and unchanged, else None (with the reason)."""
    try:
        verify_engine_set(bundle, engines, verify_hashes=verify_hashes)
    except BundleError as exc:
        notes.append(f"engines {engines.name} not used: {exc}")
        log.warning("engines %s not used: %s", engines.name, exc)
        return None
    return engines


def trt_cache_dir(bundle: Bundle) -> Path:
    """Where the TensorRT EP caches engines built from the ONNX graphs, created: ``trt-cache``
    in the bundle when it is writable, else a folder per bundle under the user's cache
    (onnxruntime creates only the last level of a cache path itself)."""
    if os.access(bundle.path, os.W_OK):
        cache = bundle.path / "trt-cache"
    else:
        digest = hashlib.sha256(
            "".join(f"{n}:{e.sha256}" for n, e in sorted(bundle.manifest.files.items())).encode()
        ).hexdigest()[:16]
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        cache = root / "gmner" / "trt" / digest
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BackendError(
            f"TensorRT engine cache {cache}: cannot create it ({exc.strerror}); set "
            "XDG_CACHE_HOME to a writable folder or pass provider_options "
            "trt_engine_cache_path=DIR"
        ) from None
    return cache


@dataclass(frozen=True)
class KvLayout:
    """Shape facts of the decoder's KV cache."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: np.dtype


def session(
    path: Path, providers: Sequence[ProviderEntry] | None = None, threads: int | None = None
):
    """An onnxruntime session for one graph file, with the options every backend uses
    (``threads`` intra-op threads and one inter-op thread, all graph optimizations, node
    placement recorded) on ``providers`` (default: the CPU). When onnxruntime could not start
    the first provider asked for (it then falls back to the CPU with only a printed warning),
    this raises instead."""
    ort = prov.onnxruntime()
    if not path.is_file():
        raise BackendError(f"{path}: graph file missing")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry(_RECORD_PLACEMENT, "1")
    entries = list(providers or ["CPUExecutionProvider"])
    try:
        sess = ort.InferenceSession(str(path), options, providers=entries)
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise BackendError(f"{path}: onnxruntime could not load it ({exc})") from exc
    wanted = entries[0] if isinstance(entries[0], str) else entries[0][0]
    if wanted not in sess.get_providers():
        raise BackendError(
            f"{path}: onnxruntime could not start {wanted} and fell back to "
            f"{', '.join(sess.get_providers())}; its log above says why (often a missing CUDA, "
            "cuDNN or TensorRT library)"
        )
    return sess


def _subgraphs(sess) -> list | None:
    if not hasattr(sess, "get_provider_graph_assignment_info"):  # onnxruntime < 1.23
        return None
    try:
        return list(sess.get_provider_graph_assignment_info())
    except Exception as exc:  # onnxruntime's untyped Fail: the session did not record it
        log.debug("no node placement recorded: %s", exc)
        return None


def placement(sess) -> dict[str, int] | None:
    """Nodes per execution provider in ``sess`` (None where this onnxruntime cannot say:
    before 1.23, or without the recording entry)."""
    subgraphs = _subgraphs(sess)
    if subgraphs is None:
        return None
    counts: dict[str, int] = {}
    for sub in subgraphs:
        counts[sub.ep_name] = counts.get(sub.ep_name, 0) + len(sub.get_nodes())
    return counts


def cpu_ops(sess) -> dict[str, int] | None:
    """Operator types placed on the CPU provider in ``sess``, with counts (None: unknown)."""
    subgraphs = _subgraphs(sess)
    if subgraphs is None:
        return None
    ops: dict[str, int] = {}
    for sub in subgraphs:
        if sub.ep_name == "CPUExecutionProvider":
            for node in sub.get_nodes():
                ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return ops


class OrtGraphs:
    """onnxruntime sessions for ``vision.onnx``, ``embedding.onnx`` and ``decoder.onnx``."""

    def __init__(
        self,
        files: Mapping[str, str | Path],
        kv: KvLayout,
        *,
        providers: Sequence[ProviderEntry] | Mapping[str, Sequence[ProviderEntry]] | None = None,
        threads: int | None = None,
        device_id: int = 0,
        limits: EngineLimits | None = None,
    ):
        def entries(graph: str):
            return providers.get(graph) if isinstance(providers, Mapping) else providers

        self.kv = kv
        self.limits = limits
        self.device_id = device_id
        self.vision = session(Path(files["vision"]), entries("vision"), threads)
        self.embedding = session(Path(files["embedding"]), entries("embedding"), threads)
        self.decoder = session(Path(files["decoder"]), entries("decoder"), threads)
        self._past_names = [
            f"past_{kind}_{layer}" for layer in range(kv.num_layers) for kind in ("key", "value")
        ]
        self._present_names = [o.name for o in self.decoder.get_outputs()][1:]
        #: whether the decoder returns the logits of several positions (``logits_index``,
        #: format version 2); a version-1 decoder returns the last position's only
        self.verifies_drafts = "logits_index" in {i.name for i in self.decoder.get_inputs()}
        self.device = "cuda" if self.decoder.get_providers()[0] in _GPU_PROVIDERS else "cpu"

    @classmethod
    def from_bundle(cls, bundle, plan: ProviderPlan | None = None, *, threads=None) -> OrtGraphs:
        """Sessions for a validated :class:`gmner_rt.bundle.Bundle` as ``plan`` says
        (default: the CPU)."""
        m = bundle.manifest
        kv = KvLayout(
            m.kv_cache.num_layers,
            m.kv_cache.num_kv_heads,
            m.kv_cache.head_dim,
            np.dtype(m.kv_cache.dtype),
        )
        threads = threads if threads is not None else _env_threads()
        if plan is None:
            files = {name: bundle.file(spec.file) for name, spec in m.graphs.items()}
            graphs = cls(files, kv, threads=threads)
        else:
            graphs = cls(
                plan.files,
                kv,
                providers=plan.providers,
                threads=threads,
                device_id=plan.device_id,
                limits=plan.limits,
            )
        graphs.check_io(bundle)
        return graphs

    def check_io(self, bundle) -> None:
        """Every graph's inputs and outputs are the ones the manifest declares (a decoder entry
        pointing at the vision graph fails here, at load, not at the first extract)."""
        for name, sess in self.sessions().items():
            spec = bundle.manifest.graphs[name]
            for kind, real, declared in (
                ("inputs", [t.name for t in sess.get_inputs()], [t.name for t in spec.inputs]),
                ("outputs", [t.name for t in sess.get_outputs()], [t.name for t in spec.outputs]),
            ):
                if set(real) != set(declared):
                    missing = sorted(set(declared) - set(real))[:5]
                    extra = sorted(set(real) - set(declared))[:5]
                    raise BundleError(
                        f"{bundle.path}: graphs.{name} ({spec.file}): its {kind} are not the "
                        f"manifest's (missing {missing}, not declared {extra}): the file is not "
                        f"the {name} graph this manifest describes"
                    )

    def sessions(self) -> dict[str, Any]:
        """Graph name -> its onnxruntime session."""
        return {"vision": self.vision, "embedding": self.embedding, "decoder": self.decoder}

    def providers(self) -> dict[str, list[str]]:
        """Graph name -> the providers its session holds, first = preferred."""
        return {name: s.get_providers() for name, s in self.sessions().items()}

    def placement(self) -> dict[str, dict[str, int] | None]:
        """Graph name -> nodes per execution provider (None where onnxruntime cannot say)."""
        return {name: placement(s) for name, s in self.sessions().items()}

    def cpu_ops(self) -> dict[str, dict[str, int] | None]:
        """Graph name -> operator types placed on the CPU, with counts (None: unknown)."""
        return {name: cpu_ops(s) for name, s in self.sessions().items()}

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
        logits, present = self.decode_last(inputs_embeds, attention_mask, position_ids, past, 1)
        return logits[:, -1, :], present

    def decode_last(
        self,
        inputs_embeds: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: Sequence[np.ndarray],
        last: int,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decoder call: ``(logits [B, last, vocab] of the last ``last`` positions, present
        cache)``; ``last > 1`` needs a decoder that :attr:`verifies_drafts`."""
        length = inputs_embeds.shape[1]
        if not 1 <= last <= length:
            raise BackendError(f"last: expected 1 <= last <= {length} (the call's length)")
        if last > 1 and not self.verifies_drafts:
            raise BackendError(
                "this decoder returns the last position's logits only (bundle format 1); "
                "re-export the bundle to verify drafted tokens"
            )
        binding = self.decoder.io_binding()
        if self.verifies_drafts:
            index = np.arange(length - last, length, dtype=np.int64)
            binding.bind_cpu_input("logits_index", index)
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
            binding.bind_output(name, self.device, self.device_id if self.device != "cpu" else 0)
        self.decoder.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy()[:, -last:, :], list(outputs[1:])

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
