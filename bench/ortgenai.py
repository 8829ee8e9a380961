"""onnxruntime-genai as a peer system for the benchmarks: its model builder's decoder.

Boundary: this module is a benchmark adapter, not part of the runtime library. It builds
onnxruntime-genai's own text decoder for a Qwen2.5-VL checkpoint (:func:`build_decoder`, the
builder ``python -m onnxruntime_genai.models.builder`` run as a subprocess into a cache), and
runs it two ways:

* :class:`OrtGenaiDecoder`: a :class:`gmner_rt.generate.Backend` whose vision and embedding
  graphs are the bundle's own and whose decoder is the builder's ``exclude_embeds`` model
  (input ``inputs_embeds``), run by a plain onnxruntime session with IOBinding, driven by
  :mod:`gmner_rt.generate` like our own decoder. onnxruntime-genai's ``Generator`` is not
  used here: it cannot take our image embeddings;
* :func:`text_only_generate`: onnxruntime-genai's own ``og.Model``/``og.Generator`` on a
  text-only prompt (a build that takes ``input_ids``).

It knows nothing about prompts, images, records or timing tables (``gmner bench``'s). It
imports ``onnxruntime_genai`` lazily; the builder needs torch and transformers too (the
``train`` extra). Weights come from the checkpoint directory given to :func:`build_decoder`:
for a bundle exported with an adapter, build from the merged model (``gmner export merge``).

The builder's decoder (0.18, ``Qwen2_5_VLForConditionalGeneration``, checked):

* inputs ``inputs_embeds [B, T, hidden]``, ``attention_mask [B, total] int64``,
  ``position_ids [3, B, T] int64`` (M-RoPE rows t, h, w, applied by ``MRotaryEmbedding``),
  ``past_key_values.{i}.key|value [B, kv_heads, past, head_dim]``; outputs
  ``logits [B, T, vocab]`` (every position; ``[B, 1, vocab]`` with ``prune_lm_head=true``)
  and ``present.{i}.key|value [B, kv_heads, total, head_dim]`` (names from genai_config.json);
* attention is ``GroupQueryAttention``, which reads the mask only as per-row lengths
  (``seqlens_k = sum(mask) - 1``, ``total = mask width``): each row's valid keys are the
  first ``seqlens_k + 1`` of its cache, i.e. right padding; a left-padded mask is misread.

:class:`OrtGenaiDecoder` therefore re-lays a left-padded prompt as right padding (each row's
real tokens first; the cache then holds each row's keys from position 0, and the backend
tracks each row's length in the cache object it returns) and passes GroupQueryAttention the
mask it understands. Rows that are fed different numbers of tokens in one decode step
(jump-forward under a grammar with batch > 1) cannot be expressed and raise
:class:`~gmner_rt.errors.BackendError`; a row fed nothing (finished) is fed padding that it
never reads again.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import numbers
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from gmner_rt.backends import onnxruntime as ort_backend
from gmner_rt.errors import BackendError, InputError

log = logging.getLogger(__name__)

__all__ = [
    "EXECUTION_PROVIDERS",
    "PRECISIONS",
    "STAMP_NAME",
    "GqaCache",
    "OrtGenaiDecoder",
    "build_decoder",
    "text_only_generate",
]

#: ``-p`` values of the 0.18 builder (CPU takes fp32, int8 and int4).
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
#: ``-e`` values of the 0.18 builder.
EXECUTION_PROVIDERS = ("cpu", "cuda", "dml", "webgpu")
#: Written into a finished build, last: a folder without it is an unfinished build.
STAMP_NAME = "gmner-ortgenai-build.json"
GENAI_CONFIG = "genai_config.json"
#: Lines of the builder's stderr quoted in a build error.
_TAIL_LINES = 25
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def _genai_version() -> str:
    try:
        return importlib.metadata.version("onnxruntime-genai")
    except importlib.metadata.PackageNotFoundError:
        raise BackendError(
            "onnxruntime-genai is not installed (pip install onnxruntime-genai)"
        ) from None


def _import_genai():
    try:
        import onnxruntime_genai
    except ImportError as exc:
        raise BackendError(
            f"onnxruntime-genai is not importable ({exc}); pip install onnxruntime-genai"
        ) from exc
    return onnxruntime_genai


# --- building ---------------------------------------------------------------------------------


def _option_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _build_key(
    model_dir: Path, precision: str, ep: str, exclude_embeds: bool, extra: Mapping[str, str]
) -> dict:
    """What a build depends on: the checkpoint's config and weight files, and the options."""
    config = model_dir / "config.json"
    if not config.is_file():
        raise InputError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    weights = sorted(
        p
        for p in model_dir.iterdir()
        if p.is_file() and (p.name.endswith(".safetensors") or p.name.endswith(".index.json"))
    )
    if not any(p.name.endswith(".safetensors") for p in weights):
        raise InputError(f"{model_dir}: no *.safetensors weights")
    digest = hashlib.sha256(config.read_bytes())
    generation = model_dir / "generation_config.json"  # the builder's eos ids come from it
    if generation.is_file():
        digest.update(generation.read_bytes())
    return {
        "config_sha256": digest.hexdigest(),
        "weights": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in weights],
        "precision": precision,
        "execution_provider": ep,
        "exclude_embeds": exclude_embeds,
        "extra_options": dict(sorted(extra.items())),
        "onnxruntime_genai": _genai_version(),
    }


