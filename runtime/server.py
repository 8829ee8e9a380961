"""The HTTP API of ``gmner serve``: a Starlette application over one extractor.

    POST /v1/extract   multipart (an ``image`` file, ``text`` and option fields) or JSON
                       (``image`` as base64, ``text``, options) -> the extraction as
                       ``gmner extract --json`` prints it
    GET  /health       200 while serving, 503 while draining; queue figures
    GET  /v1/model     the bundle's name, labels, versions, provider and the serving limits

Requests run through a :class:`~gmner.runtime.batching.Batcher` (dynamic batching, one
worker thread); the event loop only reads bodies, checks them and waits. Bad input is a 4xx
whose body names the problem (``{"error": ...}``); a full queue is a 503 with Retry-After; the
lifespan's shutdown finishes every accepted request before the process ends. This module knows
nothing about the command line, sockets or signals (uvicorn, in :mod:`.serve`, owns those).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import gmner_rt
from gmner_rt.errors import GmnerError, InputError
from gmner_rt.images import check_pixel_count
from gmner_rt.vision import to_rgb

from .batching import BatchConfig, Batcher, QueueFull
from .serve import Limits

log = logging.getLogger(__name__)

__all__ = ["create_app", "model_info"]

#: Decoding options a request may set, and how a form field's string becomes each.
OPTIONS = ("think", "think_budget", "constrained", "jump_forward", "max_new_tokens")
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


class _HTTPError(Exception):
    """An answer other than 200: the status and the message for ``{"error": ...}``."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = dict(headers or {})


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=dict(headers or {}))


