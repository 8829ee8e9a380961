"""``gmner cot`` against a chat-completions server started on 127.0.0.1 by each test.

The server records every request, answers with canned reasoning, and follows a script of
failures (status codes, Retry-After, empty replies, slow replies); it refuses anything past
``MAX_HITS`` requests so that a retry bug cannot loop, and it is shut down after each test.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from gmner.runtime import cli
from gmner.train import cot
from PIL import Image

from gmner_rt.data import load_split
from gmner_rt.errors import InputError
from gmner_rt.records import format_answer, format_records

MAX_HITS = 40
REPLY = "The image shows a tall man on the left. Kevin Durant is a basketball player, a PER."

TRAIN = """IMGID:t1
Kevin\tB-PER
Durant\tI-PER
visits\tO
New\tB-LOC
York\tI-LOC

IMGID:t2
Apple\tB-ORG
&amp;\tO
Google\tB-ORG
news\tO

IMGID:t3
nothing\tO
here\tO
"""

T1_XML = """<annotation><size><width>64</width><height>48</height><depth>3</depth></size>
<object><name>Kevin Durant</name>
<bndbox><xmin>10</xmin><ymin>5</ymin><xmax>30</xmax><ymax>40</ymax></bndbox></object>
</annotation>"""


class FakeTeacher:
    """State of the fake server: the requests seen and the failures still to serve."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.script: list[tuple] = []  # (status, headers, body) or ("sleep", seconds)
        self.lock = threading.Lock()

    @property
    def hits(self) -> int:
        return len(self.requests)

    def answer(self, headers: dict, body: dict) -> tuple:
        with self.lock:
            self.requests.append({"headers": headers, "body": body})
            if len(self.requests) > MAX_HITS:
                return 410, {}, b'{"error": "fake teacher: too many requests"}'
            step = self.script.pop(0) if self.script else None
        if step and step[0] == "sleep":
            time.sleep(step[1])
        elif step:
            return step
        reply = {"choices": [{"message": {"role": "assistant", "content": REPLY}}]}
        return 200, {}, json.dumps(reply).encode()


def _handler(teacher: FakeTeacher) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            body["_path"] = self.path
            status, headers, payload = teacher.answer(dict(self.headers), body)
            try:
                self.send_response(status)
                for key, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout test)

        def log_message(self, *args) -> None:
            pass

    return Handler


@pytest.fixture(autouse=True)
def _info_logs(caplog):
    caplog.set_level(logging.INFO)


@pytest.fixture
def teacher(monkeypatch):
    """A running fake teacher; yields ``(FakeTeacher, base_url)``."""
    for name in (*cot.ENV_BASE_URL, *cot.ENV_MODEL, *cot.ENV_API_KEY):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    state = FakeTeacher()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def data(tmp_path) -> tuple[Path, Path]:
    """A three-tweet Twitter-GMNER folder and an image folder with one PNG per tweet."""
    root, images = tmp_path / "data", tmp_path / "images"
    (root / "txt").mkdir(parents=True)
    (root / "xml").mkdir()
    images.mkdir()
    (root / "txt" / "train.txt").write_text(TRAIN, encoding="utf-8")
    (root / "xml" / "t1.xml").write_text(T1_XML, encoding="utf-8")
    for img_id, size in (("t1", (64, 48)), ("t2", (40, 30)), ("t3", (20, 20))):
        Image.new("RGB", size, (200, 30, 30)).save(images / f"{img_id}.png")
    return root, images


def _gmner_cot(teacher_url, root, images, out, *extra) -> int:
    argv = [
        "cot",
        "--data",
        str(root),
        "--split",
        "train",
        "--out",
        str(out),
        "--base-url",
        teacher_url,
        "--model",
        "teacher-x",
        "--api-key",
        "sk-test",
        "--rpm",
        "0",
        "--backoff",
        "0.001",
        *extra,
    ]
    if images is not None:
        argv += ["--images", str(images)]
    return cli.main(argv)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _user_parts(request: dict) -> list[dict]:
    return request["body"]["messages"][-1]["content"]


