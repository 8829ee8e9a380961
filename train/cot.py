"""``gmner cot``: ask a teacher LLM for the reasoning (the ``<think>`` part) of each tweet.

One OpenAI-compatible ``POST {base_url}/chat/completions`` per tweet carries the image (a
base64 data URL), the tweet text and the gold records, and asks for a short two-part
reasoning: visual cues, then background knowledge. Each answer is appended to a JSONL file as
``{"img_id", "image_path", "think", "model"}``, the format the E2E-GMNER reference reads (it
joins ``think`` to a tweet by the image file's stem). That file is also the cache: a second
run skips the tweets already in it. Requests pass a requests-per-minute limiter and are
retried with exponential backoff and seeded jitter on HTTP 429, 5xx, timeouts, dropped
connections and empty replies; any other 4xx stops the run.

This module knows nothing about training: it neither tokenizes nor checks that the reasoning
agrees with the records. The HTTP call (:func:`post_json`) knows nothing about retries.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import logging
import mimetypes
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from gmner_rt.cli_flags import add_path_list
from gmner_rt.data import Tweet, find_image, load_split
from gmner_rt.errors import GmnerError, InputError
from gmner_rt.records import format_records

log = logging.getLogger(__name__)

ENV_BASE_URL = ("GMNER_COT_BASE_URL", "OPENAI_BASE_URL")
ENV_MODEL = ("GMNER_COT_MODEL",)
ENV_API_KEY = ("GMNER_COT_API_KEY", "OPENAI_API_KEY")
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
Sleep = Callable[[float], None]
#: ``post(url, payload, headers, timeout) -> reply``, one HTTP attempt (see :func:`post_json`).
Post = Callable[[str, dict, Mapping[str, str], float], dict]

SYSTEM_PROMPT = "You explain annotations for grounded multimodal named entity recognition."

#: The one instruction the teacher reads; :func:`prompt_text` fills the placeholders.
PROMPT_TEMPLATE = """\
Tweet: {text}
{image_line}
Gold entities, one record per entity as mention|TYPE|[x1,y1,x2,y2] in original image pixels \
(None = the image does not show the entity; a lone None = the tweet has no named entity):
{records}

Write a SHORT reasoning (at most about 120 words) that leads from the image and the tweet to \
exactly these entities, in two parts:
1. Visual cues: which entities are visible in the image and where (describe the place in \
words, such as "the man on the left"), or that the image does not show them.
2. Background knowledge: what each mention refers to and why it has its type (PER, LOC, ORG \
or OTHER).
Write plain prose as if working the answer out yourself. Do not say the entities were given, \
do not restate the records, their format or any coordinates, and do not use tags, markdown \
or headings."""


# -- Configuration ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CotConfig:
    """How to reach the teacher and how hard to try.

    Attributes:
        base_url: API root, the part before ``/chat/completions`` (``--base-url``).
        model: teacher model name sent with each request (``--model``).
        api_key: bearer token, or None for a server without authentication (``--api-key``).
        rpm: at most this many requests a minute, retries included; 0 = unlimited (``--rpm``).
        max_retries: retries of one tweet after its first attempt (``--max-retries``).
        timeout: seconds to wait for one response (``--timeout``).
        backoff: delay before the first retry in seconds, doubled on each retry (``--backoff``).
        backoff_max: cap on one computed delay; a Retry-After header is obeyed as sent
            (``--backoff-max``).
        max_tokens: cap on the length of one reply in tokens (``--max-tokens``).
        workers: requests in flight at once (``--workers``).
        seed: seed of the random generator that draws the backoff jitter (``--seed``).
    """

    base_url: str
    model: str
    api_key: str | None = None
    rpm: float = 60.0
    max_retries: int = 5
    timeout: float = 120.0
    backoff: float = 1.0
    backoff_max: float = 60.0
    max_tokens: int = 512
    workers: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise InputError(f"--base-url must start with http(s)://, got {self.base_url!r}")
        if not self.model.strip():
            raise InputError("--model must not be empty")
        checks = {
            "--rpm": (self.rpm, self.rpm >= 0),
            "--max-retries": (self.max_retries, self.max_retries >= 0),
            "--timeout": (self.timeout, self.timeout > 0),
            "--backoff": (self.backoff, self.backoff >= 0),
            "--backoff-max": (self.backoff_max, self.backoff_max >= 0),
            "--max-tokens": (self.max_tokens, self.max_tokens > 0),
            "--workers": (self.workers, self.workers >= 1),
        }
        for flag, (value, ok) in checks.items():
            if not ok:
                raise InputError(f"{flag} is out of range: {value!r}")


def _first(flag_value: str | None, env: Mapping[str, str], names: Sequence[str]) -> str | None:
    return flag_value or next((env[n] for n in names if env.get(n)), None)


def config_from_args(args: argparse.Namespace, env: Mapping[str, str]) -> CotConfig:
    """The config from the flags, falling back to environment variables; flags win."""
    base_url = _first(args.base_url, env, ENV_BASE_URL)
    model = _first(args.model, env, ENV_MODEL)
    if not base_url:
        raise InputError(f"no teacher API: pass --base-url or set {' or '.join(ENV_BASE_URL)}")
    if not model:
        raise InputError(f"no teacher model: pass --model or set {ENV_MODEL[0]}")
    fields = (
        "rpm",
        "max_retries",
        "timeout",
        "backoff",
        "backoff_max",
        "max_tokens",
        "workers",
        "seed",
    )
    return CotConfig(
        base_url=base_url.rstrip("/"),
        model=model,
        api_key=_first(args.api_key, env, ENV_API_KEY),
        **{f: getattr(args, f) for f in fields},
    )


# -- Prompt -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TeacherImage:
    """An image as sent to the teacher: a ``data:`` URL and its ``(width, height)``."""

    data_url: str
    size: tuple[int, int]


def load_image(path: Path) -> TeacherImage:
    """Read an image file into a base64 data URL (the bytes as stored, not re-encoded)."""
    try:
        with Image.open(path) as image:
            size = image.size
    except (OSError, UnidentifiedImageError) as exc:
        raise InputError(f"{path}: not a readable image ({exc})") from None
    mime = mimetypes.guess_type(path.name)[0] or "image/jpeg"
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return TeacherImage(f"data:{mime};base64,{encoded}", size)


def prompt_text(tweet: Tweet, image: TeacherImage | None) -> str:
    """The instruction for one tweet; the image size is the XML's (the boxes' space), else
    the file's."""
    size = tweet.image_size or (image.size if image else None)
    shown = "The image is attached." if image else "The image is not available here."
    image_line = f"{shown} Image size: {size[0]}x{size[1]} pixels." if size else shown
    records = format_records(tweet.records())
    return PROMPT_TEMPLATE.format(text=tweet.text, image_line=image_line, records=records)


