"""Tests for GRBP box perturbation (gmner.train.augment)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from gmner.train.augment import (
    GRBPConfig,
    perturb_box,
    perturb_records,
    sample_rng,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from gmner_rt.geometry import iou
from gmner_rt.records import EntityRecord

# Strong noise so that the IoU guard and the image border are exercised often.
STRONG = GRBPConfig(beta=0.2, gamma=0.2, truncation=3.0)
# Noise without a guard: every draw is kept, so distinct streams give distinct boxes.
UNGUARDED = GRBPConfig(beta=0.1, gamma=0.1, tau=0.0)
N_STAT = 10_000


def _random_box(rng: np.random.Generator, width: int, height: int) -> tuple[int, ...]:
    x1, x2 = sorted(rng.choice(width + 1, size=2, replace=False).tolist())
    y1, y2 = sorted(rng.choice(height + 1, size=2, replace=False).tolist())
    return x1, y1, x2, y2


def _assert_valid(out, box, size, cfg) -> None:
    width, height = size
    assert all(isinstance(v, int) for v in out)
    assert 0 <= out[0] < out[2] <= width and 0 <= out[1] < out[3] <= height
    if out != box:
        # the reference's guard holds before rounding: half a pixel per side of slack
        w, h = box[2] - box[0], box[3] - box[1]
        slack = 2 * (w + h) / (w * h) if cfg.distribution == "reference" else 0.0
        assert iou(out, box) >= cfg.tau - slack


def _centre_and_size(box):
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, box[2] - box[0], box[3] - box[1]


def _relative_moves(box, size, cfg, n=N_STAT, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """``dx / w`` and ``w' / w - 1`` over ``n`` draws."""
    rng = np.random.default_rng(seed)
    cx, _, w, _ = _centre_and_size(box)
    outs = np.array([_centre_and_size(perturb_box(box, size, cfg, rng)) for _ in range(n)])
    return (outs[:, 0] - cx) / w, outs[:, 2] / w - 1


def test_iou_guard_and_bounds_hold_over_many_random_boxes():
    rng = np.random.default_rng(123)
    moved = kept = 0
    for _ in range(3000):
        size = (int(rng.integers(28, 1500)), int(rng.integers(28, 1500)))
        box = _random_box(rng, *size)
        out = perturb_box(box, size, STRONG, rng)
        _assert_valid(out, box, size, STRONG)
        moved += out != box
        kept += out == box
    assert moved > 1500 and kept > 100  # both the accepted and the fallback paths ran


@settings(max_examples=300, deadline=None)
@given(
    width=st.integers(2, 2000),
    height=st.integers(2, 2000),
    data=st.data(),
    tau=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32 - 1),
    distribution=st.sampled_from(["gauss", "uniform", "reference"]),
)
def test_iou_guard_property(width, height, data, tau, seed, distribution):
    x1 = data.draw(st.integers(0, width - 1))
    x2 = data.draw(st.integers(x1 + 1, width))
    y1 = data.draw(st.integers(0, height - 1))
    y2 = data.draw(st.integers(y1 + 1, height))
    cfg = GRBPConfig(beta=0.3, gamma=0.4, tau=tau, distribution=distribution, min_size=1)
    box = (x1, y1, x2, y2)
    _assert_valid(
        perturb_box(box, (width, height), cfg, np.random.default_rng(seed)),
        box,
        (width, height),
        cfg,
    )


def test_tau_one_always_returns_the_original():
    rng = np.random.default_rng(1)
    cfg = GRBPConfig(beta=0.2, gamma=0.2, tau=1.0)
    assert all(
        perturb_box((10, 20, 110, 220), (300, 300), cfg, rng) == (10, 20, 110, 220)
        for _ in range(200)
    )


def test_box_below_min_size_is_unchanged_and_draws_nothing():
    rng = np.random.default_rng(2)
    state = rng.bit_generator.state
    assert perturb_box((10, 10, 11, 80), (100, 100), STRONG, rng) == (10, 10, 11, 80)
    assert perturb_box((10, 10, 80, 11), (100, 100), STRONG, rng) == (10, 10, 80, 11)
    assert rng.bit_generator.state == state


