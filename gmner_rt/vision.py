"""Qwen2.5-VL vision inputs in numpy: pixels, vision-encoder indices and M-RoPE position ids.

Three jobs, each equal to its transformers 5.23 reference:

- images -> ``pixel_values`` / grids, as ``Qwen2VLImageProcessorPil`` (``to_rgb``, ``preprocess``);
- grids -> the vision encoder's rotary ids and window-attention indices, as
  ``transformers.vision_utils`` (``vision_indices``);
- token ids + grids -> the language model's 3-row M-RoPE position ids and deltas, as
  ``Qwen2_5_VLModel.get_rope_index`` (``rope_index``, ``decode_positions``).

This module knows nothing about tokenization, chat templates or ONNX: token ids arrive as
integer arrays, the image token id as a number, and everything leaves as numpy arrays.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .errors import InputError
from .geometry import ImageGeometry
from .images import check_pixel_count, open_image

__all__ = [
    "Grid",
    "ImageInput",
    "ImageProcessorSettings",
    "VisionIndices",
    "decode_positions",
    "num_image_tokens",
    "preprocess",
    "preprocess_batch",
    "rope_index",
    "to_rgb",
    "vision_indices",
]

Grid = tuple[int, int, int]  # (t, h, w) in patches, as image_grid_thw
ImageInput = str | Path | bytes | Image.Image | np.ndarray

_RESAMPLE = {name.lower(): member for name, member in Image.Resampling.__members__.items()}
_PAD = -1  # marks padding in the window layout (transformers uses -100)


@dataclass(frozen=True, slots=True)
class ImageProcessorSettings:
    """How images become ``pixel_values``; defaults are Qwen2.5-VL's.

    Attributes:
        patch_size: side of one vision-encoder patch, in pixels.
        merge_size: patches merged per side into one language-model token (2 -> 2x2).
        temporal_patch_size: frames per temporal patch; a still image is repeated this often.
        min_pixels: smallest image area after ``smart_resize``.
        max_pixels: largest image area after ``smart_resize``.
        image_mean: per-channel (R, G, B) mean subtracted after rescaling.
        image_std: per-channel (R, G, B) standard deviation divided by after subtracting the mean.
        rescale_factor: multiplier taking uint8 values to [0, 1].
        resample: PIL resampling filter name, case-insensitive ("bicubic", "bilinear", ...).
    """

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    rescale_factor: float = 1 / 255
    resample: str = "bicubic"

    def __post_init__(self) -> None:
        for name in ("patch_size", "merge_size", "temporal_patch_size", "min_pixels", "max_pixels"):
            object.__setattr__(self, name, _positive(name, getattr(self, name), int))
        if self.max_pixels < self.min_pixels:
            raise InputError(f"max_pixels {self.max_pixels} is below min_pixels {self.min_pixels}")
        object.__setattr__(self, "rescale_factor", _positive("rescale_factor", self.rescale_factor))
        for name in ("image_mean", "image_std"):
            object.__setattr__(self, name, _rgb_triple(name, getattr(self, name)))
        if min(self.image_std) <= 0:
            raise InputError(f"image_std must be positive, got {self.image_std}")
        name = self.resample.lower() if isinstance(self.resample, str) else None
        if name not in _RESAMPLE:
            raise InputError(f"resample must be one of {sorted(_RESAMPLE)}, got {self.resample!r}")
        object.__setattr__(self, "resample", name)

    @property
    def factor(self) -> int:
        """Model-space image sides are multiples of this (``patch_size * merge_size``)."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ImageProcessorSettings:
        """Settings from ``to_dict()``'s output; missing keys take defaults, unknown keys raise."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise InputError(f"unknown image processor settings: {', '.join(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (lists for the per-channel triples)."""
        d = asdict(self)
        d["image_mean"] = list(self.image_mean)
        d["image_std"] = list(self.image_std)
        return d


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _positive(name: str, value: Any, kind: type[int] | type[float] = float) -> Any:
    number = _is_int(value) or (kind is float and isinstance(value, float | np.floating))
    if not number or not 0 < value < math.inf:
        raise InputError(f"{name} must be a positive {kind.__name__}, got {value!r}")
    return kind(value)