def build_prompt(tweet: Tweet, image: TeacherImage | None) -> list[dict]:
    """Chat messages for one tweet: a system line, then the [image part and] text part."""
    content: list[dict] = []
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": image.data_url}})
    content.append({"type": "text", "text": prompt_text(tweet, image)})
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]


# -- HTTP, rate limit, retries ----------------------------------------------------------------


class TeacherError(GmnerError):
    """The teacher API refused a request in a way retrying cannot fix (a 4xx but 429)."""


class TeacherUnavailable(TeacherError):
    """One tweet's retries ran out (429, 5xx, timeouts, bad replies); the run goes on."""


class RetryableError(Exception):
    """A failure worth another try, with the server's Retry-After in seconds if it sent one."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _excerpt(body: bytes, limit: int = 300) -> str:
    text = body.decode("utf-8", "replace").strip()
    return text if len(text) <= limit else text[:limit] + "..."


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header, or None (HTTP dates are not read)."""
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def post_json(url: str, payload: dict, headers: Mapping[str, str], timeout: float) -> dict:
    """POST JSON and return the decoded JSON reply: one attempt, no retries."""
    data = json.dumps(payload).encode("utf-8")
    all_headers = {"Content-Type": "application/json", **headers}
    request = urllib.request.Request(url, data=data, headers=all_headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        detail = f"HTTP {exc.code} from {url}: {_excerpt(exc.read())}"
        if exc.code == 429 or exc.code >= 500:
            retry_after = parse_retry_after(exc.headers.get("Retry-After"))
            raise RetryableError(detail, retry_after) from None
        raise TeacherError(f"teacher API answered {detail}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
        raise RetryableError(f"{type(exc).__name__} from {url}: {exc}") from None
    try:
        return json.loads(body)
    except ValueError:
        raise RetryableError(f"reply from {url} is not JSON: {_excerpt(body)}") from None


def reply_text(reply: dict) -> str:
    """The reasoning in a chat-completions reply; empty or tagged text is retryable."""
    try:
        choice = reply["choices"][0]
        text, finish = (choice["message"]["content"] or "").strip(), choice.get("finish_reason")
    except (KeyError, IndexError, TypeError, AttributeError):
        raise RetryableError(f"reply has no choices[0].message.content: {reply!r:.300}") from None
    if not text:
        raise RetryableError(f"the teacher's reply is empty (finish_reason {finish!r})")
    if finish == "length":
        log.warning("a reply was cut at --max-tokens: ...%s", text[-60:])
    if any(tag in text.lower() for tag in _TAGS):
        raise RetryableError(f"the teacher's reply contains think/answer tags: {text[:120]!r}")
    return text


class RateLimiter:
    """Spaces request starts at least ``60 / rpm`` seconds apart, in call order; thread-safe.

    ``clock`` and ``sleep`` are injectable so that tests can run it on a fake clock.
    """

    def __init__(
        self, rpm: float, *, clock: Callable[[], float] = time.monotonic, sleep: Sleep = time.sleep
    ) -> None:
        self.interval = 60.0 / rpm if rpm > 0 else 0.0
        self._clock, self._sleep = clock, sleep
        self._next = -float("inf")
        self._lock = threading.Lock()

    def acquire(self) -> None:
        """Reserve the next free slot and sleep until it comes."""
        if self.interval == 0.0:
            return
        with self._lock:
            now = self._clock()
            slot = max(now, self._next)
            self._next = slot + self.interval
        if slot > now:
            self._sleep(slot - now)


class CotClient:
    """Chat completions with rate limiting and retries; ``post`` and ``sleep`` are injectable."""

    def __init__(
        self,
        config: CotConfig,
        *,
        rng: random.Random,
        limiter: RateLimiter | None = None,
        post: Post = post_json,
        sleep: Sleep = time.sleep,
    ) -> None:
        self.config = config
        self.url = f"{config.base_url}/chat/completions"
        self.limiter = limiter or RateLimiter(config.rpm)
        self._rng, self._rng_lock = rng, threading.Lock()
        self._post, self._sleep = post, sleep
        self._headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}

    def backoff_delay(self, attempt: int, retry_after: float | None) -> float:
        """Retry-After when the server sent one, else ``backoff * 2**attempt`` times a jitter
        factor drawn from [0.5, 1), capped at ``backoff_max``."""
        if retry_after is not None:
            return retry_after
        with self._rng_lock:
            jitter = 0.5 + 0.5 * self._rng.random()
        return min(self.config.backoff_max, self.config.backoff * 2**attempt) * jitter

    def complete(self, messages: list[dict], label: str = "request") -> str:
        """The teacher's reply text; :class:`TeacherUnavailable` once the retries are spent."""
        cfg = self.config
        payload = {"model": cfg.model, "messages": messages, "max_tokens": cfg.max_tokens}
        attempts = cfg.max_retries + 1
        for attempt in range(attempts):
            self.limiter.acquire()
            try:
                return reply_text(self._post(self.url, payload, self._headers, cfg.timeout))
            except RetryableError as exc:
                if attempt + 1 == attempts:
                    message = f"{label}: gave up after {attempts} attempts: {exc}"
                    raise TeacherUnavailable(message) from exc
                delay = self.backoff_delay(attempt, exc.retry_after)
                log.warning("%s: %s; retry %d in %.2fs", label, exc, attempt + 1, delay)
                self._sleep(delay)
        raise AssertionError("unreachable")


# -- Output file (also the cache) -------------------------------------------------------------


def read_cache(path: Path) -> set[str]:
    """Ids of the tweets already in the output file.

    A last line cut off by a kill (no newline, not JSON) is removed from the file with a
    warning, so that tweet is asked again and written once; a complete last line that only
    lacks its newline gets one. Any other bad line is an error naming the file and line.
    """
    if not path.is_file():
        return set()
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    if data[cut:].strip():
        try:
            json.loads(data[cut:])
        except ValueError:
            log.warning("%s: ignoring a truncated last line (%d bytes)", path, len(data) - cut)
            os.truncate(path, cut)
            data = data[:cut]
        else:
            with path.open("ab") as f:
                f.write(b"\n")
    done: set[str] = set()
    for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            img_id, think = row["img_id"], row["think"]
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{path}:{number}: not a cot record: {line[:120]!r}") from None
        if think:
            done.add(str(img_id))
    return done


def resolve_images(
    tweets: Iterable[Tweet], image_dirs: Sequence[str | Path], *, skip_missing: bool
) -> tuple[list[tuple[Tweet, Path | None]], int]:
    """``(tweet, image path or None)`` jobs, and how many tweets' images are missing."""
    if absent := [str(d) for d in image_dirs if not Path(d).is_dir()]:
        raise InputError(f"--images: no such folder: {', '.join(absent)}")
    jobs, missing = [], 0
    for tweet in tweets:
        path = find_image(image_dirs, tweet.img_id) if image_dirs else None
        if image_dirs and path is None:
            if not skip_missing:
                where = ", ".join(str(d) for d in image_dirs)
                raise InputError(
                    f"tweet {tweet.img_id}: no image {tweet.img_id}.* in {where} "
                    "(pass --skip-missing-images to send the text alone)"
                )
            missing += 1
        jobs.append((tweet, path))
    return jobs, missing


def _think(client: CotClient, tweet: Tweet, path: Path | None, stop: threading.Event) -> str | None:
    """One tweet's reasoning; None when an earlier error stopped the run."""
    if stop.is_set():
        return None
    try:
        image = load_image(path) if path is not None else None
        return client.complete(build_prompt(tweet, image), label=f"tweet {tweet.img_id}")
    except TeacherUnavailable:
        raise
    except BaseException:
        stop.set()  # no worker starts another request
        raise


def generate(
    jobs: Sequence[tuple[Tweet, Path | None]], client: CotClient, out: Path
) -> Counter[str]:
    """Ask the teacher for every job, appending one flushed line per answer to ``out``.

    Tweets whose retries run out are counted as ``failed``; any other error stops the run.
    """
    counts: Counter[str] = Counter()
    stop = threading.Event()
    out.parent.mkdir(parents=True, exist_ok=True)
    with (
        out.open("a", encoding="utf-8") as f,
        ThreadPoolExecutor(client.config.workers) as pool,
        tqdm(total=len(jobs), desc="cot", unit="tweet") as bar,
    ):
        futures = {pool.submit(_think, client, t, p, stop): (t, p) for t, p in jobs}
        try:
            for future in as_completed(futures):
                tweet, path = futures[future]
                bar.update()
                try:
                    think = future.result()
                except TeacherUnavailable as exc:
                    log.error("%s", exc)
                    counts["failed"] += 1
                    continue
                if think is None:
                    continue
                image_path = str(path) if path is not None else None
                row = {
                    "img_id": tweet.img_id,
                    "image_path": image_path,
                    "think": think,
                    "model": client.config.model,
                }
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                counts["done"] += 1
        except BaseException:
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return counts


# -- Command line -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``gmner cot``."""
    a = parser.add_argument
    a("--data", required=True, help="Twitter-GMNER folder (txt/<split>.txt, xml/)")
    a("--split", default="train", help="split to annotate (default: train)")
    a("--out", required=True, type=Path, help="output JSONL, also the resume cache")
    add_path_list(
        parser,
        "--images",
        help="image folder(s); without one the teacher sees the text only",
    )
    a(
        "--skip-missing-images",
        action="store_true",
        help="send the text alone for tweets without an image instead of failing",
    )
    a("--base-url", help=f"API root before /chat/completions (env {', '.join(ENV_BASE_URL)})")
    a("--model", help=f"teacher model name (env {ENV_MODEL[0]})")
    a("--api-key", help=f"bearer token (env {', '.join(ENV_API_KEY)})")
    a("--rpm", type=float, default=60.0, help="requests a minute, retries included; 0 = no cap")
    a("--max-retries", type=int, default=5, help="retries per tweet (default: 5)")
    a("--timeout", type=float, default=120.0, help="seconds per request (default: 120)")
    a("--backoff", type=float, default=1.0, help="first retry delay in seconds, then doubled")
    a("--backoff-max", type=float, default=60.0, help="cap on one retry delay in seconds")
    a("--max-tokens", type=int, default=512, help="cap on one reply's tokens (default: 512)")
    a("--limit", type=int, help="only the first N tweets of the split (cached ones included)")
    a("--workers", type=int, default=1, help="requests in flight at once (default: 1)")
    a("--seed", type=int, default=0, help="seed of the retry jitter (default: 0)")


def run(args: argparse.Namespace) -> int:
    """Annotate the split; 0 when every tweet has reasoning, 1 when some failed."""
    config = config_from_args(args, os.environ)
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be at least 1, got {args.limit}")
    tweets = load_split(args.data, args.split)[: args.limit]
    done = read_cache(args.out)
    pending = [t for t in tweets if t.img_id not in done]
    jobs, missing = resolve_images(pending, args.images, skip_missing=args.skip_missing_images)
    if not args.images:
        log.warning("no --images folder: the teacher sees the tweet text only")
    cached = len(tweets) - len(pending)
    log.info(
        "cot: %d tweets, %d cached, asking %s at %s about %d",
        len(tweets),
        cached,
        config.model,
        config.base_url,
        len(jobs),
    )
    counts = generate(jobs, CotClient(config, rng=random.Random(config.seed)), args.out)
    log.info(
        "cot summary: %d done, %d skipped (cached), %d failed, %d without image -> %s",
        counts["done"],
        cached,
        counts["failed"],
        missing,
        args.out,
    )
    return 1 if counts["failed"] else 0
