"""Image files: opening them the way every part of gmner sees them.

EXIF orientation is applied, so sizes and boxes refer to the image as displayed.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

__all__ = ["MAX_IMAGE_PIXELS", "check_pixel_count", "image_size", "open_image"]

#: Largest image decoded, in pixels (a decompression-bomb guard; the model sees at most about
#: a million pixels anyway, so nothing useful is lost). 64 MP is a 9248 x 6936 photo.
MAX_IMAGE_PIXELS = 64_000_000

_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height
_EXIF_ORIENTATION = 0x0112


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of an image file after EXIF orientation, reading only its header."""
    _not_a_folder(path)
    try:
        with Image.open(path) as im:
            width, height = im.size
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    except FileNotFoundError:
        raise InputError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{path}: not a readable image ({exc})") from None
    if orientation in _TRANSPOSED_ORIENTATIONS:
        return height, width
    return width, height


def _reason(exc: BaseException) -> str:
    """PIL's message without the repr of an in-memory file it may hold."""
    text = str(exc)
    if "<_io." in text:
        return type(exc).__name__ if "cannot identify" not in text else "cannot identify the format"
    return text


def _not_a_folder(path: str | Path) -> None:
    if Path(path).is_dir():
        raise InputError(f"{path}: is a folder, not an image file")


def open_image(source: str | Path | bytes) -> Image.Image:
    """Decode an image file (a path or its bytes): fully loaded, EXIF-oriented, mode unchanged.

    Raises :class:`InputError` naming the file (or the byte count) when it is missing or unreadable.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        name, fp = f"image bytes ({len(source)} bytes)", io.BytesIO(bytes(source))
    else:
        name, fp = str(source), source
        _not_a_folder(source)
    try:
        with Image.open(fp) as im:
            check_pixel_count(im.width, im.height, name)
            im.load()
            return ImageOps.exif_transpose(im)
    except FileNotFoundError:
        raise InputError(f"{name}: image not found") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InputError(f"{name}: not a readable image ({_reason(exc)})") from None


def check_pixel_count(width: int, height: int, name: str = "image") -> None:
    """Raise :class:`InputError` when ``width * height`` is over :data:`MAX_IMAGE_PIXELS`."""
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(
            f"{name}: {width}x{height} is {width * height} pixels, over the limit of "
            f"{MAX_IMAGE_PIXELS} (gmner_rt.images.MAX_IMAGE_PIXELS)"
        )