def test_every_tweet_gets_a_line_and_the_request_carries_its_inputs(teacher, data, tmp_path):
    state, url = teacher
    root, images = data
    out = tmp_path / "cot.jsonl"
    assert _gmner_cot(url, root, images, out) == 0
    rows = _lines(out)
    assert [r["img_id"] for r in rows] == ["t1", "t2", "t3"]
    assert all(r["think"] == REPLY and r["model"] == "teacher-x" for r in rows)
    assert rows[0]["image_path"] == str(images / "t1.png")

    first = state.requests[0]
    assert first["body"]["_path"] == "/v1/chat/completions"
    assert first["body"]["model"] == "teacher-x"
    assert first["headers"]["Authorization"] == "Bearer sk-test"
    image_part, text_part = _user_parts(first)
    prefix = "data:image/png;base64,"
    assert image_part["image_url"]["url"].startswith(prefix)
    png = base64.b64decode(image_part["image_url"]["url"][len(prefix) :])
    assert png == (images / "t1.png").read_bytes()
    text = text_part["text"]
    assert "Kevin Durant visits New York" in text
    assert "Kevin Durant|PER|[10,5,30,40]; New York|LOC|None" in text
    assert "64x48 pixels" in text
    assert "Apple & Google news" in _user_parts(state.requests[1])[1]["text"]


def test_429_500_and_empty_replies_are_retried(teacher, data, tmp_path, caplog):
    state, url = teacher
    state.script = [
        (429, {"Retry-After": "0"}, b'{"error": "slow down"}'),
        (500, {}, b"boom"),
        (200, {}, json.dumps({"choices": [{"message": {"content": "  "}}]}).encode()),
    ]
    out = tmp_path / "cot.jsonl"
    assert _gmner_cot(url, data[0], data[1], out) == 0
    assert state.hits == 3 + 3
    assert {r["img_id"] for r in _lines(out)} == {"t1", "t2", "t3"}
    warnings = caplog.text
    assert "HTTP 429" in warnings and "HTTP 500" in warnings and "empty" in warnings


def test_a_timeout_is_retried(teacher, data, tmp_path):
    state, url = teacher
    state.script = [("sleep", 1.0)]
    out = tmp_path / "cot.jsonl"
    assert _gmner_cot(url, data[0], data[1], out, "--timeout", "0.2", "--limit", "1") == 0
    assert state.hits == 2
    assert [r["img_id"] for r in _lines(out)] == ["t1"]


def test_tweets_whose_retries_run_out_are_counted_and_the_exit_code_is_1(
    teacher, data, tmp_path, caplog
):
    state, url = teacher
    state.script = [(503, {}, b"down")] * 4
    out = tmp_path / "cot.jsonl"
    code = _gmner_cot(url, data[0], data[1], out, "--max-retries", "1", "--limit", "2")
    assert code == 1
    assert state.hits == 4
    assert out.read_text() == ""
    assert "0 done, 0 skipped (cached), 2 failed" in caplog.text


def test_resume_asks_only_for_the_tweets_not_yet_written(teacher, data, tmp_path, caplog):
    state, url = teacher
    root, images = data
    out = tmp_path / "cot.jsonl"
    assert _gmner_cot(url, root, images, out, "--limit", "1") == 0
    assert state.hits == 1
    assert _gmner_cot(url, root, images, out) == 0
    assert state.hits == 3
    assert _gmner_cot(url, root, images, out) == 0
    assert state.hits == 3
    assert "0 done, 3 skipped (cached), 0 failed" in caplog.text
    assert sorted(r["img_id"] for r in _lines(out)) == ["t1", "t2", "t3"]


def test_a_truncated_last_line_is_dropped_and_not_duplicated(teacher, data, tmp_path, caplog):
    state, url = teacher
    root, images = data
    out = tmp_path / "cot.jsonl"
    assert _gmner_cot(url, root, images, out, "--limit", "2") == 0
    raw = out.read_bytes()
    second = raw.index(b"\n") + 1
    out.write_bytes(raw[: second + 25])  # killed while writing t2's line
    assert _gmner_cot(url, root, images, out) == 0
    assert "truncated last line" in caplog.text
    assert state.hits == 2 + 2
    assert sorted(r["img_id"] for r in _lines(out)) == ["t1", "t2", "t3"]