def _rgb_triple(name: str, value: Any) -> tuple[float, float, float]:
    values = list(value) if isinstance(value, list | tuple | np.ndarray) else []
    if len(values) != 3 or not all(
        _is_int(v) or isinstance(v, float | np.floating) for v in values
    ):
        raise InputError(f"{name} must be 3 numbers (R, G, B), got {value!r}")
    r, g, b = (float(v) for v in values)
    if not all(map(math.isfinite, (r, g, b))):
        raise InputError(f"{name} must be finite, got {value!r}")
    return r, g, b


# ---------------------------------------------------------------------------- images -> RGB


def to_rgb(image: ImageInput) -> Image.Image:
    """An RGB PIL image, converted as transformers' Qwen2-VL processor converts the same input.

    EXIF orientation is applied first (for in-memory PIL images too, where the processor would
    skip it). Then, matching the reference input by input:

    - path or bytes: ``convert("RGB")`` as ``transformers.image_utils.load_image`` (and gmner's
      training loader) do, so an alpha channel is *dropped*, not composited; then the processor's
      own step below. ``convert("RGB")`` keeps a palette/L ``transparency`` entry as an RGB colour,
      so pixels of exactly that colour end up white, as in the reference.
    - PIL image: if it has an alpha band or a ``transparency`` entry (RGBA, LA, PA, P/L/RGB with
      tRNS) it is alpha-composited onto opaque white with PIL; otherwise ``convert("RGB")``
      (L, 1, CMYK, YCbCr, I;16, I, F ... as PIL converts them).
    - uint8 array, channels last (never channels first, unlike the reference's guess for
      shapes such as 3xWx3): HxW or HxWx1 repeated to 3 channels; HxWx3 as is; HxWx4
      composited onto white with the reference's float64 formula, rounded half to even (equal
      to PIL's compositing for every value/alpha pair).

    Raises :class:`InputError` for a missing or unreadable file, undecodable bytes, or an array
    of the wrong dtype or shape.
    """
    if isinstance(image, Image.Image):
        # the size is known before decoding: a huge lazy image is refused before it is read
        check_pixel_count(image.width, image.height, f"PIL image ({image.mode})")
        try:
            return _composite_on_white(ImageOps.exif_transpose(image))
        except (OSError, ValueError) as exc:  # truncated data, a closed image, ...
            raise InputError(
                f"PIL image ({image.mode}, {image.width}x{image.height}) could not be read: {exc}"
            ) from None
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    if isinstance(image, str | Path | bytes | bytearray | memoryview):
        return _composite_on_white(open_image(image).convert("RGB"))
    raise InputError(
        f"image must be a path, bytes, a PIL image or a uint8 array, got {type(image).__name__}"
    )


def _composite_on_white(image: Image.Image) -> Image.Image:
    """transformers' ``convert_to_rgb`` for PIL images."""
    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
        return image.convert("RGB")
    except ValueError as exc:
        raise InputError(f"image mode {image.mode!r} cannot be converted to RGB ({exc})") from None


def _array_to_rgb(array: np.ndarray) -> Image.Image:
    """transformers' ``convert_to_rgb`` for channels-last uint8 arrays."""
    if array.dtype != np.uint8:
        raise InputError(f"image array must be uint8, got {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or 0 in array.shape:
        raise InputError(f"image array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {array.shape}")
    check_pixel_count(array.shape[1], array.shape[0], f"image array {array.shape}")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.shape[2] == 4:
        alpha = array[..., 3:4] / 255
        composite = alpha * array[..., :3] + (1 - alpha) * 255
        array = np.round(composite).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array))


# ------------------------------------------------------------------------ RGB -> pixel_values


@dataclass(frozen=True)
class PreparedImage:
    """An image ready for the vision graph, computed once (one ``smart_resize``).

    Attributes:
        pixel_values: float32 ``[t*h*w, 3*temporal*patch*patch]``, patches in merge-block order.
        grid: ``(t, h, w)`` in patches.
        geometry: the original size and the size the model sees (boxes map between them).
    """

    pixel_values: np.ndarray
    grid: Grid
    geometry: ImageGeometry


