"""One benchmarked system, measured in a process of its own (``gmner bench``'s worker).

``gmner bench`` starts ``python -m gmner.bench.workers SPEC OUT`` once per system, so
each system's peak resident memory is its own and no system warms another's caches. SPEC is a
JSON :class:`WorkerSpec`; OUT receives the figures as JSON. Every system does the same work:
the same prompts (checked: the HF processor's ids must equal the bundle's), greedy decoding of
exactly ``new_tokens`` tokens with the end-of-sequence ids suppressed, on the same number of
threads; the generated ids go back to the parent, which fails the bench if they differ.

Systems:

* ``gmner_rt``: :func:`gmner_rt.load` on onnxruntime, decoded by :mod:`gmner_rt.generate`;
* ``hf``: transformers ``generate`` on the source checkpoint (torch, same dtype);
* ``ortgenai``: onnxruntime-genai's model-builder decoder driven by our loop, with our vision
  and embedding graphs (:mod:`gmner.bench.ortgenai`);
* ``ortgenai_text``: ``og.Generator`` on a text-only prompt (it cannot take our images); the
  ``gmner_rt`` worker decodes the same text-only prompt when asked (``text_only``), so the
  two are compared like the others.

This module knows nothing about tables, ratios or plots (``bench.py``'s).
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from gmner.runtime.timing import (  # noqa: F401 (bench_pairs, Run: re-exported)
    Run,
    bench_pairs,
    loop_e2e,
    loop_run,
    median_ms,
    p90_ms,
    suppress,
    tokens_per_s,
)

log = logging.getLogger(__name__)

__all__ = ["SYSTEMS", "Run", "WorkerSpec", "bench_pairs", "run_worker"]

SYSTEMS = ("gmner_rt", "hf", "ortgenai", "ortgenai_text")


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker measures.

    Attributes:
        system: one of :data:`SYSTEMS`.
        bundle: the exported bundle directory.
        model: the source checkpoint directory (hf and ortgenai need it).
        threads: intra-op threads for every runtime in the worker.
        new_tokens: greedy tokens per request (eos suppressed: exactly this many).
        repeats: measured repeats of each figure, after ``warmup`` unmeasured ones.
        warmup: unmeasured runs first.
        pairs: how many bench pairs (``bench_pairs``) batch-1 figures run over.
        batch: the batch size of the batched figures (0: none).
        cache: folder for built artifacts (onnxruntime-genai's decoders).
        text_only: also decode the text-only prompt (gmner_rt, beside ``ortgenai_text``).
        precision: ortgenai's builder precision ("fp32", "int8", "int4"); gmner_rt's comes
            with its bundle.
        bandwidth_mb: ``paired`` only: the matrix of a bandwidth probe taken between the
            decode steps (0: none), for a roofline fraction free of drift.
        provider: gmner_rt's execution provider ("cpu", "cuda", "tensorrt"); hf runs on the
            same GPU when it is not "cpu".
        device_id: the CUDA device.
    """

    system: str
    bundle: str
    model: str | None
    threads: int
    new_tokens: int
    repeats: int
    warmup: int
    pairs: int
    batch: int
    cache: str
    text_only: bool = False
    precision: str = "fp32"
    bandwidth_mb: int = 0
    provider: str = "cpu"
    device_id: int = 0

    @property
    def torch_device(self) -> str:
        """Where the hf system runs: the GPU whenever gmner_rt runs on one."""
        return "cpu" if self.provider == "cpu" else f"cuda:{self.device_id}"


@dataclass
class Figures:
    """What a worker reports (times in ms)."""

    system: str
    load_s: float = 0.0
    ttft_ms: float | None = None
    decode_tokens_per_s: float | None = None
    token_ms: list[float] = field(default_factory=list)
    ttft_ms_batch: float | None = None
    decode_tokens_per_s_batch: float | None = None
    e2e_ms_median: float | None = None
    e2e_ms_p90: float | None = None
    peak_rss_mb: float = 0.0
    decoder_mb: float | None = None
    tokens: list[list[int]] = field(default_factory=list)
    tokens_batch: list[list[int]] = field(default_factory=list)
    tokens_e2e: list[list[int]] = field(default_factory=list)
    text_only: dict | None = None
    paired: dict | None = None
    notes: list[str] = field(default_factory=list)