def test_a_complete_last_line_without_newline_is_kept(tmp_path):
    out = tmp_path / "cot.jsonl"
    out.write_text('{"img_id": "t1", "image_path": null, "think": "x", "model": "m"}')
    assert cot.read_cache(out) == {"t1"}
    assert out.read_text().endswith("}\n")


def test_a_bad_line_inside_the_file_is_an_error_naming_the_line(tmp_path):
    out = tmp_path / "cot.jsonl"
    out.write_text('{"img_id": "t1", "think": "x"}\nnot json\n{"img_id": "t2", "think": "y"}\n')
    with pytest.raises(InputError, match=r"cot\.jsonl:2"):
        cot.read_cache(out)


def test_401_is_a_clear_error_and_is_not_retried(teacher, data, tmp_path, caplog):
    state, url = teacher
    state.script = [(401, {}, b'{"error": {"message": "invalid api key"}}')]
    assert _gmner_cot(url, data[0], data[1], tmp_path / "cot.jsonl") == 2
    assert state.hits == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("HTTP 401" in m and "invalid api key" in m for m in errors)


def test_a_missing_image_is_an_error_naming_tweet_and_folder(teacher, data, tmp_path):
    state, url = teacher
    root, images = data
    (images / "t2.png").unlink()
    args = _args(
        [
            "--data",
            str(root),
            "--out",
            str(tmp_path / "o.jsonl"),
            "--base-url",
            url,
            "--model",
            "m",
            "--images",
            str(images),
        ]
    )
    with pytest.raises(InputError, match=rf"tweet t2: no image t2\.\* in {images}"):
        cot.run(args)
    assert state.hits == 0


def test_skip_missing_images_sends_the_text_alone(teacher, data, tmp_path, caplog):
    state, url = teacher
    root, images = data
    (images / "t2.png").unlink()
    out = tmp_path / "cot.jsonl"
    assert _gmner_cot(url, root, images, out, "--skip-missing-images") == 0
    rows = {r["img_id"]: r for r in _lines(out)}
    assert rows["t2"]["image_path"] is None and rows["t1"]["image_path"]
    parts = _user_parts(state.requests[1])
    assert [p["type"] for p in parts] == ["text"]
    assert "not available" in parts[0]["text"]
    assert "1 without image" in caplog.text


def test_parallel_workers_write_every_tweet_once(teacher, data, tmp_path):
    state, url = teacher
    out = tmp_path / "cot.jsonl"
    assert _gmner_cot(url, data[0], data[1], out, "--workers", "3") == 0
    assert state.hits == 3
    assert sorted(r["img_id"] for r in _lines(out)) == ["t1", "t2", "t3"]


def test_output_reads_as_the_reference_cot_format(teacher, data, tmp_path):
    """The E2E-GMNER reference keys reasoning by the image file's stem."""
    _, url = teacher
    root, images = data
    out = tmp_path / "cot.jsonl"
    assert _gmner_cot(url, root, images, out) == 0
    by_stem = {}
    for row in _lines(out):
        think = row.get("think") or row.get("cot") or row.get("reasoning")
        by_stem[Path(row["image_path"]).stem] = think
    tweets = load_split(root, "train")
    assert set(by_stem) == {t.img_id for t in tweets}
    for tweet in tweets:
        target = format_answer(tweet.records(), think=by_stem[tweet.img_id])
        assert target.startswith(f"<think>{REPLY}</think><answer>")


# -- Units: rate limiter, backoff, configuration, prompt -------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_rate_limiter_spaces_calls_on_a_fake_clock():
    clock = FakeClock()
    limiter = cot.RateLimiter(30, clock=clock, sleep=clock.sleep)  # one call per 2 s
    starts = []
    for pause in (0, 0, 0, 10, 0.5):
        clock.now += pause
        limiter.acquire()
        starts.append(clock.now)
    assert starts == [0, 2, 4, 14, 16]
    assert clock.sleeps == [2, 2, 1.5]


