"""``gmner bench``: gmner_rt side by side with the tools users would pick instead.

    gmner bench --preset bench-small --json out/bench/bench-small.json --plot docs/images/x.png
    gmner bench --bundle B --model M --systems gmner_rt,hf
    gmner bench --preset bench-small --systems gmner_rt,hf,gmner_rt:int8,gmner_rt:int4,ortgenai:int4
    gmner bench --preset bench-small --provider cuda --dtype fp16 --systems gmner_rt,hf
    gmner bench speculation --preset bench-small --limit 3   (:mod:`.speculation`'s comparison)

For one bundle and its source checkpoint (or a ``--preset``, which builds, caches and exports
that random-weight model itself), every system runs in a child process of its own
(:mod:`gmner.bench.workers`) on the same fixed image/text pairs, threads and greedy
tokens, one after another so none competes for the cores. This module then checks that every
system generated the same ids as gmner_rt (the bench fails when they differ: the systems did
different work), measures the machine's memory bandwidth with a large fp32 matrix-vector
product on all cores, and reports, per system: time to first token (preprocess + vision +
prefill), decode tokens/s at batch 1 and at ``--batch``, end-to-end ``extract`` latency
(median, p90), peak resident memory, and each as a ratio to gmner_rt measured in the same run
(``> 1``: gmner_rt is better), plus the decode roofline: bytes of weights (and KV cache) read
per token over the bandwidth. It writes a table to stdout, ``--json`` and a per-token latency
plot (``--plot``, needs matplotlib). It knows nothing about how a system decodes.

Separate processes minutes apart see different memory bandwidth on a shared machine, so the
decode ratio to onnxruntime-genai is also measured paired: both decoders in one process,
stepped in turn (:func:`gmner.bench.workers.run_paired`), for fp32 and for each
quantized variant both systems run.

With ``--provider cuda`` (or ``tensorrt``), gmner_rt runs on that onnxruntime provider and
hf on the same GPU (torch), and the roofline uses the GPU's bandwidth: measured by a
matrix-vector product on the CUDA provider, or, where that cannot run, the data-sheet figure
(``bandwidth_source`` says which).

Quantized variants (``gmner_rt:int8``, ``gmner_rt:int4``: the bundle quantized by ``gmner
export quantize``, cached; ``ortgenai:int4``: the builder at that precision) decode other
logits, so their ids are not held to gmner_rt's; the report gives how many greedy tokens they
share with the fp ones before the first difference, their decoder size and their roofline.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from gmner_rt.errors import GmnerError, InputError

from .bandwidth import (  # noqa: F401 (measure_bandwidth: re-exported)
    BandwidthProbe,
    GpuBandwidthProbe,
    measure_bandwidth,
    spec_bandwidth,
)
from .workers import SYSTEMS, WorkerSpec, decoder_bytes, kv_cache_bytes  # noqa: F401 (WorkerSpec: re-exported)

log = logging.getLogger(__name__)

__all__ = [
    "BenchConfig",
    "BenchError",
    "first_difference",
    "measure_bandwidth",
    "prepare_preset",
    "run_bench",
]

PRESETS = ("tiny", "bench-small")
#: Providers gmner_rt can be benched on (hf follows it to the GPU).
BENCH_PROVIDERS = ("cpu", "cuda", "tensorrt")
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gmner" / "bench"
#: Which figures a ratio compares, and whether more is better.
RATIO_FIGURES = {
    "ttft_ms": False,
    "decode_tokens_per_s": True,
    "ttft_ms_batch": False,
    "decode_tokens_per_s_batch": True,
    "e2e_ms_median": False,
    "e2e_ms_p90": False,
    "peak_rss_mb": False,
}
#: Files whose content decides whether a cached preset export is still current.
_PRESET_SOURCES = ("train/tiny_model.py", "export/graphs.py", "export/onnx_export.py")


#: Quantized variants a system may be run as (``gmner_rt:int4``: the bundle quantized by
#: ``gmner export quantize``; ``ortgenai:int4``: onnxruntime-genai's builder at that precision).
VARIANTS = ("int8", "int4")
_VARIANT_SYSTEMS = ("gmner_rt", "ortgenai")


def split_system(name: str) -> tuple[str, str | None]:
    """``"gmner_rt:int4"`` -> ``("gmner_rt", "int4")``; ``"hf"`` -> ``("hf", None)``."""
    base, _, variant = name.partition(":")
    return base, variant or None


def _known_system(name: str) -> bool:
    base, variant = split_system(name)
    if variant is None:
        return base in SYSTEMS
    return base in _VARIANT_SYSTEMS and variant in VARIANTS


class BenchError(GmnerError):
    """A bench that cannot be run, or whose systems did different work."""


@dataclass(frozen=True)
class BenchConfig:
    """What ``gmner bench`` measures.

    Attributes:
        bundle: the exported bundle (None with ``preset``).
        model: its source checkpoint (hf and ortgenai need it; None with ``preset``).
        preset: build, cache and export this random-weight model (``tiny`` or ``bench-small``).
        systems: the systems to run; ``gmner_rt`` is always first (the reference).
        threads: intra-op threads for every system.
        new_tokens: greedy tokens per request (eos suppressed: exactly this many).
        repeats: measured repeats after ``warmup`` unmeasured runs.
        warmup: unmeasured runs first.
        rounds: every system's worker runs this many times, the systems taking turns
            (A B C A B C ...), and each figure is the median over the rounds: on a shared
            machine whose memory bandwidth drifts, this keeps the drift out of the ratios.
        pairs: bench pairs the batch-1 figures run over.
        batch: batch size of the batched figures (0 or 1: none).
        cache: where presets and built peer models are cached.
        bandwidth_mb: size of the matrix of the bandwidth measurement (0: skip it).
        timeout_s: the limit per system.
        provider: gmner_rt's execution provider: "cpu", "cuda" or "tensorrt" (hf then runs
            on the same GPU).
        device_id: the CUDA device.
        dtype: the precision a ``preset`` is exported in ("fp32" or "fp16").
    """

    bundle: Path | None = None
    model: Path | None = None
    preset: str | None = None
    systems: tuple[str, ...] = ("gmner_rt", "hf", "ortgenai", "ortgenai_text")
    threads: int = os.cpu_count() or 1
    new_tokens: int = 64
    repeats: int = 3
    warmup: int = 1
    rounds: int = 2
    pairs: int = 2
    batch: int = 4
    cache: Path = DEFAULT_CACHE
    bandwidth_mb: int = 1024
    timeout_s: float = 3600.0
    provider: str = "cpu"
    device_id: int = 0
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        if self.provider not in BENCH_PROVIDERS:
            raise InputError(
                f"--provider: expected one of {', '.join(BENCH_PROVIDERS)}, got {self.provider!r}"
            )
        if self.dtype not in ("fp32", "fp16"):
            raise InputError(f"--dtype: expected fp32 or fp16, got {self.dtype!r}")
        if self.dtype != "fp32" and self.preset is None:
            raise InputError("--dtype: applies to --preset (a --bundle has its own precision)")
        cpu_only = [s for s in self.systems if s.startswith("ortgenai")]
        if self.provider != "cpu" and cpu_only:
            raise InputError(
                f"--systems: {', '.join(cpu_only)} run on the CPU only in this bench "
                "(onnxruntime-genai's CUDA build is another package); drop them with "
                f"--provider {self.provider}"
            )
        if self.preset is not None and self.preset not in PRESETS:
            raise InputError(f"--preset: expected one of {PRESETS}, got {self.preset!r}")
        if (self.preset is None) == (self.bundle is None):
            raise InputError("--bundle / --preset: give exactly one of them")
        if self.preset is not None and self.model is not None:
            raise InputError("--model: not with --preset (the preset builds its own checkpoint)")
        unknown = [s for s in self.systems if not _known_system(s)]
        if unknown or not self.systems or self.systems[0] != "gmner_rt":
            raise InputError(
                f"--systems: expected gmner_rt first, then any of {SYSTEMS[1:]}, or "
                f"gmner_rt / ortgenai with a quantized variant ({', '.join(VARIANTS)}: "
                f"e.g. gmner_rt:int4), got {','.join(self.systems)}"
            )
        if len(set(self.systems)) != len(self.systems):
            raise InputError(f"--systems: a system is named twice in {','.join(self.systems)}")
        for flag, value, low in (
            ("--threads", self.threads, 1),
            ("--new-tokens", self.new_tokens, 2),
            ("--repeats", self.repeats, 1),
            ("--warmup", self.warmup, 0),
            ("--rounds", self.rounds, 1),
            ("--pairs", self.pairs, 1),
            ("--batch", self.batch, 0),
            ("--bandwidth-mb", self.bandwidth_mb, 0),
        ):
            if value < low:
                raise InputError(f"{flag}: must be >= {low}, got {value}")
        needs_model = [s for s in self.systems if not s.startswith("gmner_rt")]
        if needs_model and self.preset is None and self.model is None:
            raise InputError(f"--model: the systems {needs_model} need the source checkpoint")


# --- the model under test ----------------------------------------------------------------------


def _sources_digest() -> str:
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for name in _PRESET_SOURCES:
        path = root / name
        digest.update(path.read_bytes() if path.is_file() else name.encode())
    return digest.hexdigest()[:16]


def prepare_preset(name: str, cache: Path, dtype: str = "fp32") -> tuple[Path, Path]:
    """``(checkpoint, bundle)`` of preset ``name``, built and exported (in ``dtype``) once per
    source digest."""
    from gmner.export.build import BundleOptions, export_bundle
    from gmner.export.onnx_export import ExportSettings
    from gmner.train.tiny_model import build_tiny_model

    home = cache / f"{name}-{_sources_digest()}"
    model = home / "model"
    bundle = home / ("bundle" if dtype == "fp32" else f"bundle-{dtype}")
    if (bundle / "manifest.json").is_file():
        log.info("preset %s: cached at %s", name, home)
        return model, bundle
    started = time.perf_counter()
    home.mkdir(parents=True, exist_ok=True)
    if not (model / "config.json").is_file():
        build_tiny_model(model, preset=name, seed=0)
    settings = ExportSettings(dtype={"fp32": "float32", "fp16": "float16"}[dtype])
    export_bundle(
        BundleOptions(
            model=model, adapter=None, out=bundle, name=f"{name}-bench", settings=settings
        )
    )
    log.info("preset %s: built and exported in %.1f s", name, time.perf_counter() - started)
    return model, bundle


def prepare_quantized(bundle: Path, scheme: str, cache: Path) -> Path:
    """``bundle`` with its decoder quantized to ``scheme`` (``gmner export quantize``'s
    defaults), made once per source manifest."""
    from gmner.export.quantize import QuantSettings
    from gmner.export.quantized_bundle import quantize_bundle

    digest = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()[:16]
    out = cache / "quantized" / f"{digest}-{scheme}"
    if (out / "manifest.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    quantize_bundle(bundle, out, QuantSettings(scheme))
    log.info("quantized %s to %s in %.1f s", bundle, scheme, time.perf_counter() - started)
    return out


# --- the machine -------------------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_facts(threads: int, provider: str = "cpu", device_id: int = 0) -> dict:
    """The machine (its GPU when the provider is one) and the versions the figures were taken
    with."""
    import importlib.metadata

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    gpu = None
    if provider != "cpu":
        from gmner_rt.devices import cuda_device, tensorrt_version

        device = cuda_device(device_id)
        gpu = {
            "name": device.name if device else None,
            "compute_capability": device.compute_capability if device else None,
            "tensorrt": tensorrt_version(),
        }
    return {
        "cpu": _cpu_name(),
        "gpu": gpu,
        "provider": provider,
        "cores": os.cpu_count(),
        "memory_gb": _memory_gb(),
        "threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            name: version(name)
            for name in (
                "gmner",
                "onnxruntime",
                "onnxruntime-gpu",
                "onnxruntime-genai",
                "torch",
                "transformers",
                "numpy",
            )
        },
    }


# --- the roofline ------------------------------------------------------------------------------


def decoder_weight_bytes(bundle_dir: Path) -> int:
    """Bytes of the decoder graph's weights (file plus external data): what one decode step
    reads from memory once (the embedding table is read one row per token, so it is left out)."""
    from gmner_rt.bundle import load_bundle

    return decoder_bytes(load_bundle(bundle_dir, verify_hashes=False))


def kv_bytes_per_token(bundle_dir: Path, context: int) -> int:
    """Bytes of KV cache one decode step reads at ``context`` cached positions."""
    from gmner_rt.bundle import load_bundle

    return kv_cache_bytes(load_bundle(bundle_dir, verify_hashes=False).manifest.kv_cache, context)


def roofline(bandwidth_gb_s: float, weights: int, kv: int, decode_tokens_per_s: float) -> dict:
    per_token = weights + kv
    ceiling = bandwidth_gb_s * 1e9 / per_token
    return {
        "bandwidth_gb_s": bandwidth_gb_s,
        "bytes_per_token": per_token,
        "weight_bytes": weights,
        "kv_bytes_at_mean_context": kv,
        "decode_tokens_per_s": ceiling,
        "gmner_rt_fraction": decode_tokens_per_s / ceiling,
    }


# --- running the systems -----------------------------------------------------------------------


def _run_system(spec: WorkerSpec, timeout_s: float) -> dict:
    """One worker process; its figures, or a BenchError with the tail of what it said."""
    with tempfile.TemporaryDirectory(prefix="gmner-bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(asdict(spec)))
        command = [
            sys.executable,
            "-m",
            "gmner.bench.workers",
            str(spec_path),
            str(out_path),
        ]
        log.info("running %s", spec.system)
        started = time.perf_counter()
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"{spec.system}: did not finish within {timeout_s:.0f} s") from exc
        if proc.returncode != 0 or not out_path.is_file():
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise BenchError(f"{spec.system}: the worker failed (exit {proc.returncode}):\n{tail}")
        log.info("%s: done in %.1f s", spec.system, time.perf_counter() - started)
        return json.loads(out_path.read_text())


def merge_rounds(runs: list[dict]) -> dict:
    """One system's figures over interleaved rounds: the median of each figure (the peak
    memory's maximum), per-token latencies position by position; the ids of every round must
    be the same (greedy decoding of the same prompts is deterministic)."""
    if len(runs) == 1:
        return runs[0]
    merged = dict(runs[0])
    for key in (*RATIO_FIGURES, "load_s", "bandwidth_gb_s", "roofline_fraction"):
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            merged[key] = max(values) if key == "peak_rss_mb" else float(np.median(values))
    if runs[0].get("token_ms"):
        width = min(len(r["token_ms"]) for r in runs)
        merged["token_ms"] = [
            float(np.median([r["token_ms"][i] for r in runs])) for i in range(width)
        ]
    if runs[0].get("text_only"):
        merged["text_only"] = dict(runs[0]["text_only"])
        for key in ("ttft_ms", "decode_tokens_per_s"):
            merged["text_only"][key] = float(np.median([r["text_only"][key] for r in runs]))
    for key in ("tokens", "tokens_batch", "tokens_e2e"):
        if any(r[key] != runs[0][key] for r in runs):
            raise BenchError(f"{runs[0]['system']}: {key} differ between rounds")
    merged["rounds"] = {
        key: [r.get(key) for r in runs]
        for key in (*RATIO_FIGURES, "bandwidth_gb_s", "roofline_fraction")
    }
    return merged


def first_difference(a: list[list[int]], b: list[list[int]]) -> str | None:
    """Where two systems' ids first differ (``"row R differs at token T (of N and M)"``),
    or None when they are equal."""
    if len(a) != len(b):
        return f"{len(a)} rows against {len(b)}"
    for row, (x, y) in enumerate(zip(a, b, strict=True)):
        if x != y:
            at = next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), None)
            at = min(len(x), len(y)) if at is None else at
            return f"row {row} differs at token {at} (of {len(x)} and {len(y)})"
    return None


def compare_tokens(results: dict[str, dict]) -> dict[str, dict[str, str | None]]:
    """Per system, per run kind, where its ids first differ from gmner_rt's (None: equal).
    Quantized variants compute other logits, so they are left to :func:`agreement`."""
    reference = results["gmner_rt"]
    report: dict[str, dict[str, str | None]] = {}
    for system, figures in results.items():
        if system == "gmner_rt" or split_system(system)[1] is not None:
            continue
        if system == "ortgenai_text":
            ours = (reference.get("text_only") or {}).get("tokens", [])
            report[system] = {"text_only": first_difference(ours, figures["text_only"]["tokens"])}
            continue
        report[system] = {
            kind: first_difference(reference[kind], figures[kind])
            for kind in ("tokens", "tokens_batch", "tokens_e2e")
            if reference[kind] or figures[kind]
        }
    return report


def _prefix(a: list[int], b: list[int]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def agreement(results: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Per quantized variant: greedy tokens agreeing with gmner_rt's fp ones before the first
    difference (mean and min over the batch-1 runs), out of ``new_tokens``."""
    reference = results["gmner_rt"]["tokens"]
    out = {}
    for system, figures in results.items():
        if split_system(system)[1] is None:
            continue
        lengths = [_prefix(a, b) for a, b in zip(reference, figures["tokens"], strict=True)]
        out[system] = {
            "greedy_prefix_mean": float(np.mean(lengths)),
            "greedy_prefix_min": int(min(lengths)),
            "tokens": len(reference[0]),
        }
    return out