def prepare_image(image: Image.Image, settings: ImageProcessorSettings) -> PreparedImage:
    """The :class:`PreparedImage` of an RGB image (see :func:`to_rgb`).

    Equal to ``Qwen2VLImageProcessorPil(...)(images=[image])``: PIL resize to ``smart_resize``'s
    size, ``uint8 * rescale_factor`` in float64 cast to float32, then ``(x - mean) / std`` in
    float32, then patches in merge-block order.
    """
    if not isinstance(image, Image.Image) or image.mode != "RGB":
        got = image.mode if isinstance(image, Image.Image) else type(image).__name__
        raise InputError(f"preprocess expects an RGB PIL image (see to_rgb), got {got}")
    try:
        geometry = ImageGeometry.for_image(
            image.width,
            image.height,
            min_pixels=settings.min_pixels,
            max_pixels=settings.max_pixels,
            factor=settings.factor,
        )
    except ValueError as exc:
        raise InputError(f"image of {image.width}x{image.height} pixels: {exc}") from None
    width, height = geometry.model_size
    resized = image.resize((width, height), resample=_RESAMPLE[settings.resample])
    pixels = _normalize(np.asarray(resized), settings)  # [H, W, 3]
    grid = (1, height // settings.patch_size, width // settings.patch_size)
    return PreparedImage(_patchify(pixels, settings), grid, geometry)


def preprocess(image: Image.Image, settings: ImageProcessorSettings) -> tuple[np.ndarray, Grid]:
    """``(pixel_values, grid)`` of :func:`prepare_image`."""
    prepared = prepare_image(image, settings)
    return prepared.pixel_values, prepared.grid


def preprocess_batch(
    images: Sequence[Image.Image], settings: ImageProcessorSettings
) -> tuple[np.ndarray, list[Grid]]:
    """``preprocess`` for several images: pixel values concatenated in order, one grid each."""
    if not images:
        raise InputError("preprocess_batch needs at least one image")
    results = [preprocess(image, settings) for image in images]
    return np.concatenate([pixels for pixels, _ in results]), [grid for _, grid in results]


def _normalize(pixels: np.ndarray, settings: ImageProcessorSettings) -> np.ndarray:
    scaled = (pixels.astype(np.float64) * settings.rescale_factor).astype(np.float32)
    mean = np.asarray(settings.image_mean, dtype=np.float32)
    std = np.asarray(settings.image_std, dtype=np.float32)
    return (scaled - mean) / std


def _patchify(pixels: np.ndarray, settings: ImageProcessorSettings) -> np.ndarray:
    """[H, W, C] -> [gh*gw, C*temporal*p*p], patches ordered by merge block, then within it."""
    p, m, tp = settings.patch_size, settings.merge_size, settings.temporal_patch_size
    height, width, channels = pixels.shape
    gh, gw = height // p, width // p
    x = pixels.reshape(gh // m, m, p, gw // m, m, p, channels)
    x = x.transpose(0, 3, 1, 4, 6, 2, 5)  # [gh/m, gw/m, m, m, C, p, p]
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], tp, p, p))
    return x.reshape(gh * gw, channels * tp * p * p)


# ------------------------------------------------------------------- vision-encoder indices


@dataclass(frozen=True, eq=False)
class VisionIndices:
    """Index tensors of the Qwen2.5-VL vision encoder for a set of images, in patch units.

    Attributes:
        rot_pos_ids: int64 [N, 2], (h, w) rotary position of each patch in the original
            (merge-block-major) patch order, as ``get_vision_position_ids``.
        window_index: int64 [N / merge^2], merged-token order -> window order.
        reverse_index: int64 [N / merge^2], ``argsort(window_index)``: back to merged-token order.
        cu_seqlens: int64 [frames + 1], full-attention boundaries (one segment per frame).
        cu_window_seqlens: int64 [windows + 1], window-attention boundaries, repeats removed.
    """

    rot_pos_ids: np.ndarray
    window_index: np.ndarray
    reverse_index: np.ndarray
    cu_seqlens: np.ndarray
    cu_window_seqlens: np.ndarray