# --- reading a request ---------------------------------------------------------------------


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past ``limit`` bytes (before reading it when the
    Content-Length says so, else as soon as the stream passes it)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise _HTTPError(413, f"request body of {int(length)} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _HTTPError(413, f"request body over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


async def _fields_of(request: Request, limits: Limits) -> tuple[bytes, dict[str, Any]]:
    """``(image bytes, other fields)`` of a JSON or multipart request."""
    body = await _read_body(request, limits.max_body_bytes)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InputError(f"body: not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise InputError("body: expected a JSON object with image and text")
        image = data.pop("image", None)
        if not isinstance(image, str) or not image:
            raise InputError("image: expected the image file's bytes as a base64 string")
        return _base64(image, limits), data
    if kind == "multipart/form-data":
        parser = MultiPartParser(
            request.headers,
            _once(body),
            max_files=1,
            max_fields=len(OPTIONS) + 2,
            max_part_size=limits.max_body_bytes,
        )
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            raise InputError(f"body: not a usable multipart form ({exc.message})") from None
        try:
            fields: dict[str, Any] = {}
            image = None
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if key != "image":
                        raise InputError(f"{key}: a file; only image may be one")
                    image = await value.read()
                elif key == "image":
                    raise InputError("image: expected a file part (curl -F image=@photo.jpg)")
                else:
                    fields[key] = value
        finally:
            await form.close()
        if image is None:
            raise InputError("image: missing (a file part named image)")
        return image, _form_options(fields)
    raise _HTTPError(
        415, f"Content-Type {kind or '(none)'}: send multipart/form-data or application/json"
    )


def _base64(value: str, limits: Limits) -> bytes:
    if value.startswith("data:") and "," in value:  # a data URL: data:image/png;base64,....
        value = value.split(",", 1)[1]
    if len(value) > (limits.max_image_bytes + 2) // 3 * 4:
        raise _HTTPError(413, f"image: over the limit of {limits.max_image_bytes} bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"image: not valid base64 ({exc})") from None


def _form_options(fields: dict[str, str]) -> dict[str, Any]:
    """Form fields (strings) as the JSON request's types."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if key in ("constrained", "jump_forward"):
            low = value.strip().lower()
            if low not in _TRUE + _FALSE:
                raise InputError(f"{key}: expected true or false, got {value!r}")
            out[key] = low in _TRUE
        elif key in ("think_budget", "max_new_tokens"):
            try:
                out[key] = int(value) if value.strip() else None
            except ValueError:
                raise InputError(f"{key}: expected an integer, got {value!r}") from None
        else:
            out[key] = value
    return out


def _checked(fields: dict[str, Any], limits: Limits) -> tuple[str, dict[str, Any]]:
    """``(text, decoding options)`` from a request's fields, each checked."""
    unknown = sorted(set(fields) - {"text", *OPTIONS})
    if unknown:
        raise InputError(
            f"unknown field(s) {', '.join(unknown)}; expected image, text and any of "
            f"{', '.join(OPTIONS)}"
        )
    text = fields.get("text")
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"text: expected a non-empty string, got {text!r}")
    if len(text) > limits.max_text_chars:
        raise _HTTPError(413, f"text: {len(text)} characters; the limit is {limits.max_text_chars}")
    options: dict[str, Any] = {}
    think = fields.get("think", "auto")
    if think not in ("on", "off", "auto"):
        raise InputError(f"think: expected on, off or auto, got {think!r}")
    options["think"] = think
    for key in ("constrained", "jump_forward"):
        value = fields.get(key, True)
        if not isinstance(value, bool):
            raise InputError(f"{key}: expected true or false, got {value!r}")
        options[key] = value
    for key, top in (("think_budget", None), ("max_new_tokens", limits.max_new_tokens)):
        value = fields.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{key}: expected an integer >= 1, got {value!r}")
        if top is not None and value > top:
            raise InputError(f"{key}: {value} is over this server's limit of {top}")
        options[key] = value
    if "think_budget" in options and not options["constrained"]:
        raise InputError("think_budget: needs constrained true")
    return text, options


def _decode(image: bytes, limits: Limits):
    """The upload as an RGB PIL image, as ``gmner extract --image`` reads a file."""
    if len(image) > limits.max_image_bytes:
        raise _HTTPError(413, f"image: {len(image)} bytes; the limit is {limits.max_image_bytes}")
    if not image:
        raise InputError("image: empty")
    rgb = to_rgb(image)
    check_pixel_count(rgb.width, rgb.height)
    return rgb


# --- the application -----------------------------------------------------------------------


def create_app(
    extractor,
    batch: BatchConfig | None = None,
    limits: Limits | None = None,
    drain_timeout_s: float | None = None,
) -> Starlette:
    """The application serving ``extractor`` (a :class:`gmner_rt.Extractor`).

    ``drain_timeout_s``: how long the shutdown waits for accepted requests (None: as long as
    they take).
    """
    batch = batch or BatchConfig()
    limits = limits or Limits()

    @asynccontextmanager
    async def lifespan(app: Starlette):
        app.state.batcher = Batcher(extractor, batch)
        log.info("serving %s on %s", extractor.bundle.manifest.model.name, extractor.provider)
        try:
            yield
        finally:
            batcher: Batcher = app.state.batcher
            stats = batcher.stats()
            log.info(
                "shutting down: finishing %d waiting and %d running request(s)",
                stats["waiting"],
                stats["running"],
            )
            done = await asyncio.to_thread(batcher.close, drain_timeout_s)
            if not done:
                log.error("requests still running after %s s; stopping anyway", drain_timeout_s)

    async def extract(request: Request) -> JSONResponse:
        batcher: Batcher = request.app.state.batcher
        try:
            image, fields = await _fields_of(request, limits)
            text, options = _checked(fields, limits)
            rgb = await asyncio.to_thread(_decode, image, limits)
            future = batcher.submit(rgb, text, options)
        except _HTTPError as exc:
            return _error(exc.status, str(exc), exc.headers)
        except QueueFull as exc:
            return _error(503, str(exc), {"Retry-After": str(limits.retry_after_s)})
        except InputError as exc:
            return _error(400, str(exc))
        try:
            done = await asyncio.wrap_future(future)
        except InputError as exc:
            return _error(400, str(exc))
        except GmnerError as exc:
            log.error("request failed: %s", exc)
            return _error(500, str(exc))
        except Exception as exc:  # a backend crash or a bug: logged by the batcher
            return _error(500, f"internal error ({type(exc).__name__}); see the server's log")
        return JSONResponse(
            done.extraction.to_dict(), headers={"X-Gmner-Batch-Size": str(done.batch_size)}
        )

    async def health(request: Request) -> JSONResponse:
        batcher: Batcher = request.app.state.batcher
        status = "draining" if batcher.closing else "ok"
        return JSONResponse(
            {"status": status, **batcher.stats()}, status_code=503 if batcher.closing else 200
        )

    async def model(request: Request) -> JSONResponse:
        return JSONResponse(model_info(extractor, batch, limits))

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        """Starlette's own errors (unknown path, wrong method) as JSON like the rest."""
        allowed = (exc.headers or {}).get("Allow")
        hint = f"; allowed: {allowed}" if allowed else ""
        message = f"{request.method} {request.url.path}: {exc.detail}{hint}"
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)

    return Starlette(
        routes=[
            Route("/v1/extract", extract, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/v1/model", model, methods=["GET"]),
        ],
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error},
    )


def model_info(extractor, batch: BatchConfig, limits: Limits) -> dict[str, Any]:
    """What ``GET /v1/model`` answers."""
    import onnxruntime

    m = extractor.bundle.manifest
    return {
        "name": m.model.name,
        "labels": list(m.labels),
        "provider": extractor.provider,
        "versions": {
            "gmner_rt": gmner_rt.__version__,
            "onnxruntime": onnxruntime.__version__,
            "bundle_format": m.format_version,
            "record_format": m.record_format_version,
            "exporter": dict(m.exporter),
        },
        "dtype": m.model.dtype,
        "quantization": m.quantization.scheme if m.quantization is not None else None,
        "default_max_new_tokens": m.generation.default_max_new_tokens,
        "batching": asdict(batch),
        "limits": asdict(limits),
    }