def test_same_seed_same_boxes_new_epoch_or_sample_new_boxes():
    box, size = (100, 100, 300, 250), (640, 480)

    def draw(seed, epoch, index):
        return perturb_box(box, size, UNGUARDED, sample_rng(seed, epoch, index))

    assert draw(7, 3, 11) == draw(7, 3, 11)
    assert len({draw(7, epoch, 11) for epoch in range(10)}) == 10
    assert draw(7, 3, 11) != draw(7, 3, 12)
    assert draw(7, 3, 11) != draw(8, 3, 11)


def test_global_random_state_is_untouched():
    np_state, py_state = np.random.get_state(), random.getstate()
    perturb_box((100, 100, 300, 250), (640, 480), STRONG, sample_rng(0, 0, 0))
    after = np.random.get_state()
    assert random.getstate() == py_state
    assert np.array_equal(np_state[1], after[1]) and np_state[2:] == after[2:]


def test_sample_rng_rejects_negative_arguments():
    with pytest.raises(ValueError, match="epoch"):
        sample_rng(0, -1, 0)


def test_perturb_records_moves_boxes_and_keeps_the_rest():
    records = (
        EntityRecord("Obama", "PER", ((100, 100, 300, 250),)),
        EntityRecord("Fox", "ORG", None),
        EntityRecord("Paris", "LOC", ((10, 10, 200, 200), (300, 50, 600, 400))),
    )
    size = (640, 480)
    out = perturb_records(records, size, STRONG, sample_rng(0, 0, 0))
    assert out == perturb_records(records, size, STRONG, sample_rng(0, 0, 0))
    assert [(r.mention, r.type) for r in out] == [(r.mention, r.type) for r in records]
    assert out[1] is records[1]
    assert out[0].boxes != records[0].boxes or out[2].boxes != records[2].boxes
    for new, old in zip(out, records, strict=True):
        for b_new, b_old in zip(new.boxes or (), old.boxes or (), strict=True):
            _assert_valid(b_new, b_old, size, STRONG)


def test_disabled_is_identity():
    records = (EntityRecord("Obama", "PER", ((100, 100, 300, 250),)),)
    cfg = GRBPConfig(enabled=False, beta=0.5)
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    assert perturb_records(records, (640, 480), cfg, rng) == records
    assert perturb_box((100, 100, 300, 250), (640, 480), cfg, rng) == (100, 100, 300, 250)
    assert rng.bit_generator.state == state


def test_small_boxes_get_weaker_noise():
    # Same width (so the same relative rounding), area 800 < 1024 versus 10000.
    size = (1000, 1000)
    cfg = GRBPConfig(tau=0.0)
    small, large = (400, 400, 500, 408), (400, 400, 500, 500)
    small_dx, _ = _relative_moves(small, size, cfg, n=2000)
    large_dx, _ = _relative_moves(large, size, cfg, n=2000)
    undamped_dx, _ = _relative_moves(
        small, size, GRBPConfig(tau=0.0, small_box_damping=1.0), n=2000
    )
    ratio = np.abs(small_dx).mean() / np.abs(large_dx).mean()
    assert ratio == pytest.approx(0.5, abs=0.1)
    assert np.abs(undamped_dx).mean() / np.abs(large_dx).mean() == pytest.approx(1.0, abs=0.1)


# Tolerances of the statistical tests. n = 10,000 draws of dx / w on a 400 px box in a
# 4000 px image (tau = 0: no guard; truncation = 100: no truncation; no clipping possible).
# Rounding each coordinate adds variance 1/12 px^2, i.e. 1/24 px^2 on the centre, which is
# (1/24) / 400^2 = 2.6e-7 in relative units against beta^2 = 2.5e-3: a 1e-4 relative change.
# * mean: standard error beta / sqrt(n) = 5e-4; we allow 4 standard errors.
# * std (Gaussian): standard error ~ beta / sqrt(2n) = 0.7% of beta; 5% is ~7 standard errors.
# * std (uniform): kurtosis 1.8 gives standard error beta * sqrt(0.8 / 4n) = 0.45%; 5% is >10.
BIG_BOX, BIG_IMAGE = (1800, 1800, 2200, 2200), (4000, 4000)