def vision_indices(
    grids: Sequence[Sequence[int]] | np.ndarray,
    *,
    merge_size: int,
    window_size: int,
    patch_size: int,
) -> VisionIndices:
    """All vision-encoder indices for ``grids`` (one ``(t, h, w)`` per image), packed in order."""
    grid_list = _as_grids(grids, merge_size)
    if not grid_list:
        raise InputError("vision_indices needs at least one grid")
    window = window_size // merge_size // patch_size  # in merged tokens
    if window < 1:
        raise InputError(
            f"window_size {window_size} is smaller than merge_size * patch_size "
            f"({merge_size * patch_size})"
        )
    rot = np.concatenate([_rot_pos_ids(grid, merge_size) for grid in grid_list])
    window_index, cu_window = _window_layout(grid_list, merge_size, window)
    frames = np.repeat([h * w for _, h, w in grid_list], [t for t, _, _ in grid_list])
    return VisionIndices(
        rot_pos_ids=rot.astype(np.int64),
        window_index=window_index,
        reverse_index=np.argsort(window_index, kind="stable").astype(np.int64),
        cu_seqlens=np.concatenate([[0], np.cumsum(frames)]).astype(np.int64),
        cu_window_seqlens=cu_window,
    )


def _rot_pos_ids(grid: Grid, merge: int) -> np.ndarray:
    t, h, w = grid
    hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    blocks = (h // merge, merge, w // merge, merge)
    hpos = hpos.reshape(blocks).transpose(0, 2, 1, 3).ravel()
    wpos = wpos.reshape(blocks).transpose(0, 2, 1, 3).ravel()
    return np.tile(np.stack([hpos, wpos], axis=-1), (t, 1))


def _window_layout(grids: list[Grid], merge: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """``get_vision_window_index``: window order of merged tokens and window boundaries."""
    indices, cu, offset = [], [np.zeros(1, np.int64)], 0
    for t, h, w in grids:
        index, seqlens = _image_windows(t, h // merge, w // merge, window)
        indices.append(index + offset)
        cu.append(np.cumsum(seqlens) * merge**2 + cu[-1][-1])
        offset += index.size
    bounds = np.concatenate(cu)
    keep = np.concatenate([[True], bounds[1:] != bounds[:-1]])  # torch.unique_consecutive
    return np.concatenate(indices).astype(np.int64), bounds[keep].astype(np.int64)


def _image_windows(t: int, lh: int, lw: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    index = np.arange(t * lh * lw).reshape(t, lh, lw)
    pad_h, pad_w = window - lh % window, window - lw % window  # a whole window when divisible
    padded = np.pad(index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=_PAD)
    nh, nw = (lh + pad_h) // window, (lw + pad_w) // window
    padded = padded.reshape(t, nh, window, nw, window).transpose(0, 1, 3, 2, 4)
    padded = padded.reshape(t * nh * nw, window * window)  # one row per window
    flat = padded.ravel()
    return flat[flat != _PAD], (padded != _PAD).sum(axis=1)


def _as_grids(grids: Sequence[Sequence[int]] | np.ndarray | None, merge: int) -> list[Grid]:
    _positive("merge_size", merge, int)
    result = []
    for i, grid in enumerate([] if grids is None else grids):
        values = list(np.asarray(grid).reshape(-1))
        if len(values) != 3 or not all(_is_int(v) and v > 0 for v in values):
            raise InputError(f"grid {i} must be three positive integers (t, h, w), got {grid}")
        t, h, w = (int(v) for v in values)
        if h % merge or w % merge:
            raise InputError(f"grid {i} {(t, h, w)}: h and w must be multiples of merge {merge}")
        result.append((t, h, w))
    return result


def num_image_tokens(grid: Sequence[int], merge_size: int) -> int:
    """Language-model tokens one image takes: ``t * h * w / merge_size**2``."""
    t, h, w = grid
    return int(t) * int(h) * int(w) // merge_size**2


# ------------------------------------------------------------------------------- M-RoPE ids


def rope_index(
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None,
    grids: Sequence[Sequence[int]] | np.ndarray | None,
    *,
    image_token_id: int,
    merge_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE position ids int64 [3, B, T] and rope deltas int64 [B] for a prompt batch.

    Equal to ``Qwen2_5_VLModel.get_rope_index`` for images (no video): text advances t, h and w
    together; a run of image tokens gets (t, h, w) positions on its merged grid starting at the
    current position, which then advances by ``max(h, w) / merge``. Grids are consumed in order
    across rows (``None``: no images). Padding (``attention_mask == 0``) gets position 0 and is
    not counted. The delta is ``max position + 1 - real tokens``: what decoding adds to a plain
    text position (see ``decode_positions``).
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise InputError(f"input_ids must be [batch, tokens], got shape {ids.shape}")
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask) != 0
    if mask.shape != ids.shape:
        raise InputError(f"attention_mask shape {mask.shape} differs from input_ids {ids.shape}")
    grid_list = _as_grids(grids, merge_size)
    positions = np.zeros((3, *ids.shape), np.int64)
    deltas = np.zeros(ids.shape[0], np.int64)
    used = 0
    for row in range(ids.shape[0]):
        tokens = ids[row][mask[row]]
        if tokens.size == 0:
            raise InputError(f"row {row}: no real tokens (attention mask is all zero)")
        row_positions, used = _row_positions(
            row, tokens == image_token_id, grid_list, used, merge_size
        )
        positions[:, row, mask[row]] = row_positions
        deltas[row] = row_positions.max() + 1 - tokens.size
    if used != len(grid_list):
        raise InputError(f"{len(grid_list)} image grids given but input_ids hold {used} images")
    return positions, deltas


def decode_positions(rope_deltas: np.ndarray, real_lengths: np.ndarray) -> np.ndarray:
    """M-RoPE position ids int64 [3, B, 1] of the token fed at the next decode step.

    ``real_lengths[b]`` is the number of real (non-padding) tokens row ``b`` holds before this
    token: its prompt's real tokens plus the tokens generated so far (so the token sampled from
    the prefill logits has ``real_lengths`` = real prompt length). As in transformers' generation
    with a cache, the position is ``real_length + rope_delta`` and all three rows are equal:
    generated text advances t, h and w together.
    """
    deltas = np.asarray(rope_deltas, dtype=np.int64).reshape(-1)
    lengths = np.asarray(real_lengths, dtype=np.int64).reshape(-1)
    if deltas.shape != lengths.shape:
        raise InputError(f"rope_deltas {deltas.shape} and real_lengths {lengths.shape} differ")
    return np.repeat((lengths + deltas)[None, :, None], 3, axis=0)


def _row_positions(
    row: int, is_image: np.ndarray, grids: list[Grid], used: int, merge: int
) -> tuple[np.ndarray, int]:
    """[3, real tokens] positions of one row and the number of grids used after it."""
    pieces, current = [], 0
    for start, end, image in _runs(is_image):
        length = end - start
        if not image:
            pieces.append(np.broadcast_to(np.arange(length) + current, (3, length)))
            current += length
            continue
        if used >= len(grids):
            raise InputError(f"row {row}: more image-token runs than the {len(grids)} grids given")
        t, h, w = grids[used]
        lh, lw = h // merge, w // merge
        if t * lh * lw != length:
            raise InputError(
                f"row {row}: {length} image tokens but grid {used} {(t, h, w)} "
                f"needs {t * lh * lw} (merge {merge})"
            )
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(lh), np.arange(lw), indexing="ij")
        pieces.append(np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + current)
        current += max(lh, lw)
        used += 1
    return np.concatenate(pieces, axis=1), used


def _runs(flags: np.ndarray) -> Iterator[tuple[int, int, bool]]:
    """``(start, end, flag)`` of each run of equal values, like ``itertools.groupby``."""
    cuts = np.flatnonzero(flags[1:] != flags[:-1]) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [flags.size]])
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        yield start, end, bool(flags[start])