def _peak_rss_mb() -> float:
    """Peak resident set size of this process image: ``VmHWM``, which ``exec`` resets (the
    ``ru_maxrss`` of a child carries its parent's peak over the fork)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def kv_cache_bytes(kv, context: int) -> int:
    """Bytes of a manifest ``kv_cache``'s keys and values at ``context`` positions: what one
    decode step reads of the cache at batch 1."""
    return 2 * kv.num_layers * kv.num_kv_heads * kv.head_dim * context * np.dtype(kv.dtype).itemsize


def decoder_bytes(bundle) -> int:
    """Bytes of a loaded bundle's decoder graph (file plus external data): the weights one
    decode step reads once."""
    spec = bundle.manifest.graphs["decoder"]
    files = [bundle.file(spec.file), *([bundle.file(spec.data_file)] if spec.data_file else [])]
    return sum(path.stat().st_size for path in files)


def _peer_decoder_bytes(decoder_dir: Path) -> int:
    """Bytes of an onnxruntime-genai decoder folder's graph and its external data."""
    return sum(p.stat().st_size for p in decoder_dir.iterdir() if ".onnx" in p.name)


def text_prompt(extractor, text: str):
    """A text-only prompt batch: the bundle's prompt with no image (for og.Generator)."""
    from gmner_rt.generate import PromptBatch
    from gmner_rt.prompt import render_prompt

    p = extractor.bundle.manifest.prompt
    prompt = render_prompt(
        p.chat_template,
        system=p.system,
        image="",
        instruction_template=p.instruction_think,
        text=text,
    )
    ids = extractor.tokenizer.encode(prompt, add_special_tokens=False).ids
    return PromptBatch(
        input_ids=np.asarray([ids], dtype=np.int64),
        attention_mask=np.ones((1, len(ids)), dtype=np.int64),
        pixel_values=np.zeros((0, 1), dtype=np.float32),
        grids=(),
    )


def measure_loop(extractor, spec: WorkerSpec, figures: Figures, *, text_only: bool) -> None:
    """Every figure of a loop-driven system into ``figures``."""
    pairs = bench_pairs(max(spec.pairs, spec.batch))
    singles = pairs[: spec.pairs]
    for _ in range(spec.warmup):
        loop_run(extractor, singles[:1], spec.new_tokens)
    runs = [
        loop_run(extractor, [pair], spec.new_tokens)
        for _ in range(spec.repeats)
        for pair in singles
    ]
    _single_figures(figures, runs, len(singles))
    if spec.batch > 1:
        batch = pairs[: spec.batch]
        loop_run(extractor, batch, min(spec.new_tokens, 4))
        batched = [loop_run(extractor, batch, spec.new_tokens) for _ in range(spec.repeats)]
        _batch_figures(figures, batched, spec.batch)
    e2e, ids = [], []
    for repeat in range(spec.repeats):
        for pair in singles:
            seconds, tokens = loop_e2e(extractor, pair, spec.new_tokens)
            e2e.append(seconds)
            if repeat == 0:
                ids.append(tokens)
    figures.e2e_ms_median, figures.e2e_ms_p90 = median_ms(e2e), p90_ms(e2e)
    figures.tokens_e2e = ids
    if text_only:
        batch = text_prompt(extractor, singles[0][1])
        loop_run(extractor, [], spec.new_tokens, prompt_batch=batch)
        runs = [
            loop_run(extractor, [], spec.new_tokens, prompt_batch=batch)
            for _ in range(spec.repeats)
        ]
        figures.text_only = {
            "prompt_tokens": int(batch.input_ids.shape[1]),
            "ttft_ms": median_ms([r.ttft for r in runs]),
            "decode_tokens_per_s": tokens_per_s(runs, 1),
            "tokens": runs[0].tokens,
        }


