"""``gmner serve``: the extractor behind HTTP, for callers that are not Python.

    gmner serve --bundle B [--provider P] [--host 127.0.0.1] [--port 8000] \\
        [--max-batch 8] [--max-wait-ms 10] [--max-queue 64]
    curl -F image=@photo.jpg -F text="Alice visits Paris" http://127.0.0.1:8000/v1/extract

The bundle is loaded (and hashed) once; requests are gathered into batches
(:mod:`.batching`) and answered with the JSON of ``gmner extract --json``. The API is in
:mod:`.server` and ``docs/serving.md``. Starlette and uvicorn come with the ``[serve]``
extra; this module imports them only when the server starts. SIGTERM or Ctrl-C stops taking
connections, finishes every accepted request, then exits.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path

from gmner_rt.errors import InputError

from .batching import BatchConfig
from .extract import add_provider_arguments, load_extractor, load_options, positive_int

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """What one request may hold, and how the server answers when it cannot take more.

    Attributes:
        max_image_bytes: the largest image upload, encoded (``--max-image-bytes``).
        max_text_chars: the longest text, in characters (``--max-text-chars``).
        max_new_tokens: the largest ``max_new_tokens`` a request may ask for
            (``--max-new-tokens-limit``); a request without one gets the bundle's default.
        retry_after_s: the Retry-After of a 503 (``--retry-after``).
    """

    max_image_bytes: int = 10 * 1024 * 1024
    max_text_chars: int = 4000
    max_new_tokens: int = 1024
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        for flag, value in (
            ("--max-image-bytes", self.max_image_bytes),
            ("--max-text-chars", self.max_text_chars),
            ("--max-new-tokens-limit", self.max_new_tokens),
            ("--retry-after", self.retry_after_s),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{flag}: expected an integer >= 1, got {value!r}")

    @property
    def max_body_bytes(self) -> int:
        """The largest request body: the image as base64, the text with every character
        escaped in JSON (``\\uXXXX\\uXXXX``), and room for the options and multipart headers."""
        return (self.max_image_bytes + 2) // 3 * 4 + 12 * self.max_text_chars + 64 * 1024


@dataclass(frozen=True)
class ServeConfig:
    """Where and how ``gmner serve`` listens.

    Attributes:
        host: the address to bind (``--host``; 127.0.0.1 takes local callers only, 0.0.0.0
            every interface).
        port: the TCP port (``--port``; 0 picks a free one).
        drain_timeout_s: on shutdown, how long accepted requests may take to finish
            (``--drain-timeout``).
        access_log: log one line per request (``--access-log``).
        batch: how requests are batched (:class:`~gmner.runtime.batching.BatchConfig`).
        limits: what a request may hold (:class:`Limits`).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    drain_timeout_s: float = 300.0
    access_log: bool = False
    batch: BatchConfig = field(default_factory=BatchConfig)
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host.strip():
            raise InputError(f"--host: expected an address, got {self.host!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise InputError(f"--port: expected an integer in [0, 65535], got {self.port!r}")
        if not 0 <= self.port <= 65535:
            raise InputError(f"--port: expected an integer in [0, 65535], got {self.port}")
        if not 0 < self.drain_timeout_s <= 86400:
            raise InputError(
                f"--drain-timeout: expected seconds in (0, 86400], got {self.drain_timeout_s}"
            )

    @property
    def connection_limit(self) -> int:
        """Connections uvicorn keeps open at once (beyond it, uvicorn answers 503): every
        waiting and running request, and room for health checks."""
        return self.batch.max_queue + self.batch.max_batch + 32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bundle", type=Path, help="exported bundle folder (default: the embedded default)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    batching = parser.add_argument_group("dynamic batching")
    batching.add_argument(
        "--max-batch",
        type=positive_int,
        default=8,
        help="most requests run as one batch (default 8; 1: no batching)",
    )
    batching.add_argument(
        "--max-wait-ms",
        type=float,
        default=10.0,
        help="how long the oldest waiting request waits for others to join (default 10)",
    )
    batching.add_argument(
        "--max-queue",
        type=positive_int,
        default=64,
        help="requests that may wait; one more gets 503 with Retry-After (default 64)",
    )
    limits = parser.add_argument_group("request limits")
    limits.add_argument(
        "--max-image-bytes",
        type=positive_int,
        default=10 * 1024 * 1024,
        help="largest image upload in bytes (default 10 MiB)",
    )
    limits.add_argument(
        "--max-text-chars",
        type=positive_int,
        default=4000,
        help="longest text in characters (default 4000)",
    )
    limits.add_argument(
        "--max-new-tokens-limit",
        type=positive_int,
        help="largest max_new_tokens a request may ask for (default: the bundle's default)",
    )
    limits.add_argument(
        "--retry-after", type=positive_int, default=1, help="Retry-After of a 503, s (default 1)"
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=300.0,
        help="on SIGTERM, seconds accepted requests may take to finish (default 300)",
    )
    parser.add_argument("--access-log", action="store_true", help="log every request")
    add_provider_arguments(parser)


def config_from_args(args: argparse.Namespace, default_max_new_tokens: int) -> ServeConfig:
    """The :class:`ServeConfig` the flags describe."""
    return ServeConfig(
        host=args.host,
        port=args.port,
        drain_timeout_s=args.drain_timeout,
        access_log=args.access_log,
        batch=BatchConfig(
            max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue
        ),
        limits=Limits(
            max_image_bytes=args.max_image_bytes,
            max_text_chars=args.max_text_chars,
            max_new_tokens=args.max_new_tokens_limit or default_max_new_tokens,
            retry_after_s=args.retry_after,
        ),
    )


def serve(extractor, config: ServeConfig) -> None:
    """Serve ``extractor`` until SIGTERM / SIGINT; every accepted request is answered."""
    import uvicorn

    from .server import create_app

    app = create_app(extractor, config.batch, config.limits, config.drain_timeout_s)
    uv = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_config=None,  # gmner's logging set-up, not uvicorn's own handlers
        access_log=config.access_log,
        limit_concurrency=config.connection_limit,
        timeout_graceful_shutdown=max(1, round(config.drain_timeout_s)),
        lifespan="on",
    )
    uvicorn.Server(uv).run()


def check_port_free(host: str, port: int) -> None:
    """An ``InputError`` naming ``--port`` when the address is taken, before anything loads
    (uvicorn would only find out after the bundle)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise InputError(
                f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); "
                "choose another --port"
            ) from None


def run(args: argparse.Namespace) -> int:
    # checked before the bundle loads: a bad flag costs no load
    BatchConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue)
    ServeConfig(host=args.host, port=args.port, drain_timeout_s=args.drain_timeout)
    import starlette  # noqa: F401  (the [serve] extra: named before the bundle loads)
    import uvicorn  # noqa: F401

    check_port_free(args.host, args.port)
    extractor = load_extractor(args.bundle, **load_options(args))
    extractor.token_table  # built now, not during the first request  # noqa: B018
    config = config_from_args(args, extractor.bundle.manifest.generation.default_max_new_tokens)
    serve(extractor, config)
    return 0
