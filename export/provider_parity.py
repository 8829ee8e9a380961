"""A bundle's graphs on a GPU execution provider against the PyTorch model they came from.

``gmner export`` checks its graphs on onnxruntime's CPU provider. This runs the same check (the
same probes, tensors, tolerances and greedy tokens: :mod:`gmner.export.parity`) with the
sessions on the CUDA or TensorRT provider, as :func:`gmner_rt.backends.onnxruntime.plan` sets
them up for ``gmner_rt.load``, so a GPU run is held to the export's standard:

    python -m gmner.export.provider_parity --model M [--adapter A] --bundle B --provider cuda \\
        --json parity-cuda.json

The reference is computed first on the CPU in the bundle's dtype (as the export does), then
the model is freed before the sessions load. Failures are reported, not raised, so one call
can record several providers and dtypes.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
from pathlib import Path

from gmner_rt.backends.onnxruntime import OrtGraphs, plan
from gmner_rt.bundle import load_bundle

log = logging.getLogger(__name__)

__all__ = ["provider_parity"]


def provider_parity(
    model: Path, bundle_dir: Path, provider: str, *, adapter: Path | None = None, device_id: int = 0
) -> dict:
    """The parity report of ``bundle_dir``'s graphs on ``provider`` against ``model`` (plus
    ``adapter``): the export's summary, its failures, the placement of the nodes, the times."""
    from .merge import load_merged
    from .onnx_export import ExportSettings, cast_for_export
    from .parity import ParityError, compare, reference_outputs, vision_spec

    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    started = time.perf_counter()
    torch_model, processor, _ = load_merged(model, adapter, dtype=m.model.dtype)
    cast_for_export(torch_model, ExportSettings(dtype=m.model.dtype))
    eos, pad = m.tokens.eos_ids, m.tokens.pad_id
    refs = reference_outputs(torch_model, processor, eos_ids=eos, pad_id=pad)
    vision = vision_spec(torch_model.config)
    del torch_model
    gc.collect()
    reference_s = time.perf_counter() - started
    chosen = plan(bundle, provider, device_id=device_id)
    graphs = OrtGraphs.from_bundle(bundle, chosen)
    started = time.perf_counter()
    try:
        report = compare(graphs, refs, vision, m.model.dtype, eos_ids=eos, pad_id=pad)
        failures: list[str] = []
    except ParityError as exc:
        report, failures = exc.report, str(exc).splitlines()[1:]
    return {
        "provider": chosen.provider,
        "providers": graphs.providers(),
        "placement": graphs.placement(),
        "bundle_dtype": m.model.dtype,
        "passed": not failures,
        "failures": failures,
        "reference_s": round(reference_s, 2),
        "compare_s": round(time.perf_counter() - started, 2),
        **report.to_dict(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gmner.export.provider_parity")
    parser.add_argument("--model", type=Path, required=True, help="the source Qwen2.5-VL folder")
    parser.add_argument("--adapter", type=Path, help="the LoRA adapter merged into the bundle")
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--provider", default="cuda", choices=("cpu", "cuda", "tensorrt"))
    parser.add_argument("--device-id", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = provider_parity(
        args.model, args.bundle, args.provider, adapter=args.adapter, device_id=args.device_id
    )
    text = json.dumps(report, indent=2)
    if args.json is not None:
        args.json.write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
