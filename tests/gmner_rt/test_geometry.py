"""smart_resize against the reference implementation, box mapping and IoU."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gmner_rt.geometry import FACTOR, ImageGeometry, clip_box, iou, map_box, smart_resize

PAPER = (256 * 28 * 28, 1024 * 28 * 28)  # E2E-GMNER's min/max pixels
PIXEL_SETTINGS = [
    (56 * 56, 28 * 28 * 1280),  # Qwen2-VL defaults
    PAPER,
    (4 * 28 * 28, 16384 * 28 * 28),
    (28 * 28, 28 * 28),
    (128 * 28 * 28, 2048 * 28 * 28),
    (1000, 5000),  # not multiples of 28*28
]


def _reference():
    """transformers' Qwen2-VL smart_resize (the torchvision module, else its PIL twin)."""
    pytest.importorskip("transformers")
    try:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as ref
    except ImportError:  # that module needs torchvision; the PIL module holds a verbatim copy
        try:
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
                smart_resize as ref,
            )
        except ImportError:
            pytest.skip("transformers has no Qwen2-VL smart_resize")
    return ref


def _sizes():
    tiny = range(1, 31)
    sizes = set(itertools.product(tiny, tiny))
    typical = [1, 27, 28, 29, 41, 42, 55, 56, 57, 100, 224, 299, 336, 480, 500, 600, 640, 720]
    typical += [768, 1000, 1023, 1080, 1920, 2048, 3000, 4032]
    sizes |= set(itertools.product(typical, typical))
    for side in (1, 2, 3, 7, 14, 28, 50, 100, 333):  # very wide and very tall, up to ratio 200
        for ratio in (10, 50, 99.5, 150, 199, 200):
            sizes.add((side, int(side * ratio)))
            sizes.add((int(side * ratio), side))
    sizes |= {(20000, 30000), (100000, 100000), (60000, 400), (123457, 98765), (8192, 8192)}
    return sorted(sizes)


ALL_SIZES = _sizes()
SIZES = [(h, w) for h, w in ALL_SIZES if max(h, w) / min(h, w) <= 200]
TOO_WIDE = [(h, w) for h, w in ALL_SIZES if max(h, w) / min(h, w) > 200]


@pytest.mark.parametrize("min_pixels,max_pixels", PIXEL_SETTINGS)
def test_smart_resize_matches_transformers(min_pixels, max_pixels):
    ref = _reference()
    mismatches = []
    for h, w in SIZES:
        ours = smart_resize(h, w, FACTOR, min_pixels, max_pixels)
        theirs = ref(h, w, factor=FACTOR, min_pixels=min_pixels, max_pixels=max_pixels)
        if tuple(ours) != tuple(theirs):
            mismatches.append(((h, w), ours, theirs))
    assert not mismatches, mismatches[:10]
    assert len(SIZES) > 1000


def test_grid_pairs_over_ratio_200_raise_in_both():
    ref = _reference()
    assert TOO_WIDE  # e.g. 1 x 224 from the typical sides
    for h, w in TOO_WIDE:
        with pytest.raises(ValueError):
            smart_resize(h, w)
        with pytest.raises(ValueError):
            ref(h, w)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 50000),
    st.integers(1, 50000),
    st.sampled_from(PIXEL_SETTINGS),
    st.sampled_from([14, 28, 32]),
)
def test_smart_resize_matches_transformers_random(h, w, pixels, factor):
    assume(max(h, w) / min(h, w) <= 200)
    ref = _reference()
    assert smart_resize(h, w, factor, *pixels) == tuple(
        ref(h, w, factor=factor, min_pixels=pixels[0], max_pixels=pixels[1])
    )


@pytest.mark.parametrize("h,w", [(1, 201), (201, 1), (10, 2001), (3000, 14), (1, 10**6)])
def test_aspect_ratio_over_200_raises_in_both(h, w):
    with pytest.raises(ValueError):
        smart_resize(h, w)
    ref = _reference()
    with pytest.raises(ValueError):
        ref(h, w)