def test_rate_limiter_zero_rpm_never_waits():
    clock = FakeClock()
    limiter = cot.RateLimiter(0, clock=clock, sleep=clock.sleep)
    for _ in range(5):
        limiter.acquire()
    assert clock.sleeps == []


def _client(post, sleeps: list[float], seed: int = 0) -> cot.CotClient:
    config = cot.CotConfig("http://127.0.0.1:1", "m", rpm=0, max_retries=3, backoff=1.0)
    return cot.CotClient(config, rng=random.Random(seed), post=post, sleep=sleeps.append)


def test_backoff_obeys_retry_after_else_doubles_with_seeded_jitter():
    failures = [
        cot.RetryableError("429", retry_after=2.5),
        cot.RetryableError("500"),
        cot.RetryableError("500"),
    ]

    def post(url, payload, headers, timeout):
        if failures:
            raise failures.pop(0)
        return {"choices": [{"message": {"content": "ok"}}]}

    sleeps: list[float] = []
    assert _client(post, sleeps).complete([]) == "ok"
    assert sleeps[0] == 2.5
    assert 1.0 <= sleeps[1] < 2.0 and 2.0 <= sleeps[2] < 4.0
    fresh = _client(None, [])
    assert [fresh.backoff_delay(k, None) for k in (1, 2)] == sleeps[1:]


def test_replies_with_answer_tags_are_rejected():
    with pytest.raises(cot.RetryableError, match="tags"):
        cot.reply_text({"choices": [{"message": {"content": "<think>x</think>"}}]})


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cot.add_arguments(parser)
    return parser.parse_args(argv)


def test_missing_base_url_or_model_names_the_flag_and_the_variable():
    base = ["--data", "d", "--out", "o"]
    with pytest.raises(InputError, match="--base-url.*GMNER_COT_BASE_URL"):
        cot.config_from_args(_args([*base, "--model", "m"]), {})
    with pytest.raises(InputError, match="--model.*GMNER_COT_MODEL"):
        cot.config_from_args(_args([*base, "--base-url", "http://x"]), {})


def test_environment_fills_in_and_flags_win():
    env = {
        "OPENAI_BASE_URL": "http://env/v1/",
        "GMNER_COT_MODEL": "env-model",
        "OPENAI_API_KEY": "sk-openai",
        "GMNER_COT_API_KEY": "sk-gmner",
    }
    config = cot.config_from_args(_args(["--data", "d", "--out", "o"]), env)
    assert (config.base_url, config.model, config.api_key) == (
        "http://env/v1",
        "env-model",
        "sk-gmner",
    )
    flags = [
        "--data",
        "d",
        "--out",
        "o",
        "--base-url",
        "https://flag",
        "--model",
        "f",
        "--api-key",
        "k",
    ]
    config = cot.config_from_args(_args(flags), env)
    assert (config.base_url, config.model, config.api_key) == ("https://flag", "f", "k")


@pytest.mark.parametrize(
    "field, flag",
    [("workers", "--workers"), ("timeout", "--timeout"), ("max_retries", "--max-retries")],
)
def test_config_rejects_out_of_range_values_naming_the_flag(field, flag):
    with pytest.raises(ValueError, match=flag):
        cot.CotConfig("http://x", "m", **{field: -1})


def test_prompt_without_an_image_is_text_only(data):
    tweet = load_split(data[0], "train")[0]
    messages = cot.build_prompt(tweet, None)
    (part,) = messages[-1]["content"]
    assert part["type"] == "text"
    assert format_records(tweet.records()) in part["text"]
    assert "Visual cues" in part["text"] and "Background knowledge" in part["text"]


def test_an_image_folder_that_does_not_exist_is_named(data, tmp_path):
    tweets = load_split(data[0], "train")
    with pytest.raises(InputError, match="--images: no such folder"):
        cot.resolve_images(tweets, [tmp_path / "nowhere"], skip_missing=True)
