"""The probe inputs of the export checks: images of several sizes and aspect ratios, texts.

Shared by :mod:`.parity` (graphs against PyTorch) and :mod:`.quant_check` (a quantized
decoder against the fp one), so both measure on the same inputs. Pure data: no torch, no
model, no prompt.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["PROBE_SIZES", "PROBE_TEXTS", "probe_batches"]

#: (width, height) of the probe images: square, wide, tall, tiny, and a very wide one.
PROBE_SIZES = ((224, 160), (300, 100), (90, 260), (56, 56), (500, 40))
PROBE_TEXTS = (
    "Alice Smith visits the Louvre in Paris with Acme Corp .",
    "RT @bob : Manchester United beat Chelsea",
    "Nothing to see here",
    "NASA and SpaceX launch from Florida today , says Elon Musk",
    "Tokyo",
)


def _probe_image(width: int, height: int, seed: int) -> Image.Image:
    """Noise with a few filled shapes: varied content at every scale."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(1, width)), y0 + int(rng.integers(1, height))
        draw.rectangle((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return image


def probe_batches() -> list[list[tuple[Image.Image, str]]]:
    """Batches of (image, text): three of batch 1, one of batch 2 (prompts of unequal length)."""
    pairs = [
        (_probe_image(w, h, seed), text)
        for seed, ((w, h), text) in enumerate(zip(PROBE_SIZES, PROBE_TEXTS, strict=True))
    ]
    return [[pairs[0]], [pairs[3]], [pairs[4]], [pairs[1], pairs[2]]]