@pytest.mark.parametrize("h,w", [(1, 200), (200, 1), (5, 1000)])
def test_aspect_ratio_200_is_accepted(h, w):
    mh, mw = smart_resize(h, w)
    assert mh % FACTOR == 0 and mw % FACTOR == 0 and mh > 0 and mw > 0


@pytest.mark.parametrize("h,w", [(0, 10), (10, 0), (-5, 10), (10, -1), (0, 0)])
def test_non_positive_size_raises(h, w):
    with pytest.raises(ValueError):
        smart_resize(h, w)


def test_smart_resize_hand_cases():
    # 100x200: rounds to 112x196 (area 21952, inside the default bounds).
    assert smart_resize(100, 200) == (112, 196)
    # Paper bounds: 28x28 is far below 256*28*28, so it is scaled up to exactly 16x16 patches.
    assert smart_resize(28, 28, 28, *PAPER) == (448, 448)
    # A 4000x4000 image is scaled down to 32x32 patches (1024*28*28).
    assert smart_resize(4000, 4000, 28, *PAPER) == (896, 896)


@pytest.mark.parametrize("h,w", [(300, 400), (381, 600), (1080, 1920), (50, 60), (4000, 3000)])
def test_paper_bounds_respected(h, w):
    mh, mw = smart_resize(h, w, 28, *PAPER)
    assert mh % 28 == 0 and mw % 28 == 0
    assert PAPER[0] <= mh * mw <= PAPER[1]
    assert abs(math.log((mw / mh) / (w / h))) < 0.1  # aspect ratio roughly kept


# ---------------------------------------------------------------------------------------------
# Box mapping
# ---------------------------------------------------------------------------------------------


def test_image_geometry_for_image():
    g = ImageGeometry.for_image(600, 381, min_pixels=PAPER[0], max_pixels=PAPER[1])
    mh, mw = smart_resize(381, 600, 28, *PAPER)
    assert (g.width, g.height, g.model_width, g.model_height) == (600, 381, mw, mh)
    assert g.original_size == (600, 381) and g.model_size == (mw, mh)


def test_hand_mapping():
    g = ImageGeometry(width=200, height=100, model_width=100, model_height=50)
    assert g.to_model((10, 20, 110, 60)) == (5, 10, 55, 30)
    assert g.to_original((5, 10, 55, 30)) == (10, 20, 110, 60)
    assert g.to_model((110, 60, 10, 20)) == (5, 10, 55, 30)  # reversed comes back ordered
    assert g.to_model((-50, -10, 500, 300)) == (0, 0, 100, 50)  # clipped to the model image
    assert g.to_original((-3, 2, 120, 70)) == (0, 4, 200, 100)
    assert g.to_original((10.4, 10.6, 20, 20)) == (21, 21, 40, 40)


def test_clip_and_map_box():
    assert clip_box((5, 8, -2, 30), 10, 20) == (0, 8, 5, 20)
    assert clip_box((1.4, 1.6, 2.5, 3.5), 10, 10) == (1, 2, 2, 4)  # round half to even
    assert map_box((0, 0, 10, 10), (10, 10), (30, 20)) == (0, 0, 30, 20)


@st.composite
def geometry_and_box(draw):
    w = draw(st.integers(20, 5000))
    h = draw(st.integers(20, 5000))
    assume(max(w, h) / min(w, h) <= 50)
    pixels = draw(st.sampled_from(PIXEL_SETTINGS[:3]))
    g = ImageGeometry.for_image(w, h, min_pixels=pixels[0], max_pixels=pixels[1])
    xs = sorted(draw(st.lists(st.integers(0, w), min_size=2, max_size=2)))
    ys = sorted(draw(st.lists(st.integers(0, h), min_size=2, max_size=2)))
    return g, (xs[0], ys[0], xs[1], ys[1])


