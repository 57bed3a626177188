"""Constants and geometry shared by the watermark's trainer and its device runtime.

Layer: runtime (train imports it; it imports nothing of ours). The watermark is a 32x32 tile at
the model's working resolution, repeated over the whole image; the working resolution is the
display image box-downsampled by an integer factor chosen from the image size, so the networks
cost about the same for a 64x64 MR and a 2048x2048 radiograph.
"""

from __future__ import annotations

import math

TILE = 32  # tile side at working resolution
CODE_BITS = 128  # bits carried per tile (the payload codec's code word)
WORK_SIDE = 256  # target geometric-mean side of the working image
MAX_FACTOR = 16


def working_factor(height: int, width: int) -> int:
    """Integer box-downsampling factor from native to working resolution."""
    side = math.sqrt(max(1, height) * max(1, width))
    return int(min(MAX_FACTOR, max(1, round(side / WORK_SIDE))))


SMALL_SIDE = 128  # below this a side, the mark survives light processing only (measured, issue 11)


def capacity(height: int, width: int) -> dict:
    """What an image of this size can carry, reported with every extraction so that a small image's
    weaker mark is stated, not discovered: the whole tiles at working resolution, the native pixels
    behind each of the ``CODE_BITS`` code bits, and ``robust`` False below ``SMALL_SIDE``."""
    factor = working_factor(height, width)
    tiles = (height // factor / TILE) * (width // factor / TILE)
    return {
        "tiles": round(tiles, 2),
        "pixels_per_bit": round(height * width / CODE_BITS, 1),
        "robust": min(height, width) >= SMALL_SIDE,
    }
