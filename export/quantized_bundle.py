"""A quantized bundle from an fp one: copy, quantize the decoder, measure it, rewrite the manifest.

``gmner export --quant`` runs this on the bundle it has just exported and verified against
PyTorch; ``gmner export quantize`` runs it on an existing bundle, without torch or the model.
The tokenizer, the vision and the embedding graphs are copied unchanged; the decoder is
quantized (:mod:`.quantize`) and measured against the fp decoder (:mod:`.quant_check`). The
manifest is the source's with the decoder's files, a ``quantization`` section and the
measurement (``parity.quantized``) added; the source's parity report, which is about the fp
graphs, is kept. Written in a staging directory and moved into place when complete.
"""

from __future__ import annotations

import importlib.metadata
import logging
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from gmner_rt.bundle import file_entry, load_bundle, manifest_to_dict, write_manifest
from gmner_rt.errors import InputError

from .card import write_card
from .quantize import QuantSettings, quantize_decoder
from .staging import move_into_place, staging_dir

log = logging.getLogger(__name__)

__all__ = ["quantize_bundle"]


def quantize_bundle(src: Path, out: Path, settings: QuantSettings, *, verify: bool = True) -> Path:
    """Write ``src`` (an fp bundle) with its decoder quantized as the new bundle ``out``.

    ``verify`` measures the quantized decoder against the fp one and refuses one that is too
    far (:func:`gmner.export.quant_check.check_quantized`); without it the manifest's
    ``quantization.accuracy`` is null.
    """
    started = time.perf_counter()
    source = load_bundle(src)
    m = source.manifest
    if m.quantization is not None:
        raise InputError(
            f"{src}: already quantized ({m.quantization.scheme}); quantize its fp source bundle"
        )
    tmp = staging_dir(Path(out))
    try:
        decoder = m.graphs["decoder"]
        engine_dirs = tuple(e.dir + "/" for e in m.engines)  # built for the fp decoder: left out
        for name in m.files:
            if name not in (decoder.file, decoder.data_file) and not name.startswith(engine_dirs):
                shutil.copy2(source.file(name), tmp / name)
        facts = quantize_decoder(source.file(decoder.file), tmp / decoder.file, settings)
        data_file = facts.pop("data_file")
        report = None
        if verify:
            from .quant_check import check_quantized

            report = check_quantized(source, tmp / decoder.file, settings.scheme)
        data = manifest_to_dict(m)
        data.pop("engines", None)
        data["created_utc"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        data["graphs"]["decoder"]["data_file"] = data_file
        data["files"] = {p.name: file_entry(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        data["quantization"] = {
            **facts,
            "graphs": ["decoder"],
            "accuracy": report.accuracy() if report else None,
        }
        data["parity"] = {
            **(data["parity"] or {}),
            "quantized": report.to_dict() if report else None,
        }
        data["exporter"]["quantizer"] = f"onnxruntime {importlib.metadata.version('onnxruntime')}"
        write_manifest(tmp, data)
        written = load_bundle(tmp)  # the runtime's reader accepts what we wrote
        write_card(tmp, written.manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    move_into_place(tmp, Path(out))
    log.info(
        "%s bundle written to %s in %.1f s", settings.scheme, out, time.perf_counter() - started
    )
    return Path(out)
