"""gmner_rt.vision: pixels, vision-encoder indices and M-RoPE ids against transformers."""

from __future__ import annotations

import functools
import io
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gmner_rt.errors import InputError
from gmner_rt.images import image_size
from gmner_rt.vision import (
    ImageProcessorSettings,
    decode_positions,
    num_image_tokens,
    preprocess,
    preprocess_batch,
    rope_index,
    to_rgb,
    vision_indices,
)

IMAGE_TOKEN = 151655
RNG_SEED = 1234


def _random_image(width: int, height: int, channels: int = 3, seed: int = RNG_SEED) -> np.ndarray:
    shape = (height, width) if channels == 1 else (height, width, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture(scope="module")
def hf_processor():
    """``make(min_pixels, max_pixels)`` -> transformers' Qwen2VLImageProcessorPil."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    return functools.cache(
        lambda min_pixels=56 * 56, max_pixels=28 * 28 * 1280: Qwen2VLImageProcessorPil(
            min_pixels=min_pixels, max_pixels=max_pixels
        )
    )


def _hf_pixels(processor, image) -> tuple[np.ndarray, list[list[int]]]:
    out = processor(images=[image])
    return np.asarray(out["pixel_values"]), np.asarray(out["image_grid_thw"]).tolist()


def _assert_same(ours: tuple[np.ndarray, object], ref: tuple[np.ndarray, list[list[int]]]) -> None:
    pixels, grid = ours
    ref_pixels, ref_grids = ref
    grids = [list(g) for g in grid] if isinstance(grid, list) else [list(grid)]
    assert grids == ref_grids
    assert pixels.dtype == np.float32 and pixels.shape == ref_pixels.shape
    assert np.abs(pixels - ref_pixels).max() <= 1e-5


# --------------------------------------------------------------------------------- settings


def test_settings_defaults_are_qwen25_vl() -> None:
    s = ImageProcessorSettings()
    assert (s.patch_size, s.merge_size, s.temporal_patch_size, s.factor) == (14, 2, 2, 28)
    assert (s.min_pixels, s.max_pixels, s.resample) == (3136, 1003520, "bicubic")


def test_settings_round_trip_through_json() -> None:
    s = ImageProcessorSettings(max_pixels=28 * 28 * 256, resample="LANCZOS")
    d = json.loads(json.dumps(s.to_dict()))
    assert ImageProcessorSettings.from_dict(d) == s
    assert d["resample"] == "lanczos" and d["image_mean"] == list(s.image_mean)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("patch_size", 0),
        ("merge_size", 1.5),
        ("temporal_patch_size", True),
        ("min_pixels", -1),
        ("max_pixels", 100),
        ("image_mean", (0.5, 0.5)),
        ("image_std", (0.5, 0.0, 0.5)),
        ("rescale_factor", 0),
        ("resample", "cubic"),
    ],
)
def test_settings_errors_name_the_field(field: str, value: object) -> None:
    with pytest.raises(InputError, match=field):
        ImageProcessorSettings(**{field: value})


def test_settings_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(InputError, match="patch"):
        ImageProcessorSettings.from_dict({"patch": 14})


# --------------------------------------------------------------------------------- to_rgb


def test_to_rgb_errors_name_the_input(tmp_path: Path) -> None:
    missing = tmp_path / "missing.jpg"
    with pytest.raises(InputError, match="missing.jpg: image not found"):
        to_rgb(missing)
    with pytest.raises(InputError, match=r"image bytes \(5 bytes\): not a readable image"):
        to_rgb(b"hello")
    with pytest.raises(InputError, match="must be uint8, got float32"):
        to_rgb(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(InputError, match=r"got shape \(4, 4, 2\)"):
        to_rgb(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(InputError, match=r"got shape \(0, 4, 3\)"):
        to_rgb(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(InputError, match="mode 'La' cannot be converted to RGB"):
        to_rgb(Image.new("RGBA", (4, 4)).convert("La"))
    with pytest.raises(InputError, match="got list"):
        to_rgb([[0]])  # type: ignore[arg-type]


def test_to_rgb_arrays() -> None:
    gray = _random_image(5, 4, channels=1)
    assert np.array_equal(np.asarray(to_rgb(gray)), np.repeat(gray[..., None], 3, axis=2))
    rgba = np.array([[[200, 100, 0, 0], [200, 100, 0, 255], [200, 100, 0, 128]]], np.uint8)
    # 128/255 * 200 + 127/255 * 255 = 227.4, 128/255 * 100 + 127/255 * 255 = 177.2
    expected = [[[255, 255, 255], [200, 100, 0], [227, 177, 127]]]
    assert np.asarray(to_rgb(rgba)).tolist() == expected


def test_to_rgb_bytes_equal_path(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.fromarray(_random_image(7, 5, channels=4)).save(path)
    from_path = np.asarray(to_rgb(path))
    assert np.array_equal(from_path, np.asarray(to_rgb(path.read_bytes())))
    assert np.array_equal(from_path, np.asarray(to_rgb(str(path))))


def _exif_jpeg(path: Path, width: int, height: int, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(_random_image(width, height)).save(path, exif=exif, quality=95)


def test_to_rgb_applies_exif_orientation(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    _exif_jpeg(path, 40, 20, orientation=6)
    with Image.open(path) as raw:
        assert raw.size == (40, 20)
        oriented = to_rgb(raw)
    assert to_rgb(path).size == oriented.size == image_size(path) == (20, 40)


# ------------------------------------------------------------------------ preprocess (runtime)


def test_preprocess_shapes_and_batch() -> None:
    s = ImageProcessorSettings()
    a = to_rgb(_random_image(640, 480))
    b = to_rgb(_random_image(10, 10, seed=2))
    pixels, grid = preprocess(a, s)
    assert grid == (1, 34, 46) and pixels.shape == (34 * 46, 3 * 2 * 14 * 14)
    assert num_image_tokens(grid, s.merge_size) == 17 * 23
    batch, grids = preprocess_batch([a, b], s)
    assert grids == [grid, (1, 4, 4)]
    assert np.array_equal(batch[: len(pixels)], pixels)


def test_preprocess_rejects_bad_images() -> None:
    s = ImageProcessorSettings()
    with pytest.raises(InputError, match="RGB PIL image.*got RGBA"):
        preprocess(Image.new("RGBA", (30, 30)), s)
    with pytest.raises(InputError, match="1x201 pixels: absolute aspect ratio"):
        preprocess(Image.new("RGB", (1, 201)), s)
    with pytest.raises(InputError, match="at least one image"):
        preprocess_batch([], s)


# ---------------------------------------------------------------------- preprocess (reference)

SIZES = [(10, 10), (1, 200), (200, 1), (2000, 60), (60, 2000), (640, 480), (333, 517), (57, 85)]
PIXEL_LIMITS = [(56 * 56, 28 * 28 * 1280), (28 * 28, 28 * 28 * 64), (128 * 28 * 28, 256 * 28 * 28)]


@pytest.mark.parametrize("limits", PIXEL_LIMITS, ids=lambda p: f"{p[0]}-{p[1]}")
def test_preprocess_matches_reference(hf_processor, limits: tuple[int, int]) -> None:
    settings = ImageProcessorSettings(min_pixels=limits[0], max_pixels=limits[1])
    for width, height in SIZES:
        image = Image.fromarray(_random_image(width, height))
        ours = preprocess(to_rgb(image), settings)
        _assert_same(ours, _hf_pixels(hf_processor(*limits), image))


def _with_transparency(image: Image.Image, value: object) -> Image.Image:
    image.info["transparency"] = value
    return image


def _mode_images() -> dict[str, Image.Image]:
    rgba = Image.fromarray(_random_image(45, 31, channels=4))
    rgb = rgba.convert("RGB")
    wide = np.random.default_rng(3).integers(0, 65536, (31, 45))
    images = {m: rgba.convert(m) for m in ("RGBA", "LA", "RGBa", "PA", "L", "1", "CMYK")}
    images |= {m: rgb.convert(m) for m in ("P", "YCbCr", "LAB", "HSV")}
    images["P+trns"] = _with_transparency(rgb.convert("P"), 7)
    images["L+trns"] = _with_transparency(rgb.convert("L"), 128)
    images["RGB+trns"] = _with_transparency(rgb.copy(), tuple(np.asarray(rgb)[0, 0].tolist()))
    images["I;16"] = Image.fromarray(wide.astype(np.uint16))
    images["I"] = Image.fromarray((wide - 30000).astype(np.int32))
    images["F"] = Image.fromarray((wide / 100.0).astype(np.float32))
    return images


@pytest.mark.parametrize("mode", list(_mode_images()))
def test_to_rgb_matches_reference_for_pil_modes(hf_processor, mode: str) -> None:
    image = _mode_images()[mode]
    ours = preprocess(to_rgb(image), ImageProcessorSettings())
    _assert_same(ours, _hf_pixels(hf_processor(), image))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P+trns", "L+trns", "I;16", "CMYK"])
def test_to_rgb_matches_reference_for_files(hf_processor, tmp_path: Path, mode: str) -> None:
    """A path goes through transformers' load_image, which drops alpha before compositing."""
    image = _mode_images()[mode]
    path = tmp_path / ("a.jpg" if mode == "CMYK" else "a.png")
    image.save(path)
    ours = preprocess(to_rgb(path), ImageProcessorSettings())
    _assert_same(ours, _hf_pixels(hf_processor(), str(path)))


def test_to_rgb_matches_reference_for_exif(hf_processor, tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    _exif_jpeg(path, 90, 50, orientation=6)
    ours = preprocess(to_rgb(path), ImageProcessorSettings())
    _assert_same(ours, _hf_pixels(hf_processor(), str(path)))


@pytest.mark.parametrize("channels", [3, 4])
def test_to_rgb_matches_reference_for_arrays(hf_processor, channels: int) -> None:
    array = _random_image(45, 31, channels=channels)
    ours = preprocess(to_rgb(array), ImageProcessorSettings())
    _assert_same(ours, _hf_pixels(hf_processor(), array))


def test_to_rgb_gray_array_matches_reference_single_channel(hf_processor) -> None:
    gray = _random_image(45, 31, channels=1)
    ours = preprocess(to_rgb(gray), ImageProcessorSettings())
    _assert_same(ours, _hf_pixels(hf_processor(), gray[..., None]))


def test_alpha_handling_depends_on_input_kind(tmp_path: Path) -> None:
    """As in transformers: a file's alpha is dropped, an in-memory image's is composited."""
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 200  # red, fully transparent
    path = tmp_path / "clear.png"
    Image.fromarray(rgba).save(path)
    assert np.asarray(to_rgb(path))[0, 0].tolist() == [200, 0, 0]
    assert np.asarray(to_rgb(Image.fromarray(rgba)))[0, 0].tolist() == [255, 255, 255]


# ------------------------------------------------------------------------- vision indices

GRID_SETS = [
    [(1, 4, 6)],
    [(1, 16, 16)],
    [(1, 34, 46)],
    [(1, 4, 4), (1, 10, 22), (1, 58, 2)],
    [(1, 2, 92), (1, 32, 32), (2, 4, 8)],
]


@pytest.mark.parametrize("window_size", [112, 56])
@pytest.mark.parametrize("grids", GRID_SETS, ids=str)
def test_vision_indices_match_reference(grids, window_size: int) -> None:
    torch = pytest.importorskip("torch")
    vu = pytest.importorskip("transformers.vision_utils")
    grid_thw = torch.tensor(grids)
    ours = vision_indices(grids, merge_size=2, window_size=window_size, patch_size=14)
    window_index, cu_window = vu.get_vision_window_index(grid_thw, 2, window_size, 14)
    expected = {
        "rot_pos_ids": vu.get_vision_position_ids(grid_thw, 2),
        "window_index": window_index,
        "reverse_index": torch.argsort(window_index),
        "cu_seqlens": vu.get_vision_cu_seqlens(grid_thw),
        "cu_window_seqlens": cu_window,
    }
    for name, ref in expected.items():
        value = getattr(ours, name)
        assert value.dtype == np.int64, name
        assert np.array_equal(value, ref.numpy()), name


def test_vision_indices_errors() -> None:
    with pytest.raises(InputError, match=r"grid 1 \(1, 3, 4\).*multiples of merge 2"):
        vision_indices([(1, 4, 4), (1, 3, 4)], merge_size=2, window_size=112, patch_size=14)
    with pytest.raises(InputError, match="window_size 14"):
        vision_indices([(1, 4, 4)], merge_size=2, window_size=14, patch_size=14)
    with pytest.raises(InputError, match="grid 0 must be three positive integers"):
        vision_indices([(1, 4)], merge_size=2, window_size=112, patch_size=14)
    with pytest.raises(InputError, match="at least one grid"):
        vision_indices([], merge_size=2, window_size=112, patch_size=14)
    with pytest.raises(InputError, match="merge_size must be a positive int"):
        vision_indices([(1, 4, 4)], merge_size=0, window_size=112, patch_size=14)


# ------------------------------------------------------------------------------ M-RoPE ids


def _prompt_batch(rows: list[list[object]], grids: list[tuple[int, int, int]]):
    """Left-padded ids and mask; an int in a row spec is a text length, 'img' the next image."""
    grid_iter = iter(grids)
    rng = np.random.default_rng(7)
    seqs = []
    for spec in rows:
        ids: list[int] = []
        for part in spec:
            count = num_image_tokens(next(grid_iter), 2) if part == "img" else int(part)
            ids += [IMAGE_TOKEN] * count if part == "img" else rng.integers(0, 1000, count).tolist()
        seqs.append(ids)
    width = max(map(len, seqs))
    input_ids = np.zeros((len(seqs), width), np.int64)
    mask = np.zeros((len(seqs), width), np.int64)
    for row, ids in enumerate(seqs):
        input_ids[row, width - len(ids) :] = ids
        mask[row, width - len(ids) :] = 1
    return input_ids, mask


def _hf_rope_model():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    vision_config = types.SimpleNamespace(spatial_merge_size=2, tokens_per_second=2)
    return Qwen2_5_VLModel, types.SimpleNamespace(
        config=types.SimpleNamespace(vision_config=vision_config),
        get_vision_position_ids=functools.partial(Qwen2_5_VLModel.get_vision_position_ids, None),
        rope_deltas=None,
    )


ROPE_CASES = [
    ([[5, "img", 9]], [(1, 4, 6)]),
    (
        [[3, "img", 4], [6, "img", 2, "img", 7], ["img", 12]],
        [(1, 8, 4), (1, 4, 4), (1, 2, 10), (1, 6, 6)],
    ),
    ([[2, "img", 1, "img"], [40]], [(1, 2, 2), (1, 14, 4)]),
]


@pytest.mark.parametrize(("rows", "grids"), ROPE_CASES)
def test_rope_index_matches_reference(rows, grids) -> None:
    model_cls, fake = _hf_rope_model()
    import torch

    input_ids, mask = _prompt_batch(rows, grids)
    for attention_mask in [mask] + ([None] if mask.all() else []):
        ids_t = torch.from_numpy(input_ids)
        ref_pos, ref_delta = model_cls.get_rope_index(
            fake,
            ids_t,
            mm_token_type_ids=(ids_t == IMAGE_TOKEN).int(),
            image_grid_thw=torch.tensor(grids),
            attention_mask=None if attention_mask is None else torch.from_numpy(attention_mask),
        )
        pos, delta = rope_index(
            input_ids, attention_mask, grids, image_token_id=IMAGE_TOKEN, merge_size=2
        )
        assert pos.dtype == delta.dtype == np.int64 and delta.shape == (len(rows),)
        assert np.array_equal(pos, ref_pos.numpy())
        assert np.array_equal(delta, ref_delta.numpy().reshape(-1))


def test_decode_positions_match_reference_cached_step() -> None:
    model_cls, fake = _hf_rope_model()
    import torch

    grids = [(1, 8, 4), (1, 4, 4), (1, 2, 10)]
    input_ids, mask = _prompt_batch([[3, "img", 4], [6, "img", 2, "img", 7]], grids)
    _, delta = rope_index(input_ids, mask, grids, image_token_id=IMAGE_TOKEN, merge_size=2)
    fake.rope_deltas = torch.from_numpy(delta)[:, None]
    for generated in (0, 3):  # tokens already generated before the one being fed
        full_mask = np.concatenate([mask, np.ones((2, generated + 1), np.int64)], axis=1)
        cache = types.SimpleNamespace(get_seq_length=lambda n=full_mask.shape[1] - 1: n)
        ref = model_cls.compute_3d_position_ids(
            fake, None, None, None, torch.zeros(2, 1, 1), torch.from_numpy(full_mask), cache
        )
        ours = decode_positions(delta, mask.sum(axis=1) + generated)
        assert ours.shape == (3, 2, 1) and ours.dtype == np.int64
        assert np.array_equal(ours, ref[..., -1:].numpy())


def test_rope_index_by_hand() -> None:
    # pad, 2 text, image 2x4 merged tokens (grid 1x4x8), 1 text
    ids = np.array([[0, 1, 2] + [IMAGE_TOKEN] * 8 + [3]])
    mask = np.array([[0] + [1] * 11])
    pos, delta = rope_index(ids, mask, [(1, 4, 8)], image_token_id=IMAGE_TOKEN, merge_size=2)
    assert pos[:, 0, :3].tolist() == [[0, 0, 1]] * 3
    assert pos[:, 0, 3:11].tolist() == [[2] * 8, [2, 2, 2, 2, 3, 3, 3, 3], [2, 3, 4, 5] * 2]
    assert pos[:, 0, 11].tolist() == [6, 6, 6]  # 2 + max(2, 4)
    assert delta.tolist() == [6 + 1 - 11]
    assert decode_positions(delta, [11]).reshape(-1).tolist() == [7, 7, 7]


def test_rope_index_text_only_is_plain_positions() -> None:
    ids = np.array([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    pos, delta = rope_index(ids, mask, None, image_token_id=IMAGE_TOKEN, merge_size=2)
    assert pos.tolist() == [[[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]] * 3
    assert delta.tolist() == [0, 0]


def test_rope_index_errors_name_row_and_counts() -> None:
    ids = np.array([[1] + [IMAGE_TOKEN] * 6 + [2], [1, 2, 3, 4, 5, 6, 7, 8]])
    kw = {"image_token_id": IMAGE_TOKEN, "merge_size": 2}
    with pytest.raises(InputError, match=r"row 0: 6 image tokens but grid 0 \(1, 4, 8\) needs 8"):
        rope_index(ids, None, [(1, 4, 8)], **kw)
    with pytest.raises(InputError, match="row 0: more image-token runs than the 0 grids"):
        rope_index(ids, None, [], **kw)
    with pytest.raises(InputError, match="2 image grids given but input_ids hold 1 images"):
        rope_index(ids, None, [(1, 4, 6), (1, 2, 2)], **kw)
    with pytest.raises(InputError, match="row 1: no real tokens"):
        rope_index(ids, np.array([[1] * 8, [0] * 8]), [(1, 4, 6)], **kw)


# ------------------------------------------------------------------------------- boundary


def test_import_does_not_pull_torch() -> None:
    code = "import sys, gmner_rt.vision; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_open_bytes_buffer_is_independent() -> None:
    buffer = io.BytesIO()
    Image.fromarray(_random_image(8, 6)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    image = to_rgb(bytes(data))
    data[:] = b"\0" * len(data)
    assert image.size == (8, 6) and image.mode == "RGB"
