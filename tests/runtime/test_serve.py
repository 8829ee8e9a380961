"""``gmner serve``: the real server (uvicorn in a child process on a free loopback port),
talked to over HTTP: answers, batching, limits, errors, a full queue and SIGTERM's drain."""

from __future__ import annotations

import base64
import json
import re
import signal
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")

from gmner.runtime.cli import main as cli_main  # noqa: E402
from gmner.runtime.loadtest import ServerProcess, post_extract, request  # noqa: E402

import gmner_rt  # noqa: E402

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo"
ROWS = [json.loads(line) for line in (DEMO / "examples.jsonl").read_text().splitlines()]
PAIRS = [((DEMO / r["image"]).read_bytes(), r["text"]) for r in ROWS]
IMAGE, TEXT = PAIRS[0]
LIMITS = ["--max-image-bytes", "60000", "--max-text-chars", "300"]


def _answer(data: dict) -> dict:
    data = json.loads(json.dumps(data))  # as it travels: tuples become lists
    del data["timings"]  # seconds, and the decoder calls of the whole batch
    return data


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module: batches of up to 4, gathered for up to a second."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    args = ["--max-batch", "4", "--max-wait-ms", "1000", "--max-new-tokens-limit", "200"]
    with ServerProcess(args + LIMITS, log_path=log, ready_s=120) as running:
        yield running


@pytest.fixture(scope="module")
def extractor():
    return gmner_rt.load(provider="cpu")