@pytest.mark.parametrize("distribution", ["gauss", "uniform"])
def test_centre_shift_and_scale_have_mean_zero_and_std_beta(distribution):
    cfg = GRBPConfig(beta=0.05, gamma=0.08, tau=0.0, truncation=100.0, distribution=distribution)
    dx, scale = _relative_moves(BIG_BOX, BIG_IMAGE, cfg)
    assert abs(dx.mean()) < 4 * cfg.beta / math.sqrt(N_STAT)
    assert abs(dx.std(ddof=1) - cfg.beta) / cfg.beta < 0.05
    assert abs(scale.mean()) < 4 * cfg.gamma / math.sqrt(N_STAT)
    assert abs(scale.std(ddof=1) - cfg.gamma) / cfg.gamma < 0.05
    if distribution == "uniform":  # bounded support a = beta * sqrt(3), plus rounding
        assert np.abs(dx).max() <= cfg.beta * math.sqrt(3) + 1 / 400


def test_truncation_bounds_the_shift():
    cfg = GRBPConfig(beta=0.05, tau=0.0, truncation=1.0)
    dx, _ = _relative_moves(BIG_BOX, BIG_IMAGE, cfg, n=2000)
    assert np.abs(dx).max() <= cfg.beta + 1 / 400  # k * beta plus half a pixel of rounding
    assert np.abs(dx).max() > 0.9 * cfg.beta  # the bound is reached, not clipped far below


def test_defaults_are_the_reference_collators_numbers():
    """gmner's defaults: the numbers of the reference collator's signature (0.05, 3 tries)
    read as a Gaussian std; the reference script's are in the shipped recipe."""
    cfg = GRBPConfig()
    assert (cfg.beta, cfg.gamma, cfg.tau, cfg.tries, cfg.truncation) == (0.05, 0.05, 0.6, 3, 2.0)
    assert (cfg.small_box_area, cfg.small_box_damping, cfg.min_size) == (1024, 0.5, 2)
    assert (cfg.scale_min, cfg.scale_max, cfg.distribution, cfg.enabled) == (
        0.2,
        5.0,
        "gauss",
        True,
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("beta", -1),
        ("gamma", float("nan")),
        ("tau", 1.5),
        ("tries", 0),
        ("truncation", 0.0),
        ("small_box_area", -1),
        ("small_box_damping", 2.0),
        ("scale_min", 1.5),
        ("scale_max", 0.5),
        ("min_size", 0),
        ("distribution", "laplace"),
        ("enabled", "yes"),
    ],
)
def test_config_error_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^grbp\.{field} must be"):
        GRBPConfig(**{field: value})


def test_config_error_message_format():
    with pytest.raises(ValueError, match=r"^grbp\.beta must be >= 0, got -1$"):
        GRBPConfig(beta=-1)


def test_bad_inputs_raise():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="image_size"):
        perturb_box((0, 0, 10, 10), (0, 100), GRBPConfig(), rng)
    with pytest.raises(ValueError, match="box"):
        perturb_box((0.5, 0, 10, 10), (100, 100), GRBPConfig(), rng)


# ---------------------------------------------------------------------------------------------
# The reference's draw (distribution="reference"), against its formulas
# ---------------------------------------------------------------------------------------------

N_REF = 100_000
REF = GRBPConfig(beta=0.1, gamma=0.1, tau=0.6, tries=5, distribution="reference")


def _reference_formula(box, size, cfg, n, seed):
    """The reference code's guarded draw (evaluation/geometry.py: jitter_box_with_iou_guard
    over jitter_box_center_scale, gauss), written out here vectorised over ``n`` boxes:
    sigma = a / sqrt(3), each draw clipped to +-min(a, k * sigma), float boxes clipped to the
    image, IoU before rounding, a collapsed candidate ending the tries with the original."""
    rng = np.random.default_rng(seed)
    width, height = size
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = x2 - x1, y2 - y1
    beta, gamma = cfg.beta, cfg.gamma
    if w * h < cfg.small_box_area:
        beta, gamma = beta * cfg.small_box_damping, gamma * cfg.small_box_damping

    def draw(a):
        sigma = a / math.sqrt(3.0)
        cap = min(a, cfg.truncation * sigma)
        return np.clip(rng.normal(0.0, sigma, n), -cap, cap)

    out = np.tile([x1, y1, x2, y2], (n, 1))
    done = np.zeros(n, bool)
    for _ in range(cfg.tries):
        dx, dy, sx, sy = draw(beta), draw(beta), draw(gamma), draw(gamma)
        w2 = np.maximum(cfg.min_size, w * np.clip(1 + sx, cfg.scale_min, cfg.scale_max))
        h2 = np.maximum(cfg.min_size, h * np.clip(1 + sy, cfg.scale_min, cfg.scale_max))
        cx, cy = (x1 + x2) / 2 + dx * w, (y1 + y2) / 2 + dy * h
        cand = np.stack(
            [
                np.clip(cx - w2 / 2, 0, width),
                np.clip(cy - h2 / 2, 0, height),
                np.clip(cx + w2 / 2, 0, width),
                np.clip(cy + h2 / 2, 0, height),
            ],
            axis=1,
        )
        collapsed = (cand[:, 2] - cand[:, 0] < cfg.min_size) | (
            cand[:, 3] - cand[:, 1] < cfg.min_size
        )
        ix = np.clip(np.minimum(cand[:, 2], x2) - np.maximum(cand[:, 0], x1), 0, None)
        iy = np.clip(np.minimum(cand[:, 3], y2) - np.maximum(cand[:, 1], y1), 0, None)
        inter = ix * iy
        area = (cand[:, 2] - cand[:, 0]) * (cand[:, 3] - cand[:, 1])
        ious = inter / (area + w * h - inter)
        accept = ~done & ~collapsed & (ious >= cfg.tau)
        out[accept] = np.round(cand[accept])
        done |= accept | collapsed
    return out