def _build_name(model_dir: Path, key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_dir.name) or "model"
    inputs = "embeds" if key["exclude_embeds"] else "ids"
    return f"{slug}-{key['precision']}-{key['execution_provider']}-{inputs}-{digest}"


def _tail(text: str, lines: int = _TAIL_LINES) -> str:
    """The last lines of a log, progress-bar redraws (carriage returns) collapsed."""
    kept = [line.rstrip() for line in re.split(r"[\r\n]+", text) if line.strip()]
    return "\n".join(kept[-lines:])


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=4) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_genai_config(decoder_dir: Path) -> dict:
    path = decoder_dir / GENAI_CONFIG
    if not path.is_file():
        raise BackendError(f"{decoder_dir}: not an onnxruntime-genai build (no {GENAI_CONFIG})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BackendError(f"{path}: unreadable ({exc})") from exc


def _set_threads(decoder_dir: Path, threads: int | None) -> None:
    """The decoder session's intra-op threads in genai_config.json (None: onnxruntime's)."""
    path = decoder_dir / GENAI_CONFIG
    config = _read_genai_config(decoder_dir)
    options = config["model"]["decoder"].setdefault("session_options", {})
    if options.get("intra_op_num_threads") == threads:
        return
    if threads is None:
        options.pop("intra_op_num_threads", None)
    else:
        options["intra_op_num_threads"] = threads
    _write_json(path, config)


def _check_threads(threads: int | None) -> None:
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads <= 0
    ):
        raise InputError(f"threads: expected a positive integer or None, got {threads!r}")


def build_decoder(
    model_dir: str | os.PathLike,
    cache_dir: str | os.PathLike,
    *,
    precision: str = "fp32",
    execution_provider: str = "cpu",
    exclude_embeds: bool = True,
    threads: int | None = None,
    extra_options: Mapping[str, object] | None = None,
) -> Path:
    """onnxruntime-genai's decoder for a Qwen2.5-VL checkpoint, built once into ``cache_dir``.

    Runs ``python -m onnxruntime_genai.models.builder -i MODEL -o OUT -p PRECISION -e EP
    --extra_options exclude_embeds=true ...`` in a subprocess, in a temporary folder moved
    into place after a stamp file is written, so a crashed build is never reused. The folder
    (``cache_dir/<model>-<precision>-<ep>-<embeds|ids>-<hash>``) is keyed by the checkpoint's
    ``config.json``/``generation_config.json`` bytes, its weight files' names, sizes and
    modification times, the options and the builder's version; a finished one is reused.

    Args:
        model_dir: a local Hugging Face Qwen2.5-VL directory (fp32/bf16 safetensors).
        cache_dir: where builds live.
        precision: one of :data:`PRECISIONS` (CPU: fp32, int8 or int4).
        execution_provider: one of :data:`EXECUTION_PROVIDERS`.
        exclude_embeds: build the decoder that takes ``inputs_embeds`` (for
            :class:`OrtGenaiDecoder`); False: the one that takes ``input_ids`` (for
            :func:`text_only_generate`).
        threads: the decoder session's ``intra_op_num_threads`` written into
            genai_config.json (None: removed, onnxruntime's default); not part of the key.
        extra_options: more builder ``--extra_options`` (``prune_lm_head``, ``block_size``,
            ``accuracy_level``, ...); part of the key.

    Raises:
        InputError: the model directory or an option is unusable.
        BackendError: onnxruntime-genai is missing, or the builder failed (the message names
            the model directory and quotes the end of the builder's stderr; the whole log is
            kept beside the build folder).
    """
    model = Path(model_dir).expanduser().resolve()
    if not model.is_dir():
        raise InputError(f"{model}: model directory not found")
    if precision not in PRECISIONS:
        raise InputError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if execution_provider not in EXECUTION_PROVIDERS:
        raise InputError(
            f"execution_provider: expected one of {EXECUTION_PROVIDERS}, got {execution_provider!r}"
        )
    _check_threads(threads)
    extra = {str(k): _option_text(v) for k, v in (extra_options or {}).items()}
    if "exclude_embeds" in extra:
        raise InputError("extra_options: pass exclude_embeds as the keyword argument")
    if exclude_embeds:
        extra["exclude_embeds"] = "true"
    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise BackendError("onnxruntime-genai is not installed (pip install onnxruntime-genai)")
    key = _build_key(model, precision, execution_provider, exclude_embeds, extra)
    cache = Path(cache_dir).expanduser().resolve()
    cache.mkdir(parents=True, exist_ok=True)
    name = _build_name(model, key)
    final = cache / name
    if (final / STAMP_NAME).is_file():
        log.info("onnxruntime-genai build: reusing %s", final)
    else:
        _run_builder(model, final, precision, execution_provider, extra, key)
    _set_threads(final, threads)
    return final


