"""A load test of ``gmner serve``: throughput and latency for 1, 4 and 16 concurrent clients,
with and without dynamic batching, on one bundle.

    python -m gmner.runtime.loadtest [--bundle B] [--clients 1,4,16] [--rounds 4] \\
        [--min-requests 0] [--repeats 1] [--threads 2] [--max-new-tokens 64] \\
        [--json out/load.json]

For each batching mode it starts its own ``gmner serve`` on a free port of 127.0.0.1 (the
only address it talks to) and warms it with one request. Then every (clients, mode) run is
made ``repeats`` times, the runs taking turns: in a run, every client is a thread that sends
``rounds`` requests one after another (closed loop) over the shipped example pairs
(``examples/demo``). Requests and time are bounded (``--rounds``, ``--min-requests``,
``--repeats``, ``--timeout``). It prints one row per (mode, clients): requests, errors,
throughput (requests over their wall time), p50 and p99 latency (the p99 of a few dozen
requests is about their maximum), the server's mean batch size, and from the answers' timings
the mean generated tokens per request and the mean prefill and decode seconds of the batches
that answered them. Batching off is ``--max-batch 1``.

It also provides the small HTTP client the tests use (:func:`post_extract`,
:class:`ServerProcess`): standard library only, so it runs wherever gmner does.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gmner_rt.errors import InputError

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "demo"


# --- a client ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """An HTTP answer: status, headers (lower-case names) and the JSON body."""

    status: int
    headers: dict[str, str]
    body: Any


def _multipart(image: bytes, fields: Mapping[str, Any]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for key, value in fields.items():
        text = json.dumps(value) if isinstance(value, bool) else str(value)
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n'
        parts.append(f"{head}{text}\r\n".encode())
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="image"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode()
        + image
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    content_type: str | None = None,
    timeout: float = 120.0,
) -> Reply:
    """One HTTP request to ``127.0.0.1:port`` (a new connection each time)."""
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        headers = {"Content-Type": content_type} if content_type else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        raw = response.read()
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = raw.decode("utf-8", "replace")
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    finally:
        connection.close()


def post_extract(
    port: int, image: bytes, text: str, timeout: float = 120.0, **options: Any
) -> Reply:
    """``POST /v1/extract`` as a multipart form (the image as a file part)."""
    body, content_type = _multipart(image, {"text": text, **options})
    return request(port, "POST", "/v1/extract", body, content_type, timeout)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ServerProcess:
    """``gmner serve`` in a child process on a free loopback port, ready when started.

    ``with ServerProcess(["--max-batch", "4"]) as server: request(server.port, ...)``; leaving
    the block sends SIGTERM and waits for the exit. Its log is kept in ``log_path``.
    """

    def __init__(
        self, args: Sequence[str] = (), log_path: Path | None = None, ready_s: float = 300.0
    ):
        self.args = list(args)
        self.log_path = log_path
        self.ready_s = ready_s
        self.port = 0
        self.process: subprocess.Popen | None = None
        self._log = None

    def start(self) -> ServerProcess:
        self.port = free_port()
        command = [sys.executable, "-m", "gmner.runtime.cli", "serve", "--port", str(self.port)]
        if self.log_path is not None:
            self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            command + self.args,
            stdout=self._log or subprocess.DEVNULL,
            stderr=subprocess.STDOUT if self._log else subprocess.DEVNULL,
        )
        deadline = time.monotonic() + self.ready_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"gmner serve exited with {self.process.returncode} before it was ready "
                    f"(log: {self.log_path})"
                )
            try:
                if request(self.port, "GET", "/health", timeout=5).status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"gmner serve not ready within {self.ready_s} s (log: {self.log_path})")

    def terminate(self) -> None:
        """Send SIGTERM (a graceful shutdown)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, then wait for the exit (SIGKILL after ``timeout``); the exit code."""
        if self.process is None:
            return None
        self.terminate()
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        if self._log is not None:
            self._log.close()
        return code

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --- the load test -------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadTestConfig:
    """What the load test runs.

    Attributes:
        bundle: the bundle to serve (``--bundle``; None: the embedded default).
        clients: the client counts, each a closed loop of one thread (``--clients``).
        rounds: requests each client sends per run (``--rounds``).
        min_requests: at least this many requests per run: a run with few clients sends more
            rounds (``--min-requests``; a multiple of the four example pairs gives every run
            the same mix of pairs).
        repeats: how many times every run is made, the runs taking turns (``--repeats``).
        threads: the server's onnxruntime intra-op threads (``--threads``).
        max_batch: the batch size with batching on (``--max-batch``); off is 1.
        max_wait_ms: the batching wait (``--max-wait-ms``).
        max_new_tokens: every request's token limit (``--max-new-tokens``).
        think: every request's think mode (``--think``).
        modes: which batching modes run, of "off" and "on" (``--modes``).
        timeout_s: the limit of the whole test and of each request (``--timeout``).
    """

    bundle: Path | None = None
    clients: tuple[int, ...] = (1, 4, 16)
    rounds: int = 4
    min_requests: int = 0
    repeats: int = 1
    threads: int = 2
    max_batch: int = 16
    max_wait_ms: float = 20.0
    max_new_tokens: int = 64
    think: str = "auto"
    modes: tuple[str, ...] = ("off", "on")
    timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        if not self.clients or any(c < 1 or c > 64 for c in self.clients):
            raise InputError(f"--clients: counts in [1, 64], got {self.clients}")
        for flag, value, top in (
            ("--rounds", self.rounds, 100),
            ("--min-requests", max(self.min_requests, 1), 1000),
            ("--repeats", self.repeats, 20),
            ("--threads", self.threads, 256),
            ("--max-batch", self.max_batch, 256),
            ("--max-new-tokens", self.max_new_tokens, 4096),
        ):
            if not 1 <= value <= top:
                raise InputError(f"{flag}: expected an integer in [1, {top}], got {value}")
        if self.think not in ("on", "off", "auto"):
            raise InputError(f"--think: expected on, off or auto, got {self.think!r}")
        if not self.modes or any(m not in ("off", "on") for m in self.modes):
            raise InputError(f"--modes: off and/or on, got {self.modes}")
        if not 0 < self.timeout_s <= 24 * 3600:
            raise InputError(f"--timeout: seconds in (0, 86400], got {self.timeout_s}")


@dataclass
class RunResult:
    """One (mode, clients) run."""

    mode: str
    clients: int
    requests: int
    errors: int
    seconds: float
    throughput: float
    p50_ms: float
    p99_ms: float
    mean_batch: float
    mean_tokens: float
    mean_prefill_s: float
    mean_decode_s: float
    latencies_ms: list[float] = field(default_factory=list, repr=False)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` percentile (0..100) by linear interpolation, as numpy's default."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q / 100
    low = int(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def _pairs() -> list[tuple[bytes, str]]:
    rows = [json.loads(line) for line in (EXAMPLES / "examples.jsonl").read_text().splitlines()]
    return [((EXAMPLES / r["image"]).read_bytes(), r["text"]) for r in rows]


def run_clients(
    port: int, clients: int, rounds: int, options: Mapping[str, Any], deadline: float
) -> tuple[list[float], int, float, list[dict]]:
    """``clients`` threads, each sending ``rounds`` requests in turn: (latencies in ms of the
    answered ones, errors, wall seconds, the answers' timings)."""
    pairs = _pairs()
    latencies: list[float] = []
    timings: list[dict] = []
    errors = [0]
    lock = threading.Lock()

    def client(index: int) -> None:
        for k in range(rounds):
            left = deadline - time.monotonic()
            if left <= 0:
                with lock:
                    errors[0] += rounds - k
                return
            image, text = pairs[(index + k) % len(pairs)]
            started = time.perf_counter()
            try:
                reply = post_extract(port, image, text, timeout=left, **options)
                ok = reply.status == 200
            except OSError:
                ok = False
            elapsed = (time.perf_counter() - started) * 1000
            with lock:
                if ok:
                    latencies.append(elapsed)
                    timings.append(reply.body["timings"])
                else:
                    errors[0] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors[0], time.perf_counter() - started, timings


def _server_args(config: LoadTestConfig, mode: str) -> list[str]:
    args = ["--threads", str(config.threads), "--max-queue", str(max(64, 2 * max(config.clients)))]
    args += ["--max-new-tokens-limit", str(config.max_new_tokens)]
    if config.bundle is not None:
        args += ["--bundle", str(config.bundle)]
    if mode == "on":
        return args + [
            "--max-batch",
            str(config.max_batch),
            "--max-wait-ms",
            str(config.max_wait_ms),
        ]
    return args + ["--max-batch", "1", "--max-wait-ms", "0"]


def load_test(config: LoadTestConfig, log_path: Path | None = None) -> list[RunResult]:
    """Every (mode, clients) run of ``config``. Each mode has its own server, all started
    (and warmed) first; then the runs take turns, ``repeats`` times over: clients, then mode,
    innermost. On a shared machine whose speed drifts, the drift then falls on every figure
    alike. A figure sums its repeats: requests over their summed wall time, the percentiles
    over all their latencies."""
    deadline = time.monotonic() + config.timeout_s
    options = {"max_new_tokens": config.max_new_tokens, "think": config.think}
    image, text = _pairs()[0]
    runs: dict[tuple[str, int], dict[str, Any]] = {
        (mode, clients): {
            "latencies": [],
            "errors": 0,
            "seconds": 0.0,
            "batches": 0,
            "served": 0,
            "timings": [],
        }
        for clients in config.clients
        for mode in config.modes
    }
    with ExitStack() as stack:
        servers = {}
        for mode in config.modes:
            server = stack.enter_context(ServerProcess(_server_args(config, mode), log_path))
            warm = post_extract(server.port, image, text, timeout=config.timeout_s, **options)
            if warm.status != 200:
                raise RuntimeError(f"warm-up request failed: {warm.status} {warm.body}")
            servers[mode] = server
        for repeat in range(config.repeats):
            for clients in config.clients:
                for mode in config.modes:
                    port = servers[mode].port
                    before = request(port, "GET", "/health").body
                    rounds = max(config.rounds, -(-config.min_requests // clients))
                    latencies, errors, seconds, timings = run_clients(
                        port, clients, rounds, options, deadline
                    )
                    after = request(port, "GET", "/health").body
                    run = runs[mode, clients]
                    run["latencies"] += latencies
                    run["timings"] += timings
                    run["errors"] += errors
                    run["seconds"] += seconds
                    run["batches"] += after["batches"] - before["batches"]
                    run["served"] += after["requests"] - before["requests"]
                    log.info(
                        "repeat %d, batching %s, %d clients: %d requests in %.1f s",
                        repeat + 1,
                        mode,
                        clients,
                        len(latencies),
                        seconds,
                    )
    return [
        RunResult(
            mode=mode,
            clients=clients,
            requests=len(run["latencies"]),
            errors=run["errors"],
            seconds=run["seconds"],
            throughput=len(run["latencies"]) / run["seconds"] if run["seconds"] > 0 else 0.0,
            p50_ms=percentile(run["latencies"], 50),
            p99_ms=percentile(run["latencies"], 99),
            mean_batch=run["served"] / run["batches"] if run["batches"] else 0.0,
            mean_tokens=_mean(t["tokens"] for t in run["timings"]),
            mean_prefill_s=_mean(t.get("prefill", 0.0) for t in run["timings"]),
            mean_decode_s=_mean(t.get("decode", 0.0) for t in run["timings"]),
            latencies_ms=run["latencies"],
        )
        for mode in config.modes
        for (m, clients), run in runs.items()
        if m == mode
    ]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def format_row(r: RunResult) -> str:
    return (
        f"| {r.mode} | {r.clients} | {r.requests} | {r.errors} | {r.throughput:.3g} | "
        f"{r.p50_ms:.0f} | {r.p99_ms:.0f} | {r.mean_batch:.2f} | {r.mean_tokens:.0f} | "
        f"{r.mean_prefill_s:.2f} | {r.mean_decode_s:.2f} |"
    )


def format_table(results: Sequence[RunResult]) -> str:
    """A Markdown table, then each batching mode's throughput at N clients over 1 client's."""
    lines = [
        "| batching | clients | requests | errors | req/s | p50 ms | p99 ms | mean batch | "
        "tokens | prefill s | decode s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [format_row(r) for r in results]
    for mode in ("off", "on"):
        runs = {r.clients: r for r in results if r.mode == mode}
        if 1 in runs and runs[1].throughput > 0:
            ratios = ", ".join(
                f"{c} clients {runs[c].throughput / runs[1].throughput:.2f}x"
                for c in sorted(runs)
                if c != 1
            )
            lines.append(f"batching {mode}: throughput over 1 client: {ratios}")
    return "\n".join(lines)


def _ints(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers joined by commas, got {value!r}"
        ) from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gmner.runtime.loadtest", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--bundle", type=Path, help="bundle to serve (default: the embedded one)")
    parser.add_argument("--clients", type=_ints, default=(1, 4, 16), help="default 1,4,16")
    parser.add_argument("--rounds", type=int, default=4, help="requests per client (default 4)")
    parser.add_argument(
        "--min-requests", type=int, default=0, help="at least this many per run (default 0)"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs of each setting, taking turns (default 1)"
    )
    parser.add_argument("--threads", type=int, default=2, help="server threads (default 2)")
    parser.add_argument("--max-batch", type=int, default=16, help="batching on (default 16)")
    parser.add_argument("--max-wait-ms", type=float, default=20.0, help="default 20")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="default 64")
    parser.add_argument("--think", default="auto", help="on, off or auto (default)")
    parser.add_argument("--modes", default="off,on", help="batching modes (default off,on)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="whole test, s")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--server-log", type=Path, help="append the servers' logs here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = LoadTestConfig(
            bundle=args.bundle,
            clients=args.clients,
            rounds=args.rounds,
            min_requests=args.min_requests,
            repeats=args.repeats,
            threads=args.threads,
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            max_new_tokens=args.max_new_tokens,
            think=args.think,
            modes=tuple(args.modes.split(",")),
            timeout_s=args.timeout,
        )
    except InputError as exc:
        parser.error(str(exc))
    results = load_test(config, log_path=args.server_log)
    print(format_table(results))
    if args.json is not None:
        data = {
            "config": {**asdict(config), "bundle": str(config.bundle) if config.bundle else None},
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
            "results": [asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