def _mean_iou(boxes, box) -> float:
    return float(np.mean([iou(tuple(int(v) for v in b), box) for b in boxes]))


@pytest.mark.parametrize("box", [(100, 100, 300, 250), (40, 30, 66, 60)])  # big, small
def test_reference_draw_matches_the_reference_formulas_over_100k_boxes(box):
    size = (640, 480)
    rng = np.random.default_rng(7)
    ours = np.array([perturb_box(box, size, REF, rng) for _ in range(N_REF)])
    theirs = _reference_formula(box, size, REF, N_REF, seed=8)
    ours_iou, theirs_iou = _mean_iou(ours, box), _mean_iou(theirs, box)
    spread = np.std([iou(tuple(b), box) for b in ours[:5000]])
    # two independent samples of one mean: 4 standard errors of their difference
    assert abs(ours_iou - theirs_iou) < 4 * spread * math.sqrt(2 / N_REF) + 1e-4
    assert ours_iou >= REF.tau and (ours != box).any(axis=1).mean() > 0.5
    # the clip bounds: no centre moves more than beta (damped for the small box) of the size
    damping = REF.small_box_damping if (box[2] - box[0]) * (box[3] - box[1]) < 1024 else 1.0
    cx, _, w, _ = _centre_and_size(box)
    shift = np.abs((ours[:, 0] + ours[:, 2]) / 2 - cx) / w
    assert shift.max() <= REF.beta * damping + 1 / w  # plus rounding


def test_reference_draw_is_a_normal_of_std_beta_over_sqrt3_clipped_at_beta():
    """Unguarded, on a big box: the relative shift has the clipped normal's std
    sigma^2 [1 - 2 Phi(-c) - 2 c phi(c)] + 2 beta^2 Phi(-c) with c = sqrt(3), and a share
    2 Phi(-sqrt(3)) = 8.3 % of draws sits on the bound +-beta."""
    cfg = GRBPConfig(beta=0.1, gamma=0.1, tau=0.0, tries=1, distribution="reference")
    dx, scale = _relative_moves(BIG_BOX, BIG_IMAGE, cfg, n=N_REF, seed=3)
    sigma, c = cfg.beta / math.sqrt(3), math.sqrt(3)
    tail = 0.5 * math.erfc(c / math.sqrt(2))
    pdf = math.exp(-c * c / 2) / math.sqrt(2 * math.pi)
    std = math.sqrt(sigma**2 * (1 - 2 * tail - 2 * c * pdf) + 2 * cfg.beta**2 * tail)
    assert abs(dx.std() - std) / std < 0.02
    assert abs(scale.std() - std) / std < 0.02
    assert np.abs(dx).max() <= cfg.beta + 1 / 400
    band = 1 / 800  # half a pixel of rounding on a 400-pixel box
    on_bound = np.mean(np.abs(dx) >= cfg.beta - band)
    near = math.erfc((cfg.beta - 2 * band) / sigma / math.sqrt(2))  # P(|d| >= beta - 2 band)
    assert 2 * tail - 0.005 < on_bound < near + 0.005, (on_bound, 2 * tail, near)