@settings(max_examples=300, deadline=None)
@given(geometry_and_box())
def test_round_trip_within_a_model_pixel(gb):
    g, box = gb
    back = g.to_original(g.to_model(box))
    # to_model rounds to within half a model pixel; mapping back scales that error by
    # width / model_width and rounds again (another half pixel).
    tol_x = 0.5 * g.width / g.model_width + 0.5 + 1e-9
    tol_y = 0.5 * g.height / g.model_height + 0.5 + 1e-9
    # a box with no width (height) keeps one pixel of it in each space (every box has an area)
    tol_x += (g.width / g.model_width + 1) * (box[0] == box[2])
    tol_y += (g.height / g.model_height + 1) * (box[1] == box[3])
    for k, tol in zip(range(4), (tol_x, tol_y, tol_x, tol_y), strict=True):
        assert abs(back[k] - box[k]) <= tol, (g, box, back)


@settings(max_examples=300, deadline=None)
@given(
    geometry_and_box(),
    st.tuples(*[st.floats(-1e5, 1e5, allow_nan=False)] * 4),
)
def test_mapped_boxes_are_ordered_and_clipped(gb, raw):
    g, _ = gb
    for out, (w, h) in ((g.to_model(raw), g.model_size), (g.to_original(raw), g.original_size)):
        assert all(isinstance(v, int) for v in out)
        x1, y1, x2, y2 = out
        assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h
    # Reversing the corners changes nothing.
    rev = (raw[2], raw[3], raw[0], raw[1])
    assert g.to_model(rev) == g.to_model(raw)


# ---------------------------------------------------------------------------------------------
# IoU
# ---------------------------------------------------------------------------------------------


def test_iou_hand_cases():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges
    assert iou((0, 0, 10, 10), (0, 10, 10, 20)) == 0.0
    assert iou((0, 0, 10, 10), (10, 10, 20, 20)) == 0.0  # touching corners
    # overlap 5x5 = 25; union 100 + 100 - 25 = 175
    assert iou((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(25 / 175)
    # overlap 2x2 = 4; union 8 + 8 - 4 = 12
    assert iou((0, 0, 4, 2), (2, 0, 6, 2)) == pytest.approx(1 / 3)
    assert iou((0, 0, 20, 20), (0, 0, 10, 10)) == pytest.approx(0.25)  # contained
    assert iou((0.0, 0.0, 1.5, 1.0), (0.5, 0.0, 2.0, 1.0)) == pytest.approx(1.0 / 2.0)


def test_iou_empty_boxes():
    assert iou((5, 5, 5, 10), (5, 5, 5, 10)) == 0.0
    assert iou((5, 5, 5, 10), (0, 0, 10, 10)) == 0.0
    assert iou((0, 0, 10, 10), (3, 3, 3, 3)) == 0.0
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


_coord = st.integers(-50, 50)


@settings(max_examples=300, deadline=None)
@given(st.tuples(_coord, _coord, _coord, _coord), st.tuples(_coord, _coord, _coord, _coord))
def test_iou_symmetric_and_bounded(a, b):
    a = (min(a[0], a[2]), min(a[1], a[3]), max(a[0], a[2]), max(a[1], a[3]))
    b = (min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3]))
    assert iou(a, b) == iou(b, a)
    assert 0.0 <= iou(a, b) <= 1.0
    if a[0] < a[2] and a[1] < a[3]:
        assert iou(a, a) == 1.0


@settings(max_examples=400, deadline=None)
@given(
    st.integers(1, 400),
    st.integers(1, 400),
    st.tuples(*[st.integers(-10, 3000)] * 4),
)
def test_every_mapped_box_has_an_area_inside_the_image(w, h, raw):
    """Boxes in original pixels have x1 < x2 and y1 < y2 for every image size >= 1 px and stay
    inside it (an enlarged small image used to give boxes like (14, 4, 14, 14))."""
    assume(max(w, h) / min(w, h) <= 200)
    g = ImageGeometry.for_image(w, h, min_pixels=56 * 56, max_pixels=448 * 448)
    x1, y1, x2, y2 = g.to_original(raw)
    assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h, (g, raw)


def test_coordinates_of_hundreds_of_digits_do_not_overflow():
    g = ImageGeometry(width=100, height=50, model_width=56, model_height=28)
    assert g.to_original((10**400, -(10**400), 10**300, 5)) == (99, 0, 100, 9)
    assert g.to_original((float("inf"), float("nan"), 3, 4)) == (5, 0, 100, 7)
