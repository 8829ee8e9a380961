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

``distribution="reference"`` is the E2E-GMNER reference code's draw instead
(``evaluation/geometry.py``): there ``beta`` / ``gamma`` are *clip bounds*, not standard
deviations. Each relative draw is ``N(0, sigma^2)`` with ``sigma = beta / sqrt(3)`` (the std of
``U(-beta, beta)``), clipped (not redrawn) to ``+-min(beta, k * sigma)``; the candidate box
stays in floating point until it is accepted (its IoU is taken before rounding), and a
candidate that clipping leaves thinner than ``min_size`` ends the tries with the original box.

What each source says: the paper's text writes the centre noise as ``N(0, beta^2)`` and
reportedly prefers beta = 0.03 (with lr 4e-5); the reference's ``train_lora.sh`` runs
beta = gamma = 0.1 as clip bounds, tau 0.6, 5 tries (lr 5e-4), its collator's own defaults
being 0.05 and 3 tries. gmner's defaults (a std of 0.05 truncated at 2 sigma, 3 tries) are
the collator's numbers read as the paper's Gaussian; ``gmner train --recipe reference`` sets
the script's values with the reference draw.

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
DISTRIBUTIONS = ("gauss", "uniform", "reference")


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
    """Settings of GRBP. Defaults: the reference collator's numbers (0.05, 3 tries) read as
    the paper's Gaussian std; ``--recipe reference`` gives the reference script's exactly.

    Attributes:
        enabled: apply GRBP at all; when False every function here is the identity.
        beta: std of the relative centre shift ``d`` (shift = ``d * w`` or ``d * h``); with
            ``distribution="reference"`` the clip bound of ``d`` (std ``beta / sqrt(3)``);
            >= 0.
        gamma: std of the relative size change ``e`` (factor = ``1 + e``); the clip bound
            with ``distribution="reference"``; >= 0.
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
        distribution: ``"gauss"`` (truncated normal), ``"uniform"``: ``U(-a, a)`` with
            ``a = sigma * sqrt(3)``, so that its std equals ``beta`` (``gamma``) as for the
            Gaussian (with ``truncation < sqrt(3)`` the support shrinks to ``k * sigma``), or
            ``"reference"``: the reference code's clipped normal (see the module docstring;
            ``truncation`` is its ``gauss_trunc_k``).
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
    """``n`` draws to multiply ``beta`` / ``gamma`` by: std 1 limited to ``[-k, k]``; for
    ``reference``, ``N(0, 1/3)`` clipped to ``+-min(1, k / sqrt(3))``."""
    if cfg.distribution == "reference":
        sigma = 1.0 / math.sqrt(3.0)
        cap = min(1.0, float(cfg.truncation) * sigma)
        return np.clip(rng.standard_normal(n) * sigma, -cap, cap)
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
    if cfg.distribution == "reference":
        return _reference_box(original, (width, height), (beta, gamma), cfg, rng)
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


def _reference_box(
    box: Box,
    image_size: tuple[int, int],
    strength: tuple[float, float],
    cfg: GRBPConfig,
    rng: np.random.Generator,
) -> Box:
    """The reference code's guarded draw: float candidates, IoU before rounding, and a
    candidate clipped thinner than ``min_size`` ending the tries with the original box."""
    width, height = image_size
    beta, gamma = strength
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = x2 - x1, y2 - y1
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    for _ in range(cfg.tries):
        d_x, d_y, e_w, e_h = _unit_draws(rng, cfg, 4)
        new_w = max(cfg.min_size, w * min(max(1.0 + gamma * e_w, cfg.scale_min), cfg.scale_max))
        new_h = max(cfg.min_size, h * min(max(1.0 + gamma * e_h, cfg.scale_min), cfg.scale_max))
        new_cx, new_cy = cx + beta * d_x * w, cy + beta * d_y * h
        cand = (
            min(max(new_cx - new_w / 2, 0.0), width),
            min(max(new_cy - new_h / 2, 0.0), height),
            min(max(new_cx + new_w / 2, 0.0), width),
            min(max(new_cy + new_h / 2, 0.0), height),
        )
        if cand[2] - cand[0] < cfg.min_size or cand[3] - cand[1] < cfg.min_size:
            return box
        if _float_iou(cand, (x1, y1, x2, y2)) >= cfg.tau:
            return clip_box(cand, width, height)
    return box


def _float_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if inter > 0 and union > 0 else 0.0


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