def _single_figures(figures: Figures, runs: Sequence[Run], pairs: int) -> None:
    figures.ttft_ms = median_ms([r.ttft for r in runs])
    figures.decode_tokens_per_s = tokens_per_s(runs, 1)
    width = min(len(r.token_times) for r in runs)
    figures.token_ms = [
        float(np.median([r.token_times[i] for r in runs]) * 1000.0) for i in range(width)
    ]
    figures.tokens = [r.tokens[0] for r in runs[:pairs]]


def _batch_figures(figures: Figures, runs: Sequence[Run], rows: int) -> None:
    figures.ttft_ms_batch = median_ms([r.ttft for r in runs])
    figures.decode_tokens_per_s_batch = tokens_per_s(runs, rows)
    figures.tokens_batch = runs[0].tokens


def run_gmner_rt(spec: WorkerSpec, figures: Figures) -> None:
    import gmner_rt

    started = time.perf_counter()
    limits = None
    if spec.provider == "tensorrt":  # profiles wide enough for the batched figures
        from gmner_rt.bundle import load_bundle
        from gmner_rt.tensorrt import resolve_limits

        manifest = load_bundle(spec.bundle, verify_hashes=False).manifest
        limits = resolve_limits(manifest, max_batch=max(1, spec.batch))
    extractor = gmner_rt.load(
        spec.bundle,
        provider=spec.provider,
        device_id=spec.device_id,
        threads=spec.threads,
        limits=limits,
    )
    figures.load_s = time.perf_counter() - started
    figures.notes.append(f"gmner_rt on {extractor.provider}: {extractor.placement()}")
    figures.decoder_mb = decoder_bytes(extractor.bundle) / 1e6
    measure_loop(extractor, spec, figures, text_only=spec.text_only)


def run_ortgenai(spec: WorkerSpec, figures: Figures) -> None:
    from gmner_rt.bundle import load_bundle
    from gmner_rt.extractor import Extractor

    from .ortgenai import OrtGenaiDecoder, build_decoder

    if spec.model is None:
        raise ValueError("ortgenai: needs the source checkpoint (--model or --preset)")
    decoder_dir = build_decoder(
        spec.model, Path(spec.cache), precision=spec.precision, threads=spec.threads
    )
    figures.decoder_mb = _peer_decoder_bytes(decoder_dir) / 1e6
    started = time.perf_counter()
    bundle = load_bundle(spec.bundle)
    backend = OrtGenaiDecoder.from_bundle(bundle, decoder_dir, threads=spec.threads)
    figures.load_s = time.perf_counter() - started
    measure_loop(Extractor(bundle, backend), spec, figures, text_only=False)


def run_ortgenai_text(spec: WorkerSpec, figures: Figures) -> None:
    import gmner_rt

    from .ortgenai import build_decoder, text_only_generate

    if spec.model is None:
        raise ValueError("ortgenai_text: needs the source checkpoint (--model or --preset)")
    decoder_dir = build_decoder(
        spec.model, Path(spec.cache), exclude_embeds=False, threads=spec.threads
    )
    extractor = gmner_rt.load(spec.bundle, provider="cpu", threads=1)
    ids = text_prompt(extractor, bench_pairs(1)[0][1]).input_ids[0].tolist()
    del extractor
    text_only_generate(decoder_dir, ids, min(spec.new_tokens, 4), threads=spec.threads)
    results = [
        text_only_generate(decoder_dir, ids, spec.new_tokens, threads=spec.threads)
        for _ in range(spec.repeats)
    ]
    figures.text_only = {
        "prompt_tokens": len(ids),
        "ttft_ms": median_ms([r["ttft_s"] for r in results]),
        "decode_tokens_per_s": float(np.median([r["decode_tokens_per_s"] for r in results])),
        "tokens": [results[0]["tokens"]],
    }
    figures.token_ms = [
        float(np.median([r["token_times_s"][i] for r in results]) * 1000.0)
        for i in range(min(len(r["token_times_s"]) for r in results))
    ]


