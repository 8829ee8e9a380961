"""onnxruntime's TensorRT execution provider, configured from the bundle: profiles, caches,
and the choice of prebuilt engines.

TensorRT builds an engine for a range of input shapes, its optimization profile. Without one,
onnxruntime's TensorRT EP builds for the shapes it meets and builds again whenever an input
leaves them, which for a decoder whose past grows by a token per step means rebuilding while
it decodes. Here every dynamic input of each graph gets an explicit profile, derived from the
manifest's declared shapes and three limits (:class:`~gmner_rt.bundle.EngineLimits`: the batch,
the context = prompt + image tokens + new tokens, and the image tokens per image). The runtime
then keeps every request inside those limits (see :class:`gmner_rt.extractor.Extractor`).

Engines built ahead of time (``gmner export engine``) are stored as onnxruntime EP-context
models and described by the manifest's ``engines`` section; :func:`match_engines` picks one set
only when its GPU architecture, TensorRT and onnxruntime versions are this machine's, and says
why for every set it refuses.

This module computes shapes and option dictionaries only: it creates no session (the backend
does) and reads devices through :mod:`gmner_rt.devices`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .bundle import EngineLimits, EngineSet, GraphSpec, Manifest, ShapeRange
from .devices import CudaDevice
from .errors import BackendError, BundleError, InputError

__all__ = ["DIM_NAMES", "TRT_OPTION_NAMES", "TrtSettings", "default_limits", "dim_ranges"]
__all__ += ["engine_set_name", "graph_profile", "image_token_cap", "match_engines"]
__all__ += ["cache_prefix", "max_windows", "profile_options", "profiles", "resolve_limits"]
__all__ += ["session_options"]

#: Provider option names of onnxruntime's TensorRT EP, as its documentation and
#: ``tensorrt_execution_provider_info.cc`` name them (onnxruntime 1.19 to 1.32). Every option
#: gmner writes is one of these (tested), and user options are checked against them.
TRT_OPTION_NAMES = frozenset(
    {
        "device_id", "has_user_compute_stream", "user_compute_stream",
        "trt_max_partition_iterations", "trt_min_subgraph_size", "trt_max_workspace_size",
        "trt_fp16_enable", "trt_bf16_enable", "trt_int8_enable", "trt_int8_calibration_table_name",
        "trt_int8_use_native_calibration_table", "trt_dla_enable", "trt_dla_core",
        "trt_dump_subgraphs", "trt_engine_cache_enable", "trt_engine_cache_path",
        "trt_weight_stripped_engine_enable", "trt_onnx_model_folder_path",
        "trt_engine_cache_prefix", "trt_engine_decryption_enable",
        "trt_engine_decryption_lib_path", "trt_force_sequential_engine_build",
        "trt_context_memory_sharing_enable", "trt_layer_norm_fp32_fallback",
        "trt_timing_cache_enable", "trt_timing_cache_path", "trt_force_timing_cache",
        "trt_detailed_build_log", "trt_build_heuristics_enable", "trt_sparsity_enable",
        "trt_builder_optimization_level", "trt_auxiliary_streams", "trt_tactic_sources",
        "trt_extra_plugin_lib_paths", "trt_profile_min_shapes", "trt_profile_max_shapes",
        "trt_profile_opt_shapes", "trt_cuda_graph_enable", "trt_dump_ep_context_model",
        "trt_ep_context_file_path", "trt_ep_context_embed_mode", "trt_engine_hw_compatible",
        "trt_onnx_bytestream", "trt_onnx_bytestream_size", "trt_op_types_to_exclude",
    }
)  # fmt: skip

#: The symbolic dimensions the exporter writes; any other name has no profile rule.
DIM_NAMES = ("batch", "sequence", "past_sequence", "total_sequence", "num_patches")
DIM_NAMES += ("num_groups", "num_images_plus_1", "num_windows_plus_1", "num_logits")
#: The most positions whose logits one decoder call returns (a verified draft and the token
#: before it; :class:`gmner_rt.speculate.SpeculationSettings` drafts at most 15).
MAX_LOGITS = 16
#: Prompt + instruction + tweet tokens the default context allows beside image and new tokens.
PROMPT_ALLOWANCE = 512


@dataclass(frozen=True)
class TrtSettings:
    """How the TensorRT EP builds and caches engines for the ONNX graphs.

    Attributes:
        limits: the shape limits of the profiles (batch, context, image tokens).
        device_id: the CUDA device.
        fp16: let TensorRT pick fp16 kernels (default: when the bundle is fp16).
        cache_dir: where engines and the timing cache are cached (built on first use).
    """

    limits: EngineLimits
    device_id: int = 0
    fp16: bool | None = None
    cache_dir: Path | None = None


def image_token_cap(manifest: Manifest) -> int:
    """Merged image tokens of the largest image the bundle's ``max_pixels`` admits (or its
    ``model.vision.max_image_tokens``, if lower)."""
    vision, pixels = manifest.model.vision, manifest.image_processor["max_pixels"]
    cap = max(1, pixels // (vision.patch_size * vision.spatial_merge_size) ** 2)
    return min(cap, vision.max_image_tokens) if vision.max_image_tokens else cap


def default_limits(manifest: Manifest) -> EngineLimits:
    """Batch 1; every image token the bundle allows; a context of those, the prompt allowance
    and the bundle's default generation budget, rounded up to a multiple of 64."""
    tokens = image_token_cap(manifest)
    context = tokens + PROMPT_ALLOWANCE + manifest.generation.default_max_new_tokens
    return EngineLimits(max_batch=1, max_context=-(-context // 64) * 64, max_image_tokens=tokens)


def resolve_limits(
    manifest: Manifest,
    *,
    max_batch: int | None = None,
    max_context: int | None = None,
    max_image_tokens: int | None = None,
) -> EngineLimits:
    """The limits asked for (None: :func:`default_limits`'), checked; errors name the flag."""
    base = default_limits(manifest)
    cap = image_token_cap(manifest)
    for flag, value in (
        ("--max-batch", max_batch),
        ("--max-context", max_context),
        ("--max-image-tokens", max_image_tokens),
    ):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise InputError(f"{flag}: expected a positive integer, got {value!r}")
    tokens = base.max_image_tokens if max_image_tokens is None else max_image_tokens
    if tokens > cap:
        raise InputError(
            f"--max-image-tokens: {tokens} is more than the bundle's images can give ({cap}: its "
            "max_pixels); re-export with a larger --max-image-tokens to raise it"
        )
    if max_context is None:
        context = tokens + PROMPT_ALLOWANCE + manifest.generation.default_max_new_tokens
        max_context = -(-context // 64) * 64
    if max_context <= tokens:
        raise InputError(
            f"--max-context: {max_context} leaves no room for text beside {tokens} image tokens"
        )
    return EngineLimits(
        max_batch=base.max_batch if max_batch is None else max_batch,
        max_context=max_context,
        max_image_tokens=tokens,
    )


def max_windows(tokens: int, window: int) -> int:
    """The most attention windows an image of at most ``tokens`` merged tokens has: windows
    of ``window`` x ``window`` merged tokens over an ``h`` x ``w`` grid, ``h * w <= tokens``."""
    return max(
        math.ceil(h / window) * math.ceil((tokens // h) / window) for h in range(1, tokens + 1)
    )


def _square_windows(tokens: int, window: int) -> int:
    side = max(1, math.isqrt(tokens))
    return math.ceil(side / window) * math.ceil((tokens // side) / window)


def dim_ranges(manifest: Manifest, limits: EngineLimits) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of every symbolic dimension under ``limits``. Opt is the decode step
    (batch 1, one new token, half the context cached) and one image of the most tokens."""
    vision = manifest.model.vision
    merge2 = vision.spatial_merge_size**2
    window = max(1, vision.window_size // vision.spatial_merge_size // vision.patch_size)
    b, ctx, tokens = limits.max_batch, limits.max_context, limits.max_image_tokens
    half = ctx // 2
    return {
        "batch": (1, 1, b),
        "sequence": (1, 1, ctx),
        "past_sequence": (0, half, ctx - 1),
        "total_sequence": (1, half + 1, ctx),
        "num_patches": (merge2, tokens * merge2, b * tokens * merge2),
        "num_groups": (1, tokens, b * tokens),
        "num_images_plus_1": (2, 2, b + 1),
        "num_logits": (1, 1, min(MAX_LOGITS, ctx)),
        "num_windows_plus_1": (
            2,
            _square_windows(tokens, window) + 1,
            b * max_windows(tokens, window) + 1,
        ),
    }


def graph_profile(
    name: str, spec: GraphSpec, ranges: Mapping[str, tuple[int, int, int]]
) -> dict[str, ShapeRange]:
    """The profile of every input of ``spec`` with a symbolic dimension."""
    profile = {}
    for tensor in spec.inputs:
        if all(isinstance(d, int) for d in tensor.shape):
            continue
        rows: list[list[int]] = [[], [], []]
        for dim in tensor.shape:
            if isinstance(dim, int):
                bounds = (dim, dim, dim)
            elif dim in ranges:
                bounds = ranges[dim]
            else:
                raise BundleError(
                    f"graphs.{name}.inputs {tensor.name}: dimension {dim!r} has no TensorRT "
                    f"profile rule (known: {', '.join(DIM_NAMES)})"
                )
            for row, value in zip(rows, bounds, strict=True):
                row.append(value)
        profile[tensor.name] = ShapeRange(*(tuple(r) for r in rows))
    return profile


def profiles(manifest: Manifest, limits: EngineLimits) -> dict[str, dict[str, ShapeRange]]:
    """Per graph, the profile of its dynamic inputs under ``limits``."""
    ranges = dim_ranges(manifest, limits)
    return {name: graph_profile(name, spec, ranges) for name, spec in manifest.graphs.items()}


def profile_options(profile: Mapping[str, ShapeRange]) -> dict[str, str]:
    """``trt_profile_{min,opt,max}_shapes`` for one profile: "name:1x2x3,other:4x5"."""

    def shapes(pick) -> str:
        return ",".join(f"{n}:{'x'.join(map(str, pick(r)))}" for n, r in profile.items())

    return {
        "trt_profile_min_shapes": shapes(lambda r: r.min),
        "trt_profile_opt_shapes": shapes(lambda r: r.opt),
        "trt_profile_max_shapes": shapes(lambda r: r.max),
    }


def check_option_names(options: Mapping[str, str], *, source: str) -> None:
    """Every name must be a TensorRT EP option (a typo would otherwise fail deep inside)."""
    unknown = sorted(set(options) - TRT_OPTION_NAMES)
    if unknown:
        raise BackendError(
            f"{source}: not TensorRT execution provider options: {', '.join(unknown)} "
            "(see onnxruntime's TensorRT-ExecutionProvider page)"
        )


def session_options(manifest: Manifest, settings: TrtSettings) -> dict[str, dict[str, str]]:
    """Per graph, the TensorRT EP options for the ONNX graphs: device, precision, profiles,
    engine and timing caches (engines built on first use, then loaded from the cache)."""
    fp16 = manifest.model.dtype == "float16" if settings.fp16 is None else settings.fp16
    common = {"device_id": str(settings.device_id), "trt_fp16_enable": str(fp16)}
    if settings.cache_dir is not None:
        cache = str(settings.cache_dir)
        common |= {
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": cache,
            "trt_timing_cache_enable": "True",
            "trt_timing_cache_path": cache,
        }
    out = {}
    for name, profile in profiles(manifest, settings.limits).items():
        options = {**common, **profile_options(profile)}
        if settings.cache_dir is not None:
            options["trt_engine_cache_prefix"] = cache_prefix(manifest, name, settings.limits, fp16)
        out[name] = options
    return out


def cache_prefix(manifest: Manifest, graph: str, limits: EngineLimits, fp16: bool) -> str:
    """The cached engines' name prefix: the graph, a digest of its files' sha256, the limits
    and the precision. onnxruntime names cached engines by the graph's structure and file name
    only, so without this a re-exported bundle (new weights, same structure) or other limits
    would load stale engines from the cache."""
    spec = manifest.graphs[graph]
    hashes = [manifest.files[f].sha256 for f in (spec.file, spec.data_file) if f is not None]
    digest = hashlib.sha256("".join(hashes).encode()).hexdigest()[:12]
    precision = "fp16" if fp16 else "fp32"
    return (
        f"{graph}-{digest}-{precision}-mb{limits.max_batch}-mc{limits.max_context}"
        f"-mit{limits.max_image_tokens}"
    )


def engine_set_name(device: CudaDevice, tensorrt: str, precision: str, limits: EngineLimits) -> str:
    """A folder name that carries the build profile: sm87-trt10.3.0-fp16-mb1-mc2048-mit1024."""
    return (
        f"{device.sm}-trt{tensorrt}-{precision}-mb{limits.max_batch}"
        f"-mc{limits.max_context}-mit{limits.max_image_tokens}"
    )


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def refusal(
    engine: EngineSet, device: CudaDevice | None, tensorrt: str | None, onnxruntime: str
) -> str | None:
    """Why ``engine`` cannot run here, or None when it can."""
    if device is None:
        return "no CUDA device was found"
    if engine.compute_capability != device.compute_capability:
        return (
            f"built for compute capability {engine.compute_capability} ({engine.device_name}), "
            f"this GPU is {device.compute_capability} ({device.name})"
        )
    if tensorrt is None:
        return "no TensorRT library (libnvinfer) was found"
    if engine.tensorrt != tensorrt:
        return f"built with TensorRT {engine.tensorrt}, this machine has {tensorrt}"
    if _minor(engine.onnxruntime) != _minor(onnxruntime):
        return f"built with onnxruntime {engine.onnxruntime}, this one is {onnxruntime}"
    return None


def match_engines(
    engines: Sequence[EngineSet],
    device: CudaDevice | None,
    tensorrt: str | None,
    onnxruntime: str,
) -> tuple[EngineSet | None, list[str]]:
    """The first engine set that can run here, and why each earlier one cannot."""
    reasons = []
    for engine in engines:
        why = refusal(engine, device, tensorrt, onnxruntime)
        if why is None:
            return engine, reasons
        reasons.append(f"engines {engine.name}: {why}")
    return None, reasons