def _public(figures: dict) -> dict:
    keys = (
        "load_s",
        *RATIO_FIGURES,
        "decoder_mb",
        "bandwidth_gb_s",
        "roofline_fraction",
        "token_ms",
        "text_only",
        "rounds",
        "notes",
    )
    out = {key: figures.get(key) for key in keys}
    if out["text_only"]:
        out["text_only"] = {k: v for k, v in out["text_only"].items() if k != "tokens"}
    return out


def ratios(systems: dict[str, dict]) -> dict[str, dict[str, float | None]]:
    """How many times better gmner_rt is than each system, per figure (> 1: gmner_rt wins)."""
    ours = systems["gmner_rt"]
    out: dict[str, dict[str, float | None]] = {}
    for name, theirs in systems.items():
        if name == "gmner_rt":
            continue
        row: dict[str, float | None] = {}
        figures = dict(RATIO_FIGURES)
        if name == "ortgenai_text":
            a, b = (ours.get("text_only") or {}), (theirs.get("text_only") or {})
            pairs = {"decode_tokens_per_s": (a, b, True), "ttft_ms": (a, b, False)}
        else:
            pairs = {key: (ours, theirs, more) for key, more in figures.items()}
        for key, (mine, other, more) in pairs.items():
            x, y = mine.get(key), other.get(key)
            row[key] = (x / y if more else y / x) if x and y else None
        out[name] = row
    return out


