"""Real-scale export check (not run in CI): a random Qwen2.5-VL-3B exported in fp16.

    python -m gmner.bench.export_at_scale --work /tmp/real-scale [--dtype fp16] [--no-verify]

Builds a random-weight model with the real 3B configuration (``gmner tiny-model --preset
qwen2.5-vl-3b``, bf16 like the released checkpoint), then runs ``gmner export`` on it with the
parity check on. Each step runs in its own process so its peak resident memory is its own;
the script prints one JSON summary (times, peak memory, file sizes, parity) and writes it to
``WORK/real_scale.json``. Figures from a run are recorded in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

PRESET = "qwen2.5-vl-3b"


def _step(args: list[str]) -> dict:
    """Run ``gmner ARGS`` here (in this process) and report its time and peak RSS."""
    from gmner.runtime.cli import main

    started = time.perf_counter()
    code = main(args)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "exit_code": code,
        "seconds": round(time.perf_counter() - started, 1),
        "peak_rss_gib": round(peak_kib / 2**20, 2),
    }


def _child(args: list[str]) -> dict:
    """Run one step in a fresh interpreter; return its JSON report."""
    command = [sys.executable, "-m", "gmner.bench.export_at_scale", "--child", "--", *args]
    log.info("running: gmner %s", " ".join(args))
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    sys.stderr.write(done.stderr[-4000:])
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"gmner {' '.join(args)} failed (exit {done.returncode})")
    return json.loads(lines[-1])


def _sizes(folder: Path) -> dict[str, float]:
    return {
        p.name: round(p.stat().st_size / 2**30, 3) for p in sorted(folder.iterdir()) if p.is_file()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="working folder (model and bundle go here)")
    parser.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    parser.add_argument("--no-verify", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.child:
        print(json.dumps(_step(args.rest)))
        return 0
    if args.work is None:
        parser.error("--work is required")
    model, bundle = args.work / "model", args.work / f"bundle-{args.dtype}"
    summary: dict = {"preset": PRESET, "dtype": args.dtype}
    if not (model / "config.json").is_file():
        summary["build"] = _child(["tiny-model", "--preset", PRESET, "--out", str(model)])
    summary["model_files_gib"] = _sizes(model)
    export_args = ["export", "--model", str(model), "--out", str(bundle), "--dtype", args.dtype]
    if args.no_verify:
        export_args.append("--no-verify")
    summary["export"] = _child(export_args)
    summary["bundle_files_gib"] = _sizes(bundle)
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    summary["parity"] = manifest.get("parity")
    text = json.dumps(summary, indent=2)
    (args.work / "real_scale.json").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