def _run_builder(
    model: Path, final: Path, precision: str, ep: str, extra: Mapping[str, str], key: dict
) -> None:
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    out = tmp / "model"
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model)]
    command += ["-o", str(out), "-p", precision, "-e", ep, "-c", str(tmp / "builder-cache")]
    if extra:
        command += ["--extra_options", *(f"{k}={v}" for k, v in extra.items())]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    log.info("onnxruntime-genai build: %s (%s, %s) -> %s", model, precision, ep, final)
    log.debug("builder command: %s", " ".join(command))
    started = time.perf_counter()
    try:
        tmp.mkdir(parents=True)
        done = subprocess.run(
            command, capture_output=True, text=True, errors="replace", env=env, check=False
        )
        seconds = time.perf_counter() - started
        log.debug("builder stdout:\n%s", _tail(done.stdout, 200))
        if done.returncode != 0 or not (out / GENAI_CONFIG).is_file():
            failed_log = final.with_name(final.name + ".failed.log")
            failed_log.write_text(
                f"$ {' '.join(command)}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}",
                encoding="utf-8",
            )
            raise BackendError(
                f"{model}: the onnxruntime-genai builder failed (exit {done.returncode}, "
                f"{seconds:.1f} s; full log {failed_log}); its stderr ends:\n"
                f"{_tail(done.stderr) or _tail(done.stdout)}"
            )
        stamp = {
            **key,
            "model_dir": str(model),
            "command": command[1:],
            "build_seconds": round(seconds, 3),
            "built_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        _write_json(out / STAMP_NAME, stamp)
        if final.exists():  # an unfinished folder (no stamp), or another process's build
            if (final / STAMP_NAME).is_file():
                log.info("onnxruntime-genai build: another process finished %s first", final)
                return
            shutil.rmtree(final)
        try:
            os.rename(out, final)
        except OSError:
            if not (final / STAMP_NAME).is_file():
                raise
        log.info("onnxruntime-genai build: %s built in %.1f s", final, seconds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- the decoder as a gmner_rt backend --------------------------------------------------------


class GqaCache(list):
    """The KV cache ``[key_0, value_0, key_1, value_1, ...]`` (onnxruntime values) with each
    row's number of valid positions, which lie first (right padding: GroupQueryAttention's)."""

    def __init__(self, values, lengths: np.ndarray):
        super().__init__(values)
        self.lengths = lengths


def _seq_len(value) -> int:
    shape = value.shape if isinstance(value, np.ndarray) else value.shape()
    return int(shape[2])


def _env_threads() -> int | None:
    value = os.environ.get("GMNER_THREADS")
    if value is None:
        return None
    if not value.isdigit() or int(value) <= 0:
        raise BackendError(f"GMNER_THREADS: expected a positive integer, got {value!r}")
    return int(value)


class OrtGenaiDecoder:
    """A :class:`gmner_rt.generate.Backend`: the bundle's vision and embedding graphs, and
    onnxruntime-genai's model-builder decoder (an ``exclude_embeds`` build) for ``decode``.

    The KV cache stays in onnxruntime values between calls (IOBinding, as
    :class:`gmner_rt.backends.onnxruntime.OrtGraphs`); :meth:`decode` returns the logits of
    each row's last real token, ``[B, vocab]`` float32.

    Batches: left-padded prompts of different lengths are re-laid as right padding for
    GroupQueryAttention (see the module docstring), so they decode correctly. A decode step
    that feeds some rows fewer tokens than others, but more than none (jump-forward with
    batch > 1), raises :class:`BackendError`: GroupQueryAttention appends the same number of
    tokens to every row. A row fed nothing (finished) is fed padding; its logits are garbage.
    With a ``prune_lm_head`` build, prompts of different lengths raise too (the pruned head
    reads the last column only).
    """

    def __init__(
        self,
        files: Mapping[str, str | os.PathLike],
        decoder_dir: str | os.PathLike,
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ):
        """``files``: the bundle's ``vision`` and ``embedding`` graph files."""
        _check_threads(threads)
        self.decoder_dir = Path(decoder_dir)
        self.genai_config = _read_genai_config(self.decoder_dir)
        spec = self.genai_config["model"]["decoder"]
        inputs, outputs = spec["inputs"], spec["outputs"]
        if "inputs_embeds" not in inputs:
            raise BackendError(
                f"{self.decoder_dir}: a decoder that takes input_ids; OrtGenaiDecoder needs an "
                "exclude_embeds build (build_decoder(..., exclude_embeds=True))"
            )
        self.num_layers = int(spec["num_hidden_layers"])
        self.num_kv_heads = int(spec["num_key_value_heads"])
        self.head_dim = int(spec["head_size"])
        self.hidden_size = int(spec["hidden_size"])
        self.vocab_size = int(self.genai_config["model"]["vocab_size"])
        if threads is None:
            threads = _env_threads()
        if threads is None:
            threads = spec.get("session_options", {}).get("intra_op_num_threads")
        if providers is None:
            provider_options = spec.get("session_options", {}).get("provider_options", [])
            on_cuda = any("cuda" in entry for entry in provider_options)
            providers = ["CUDAExecutionProvider"] * on_cuda + ["CPUExecutionProvider"]
        self.vision = ort_backend.session(Path(files["vision"]), providers, threads)
        self.embedding = ort_backend.session(Path(files["embedding"]), providers, threads)
        self.decoder = ort_backend.session(self.decoder_dir / spec["filename"], providers, threads)
        self._names = {
            "inputs_embeds": inputs["inputs_embeds"],
            "attention_mask": inputs["attention_mask"],
            "position_ids": inputs["position_ids"],
            "logits": outputs["logits"],
        }
        self._past_names, self._present_names = [], []
        for layer in range(self.num_layers):
            self._past_names += [
                inputs["past_key_names"] % layer,
                inputs["past_value_names"] % layer,
            ]
            self._present_names += [
                outputs["present_key_names"] % layer,
                outputs["present_value_names"] % layer,
            ]
        self._check_io()
        self.device = (
            "cuda" if self.decoder.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        )

    def _check_io(self) -> None:
        ins = {i.name: i for i in self.decoder.get_inputs()}
        outs = {o.name: o for o in self.decoder.get_outputs()}
        wanted_in = [self._names[n] for n in ("inputs_embeds", "attention_mask", "position_ids")]
        missing = [n for n in [*wanted_in, *self._past_names] if n not in ins]
        missing += [n for n in [self._names["logits"], *self._present_names] if n not in outs]
        extra = sorted(set(ins) - set(wanted_in) - set(self._past_names))
        if missing or extra:
            raise BackendError(
                f"{self.decoder_dir}: decoder I/O differs from genai_config.json "
                f"(missing {missing}, unexpected inputs {extra})"
            )
        positions = ins[self._names["position_ids"]].shape
        if len(positions) != 3 or positions[0] != 3:
            raise BackendError(
                f"{self.decoder_dir}: expected position_ids [3, batch, sequence] (M-RoPE), "
                f"got {positions}"
            )
        self.embeds_dtype = _ORT_DTYPES[ins[self._names["inputs_embeds"]].type]
        self.kv_dtype = _ORT_DTYPES[ins[self._past_names[0]].type]
        self.pruned = outs[self._names["logits"]].shape[1] == 1

    @classmethod
    def from_bundle(
        cls,
        bundle,
        decoder_dir: str | os.PathLike,
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ) -> OrtGenaiDecoder:
        """The backend for a :class:`gmner_rt.bundle.Bundle` and a :func:`build_decoder`
        folder of the same model (its shapes are checked against the manifest)."""
        m = bundle.manifest
        files = {name: bundle.file(m.graphs[name].file) for name in ("vision", "embedding")}
        backend = cls(files, decoder_dir, providers=providers, threads=threads)
        text = m.model.text
        ours = (text.num_layers, text.num_kv_heads, text.head_dim, text.hidden_size)
        ours += (text.vocab_size,)
        theirs = (backend.num_layers, backend.num_kv_heads, backend.head_dim)
        theirs += (backend.hidden_size, backend.vocab_size)
        if ours != theirs:
            raise BackendError(
                f"{decoder_dir}: built from another model than {bundle.path} "
                "(layers, kv heads, head dim, hidden, vocab: "
                f"{theirs} against the manifest's {ours})"
            )
        if m.model.adapter is not None:
            log.warning(
                "%s merges adapter %s: %s must be built from the merged checkpoint "
                "(gmner export merge), or its decoder has other weights",
                bundle.path,
                m.model.adapter,
                decoder_dir,
            )
        return backend

    def encode_images(self, pixel_values: np.ndarray, indices) -> np.ndarray:
        """``image_embeds [groups, hidden]`` from the bundle's vision graph."""
        return ort_backend.encode_images(self.vision, pixel_values, indices)

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        """``inputs_embeds [B, T, hidden]`` from the bundle's embedding graph."""
        return ort_backend.embed(self.embedding, input_ids)

    def empty_cache(self, batch: int) -> GqaCache:
        """A KV cache of past length 0."""
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        values = [np.zeros(shape, dtype=self.kv_dtype) for _ in self._past_names]
        return GqaCache(values, np.zeros(batch, dtype=np.int64))

    def decode(
        self,
        inputs_embeds: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: Sequence,
    ) -> tuple[np.ndarray, GqaCache]:
        """One decoder call: ``(logits [B, vocab] of each row's last token, present cache)``."""
        rows, width = inputs_embeds.shape[:2]
        mask = np.asarray(attention_mask)
        total = mask.shape[1]
        past_width = _seq_len(past[0])
        if mask.shape[0] != rows or past_width != total - width:
            raise BackendError(
                f"attention_mask {mask.shape} does not match inputs_embeds {inputs_embeds.shape} "
                f"and a cache of {past_width} positions"
            )
        lengths = getattr(past, "lengths", None)
        if lengths is None:
            if past_width:
                raise BackendError("past: not a cache of this backend (empty_cache or decode's)")
            lengths = np.zeros(rows, dtype=np.int64)
        counts = mask[:, total - width :].sum(axis=1).astype(np.int64)
        embeds = np.ascontiguousarray(inputs_embeds, dtype=self.embeds_dtype)
        positions = np.ascontiguousarray(position_ids, dtype=np.int64)
        if (counts != width).any():
            if past_width == 0:
                if (counts == 0).any():
                    raise BackendError("attention_mask: a prompt row has no tokens")
                if self.pruned:
                    raise BackendError(
                        f"{self.decoder_dir}: a prune_lm_head build reads the last column only; "
                        "it cannot decode prompts of different lengths in one batch"
                    )
                embeds, positions = _right_padded(embeds, positions, mask != 0)
            else:
                finished = counts == 0
                if (counts[~finished] != width).any():
                    raise BackendError(
                        "GroupQueryAttention appends the same number of tokens to every row: "
                        f"a step fed rows {counts.tolist()} tokens (jump-forward with batch > 1 "
                        "is not supported by this backend; decode such batches one row at a time)"
                    )
                counts = np.where(finished, width, counts)
        lengths = lengths + counts
        gqa_mask = (np.arange(total)[None, :] < lengths[:, None]).astype(np.int64)

        binding = self.decoder.io_binding()
        binding.bind_cpu_input(self._names["inputs_embeds"], embeds)
        binding.bind_cpu_input(self._names["attention_mask"], gqa_mask)
        binding.bind_cpu_input(self._names["position_ids"], positions)
        for name, value in zip(self._past_names, past, strict=True):
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, np.ascontiguousarray(value, dtype=self.kv_dtype))
            else:
                binding.bind_ortvalue_input(name, value)
        binding.bind_output(self._names["logits"], "cpu")
        for name in self._present_names:
            binding.bind_output(name, self.device)
        self.decoder.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        logits = outputs[0].numpy()
        last = logits[:, -1] if self.pruned else logits[np.arange(rows), counts - 1]
        return last.astype(np.float32, copy=False), GqaCache(outputs[1:], lengths)


def _right_padded(
    embeds: np.ndarray, positions: np.ndarray, real: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's real tokens (``real [B, T]``) moved first, padding after them."""
    new_embeds = np.zeros_like(embeds)
    new_positions = np.zeros_like(positions)
    for row in range(len(embeds)):
        index = np.flatnonzero(real[row])
        new_embeds[row, : len(index)] = embeds[row, index]
        new_positions[:, row, : len(index)] = positions[:, row, index]
    return new_embeds, new_positions


# --- onnxruntime-genai's own generator (text only) ---------------------------------------------


@functools.lru_cache(maxsize=1)
def _genai_model(decoder_dir: str, overlay: str):
    og = _import_genai()
    config = og.Config(decoder_dir)
    if overlay:
        config.overlay(overlay)
    started = time.perf_counter()
    model = og.Model(config)
    log.info("og.Model %s loaded in %.2f s", decoder_dir, time.perf_counter() - started)
    return model


def text_only_generate(
    decoder_dir: str | os.PathLike,
    prompt_ids: Sequence[int],
    new_tokens: int,
    *,
    threads: int | None = None,
    eos_ids: Sequence[int] | None = None,
) -> dict:
    """Greedy decoding of exactly ``new_tokens`` tokens by ``og.Generator`` (batch 1).

    ``decoder_dir`` is a :func:`build_decoder` folder built with ``exclude_embeds=False``.
    ``min_length = max_length = prompt + new_tokens``, so the search masks the end-of-sequence
    ids (the build's, or ``eos_ids``) until the last token: like our loop with those ids'
    logits set to -inf. ``threads`` overrides the session's intra-op threads. The
    ``og.Model`` of the last call is kept (loading is not timed).

    Returns ``{"tokens": [new_tokens ids], "ttft_s": seconds from the prompt's
    append_tokens to the first token, "token_times_s": [the time of each later token]
    (new_tokens - 1 of them), "decode_tokens_per_s": their rate, "prompt_tokens": n}``.
    """
    _check_threads(threads)
    og = _import_genai()
    path = Path(decoder_dir)
    spec = _read_genai_config(path)["model"]
    if "inputs_embeds" in spec["decoder"]["inputs"]:
        raise InputError(
            f"{path}: an exclude_embeds build (it takes inputs_embeds); text_only_generate "
            "needs build_decoder(..., exclude_embeds=False)"
        )
    ids = [int(t) for t in prompt_ids]
    if not ids:
        raise InputError("prompt_ids: expected at least one token")
    if new_tokens < 1:
        raise InputError(f"new_tokens: must be >= 1, got {new_tokens}")
    total = len(ids) + new_tokens
    if total > int(spec.get("context_length", total)):
        raise InputError(f"prompt + new_tokens = {total} exceeds the context length")
    overlay: dict = {}
    if threads is not None:
        options = {"intra_op_num_threads": int(threads), "inter_op_num_threads": 1}
        overlay["model"] = {"decoder": {"session_options": options}}
    if eos_ids is not None:
        overlay.setdefault("model", {})["eos_token_id"] = [int(t) for t in eos_ids]
    model = _genai_model(str(path), json.dumps(overlay, sort_keys=True) if overlay else "")
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=total, min_length=total)
    generator = og.Generator(model, params)
    tokens: list[int] = []
    times: list[float] = []
    last = time.perf_counter()
    generator.append_tokens(ids)
    while len(tokens) < new_tokens and not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
        now = time.perf_counter()
        times.append(now - last)
        last = now
    if len(tokens) != new_tokens:
        raise BackendError(f"og.Generator stopped after {len(tokens)} of {new_tokens} tokens")
    decode = times[1:]
    seconds = sum(decode)
    return {
        "tokens": tokens,
        "ttft_s": times[0],
        "token_times_s": decode,
        "decode_tokens_per_s": len(decode) / seconds if seconds > 0 else math.nan,
        "prompt_tokens": len(ids),
    }