def run_bench(config: BenchConfig) -> dict:
    """Every system, the token check, the roofline: the report ``--json`` writes."""
    if config.provider != "cpu":
        _check_gpu(config)
    if config.preset is not None:
        model, bundle = prepare_preset(config.preset, config.cache, config.dtype)
        name = config.preset
    else:
        model, bundle = config.model, config.bundle
        name = str(bundle)
    bundles = {None: bundle}
    specs = {}
    for system in config.systems:
        base, variant = split_system(system)
        if base == "gmner_rt" and variant not in bundles:
            bundles[variant] = prepare_quantized(bundle, variant, config.cache)
        specs[system] = WorkerSpec(
            system=base,
            precision=variant or "fp32",
            bundle=str(bundles[variant] if base == "gmner_rt" else bundle),
            model=str(model) if model is not None else None,
            threads=config.threads,
            new_tokens=config.new_tokens,
            repeats=config.repeats,
            warmup=config.warmup,
            pairs=config.pairs,
            batch=config.batch if config.batch > 1 else 0,
            cache=str(config.cache / "peers"),
            text_only=system == "gmner_rt" and "ortgenai_text" in config.systems,
            provider=config.provider,
            device_id=config.device_id,
        )
    rounds: dict[str, list[dict]] = {system: [] for system in config.systems}
    probe, bandwidth_source = _bandwidth_probe(config)
    bandwidths: list[dict[str, float]] = []
    for index in range(config.rounds):
        log.info("round %d of %d", index + 1, config.rounds)
        for system, spec in specs.items():
            before = probe.measure() if probe else None
            figures = _run_system(spec, config.timeout_s)
            if probe is not None:
                after = probe.measure()
                bandwidths += [before, after]
                figures["bandwidth_gb_s"] = (max(before.values()) + max(after.values())) / 2
            rounds[system].append(figures)
    del probe
    if config.provider != "cpu" and not bandwidths:
        spec = _spec_bandwidth(config.device_id)
        if spec is not None:
            for runs in rounds.values():
                for figures in runs:
                    figures["bandwidth_gb_s"] = spec
            bandwidths = [{"spec": spec}]
            bandwidth_source = "spec: NVIDIA's data sheet, not measured"
    weights = decoder_weight_bytes(bundle)
    kv = kv_bytes_per_token(bundle, _mean_context(bundle, config.new_tokens))
    for runs in rounds.values():
        for figures in runs:
            if figures.get("bandwidth_gb_s") and figures.get("decode_tokens_per_s"):
                per_token = (figures.get("decoder_mb") or weights / 1e6) * 1e6 + kv
                ceiling = figures["bandwidth_gb_s"] * 1e9 / per_token
                figures["roofline_fraction"] = figures["decode_tokens_per_s"] / ceiling
    results = {system: merge_rounds(runs) for system, runs in rounds.items()}
    paired = {}
    for variant in (None, *VARIANTS):
        suffix = f":{variant}" if variant else ""
        if f"ortgenai{suffix}" in specs and f"gmner_rt{suffix}" in specs:
            spec = replace(
                specs[f"gmner_rt{suffix}"],
                system="paired",
                precision=variant or "fp32",
                warmup=2,
                repeats=3,
                text_only=False,
                bandwidth_mb=config.bandwidth_mb,
            )
            paired[variant or "fp32"] = _run_system(spec, config.timeout_s)["paired"]
    systems = {name_: _public(figures) for name_, figures in results.items()}
    report = {
        "machine": machine_facts(config.threads, config.provider, config.device_id),
        "model": name,
        "settings": {
            "new_tokens": config.new_tokens,
            "repeats": config.repeats,
            "warmup": config.warmup,
            "pairs": config.pairs,
            "batch": config.batch,
            "threads": config.threads,
            "rounds": config.rounds,
            "provider": config.provider,
            "dtype": config.dtype,
        },
        "systems": systems,
        "ratios_vs_gmner_rt": ratios(systems),
        "token_check": compare_tokens(results),
        "quantized_agreement": agreement(results),
        "paired_decode": paired,
    }
    if bandwidths:
        report["bandwidth_source"] = bandwidth_source
        report["bandwidth_gb_s"] = {
            method: [b[method] for b in bandwidths] for method in bandwidths[0]
        }
        report["roofline"] = _roofline_of(results["gmner_rt"], weights, kv)
        report["roofline_variants"] = {
            f"gmner_rt:{variant}": _roofline_of(
                results[f"gmner_rt:{variant}"], decoder_weight_bytes(path), kv
            )
            for variant, path in bundles.items()
            if variant is not None
        }
    return report