def _concurrently(port: int, pairs, **options):
    replies = [None] * len(pairs)

    def send(k: int) -> None:
        image, text = pairs[k]
        replies[k] = post_extract(port, image, text, timeout=120, **options)

    threads = [threading.Thread(target=send, args=(k,)) for k in range(len(pairs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return replies


def test_health_and_model_describe_the_server(server, extractor):
    health = request(server.port, "GET", "/health")
    assert health.status == 200 and health.body["status"] == "ok"
    model = request(server.port, "GET", "/v1/model")
    assert model.status == 200
    m = extractor.bundle.manifest
    assert model.body["name"] == m.model.name == "gmner-demo-tiny"
    assert model.body["labels"] == list(m.labels)
    assert model.body["provider"] == "cpu"
    assert model.body["versions"]["gmner_rt"] == gmner_rt.__version__
    assert model.body["versions"]["bundle_format"] == m.format_version
    assert model.body["batching"] == {"max_batch": 4, "max_wait_ms": 1000.0, "max_queue": 64}
    assert model.body["limits"]["max_image_bytes"] == 60000


def test_a_multipart_request_answers_what_gmner_extract_json_prints(server, tmp_path, capsys):
    reply = post_extract(server.port, IMAGE, TEXT, think="on")  # the demo model's mode
    assert reply.status == 200, reply.body
    assert reply.headers["x-gmner-batch-size"] == "1"
    image = tmp_path / "photo.png"
    image.write_bytes(IMAGE)
    assert (
        cli_main(["extract", "--image", str(image), "--text", TEXT, "--json", "--think", "on"]) == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert _answer(reply.body) == _answer(printed)
    assert reply.body["records"]  # the demo model finds the example's entities


def test_a_json_request_with_base64_and_options(server, extractor):
    body = {
        "image": "data:image/png;base64," + base64.b64encode(IMAGE).decode(),
        "text": TEXT,
        "think": "on",
        "constrained": False,
        "max_new_tokens": 40,
    }
    reply = request(
        server.port, "POST", "/v1/extract", json.dumps(body).encode(), "application/json"
    )
    assert reply.status == 200, reply.body
    own = extractor.extract(
        DEMO / ROWS[0]["image"], TEXT, think="on", constrained=False, max_new_tokens=40
    )
    assert _answer(reply.body) == _answer(own.to_dict())
    assert len(reply.body["token_ids"]) <= 40


def test_concurrent_requests_run_as_one_batch_each_answer_as_if_alone(server, extractor):
    replies = _concurrently(server.port, PAIRS, max_new_tokens=120)
    assert [r.status for r in replies] == [200] * 4, [r.body for r in replies]
    assert [r.headers["x-gmner-batch-size"] for r in replies] == ["4"] * 4
    for reply, row in zip(replies, ROWS, strict=True):
        own = extractor.extract(DEMO / row["image"], row["text"], max_new_tokens=120)
        assert _answer(reply.body) == _answer(own.to_dict())


def _json(port: int, data) -> object:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return request(port, "POST", "/v1/extract", raw, "application/json")


@pytest.mark.parametrize(
    "send, status, message",
    [
        (lambda p: post_extract(p, b"not an image", TEXT), 400, "not a readable image"),
        (lambda p: post_extract(p, IMAGE, "  "), 400, "text: expected a non-empty string"),
        (lambda p: post_extract(p, IMAGE, "x" * 301), 413, "301 characters; the limit is 300"),
        (lambda p: post_extract(p, b"\0" * 60001, TEXT), 413, "60001 bytes; the limit is 60000"),
        (lambda p: post_extract(p, IMAGE, TEXT, think="maybe"), 400, "think: expected on, off"),
        (lambda p: post_extract(p, IMAGE, TEXT, max_new_tokens=500), 400, "limit of 200"),
        (lambda p: post_extract(p, IMAGE, TEXT, max_new_tokens="x"), 400, "max_new_tokens"),
        (lambda p: post_extract(p, IMAGE, TEXT, constrained="perhaps"), 400, "constrained"),
        (lambda p: post_extract(p, IMAGE, TEXT, temperature=1), 400, "unknown field(s) temp"),
        (lambda p: _json(p, {"image": "@@@", "text": TEXT}), 400, "image: not valid base64"),
        (lambda p: _json(p, [1, 2]), 400, "expected a JSON object"),
        (lambda p: _json(p, b"{"), 400, "body: not JSON"),
        (lambda p: _json(p, {"text": TEXT}), 400, "image: expected the image file's bytes"),
        (
            lambda p: request(p, "POST", "/v1/extract", b"x", "text/plain"),
            415,
            "Content-Type text/plain",
        ),
        (
            lambda p: request(p, "POST", "/v1/extract", b"x" * 500_000, "application/json"),
            413,
            "the limit is",
        ),
        # refused by the extractor itself, through the batcher
        (lambda p: post_extract(p, IMAGE, TEXT, max_new_tokens=2), 400, "too few"),
        # Starlette's own errors answer JSON too
        (lambda p: request(p, "GET", "/v2/nothing", b"", "application/json"), 404, "Not Found"),
        (lambda p: request(p, "GET", "/v1/extract", b"", "application/json"), 405, "POST"),
        # valid base64 that is no image: named without Python internals
        (
            lambda p: _json(p, {"image": base64.b64encode(b"plain").decode(), "text": TEXT}),
            400,
            "cannot identify the format",
        ),
    ],
)
def test_bad_requests_get_a_4xx_that_names_the_problem(server, send, status, message):
    reply = send(server.port)
    assert reply.status == status, reply.body
    assert message in reply.body["error"] and "<_io." not in reply.body["error"]


def test_the_server_still_answers_after_bad_requests(server):
    assert post_extract(server.port, IMAGE, TEXT, think="off").status == 200


def test_a_full_queue_answers_503_with_retry_after(tmp_path):
    args = ["--max-batch", "1", "--max-wait-ms", "0", "--max-queue", "2", "--retry-after", "3"]
    replies, full = [], threading.Event()

    def client(k: int) -> None:  # a closed loop, until some client was refused (5 at most)
        for n in range(5):
            image, text = PAIRS[(k + n) % 4]
            reply = post_extract(small.port, image, text, max_new_tokens=150)
            replies.append(reply)
            if reply.status == 503:
                full.set()
            if full.is_set():
                return

    with ServerProcess(args, log_path=tmp_path / "serve.log", ready_s=120) as small:
        threads = [threading.Thread(target=client, args=(k,)) for k in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        after = post_extract(small.port, IMAGE, TEXT, think="off")
    statuses = [r.status for r in replies]
    assert set(statuses) <= {200, 503}, [r.body for r in replies]
    refused = [r for r in replies if r.status == 503]
    assert refused, statuses  # twelve clients cannot fit one running and two waiting
    assert all(r.headers["retry-after"] == "3" for r in refused)
    assert all("--max-queue 2); retry later" in r.body["error"] for r in refused)
    assert after.status == 200  # and it serves again once the queue has room


def test_sigterm_finishes_every_accepted_request(tmp_path):
    args = ["--max-batch", "1", "--max-wait-ms", "0"]
    server = ServerProcess(args, log_path=tmp_path / "serve.log", ready_s=120).start()
    try:
        replies = [None] * 6
        threads = []
        for k in range(6):
            image, text = PAIRS[k % 4]

            def send(k=k, image=image, text=text):
                try:
                    replies[k] = post_extract(server.port, image, text, max_new_tokens=150)
                except OSError as exc:  # a connection cut by the shutdown
                    replies[k] = exc

            threads.append(threading.Thread(target=send))
            threads[-1].start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until the server holds all six
            stats = request(server.port, "GET", "/health").body
            if stats["waiting"] + stats["running"] + stats["requests"] >= 6:
                break
            time.sleep(0.01)
        assert stats["waiting"] + stats["running"] >= 2, stats  # still work to drain
        server.terminate()
        for t in threads:
            t.join(120)
        # uvicorn re-raises the signal it handled once it has shut down
        assert server.process.wait(60) in (0, -signal.SIGTERM)
    finally:
        server.stop()
    assert [getattr(r, "status", r) for r in replies] == [200] * 6
    log = (tmp_path / "serve.log").read_text()
    assert "shutting down: finishing" in log
    assert "Application shutdown complete" in log  # the drain ended, nothing cut it short
    with pytest.raises(OSError):
        request(server.port, "GET", "/health", timeout=5)


def test_the_python_client_in_docs_runs_against_the_server(server, tmp_path, monkeypatch, capsys):
    docs = (Path(__file__).resolve().parents[2] / "docs" / "serving.md").read_text()
    heading = docs.index("A Python client with the standard library alone")
    snippet = re.search(r"```python\n(.*?)```", docs[heading:], re.S).group(1)
    snippet = snippet.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")
    (tmp_path / "photo.jpg").write_bytes(IMAGE)  # a PNG's bytes: the server reads any format
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "docs/serving.md", "exec"), namespace)  # noqa: S102
    assert namespace["result"]["image_size"] == [336, 336]
    assert "Ivy Calder PER" in capsys.readouterr().out