# --- HF transformers ---------------------------------------------------------------------------


class _Clock:
    """A logits processor that records when each token's scores are ready (after the forward)
    and suppresses the end-of-sequence ids, as the other systems do."""

    def __init__(self, eos_ids: Sequence[int]):
        self.times: list[float] = []
        self.eos = list(eos_ids)

    def __call__(self, input_ids, scores):
        if scores.is_cuda:  # the forward is asynchronous: the scores are ready after a sync
            import torch

            torch.cuda.synchronize(scores.device)
        self.times.append(time.perf_counter())
        scores[:, self.eos] = -float("inf")
        return scores


def _hf_prompts(processor, pairs, labels) -> list[str]:
    from gmner_rt.prompt import user_message

    return [
        processor.apply_chat_template(
            [user_message(image, text, labels, think=True)],
            tokenize=False,
            add_generation_prompt=True,
        )
        for image, text in pairs
    ]


def hf_run(
    model, processor, pairs, labels, new_tokens: int, tokens, stop=(), device: str = "cpu"
) -> Run:
    """Processor + ``generate``; the first clock tick is the first token's scores.

    ``tokens`` is the bundle's :class:`gmner_rt.bundle.TokenIds`; ``stop``: stop strings (the
    end-to-end run stops on them, as ``extract`` does)."""
    import torch
    from transformers import LogitsProcessorList

    clock = _Clock(tokens.eos_ids)
    start = time.perf_counter()
    processor.tokenizer.padding_side = "left"
    enc = processor(
        text=_hf_prompts(processor, pairs, labels),
        images=[image for image, _ in pairs],
        return_tensors="pt",
        padding=True,
    ).to(device)
    extra = {"stop_strings": list(stop), "tokenizer": processor.tokenizer} if stop else {}
    with torch.inference_mode():
        out = model.generate(
            **enc,
            max_new_tokens=new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([clock]),
            pad_token_id=tokens.pad_id,
            eos_token_id=list(tokens.eos_ids),
            **extra,
        )
    ids = out[:, enc["input_ids"].shape[1] :].tolist()
    # tick i: token i's scores are ready; the gap between ticks is one decode step
    return Run(clock.times[0] - start, [float(t) for t in np.diff(clock.times)], ids)


def _check_prompts(processor, bundle, pairs) -> None:
    """The HF processor must tokenise the prompts exactly as the bundle does (same work)."""
    from gmner_rt.extractor import Extractor

    ours = Extractor(bundle, None).prompt_batch(pairs)
    processor.tokenizer.padding_side = "left"
    enc = processor(
        text=_hf_prompts(processor, pairs, bundle.manifest.labels),
        images=[image for image, _ in pairs],
        return_tensors="np",
        padding=True,
    )
    for row in range(len(pairs)):
        theirs = enc["input_ids"][row][enc["attention_mask"][row] == 1].tolist()
        mine = ours.input_ids[row][ours.attention_mask[row] == 1].tolist()
        if theirs != mine:
            raise RuntimeError(
                f"hf: the processor's prompt for pair {row} differs from the bundle's "
                f"({len(theirs)} vs {len(mine)} tokens); the systems would not do the same work"
            )


def run_hf(spec: WorkerSpec, figures: Figures) -> None:
    import torch
    from gmner.train.modeling import load_model_and_processor

    from gmner_rt.bundle import load_bundle
    from gmner_rt.records import parse_output

    if spec.model is None:
        raise ValueError("hf: needs the source checkpoint (--model or --preset)")
    if spec.torch_device != "cpu" and not torch.cuda.is_available():
        raise RuntimeError(f"hf: torch {torch.__version__} has no CUDA; install a CUDA build")
    torch.set_num_threads(spec.threads)
    bundle = load_bundle(spec.bundle, verify_hashes=False)
    m = bundle.manifest
    started = time.perf_counter()
    model, processor = load_model_and_processor(
        spec.model,
        dtype=m.kv_cache.dtype,
        min_pixels=m.image_processor["min_pixels"],
        max_pixels=m.image_processor["max_pixels"],
    )
    model.to(spec.torch_device)
    figures.load_s = time.perf_counter() - started
    figures.notes.append(f"hf on {spec.torch_device}")
    pairs = bench_pairs(max(spec.pairs, spec.batch))
    singles = pairs[: spec.pairs]
    _check_prompts(processor, bundle, pairs)

    def run(batch, new_tokens=spec.new_tokens, stop=()):
        return hf_run(
            model, processor, batch, m.labels, new_tokens, m.tokens, stop, spec.torch_device
        )

    for _ in range(spec.warmup):
        run(singles[:1])
    runs = [run([pair]) for _ in range(spec.repeats) for pair in singles]
    _single_figures(figures, runs, len(singles))
    if spec.batch > 1:
        run(pairs[: spec.batch], min(spec.new_tokens, 4))
        _batch_figures(figures, [run(pairs[: spec.batch]) for _ in range(spec.repeats)], spec.batch)
    e2e, ids = [], []
    for repeat in range(spec.repeats):
        for pair in singles:
            started = time.perf_counter()
            result = run([pair], stop=m.generation.stop_strings)
            parse_output(processor.tokenizer.decode(result.tokens[0], skip_special_tokens=True))
            e2e.append(time.perf_counter() - started)
            if repeat == 0:
                ids.append(result.tokens[0])
    figures.e2e_ms_median, figures.e2e_ms_p90 = median_ms(e2e), p90_ms(e2e)
    figures.tokens_e2e = ids


# --- paired decode: gmner_rt and onnxruntime-genai step by step in one process ----------------


def run_paired(spec: WorkerSpec, figures: Figures) -> None:
    """gmner_rt's decoder and onnxruntime-genai's, each from its own prefill of the same
    prompt, stepped in turn (the order swapped every step) so that both see the same memory
    bandwidth at every moment: the ratio of their step times is free of the drift that
    separate processes measured minutes apart carry. Each step starts after a 20 ms pause, so
    the other session's worker threads, which spin for a while after a run, have gone idle;
    the ratio is taken over each pair of consecutive steps (one in each order). With
    ``spec.bandwidth_mb``, a bandwidth probe runs after each pair of steps too, and each
    decoder's roofline fraction is its bytes per token over its median step time, over the
    median probe. ``spec.bundle`` is gmner_rt's bundle, ``spec.precision`` the builder's
    precision for onnxruntime-genai."""
    import gmner_rt

    from .bandwidth import BandwidthProbe
    from .ortgenai import OrtGenaiDecoder, build_decoder

    if spec.model is None:
        raise ValueError("paired: needs the source checkpoint (--model or --preset)")
    extractor = gmner_rt.load(spec.bundle, provider="cpu", threads=spec.threads)
    decoder_dir = build_decoder(
        spec.model, Path(spec.cache), precision=spec.precision, threads=spec.threads
    )
    peer = OrtGenaiDecoder.from_bundle(extractor.bundle, decoder_dir, threads=spec.threads)
    backends = {"gmner_rt": extractor.backend, "ortgenai": peer}
    weight_bytes = {
        "gmner_rt": decoder_bytes(extractor.bundle),
        "ortgenai": _peer_decoder_bytes(decoder_dir),
    }
    probe = BandwidthProbe(spec.bandwidth_mb, threads=spec.threads) if spec.bandwidth_mb else None
    batch = extractor.prompt_batch(bench_pairs(1))
    times, tokens, bandwidths = _alternate_steps(extractor, backends, batch, spec, probe)
    skip = spec.warmup + spec.warmup % 2  # start on a step where gmner_rt goes first
    ms = {name: [t * 1000.0 for t in values[skip:]] for name, values in times.items()}
    mine, other = ms["gmner_rt"], ms["ortgenai"]
    ratios = [
        (other[i] + other[i + 1]) / (mine[i] + mine[i + 1]) for i in range(0, len(mine) - 1, 2)
    ]
    figures.text_only = None
    figures.notes = [f"paired decode, ortgenai precision {spec.precision}"]
    figures.paired = {
        "steps": len(mine),
        "ms_per_step_median": {name: float(np.median(v)) for name, v in ms.items()},
        "ortgenai_over_gmner_rt_median": float(np.median(ratios)),
        "ortgenai_over_gmner_rt_p10_p90": [
            float(np.percentile(ratios, 10)),
            float(np.percentile(ratios, 90)),
        ],
        "tokens_equal": tokens["gmner_rt"] == tokens["ortgenai"],
        "context": int(batch.input_ids.shape[1]),
    }
    if bandwidths:
        context = batch.input_ids.shape[1] + len(tokens["gmner_rt"]) // 2
        kv_bytes = kv_cache_bytes(extractor.bundle.manifest.kv_cache, context)
        bandwidth = float(np.median(bandwidths[spec.warmup :]))
        figures.paired["bandwidth_gb_s_median"] = bandwidth
        figures.paired["roofline_fraction"] = {
            name: (weight_bytes[name] + kv_bytes) / (np.median(values) / 1e3) / (bandwidth * 1e9)
            for name, values in ms.items()
        }