def _check_gpu(config: BenchConfig) -> None:
    """The provider must be there before anything is built (a clear error, not a worker's)."""
    from gmner_rt.providers import choose, onnxruntime

    choose(config.provider, onnxruntime().get_available_providers())


def _spec_bandwidth(device_id: int) -> float | None:
    from gmner_rt.devices import cuda_device

    device = cuda_device(device_id)
    return spec_bandwidth(device.name) if device is not None else None


def _bandwidth_probe(config: BenchConfig):
    """The probe taken around every system, and what it measures (None: no probe)."""
    if not config.bandwidth_mb:
        return None, None
    if config.provider == "cpu":
        return BandwidthProbe(config.bandwidth_mb), "measured: CPU matrix-vector product"
    try:
        probe = GpuBandwidthProbe(config.bandwidth_mb, device_id=config.device_id)
    except Exception as exc:  # no onnx package, or the CUDA provider would not start
        log.warning("GPU bandwidth not measured (%s); the data-sheet figure is used", exc)
        return None, None
    return probe, "measured: matrix-vector product on onnxruntime's CUDA provider"


def _roofline_of(figures: dict, weights: int, kv: int) -> dict:
    """The roofline at the bandwidth measured around this system's runs (median over the
    rounds); its fraction is the median of the per-round fractions."""
    r = roofline(figures["bandwidth_gb_s"], weights, kv, figures["decode_tokens_per_s"])
    r["gmner_rt_fraction"] = figures["roofline_fraction"]
    return r


