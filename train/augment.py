"""GRBP: Gaussian Risk-aware Box Perturbation of training targets (E2E-GMNER).

During training every target box is perturbed afresh each epoch, so the model does not learn to
copy one exact pixel answer for regions whose extent is ambiguous. For a box of size ``w x h``:

* the centre moves by ``(d_x * w, d_y * h)`` with ``d ~ N(0, beta^2)`` truncated to
  ``[-k * beta, k * beta]`` (``k = truncation``);
* the width and height are multiplied by ``1 + e`` with ``e ~ N(0, gamma^2)`` truncated to
  ``[-k * gamma, k * gamma]``, the factor then clamped to ``[scale_min, scale_max]``;
* the result is rounded, ordered and clipped to the image, and kept only when its IoU with the
  original is at least ``tau`` (the IoU guard); otherwise it is drawn again, up to ``tries``
  times, after which the original box is kept.

Boxes smaller than ``small_box_area`` get weaker noise (``beta`` and ``gamma`` times
``small_box_damping``); boxes thinner than ``min_size`` on either side are never moved.

Boxes are integer ``(x1, y1, x2, y2)`` in *model* space (pixels of the image after
``smart_resize``). This module knows nothing about tokenization, models, or the record text
format: it maps boxes to boxes and :class:`~gmner_rt.records.EntityRecord` to records. All
randomness comes from an explicit :class:`numpy.random.Generator`; see :func:`sample_rng`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from gmner_rt.geometry import Box, clip_box, iou
from gmner_rt.records import EntityRecord

__all__ = ["DISTRIBUTIONS", "GRBPConfig", "perturb_box", "perturb_records", "sample_rng"]

#: Noise distributions GRBP can draw from.
DISTRIBUTIONS = ("gauss", "uniform")


def _fail(name: str, rule: str, value: object) -> None:
    raise ValueError(f"grbp.{name} must be {rule}, got {value!r}")


def _is_real(value: object) -> bool:
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and not math.isnan(float(value))
    )


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class GRBPConfig:
    """Settings of GRBP; defaults are those of the reference implementation.

    Attributes:
        enabled: apply GRBP at all; when False every function here is the identity.
        beta: std of the relative centre shift ``d`` (shift = ``d * w`` or ``d * h``); >= 0.
        gamma: std of the relative size change ``e`` (factor = ``1 + e``); >= 0.
        tau: IoU guard: a perturbed box is kept only if IoU(perturbed, original) >= tau;
            in [0, 1] (0 turns the guard off, 1 keeps every box as it is).
        tries: draws per box before falling back to the original box; >= 1.
        truncation: ``k``: every draw is limited to ``k`` standard deviations (rejection
            sampling, so the Gaussian is truly truncated, not clipped); > 0, may be ``inf``.
        small_box_area: boxes with area below this (model pixels squared) are "small"; >= 0.
        small_box_damping: factor on ``beta`` and ``gamma`` for small boxes; in [0, 1].
        scale_min: lower clamp of the size factor ``1 + e``; > 0 and <= 1.
        scale_max: upper clamp of the size factor ``1 + e``; >= 1 and finite.
        min_size: boxes narrower or shorter than this (pixels) are returned unchanged; >= 1.
        distribution: ``"gauss"`` (truncated normal) or ``"uniform"``: ``U(-a, a)`` with
            ``a = sigma * sqrt(3)``, so that its std equals ``beta`` (``gamma``) as for the
            Gaussian; with ``truncation < sqrt(3)`` the support shrinks to ``k * sigma``.
    """

    enabled: bool = True
    beta: float = 0.05
    gamma: float = 0.05
    tau: float = 0.6
    tries: int = 3
    truncation: float = 2.0
    small_box_area: float = 32 * 32
    small_box_damping: float = 0.5
    scale_min: float = 0.2
    scale_max: float = 5.0
    min_size: int = 2
    distribution: str = "gauss"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        if not isinstance(self.enabled, bool):
            _fail("enabled", "a bool", self.enabled)
        for name in ("beta", "gamma", "small_box_area"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or value < 0:
                _fail(name, ">= 0", value)
        if not _is_real(self.tau) or not 0 <= self.tau <= 1:
            _fail("tau", "in [0, 1]", self.tau)
        if not _is_int(self.tries) or self.tries < 1:
            _fail("tries", "an integer >= 1", self.tries)
        if not _is_real(self.truncation) or self.truncation <= 0:
            _fail("truncation", "> 0", self.truncation)
        if not _is_real(self.small_box_damping) or not 0 <= self.small_box_damping <= 1:
            _fail("small_box_damping", "in [0, 1]", self.small_box_damping)
        if not _is_real(self.scale_min) or not 0 < self.scale_min <= 1:
            _fail("scale_min", "in (0, 1]", self.scale_min)
        if not _is_real(self.scale_max) or not 1 <= self.scale_max < math.inf:
            _fail("scale_max", ">= 1 and finite", self.scale_max)
        if not _is_int(self.min_size) or self.min_size < 1:
            _fail("min_size", "an integer >= 1", self.min_size)
        if self.distribution not in DISTRIBUTIONS:
            _fail("distribution", f"one of {DISTRIBUTIONS}", self.distribution)


def _unit_draws(rng: np.random.Generator, cfg: GRBPConfig, n: int) -> np.ndarray:
    """``n`` draws with std 1 (before truncation), limited to ``[-k, k]``."""
    if cfg.distribution == "uniform":
        a = min(math.sqrt(3.0), float(cfg.truncation))
        return rng.uniform(-a, a, size=n)
    z = rng.standard_normal(n)
    outside = np.abs(z) > cfg.truncation
    while outside.any():  # rejection sampling: a truncated, not clipped, normal
        z[outside] = rng.standard_normal(int(outside.sum()))
        outside = np.abs(z) > cfg.truncation
    return z


def _check_image_size(image_size: Sequence[int]) -> tuple[int, int]:
    if len(image_size) != 2 or not all(_is_int(v) and v > 0 for v in image_size):
        raise ValueError(
            f"image_size must be (width, height) positive integers, got {image_size!r}"
        )
    return int(image_size[0]), int(image_size[1])


def _check_box(box: Sequence[int]) -> Box:
    if len(box) != 4 or not all(_is_int(v) for v in box):
        raise ValueError(f"a box must be 4 integer coordinates (x1, y1, x2, y2), got {box!r}")
    x1, y1, x2, y2 = (int(v) for v in box)
    return x1, y1, x2, y2


def perturb_box(
    box: Sequence[int],
    image_size: tuple[int, int],
    cfg: GRBPConfig,
    rng: np.random.Generator,
) -> Box:
    """One GRBP draw of ``box`` (model space) inside an image of ``image_size = (W, H)``.

    Returns integer ``(x1, y1, x2, y2)``. A returned box that differs from the input lies in
    ``[0, W] x [0, H]``, has ``x1 < x2`` and ``y1 < y2``, and has IoU >= ``cfg.tau`` with the
    input; otherwise the input is returned unchanged (after ``cfg.tries`` rejected draws, when
    ``cfg.enabled`` is False, or when a side is shorter than ``cfg.min_size``). Pure apart
    from the draws it takes from ``rng``.
    """
    width, height = _check_image_size(image_size)
    original = _check_box(box)
    x1, y1, x2, y2 = original
    w, h = x2 - x1, y2 - y1
    if not cfg.enabled or w < cfg.min_size or h < cfg.min_size:
        return original
    beta, gamma = float(cfg.beta), float(cfg.gamma)
    if w * h < cfg.small_box_area:
        beta *= cfg.small_box_damping
        gamma *= cfg.small_box_damping
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    for _ in range(cfg.tries):
        d_x, d_y, e_w, e_h = _unit_draws(rng, cfg, 4)
        new_w = w * min(max(1.0 + gamma * e_w, cfg.scale_min), cfg.scale_max)
        new_h = h * min(max(1.0 + gamma * e_h, cfg.scale_min), cfg.scale_max)
        new_cx, new_cy = cx + beta * d_x * w, cy + beta * d_y * h
        candidate = clip_box(
            (new_cx - new_w / 2, new_cy - new_h / 2, new_cx + new_w / 2, new_cy + new_h / 2),
            width,
            height,
        )
        if (
            candidate[0] < candidate[2]
            and candidate[1] < candidate[3]
            and iou(candidate, original) >= cfg.tau
        ):
            return candidate
    return original


def perturb_records(
    records: Iterable[EntityRecord],
    image_size: tuple[int, int],
    cfg: GRBPConfig,
    rng: np.random.Generator,
) -> tuple[EntityRecord, ...]:
    """Records with every box passed through :func:`perturb_box`, in order.

    Records without boxes are kept as they are; the identity (no draws) when ``cfg.enabled``
    is False. Boxes are drawn in record order from one ``rng``, so one generator per sample
    (:func:`sample_rng`) makes the result reproducible.
    """
    records = tuple(records)
    if not cfg.enabled:
        return records
    return tuple(r.map_boxes(lambda b: perturb_box(b, image_size, cfg, rng)) for r in records)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for sample ``index`` in ``epoch`` of a run seeded with ``seed``.

    Built from ``numpy.random.SeedSequence([seed, epoch, index])``: every (epoch, sample) pair
    gets its own independent stream, so boxes are perturbed afresh each epoch, and the draws
    of a sample do not depend on which DataLoader worker loads it, in what order, or whether
    training was resumed. Call it in ``Dataset.__getitem__``; the epoch must reach the
    workers (e.g. ``persistent_workers=False``, or an epoch carried with the index), since a
    ``set_epoch`` on the main process's dataset does not reach copies in persistent workers.
    """
    for name, value in (("seed", seed), ("epoch", epoch), ("index", index)):
        if not _is_int(value) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(index)]))