def _alternate_steps(extractor, backends: dict, batch, spec: WorkerSpec, probe):
    """Prefill every backend on ``batch``, then greedy steps in turn, order swapped each
    step, and a probe after each pair (each system follows it as often as the other):
    ``(seconds per step, tokens, GB/s)``."""
    from gmner_rt.generate import prefill, step

    eos = extractor.bundle.manifest.tokens.eos_ids
    states, chosen, tokens = {}, {}, {}
    times: dict[str, list[float]] = {name: [] for name in backends}
    bandwidths: list[float] = []
    for name, backend in backends.items():
        logits, states[name] = prefill(backend, batch, extractor.vision)
        chosen[name] = np.argmax(suppress(logits, eos), axis=-1)
        tokens[name] = [int(chosen[name][0])]
    for index in range(spec.warmup + spec.repeats * (spec.new_tokens - 1)):
        order = list(backends) if index % 2 == 0 else list(reversed(backends))
        for name in order:
            time.sleep(0.02)
            began = time.perf_counter()
            logits = step(backends[name], states[name], chosen[name])
            chosen[name] = np.argmax(suppress(logits, eos), axis=-1)
            times[name].append(time.perf_counter() - began)
            tokens[name].append(int(chosen[name][0]))
        if probe is not None:  # after every pair, so each system follows it equally often
            time.sleep(0.02)
            bandwidths.append(probe.once())
    return times, tokens, bandwidths


RUNNERS: dict[str, Callable[[WorkerSpec, Figures], None]] = {
    "paired": run_paired,
    "gmner_rt": run_gmner_rt,
    "hf": run_hf,
    "ortgenai": run_ortgenai,
    "ortgenai_text": run_ortgenai_text,
}


def run_worker(spec: WorkerSpec) -> Figures:
    """Measure ``spec.system``; the peak RSS is read last."""
    figures = Figures(system=spec.system)
    RUNNERS[spec.system](spec, figures)
    figures.peak_rss_mb = _peak_rss_mb()
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2:
        raise SystemExit("usage: python -m gmner.bench.workers SPEC.json OUT.json")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    spec = WorkerSpec(**json.loads(Path(argv[0]).read_text()))
    figures = run_worker(spec)
    Path(argv[1]).write_text(json.dumps(asdict(figures)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