def _mean_context(bundle: Path, new_tokens: int) -> int:
    """Mean cached positions over a decode of the bench prompts."""
    from gmner_rt.bundle import load_bundle
    from gmner_rt.extractor import Extractor

    from .workers import bench_pairs

    extractor = Extractor(load_bundle(bundle, verify_hashes=False), None)
    prompt = extractor.prompt_batch(bench_pairs(1)).input_ids.shape[1]
    return prompt + new_tokens // 2


def failed_checks(report: dict) -> list[str]:
    """``system/kind: where`` for every token check that found a difference."""
    return [
        f"{system}/{kind}: {where}"
        for system, kinds in report["token_check"].items()
        for kind, where in kinds.items()
        if where is not None
    ]


# --- output ------------------------------------------------------------------------------------


def _cell(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.0f} %"


def format_table(report: dict) -> str:
    """A Markdown table of every system's figures and its ratio to gmner_rt."""
    b = report["settings"]["batch"]
    header = (
        f"| system | TTFT ms | decode tok/s | TTFT ms (b{b}) | decode tok/s (b{b}) "
        "| e2e ms median | e2e ms p90 | peak RSS MB | decoder MB | roofline |"
    )
    lines = [header, "|" + "---|" * 10]
    for name, f in report["systems"].items():
        if name == "ortgenai_text":
            continue
        r = report["ratios_vs_gmner_rt"].get(name, {})

        def both(key: str, digits: int = 1, f=f, r=r) -> str:
            ratio = r.get(key)
            return _cell(f.get(key), digits) + (f" ({ratio:.2f}x)" if ratio else "")

        lines.append(
            f"| {name} | {both('ttft_ms', 0)} | {both('decode_tokens_per_s', 2)} "
            f"| {both('ttft_ms_batch', 0)} | {both('decode_tokens_per_s_batch', 2)} "
            f"| {both('e2e_ms_median', 0)} | {both('e2e_ms_p90', 0)} | {both('peak_rss_mb', 0)} "
            f"| {_cell(f.get('decoder_mb'), 0)} | {_percent(f.get('roofline_fraction'))} |"
        )
    text_rows = [
        (name, f["text_only"]) for name, f in report["systems"].items() if f.get("text_only")
    ]
    if text_rows:
        lines += ["", "| text-only prompt | TTFT ms | decode tok/s |", "|---|---|---|"]
        for name, t in text_rows:
            label = "og.Generator" if name == "ortgenai_text" else name
            lines.append(
                f"| {label} | {_cell(t['ttft_ms'], 0)} | {_cell(t['decode_tokens_per_s'], 2)} |"
            )
    if "roofline" in report:
        lines.append("")
        rooflines = {"gmner_rt": report["roofline"], **report.get("roofline_variants", {})}
        for name, r in rooflines.items():
            lines.append(
                f"roofline ({name}): {r['bandwidth_gb_s']:.1f} GB/s / "
                f"{r['bytes_per_token'] / 1e9:.3f} GB per token = "
                f"{r['decode_tokens_per_s']:.2f} tok/s; measured at "
                f"{100 * r['gmner_rt_fraction']:.1f} %"
            )
    for variant, p in report.get("paired_decode", {}).items():
        low, high = p["ortgenai_over_gmner_rt_p10_p90"]
        lines.append(
            f"paired decode ({variant}, one process, steps alternating, {p['steps']} steps): "
            f"onnxruntime-genai's step takes {p['ortgenai_over_gmner_rt_median']:.3f}x "
            f"gmner_rt's (p10 {low:.3f}, p90 {high:.3f}); ms/step "
            + ", ".join(f"{k} {v:.1f}" for k, v in p["ms_per_step_median"].items())
            + (
                f"; at {p['bandwidth_gb_s_median']:.1f} GB/s measured between the steps: "
                + ", ".join(f"{k} {100 * v:.0f} %" for k, v in p["roofline_fraction"].items())
                + " of the roofline"
                if "roofline_fraction" in p
                else ""
            )
        )
    for name, a in report.get("quantized_agreement", {}).items():
        lines.append(
            f"{name}: greedy tokens equal to gmner_rt fp before the first difference: "
            f"mean {a['greedy_prefix_mean']:.1f}, min {a['greedy_prefix_min']} of {a['tokens']}"
        )
    return "\n".join(lines)


