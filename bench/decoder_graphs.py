"""Decoder graphs side by side (fp32, int8, int4, ...): prefill and decode times, file size.

    python -m gmner.bench.decoder_graphs fp32=B/decoder.onnx int4=Q/decoder.onnx \\
        [--prompt 300] [--steps 16] [--rounds 5] [--threads 2] [--json out.json]

Each graph gets one onnxruntime CPU session (``--threads`` intra-op threads). A round runs
every graph once, in turn, so that other load on the machine spreads over all of them: a
prefill of ``--prompt`` tokens at past length 0, then ``--steps`` decode steps at batch 1
feeding the presents back as the past. Figures are medians over rounds; inputs are random
embeddings (timing does not depend on them), the same for every graph, and the first
prefill's logits are compared with the first graph's (relative error: max difference over the
largest logit). Shapes come from each graph's declared inputs: this knows nothing about
bundles, tokens or images.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from gmner.runtime.extract import positive_int

from gmner_rt.backends import onnxruntime as ort_backend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecoderTimes:
    """One graph's medians (ms) and the error of its first prefill's logits."""

    name: str
    megabytes: float
    prefill_ms: float
    decode_ms_per_step: float
    logits_relative_error: float


def _feeds(session, embeds: np.ndarray, past: list[np.ndarray] | None, total: int) -> dict:
    """Inputs for ``embeds [1, T, hidden]`` after ``total - T`` cached positions."""
    start = total - embeds.shape[1]
    dtype = np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32
    embeds = embeds.astype(dtype, copy=False)
    feeds = {
        "inputs_embeds": embeds,
        "attention_mask": np.ones((1, total), dtype=np.int64),
        "position_ids": np.tile(np.arange(start, total, dtype=np.int64), (3, 1, 1)),
    }
    if any(i.name == "logits_index" for i in session.get_inputs()):  # format 2: last position
        feeds["logits_index"] = np.array([embeds.shape[1] - 1], dtype=np.int64)
    cache = [i for i in session.get_inputs() if i.name.startswith("past_")]
    for index, spec in enumerate(cache):
        empty = np.zeros((1, spec.shape[1], 0, spec.shape[3]), dtype=embeds.dtype)
        feeds[spec.name] = past[index] if past is not None else empty
    return feeds


def _round(session, prompt: np.ndarray, tokens: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(prefill ms, decode ms per step, prefill logits)."""
    started = time.perf_counter()
    logits, *past = session.run(None, _feeds(session, prompt, None, prompt.shape[1]))
    prefill = time.perf_counter() - started
    started = time.perf_counter()
    for index, token in enumerate(tokens):
        _, *past = session.run(None, _feeds(session, token, past, prompt.shape[1] + index + 1))
    return prefill * 1e3, (time.perf_counter() - started) * 1e3 / len(tokens), logits


def _size(path: Path) -> float:
    data = path.with_name(path.name + ".data")
    return (path.stat().st_size + (data.stat().st_size if data.is_file() else 0)) / 1e6


def bench(graphs: dict[str, Path], *, prompt: int, steps: int, rounds: int, threads: int):
    """Median prefill and decode times of every graph in ``graphs`` (name -> decoder.onnx)."""
    cpu = ["CPUExecutionProvider"]
    sessions = {name: ort_backend.session(path, cpu, threads) for name, path in graphs.items()}
    first = next(iter(sessions.values()))
    hidden = first.get_inputs()[0].shape[2]
    rng = np.random.default_rng(0)
    embeds = (rng.standard_normal((1, prompt, hidden)) * 0.02).astype(np.float32)
    tokens = (rng.standard_normal((steps, 1, 1, hidden)) * 0.02).astype(np.float32)
    logits = {name: _round(s, embeds, tokens[:1])[2] for name, s in sessions.items()}  # warm-up
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in sessions}
    for index in range(rounds):
        for name, session in sessions.items():
            times[name].append(_round(session, embeds, tokens)[:2])
        log.info("round %d of %d done", index + 1, rounds)
    reference = next(iter(logits.values()))
    scale = float(np.abs(reference).max())
    return [
        DecoderTimes(
            name,
            round(_size(graphs[name]), 1),
            round(statistics.median(t[0] for t in times[name]), 1),
            round(statistics.median(t[1] for t in times[name]), 2),
            float(np.abs(logits[name] - reference).max()) / scale,
        )
        for name in sessions
    ]


def format_table(results: list[DecoderTimes]) -> str:
    lines = ["| decoder | MB | prefill ms | decode ms/step | logits rel. error |", "|---" * 5 + "|"]
    for r in results:
        lines.append(
            f"| {r.name} | {r.megabytes:.1f} | {r.prefill_ms:.0f} | {r.decode_ms_per_step:.1f} "
            f"| {r.logits_relative_error:.3g} |"
        )
    return "\n".join(lines)


def _graph(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not name or not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"expected NAME=PATH/decoder.onnx, got {value!r}")
    return name, Path(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("graphs", nargs="+", type=_graph, metavar="NAME=DECODER.onnx")
    parser.add_argument("--prompt", type=positive_int, default=300, help="prefill tokens")
    parser.add_argument("--steps", type=positive_int, default=16, help="decode steps per round")
    parser.add_argument("--rounds", type=positive_int, default=5)
    parser.add_argument("--threads", type=positive_int, default=2, help="intra-op threads")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    results = bench(
        dict(args.graphs),
        prompt=args.prompt,
        steps=args.steps,
        rounds=args.rounds,
        threads=args.threads,
    )
    sys.stdout.write(format_table(results) + "\n")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
