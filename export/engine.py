"""``gmner export engine``: TensorRT engines for a bundle, built on the GPU that will run them.

The engines are built by onnxruntime's TensorRT execution provider, not by a TensorRT builder of
our own: for each graph a session is created with the optimization profiles derived from the
bundle (:mod:`gmner_rt.tensorrt`: batch, context, image tokens) and ``trt_dump_ep_context_model``,
which builds the engine and writes an EP-context model (``<graph>_ctx.onnx``) that points at it.
Embed mode 0 keeps each engine a file beside its EP-context model: a 3B decoder's engine is
several GB, past protobuf's 2 GB limit for an embedded attribute, and onnxruntime's docs
recommend mode 0 for load time. The engine cache path is relative to the EP-context model's
folder, as onnxruntime requires.

The set is built in a staging folder, checked (the EP-context models load and decode the same
greedy tokens as the ONNX graphs on the CPU, as far as the figures recorded say), moved to
``engines/<name>/`` in the bundle (the name carries the build profile:
``sm87-trt10.3.0-fp16-mb1-mc2048-mit1024``), and recorded in the manifest's ``engines``
section: GPU, compute capability, TensorRT and onnxruntime versions, limits, profiles, check.
The runtime uses a set only where those match (:func:`gmner_rt.tensorrt.match_engines`).

It runs on the device, needs onnxruntime-gpu with TensorRT, and never imports torch.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from gmner_rt import tensorrt as trt
from gmner_rt.bundle import (
    GRAPH_NAMES,
    Bundle,
    EngineLimits,
    EngineSet,
    engine_set_to_dict,
    file_entry,
    load_bundle,
    manifest_to_dict,
    write_manifest,
)
from gmner_rt.devices import CudaDevice, cuda_device, tensorrt_version
from gmner_rt.errors import BackendError, InputError
from gmner_rt.providers import choose, onnxruntime

log = logging.getLogger(__name__)

__all__ = ["EngineBuild", "build_engines", "build_options", "describe", "engine_plan"]

#: Where engine sets live in a bundle.
ENGINES_DIR = "engines"
#: Where the TensorRT timing cache is kept (reused by later builds; not part of a set).
TIMING_CACHE_DIR = "trt-cache"


@dataclass(frozen=True)
class EngineBuild:
    """What ``gmner export engine`` builds.

    Attributes:
        bundle: the bundle folder (an fp32 or fp16 bundle; quantized decoders have no
            TensorRT kernels).
        max_batch: pairs decoded together (``--max-batch``).
        max_context: prompt + image tokens + new tokens per row (``--max-context``; None:
            the image tokens, 512 for the prompt and the bundle's generation budget).
        max_image_tokens: merged image tokens per image (``--max-image-tokens``; None: all
            the bundle's ``max_pixels`` gives).
        device_id: the CUDA device to build on (``--device-id``).
        precision: TensorRT's kernels, "fp16" or "fp32" (``--precision``; None: fp16 for a
            float16 bundle, else fp32).
        replace: replace an engine set of the same name (``--replace``).
        check_tokens: greedy tokens decoded by the engines and by the ONNX graphs on the CPU
            to compare them (0: no check; ``--check-tokens``).
    """

    bundle: Path
    max_batch: int | None = None
    max_context: int | None = None
    max_image_tokens: int | None = None
    device_id: int = 0
    precision: str | None = None
    replace: bool = False
    check_tokens: int = 16

    def __post_init__(self) -> None:
        if self.precision not in (None, "fp16", "fp32"):
            raise InputError(f"--precision: expected fp16 or fp32, got {self.precision!r}")
        if self.device_id < 0:
            raise InputError(f"--device-id: expected >= 0, got {self.device_id}")
        if self.check_tokens < 0:
            raise InputError(f"--check-tokens: expected >= 0, got {self.check_tokens}")


@dataclass(frozen=True)
class EnginePlan:
    """The resolved build: limits, precision, the set's name and each graph's options."""

    limits: EngineLimits
    precision: str
    name: str
    options: dict[str, dict[str, str]]


def build_options(
    base: Mapping[str, str], graph: str, stage: Path, timing_cache: Path
) -> dict[str, str]:
    """TensorRT EP options that build ``graph``'s engine into ``stage`` and write its
    EP-context model there (``base``: device, precision and profiles)."""
    return {
        **base,
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": graph,  # relative to the EP-context model: onnxruntime's rule
        "trt_engine_cache_prefix": graph,
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(timing_cache),
        "trt_dump_ep_context_model": "True",
        "trt_ep_context_file_path": str(stage / f"{graph}_ctx.onnx"),
        "trt_ep_context_embed_mode": "0",
    }


def engine_plan(
    bundle: Bundle, config: EngineBuild, device: CudaDevice, tensorrt: str, stage: Path
) -> EnginePlan:
    """Limits, precision, name and the per-graph build options (no GPU needed)."""
    m = bundle.manifest
    if m.quantization is not None:
        raise InputError(
            f"{bundle.path}: its decoder is quantized ({m.quantization.scheme}, MatMulNBits), "
            "which TensorRT has no kernels for, and an engine must hold the whole graph; "
            "build engines from the fp16 bundle it was quantized from"
        )
    limits = trt.resolve_limits(
        m,
        max_batch=config.max_batch,
        max_context=config.max_context,
        max_image_tokens=config.max_image_tokens,
    )
    precision = config.precision or ("fp16" if m.model.dtype == "float16" else "fp32")
    settings = trt.TrtSettings(limits, device_id=device.index, fp16=precision == "fp16")
    base = trt.session_options(m, settings)
    timing = bundle.path / TIMING_CACHE_DIR
    options = {g: build_options(base[g], g, stage, timing) for g in GRAPH_NAMES}
    for graph, opts in options.items():
        trt.check_option_names(opts, source=f"engine options of {graph}")
    return EnginePlan(
        limits, precision, trt.engine_set_name(device, tensorrt, precision, limits), options
    )


def _default_session(path: Path, options: dict[str, str]):
    ort = onnxruntime()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    # Fail on any node TensorRT does not take, on every onnxruntime version (the placement
    # record above exists only from 1.23): an EP-context model must be TensorRT's alone.
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    return ort.InferenceSession(str(path), so, providers=[("TensorrtExecutionProvider", options)])


def _stage_files(stage: Path) -> list[Path]:
    return sorted(p for p in stage.rglob("*") if p.is_file())


def _build_graph(
    bundle: Bundle, graph: str, options: dict[str, str], stage: Path, session
) -> float:
    """Builds one graph's engine; returns the seconds it took."""
    from gmner_rt.backends.onnxruntime import placement

    source = bundle.file(bundle.manifest.graphs[graph].file)
    started = time.perf_counter()
    try:
        sess = session(source, options)
    except Exception as exc:  # onnxruntime's untyped errors: TensorRT's parser or builder
        raise BackendError(f"{graph}: TensorRT could not build its engine ({exc})") from exc
    seconds = time.perf_counter() - started
    counts = placement(sess) or {}
    outside = {ep: n for ep, n in counts.items() if ep != "TensorrtExecutionProvider"}
    if outside:
        raise BackendError(
            f"{graph}: TensorRT did not take the whole graph ({outside} nodes elsewhere); an "
            "engine set needs every node in TensorRT (gmner export trt-check lists why)"
        )
    ctx = Path(options["trt_ep_context_file_path"])
    if not ctx.is_file():
        found = ", ".join(str(p.relative_to(stage)) for p in _stage_files(stage)) or "nothing"
        raise BackendError(f"{graph}: onnxruntime wrote no EP-context model {ctx} (found {found})")
    log.info("%s: engine built in %.1f s", graph, seconds)
    return seconds


def check_engines(
    bundle: Bundle,
    files: Mapping[str, Path],
    providers,
    limits: EngineLimits,
    tokens: int,
    device_id: int = 0,
) -> dict:
    """Greedy tokens of a probe pair decoded by ``files`` on ``providers`` (device
    ``device_id``) and by the bundle's ONNX graphs on the CPU, both inside ``limits`` (the same
    image resize): how many agree before the first difference, and the seconds each took.
    Both are loaded at once: on an 8 GB board, build with ``--check-tokens 0``."""
    from PIL import Image

    from gmner_rt.backends.onnxruntime import OrtGraphs
    from gmner_rt.extractor import Extractor

    image = Image.new("RGB", (448, 336), (90, 140, 200))
    text = "Alice Smith visits the Louvre in Paris"
    cpu = OrtGraphs.from_bundle(bundle)
    cpu.limits = limits
    built = OrtGraphs(files, cpu.kv, providers=providers, limits=limits, device_id=device_id)
    out: dict = {"probe_tokens": tokens}
    ids = {}
    for label, graphs in (("cpu", cpu), ("engines", built)):
        started = time.perf_counter()
        result = Extractor(bundle, graphs).extract(
            image, text, think="on", constrained=False, max_new_tokens=tokens
        )
        out[f"{label}_seconds"] = round(time.perf_counter() - started, 4)
        ids[label] = result.token_ids
    agree = 0
    for a, b in zip(ids["cpu"], ids["engines"], strict=False):
        if a != b:
            break
        agree += 1
    out["agree_tokens"] = agree
    out["identical"] = ids["cpu"] == ids["engines"]
    return out


def build_engines(
    config: EngineBuild,
    *,
    session: Callable[[Path, dict[str, str]], object] | None = None,
    device: CudaDevice | None = None,
    tensorrt: str | None = None,
) -> Path:
    """Builds the engine set ``config`` asks for into ``config.bundle`` and records it in the
    manifest; returns the set's folder. ``session``, ``device`` and ``tensorrt`` replace
    onnxruntime's session, the CUDA device and TensorRT's version (tests)."""
    bundle = load_bundle(config.bundle)
    if session is None:
        choose("tensorrt", onnxruntime().get_available_providers())
        session = _default_session
    device = device or cuda_device(config.device_id)
    if device is None:
        raise BackendError(f"--device-id {config.device_id}: no CUDA device found (libcuda)")
    tensorrt = tensorrt or tensorrt_version()
    if tensorrt is None:
        raise BackendError("no TensorRT library (libnvinfer) found on this machine")
    root = bundle.path / ENGINES_DIR
    stage = root / f".build-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    plan = engine_plan(bundle, config, device, tensorrt, stage)
    final = root / plan.name
    if any(e.name == plan.name for e in bundle.manifest.engines) and not config.replace:
        raise InputError(f"{final}: an engine set of that name exists; pass --replace")
    stage.mkdir(parents=True)
    (bundle.path / TIMING_CACHE_DIR).mkdir(exist_ok=True)
    try:
        seconds = {g: _build_graph(bundle, g, plan.options[g], stage, session) for g in GRAPH_NAMES}
        check = {"build_seconds": {g: round(s, 2) for g, s in seconds.items()}}
        if config.check_tokens:
            files = {g: stage / f"{g}_ctx.onnx" for g in GRAPH_NAMES}
            entry = [("TensorrtExecutionProvider", {"device_id": str(device.index)})]
            providers = {g: entry for g in files}
            check |= check_engines(
                bundle, files, providers, plan.limits, config.check_tokens, device.index
            )
            if not check["identical"]:
                log.warning(
                    "engines and CPU graphs agree on %d of %d greedy tokens",
                    check["agree_tokens"],
                    config.check_tokens,
                )
        if final.exists():
            shutil.rmtree(final)
        os.replace(stage, final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _record(bundle, plan, device, tensorrt, final, check)
    log.info("engine set %s written to %s", plan.name, final)
    return final


def describe(config: EngineBuild) -> dict:
    """What :func:`build_engines` would build, without building (no GPU needed): limits,
    precision, the set's name (its device part from this machine, "sm?" without a GPU) and
    each graph's TensorRT EP options."""
    bundle = load_bundle(config.bundle, verify_hashes=False)
    device = cuda_device(config.device_id) or CudaDevice(config.device_id, "no CUDA device", "?")
    tensorrt = tensorrt_version() or "?"
    stage = bundle.path / ENGINES_DIR / "<staging>"
    plan = engine_plan(bundle, config, device, tensorrt, stage)
    return {
        "name": plan.name,
        "device": {"name": device.name, "compute_capability": device.compute_capability},
        "tensorrt": tensorrt,
        "precision": plan.precision,
        "limits": dataclasses.asdict(plan.limits),
        "options": plan.options,
    }


def _record(bundle: Bundle, plan: EnginePlan, device, tensorrt: str, final: Path, check) -> None:
    """The manifest with the set's files and its ``engines`` entry (replacing a namesake)."""
    m = bundle.manifest
    folder = f"{ENGINES_DIR}/{plan.name}"
    data = manifest_to_dict(m)
    data["files"] = {k: v for k, v in data["files"].items() if not k.startswith(folder + "/")}
    for path in _stage_files(final):
        data["files"][path.relative_to(bundle.path).as_posix()] = file_entry(path)
    entry = EngineSet(
        name=plan.name,
        dir=folder,
        device_name=device.name,
        compute_capability=device.compute_capability,
        tensorrt=tensorrt,
        onnxruntime=onnxruntime().__version__,
        precision=plan.precision,
        limits=plan.limits,
        graphs={g: f"{folder}/{g}_ctx.onnx" for g in GRAPH_NAMES},
        profiles=trt.profiles(m, plan.limits),
        created_utc=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        check=check,
    )
    others = [e for e in m.engines if e.name != plan.name]
    data["engines"] = [engine_set_to_dict(e) for e in (*others, entry)]
    write_manifest(bundle.path, data)  # validates first
    load_bundle(bundle.path)  # the runtime's reader accepts what we wrote