def plot_token_latency(report: dict, path: Path) -> None:
    """Per-token decode latency (batch 1) of every system, one line each, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError as exc:
        raise BenchError("--plot: needs matplotlib (pip install 'gmner[bench]')") from exc
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for name, f in report["systems"].items():
        if f.get("token_ms"):
            label = "og.Generator (text-only prompt)" if name == "ortgenai_text" else name
            ax.plot(range(2, len(f["token_ms"]) + 2), f["token_ms"], label=label, linewidth=1.4)
    if "roofline" in report:
        floor = 1000.0 / report["roofline"]["decode_tokens_per_s"]
        ax.axhline(floor, color="grey", linestyle="--", linewidth=1, label="bandwidth roofline")
    machine = report["machine"]
    ax.set_title(
        f"{report['model']}: decode latency per token, batch 1 "
        f"({machine['threads']} threads, {machine['cpu']})",
        fontsize=9,
    )
    ax.set_xlabel("generated token")
    ax.set_ylabel("ms")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# --- the command -------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model (one of)")
    model.add_argument("--preset", choices=PRESETS, help="build, cache and export this model")
    model.add_argument("--bundle", type=Path, help="an exported bundle")
    model.add_argument("--model", type=Path, help="the bundle's source checkpoint (hf, ortgenai)")
    d = BenchConfig.__dataclass_fields__
    parser.add_argument(
        "--systems",
        default=",".join(d["systems"].default),
        help="comma-separated, gmner_rt first; gmner_rt and ortgenai also as :int8 / :int4 "
        "(default: %(default)s)",
    )
    for flag, key, help_text in (
        ("--threads", "threads", "intra-op threads for every system (default: all cores)"),
        ("--new-tokens", "new_tokens", "greedy tokens per request (default: %(default)s)"),
        ("--repeats", "repeats", "measured repeats (default: %(default)s)"),
        ("--warmup", "warmup", "unmeasured runs first (default: %(default)s)"),
        ("--rounds", "rounds", "systems take turns this many times (default: %(default)s)"),
        ("--pairs", "pairs", "image/text pairs for batch-1 figures (default: %(default)s)"),
        ("--batch", "batch", "batch size of the batched figures, 0: none (default: %(default)s)"),
        ("--bandwidth-mb", "bandwidth_mb", "bandwidth matrix size, 0: skip (default: %(default)s)"),
    ):
        parser.add_argument(flag, type=int, default=d[key].default, help=help_text)
    parser.add_argument(
        "--provider",
        choices=BENCH_PROVIDERS,
        default="cpu",
        help="gmner_rt's execution provider; hf follows it to the GPU (default: %(default)s)",
    )
    parser.add_argument("--device-id", type=int, default=0, help="CUDA device (default 0)")
    parser.add_argument(
        "--dtype",
        choices=("fp32", "fp16"),
        default="fp32",
        help="precision a --preset is exported in (default: %(default)s)",
    )
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="presets and peer models")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--plot", type=Path, help="write the per-token latency plot here (PNG)")
    _speculation_parser(parser)


#: ``gmner bench``'s flags that ``gmner bench speculation`` shares (given before or after it).
_SHARED = ("bundle", "preset", "model", "threads", "provider", "cache", "json")


def _speculation_parser(parser: argparse.ArgumentParser) -> None:
    from .speculation import add_arguments as speculation_arguments

    sub = parser.add_subparsers(
        dest="action",
        metavar="ACTION",
        title="other comparisons (optional: without one, gmner bench compares the peers)",
    )
    speculation = sub.add_parser(
        "speculation",
        help="speculative decoding side by side: gmner_rt with and without prompt-lookup "
        "drafts, onnxruntime-genai, HF generate with and without prompt lookup",
        description="Decode the same requests (a data split, or the bench's pairs) with "
        "gmner_rt with and without speculation (grammar on and off), onnxruntime-genai and HF "
        "generate with and without prompt_lookup_num_tokens, every variant on every request in "
        "turn; report decoder calls per token, tokens per call, decode tokens/s and their "
        "ratios, end-to-end latency; fail when a variant's ids differ from its reference's.",
    )
    speculation_arguments(speculation, inherited=_SHARED)
    # set last: the actions' own usage lines are built from the usage at the time
    parser.usage = (
        "%(prog)s (--preset P | --bundle B [--model M]) [options]   (gmner_rt against peers)\n"
        "       %(prog)s speculation (--preset P | --bundle B [--model M]) [options]  "
        "(speculative decoding; %(prog)s speculation --help)"
    )


def _no_peer_flags(args: argparse.Namespace) -> None:
    """``gmner bench speculation`` takes none of the peer comparison's own flags."""
    d = BenchConfig.__dataclass_fields__
    defaults = {key: d[key].default for key in ("new_tokens", "repeats", "warmup", "rounds")}
    defaults |= {key: d[key].default for key in ("pairs", "batch", "bandwidth_mb", "dtype")}
    defaults |= {"systems": ",".join(d["systems"].default), "device_id": 0, "plot": None}
    for key, value in defaults.items():
        if getattr(args, key) != value:
            flag = "--" + key.replace("_", "-")
            raise InputError(
                f"{flag}: a flag of the peer comparison (gmner bench), not of gmner bench "
                "speculation (gmner bench speculation --help lists its flags)"
            )


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        bundle=args.bundle,
        model=args.model,
        preset=args.preset,
        systems=tuple(s.strip() for s in args.systems.split(",") if s.strip()),
        threads=args.threads,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        warmup=args.warmup,
        rounds=args.rounds,
        pairs=args.pairs,
        batch=args.batch,
        cache=args.cache,
        bandwidth_mb=args.bandwidth_mb,
        provider=args.provider,
        device_id=args.device_id,
        dtype=args.dtype,
    )


def run(args: argparse.Namespace) -> int:
    if getattr(args, "action", None) == "speculation":
        from .speculation import run_command

        _no_peer_flags(args)
        return run_command(args)
    config = config_from_args(args)
    report = run_bench(config)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    sys.stdout.write(format_table(report) + "\n")
    if args.plot is not None:
        plot_token_latency(report, args.plot)
    failures = failed_checks(report)
    if failures:
        raise BenchError(
            "the systems generated different tokens, so they did different work: "
            + "; ".join(failures)
        )
    return 0
