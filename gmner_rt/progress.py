"""Progress of long loops, the same way everywhere gmner runs one.

On a terminal: a tqdm bar (when tqdm is installed) with logging routed through it, so log
lines never break the bar. Elsewhere (a log file, CI, a pipe), or without tqdm: one log line
at a steady interval with the count, the rate and the time left, and one at the end. Nothing
at all after ``configure(enabled=False)`` (``gmner -q``). This module knows nothing about what
is being counted.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["Progress", "configure", "track"]

T = TypeVar("T")

log = logging.getLogger("gmner.progress")

_STATE = {"enabled": True, "interval_s": 30.0}
#: Guards the counters of every Progress and the one logging redirect of the process: bars
#: may be updated from several threads, and only one routes logging at a time.
_LOCK = threading.RLock()
_REDIRECTS = {"open": 0}


def configure(*, enabled: bool | None = None, interval_s: float | None = None) -> None:
    """Turn progress reports on or off, and set the interval of the log-line mode."""
    if enabled is not None:
        _STATE["enabled"] = bool(enabled)
    if interval_s is not None:
        if interval_s <= 0:
            raise ValueError(f"progress interval must be > 0 seconds, got {interval_s!r}")
        _STATE["interval_s"] = float(interval_s)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Counts done units of ``total`` (or of an unknown total); a context manager."""

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "it",
        *,
        initial: int = 0,
        enabled: bool = True,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.done = self._initial = initial
        self._started = self._last = time.monotonic()
        self._bar: Any = None
        self._redirect: contextlib.ExitStack | None = None
        if not (enabled and _STATE["enabled"]):
            self._mode = "off"
        elif _terminal() and _tqdm() is not None and not _REDIRECTS["open"]:
            self._mode = "bar"  # one bar at a time; a nested loop reports by log lines
            self._open_bar()
        else:
            self._mode = "log"

    def _open_bar(self) -> None:
        tqdm = _tqdm()
        from tqdm.contrib.logging import logging_redirect_tqdm

        with _LOCK:
            _REDIRECTS["open"] += 1
            self._redirect = contextlib.ExitStack()
            self._redirect.enter_context(logging_redirect_tqdm(tqdm_class=tqdm))
        self._bar = tqdm(
            total=self.total,
            initial=self._initial,
            desc=self.desc,
            unit=self.unit,
            dynamic_ncols=True,
        )

    def update(self, n: int = 1, **postfix: object) -> None:
        """``n`` more units done; ``postfix`` (e.g. ``loss=0.31``) is shown beside the count."""
        with _LOCK:
            self.done += n
            if self._mode == "bar":
                self._bar.update(n)
                if postfix:
                    self._bar.set_postfix({k: _short(v) for k, v in postfix.items()}, refresh=False)
            elif self._mode == "log":
                now = time.monotonic()
                if now - self._last >= _STATE["interval_s"]:
                    self._last = now
                    log.info("%s", self._line(postfix))

    def _line(self, postfix: dict | None = None) -> str:
        elapsed = time.monotonic() - self._started
        rate = (self.done - self._initial) / elapsed if elapsed > 0 else 0.0
        head = f"{self.desc}: {self.done}"
        if self.total:
            head += f"/{self.total} ({100 * self.done / self.total:.0f} %)"
        head += f" {self.unit}, {_duration(elapsed)} elapsed"
        if self.total and rate > 0 and self.done < self.total:
            head += f", about {_duration((self.total - self.done) / rate)} left"
        extra = ", ".join(f"{k} {_short(v)}" for k, v in (postfix or {}).items())
        return f"{head}; {extra}" if extra else head

    def close(self) -> None:
        """End the report (idempotent); the logging redirect of a bar is undone."""
        with _LOCK:
            if self._mode == "bar":
                self._bar.close()
                self._redirect.close()
                _REDIRECTS["open"] -= 1
            elif self._mode == "log" and self.done > self._initial:
                log.info("%s (done)", self._line())
            self._mode = "off"

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(
    iterable: Iterable[T], total: int | None = None, *, desc: str, unit: str = "it"
) -> Iterator[T]:
    """Yield from ``iterable``, reporting one unit per item."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(total, desc, unit) as progress:
        for item in iterable:
            yield item
            progress.update()


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _tqdm():
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm
