"""How big an input may be before we read it: the limits every reader checks against a header
before it allocates, so a file's claims never decide how much memory we take.

Layer: runtime (io; standard library only). Defaults fit the largest ordinary medical images
(a 70-frame tomosynthesis stack of 2457x1890 16-bit frames is about 650 MB decoded) with room to
spare, and stay far below what a 4 GB edge device has. A site with bigger images raises them with
environment variables (``MEDSEC_EDGE_MAX_FILE_BYTES=4G`` and so on); a malformed value is a
``ConfigError`` (exit 2), never silently ignored.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields

from medsec_edge.runtime.errors import ConfigError

__all__ = ["ENV_PREFIX", "ReadLimits", "read_limits"]

ENV_PREFIX = "MEDSEC_EDGE_"
_SUFFIX = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


@dataclass(frozen=True)
class ReadLimits:
    """Upper bounds for one input file; each is checked before the memory it bounds is taken."""

    max_file_bytes: int = 1 * 2**30  # bytes read from disk
    max_image_bytes: int = 1 * 2**30  # decoded pixels: rows * columns * frames * samples * bytes
    max_side: int = 32768  # rows or columns of one frame
    max_frames: int = 4096
    # Encoded pixel data may expand at most this much when decoded; lossless codecs on medical
    # images stay far below it (RLE cannot exceed 64:1), a decompression bomb does not.
    max_expansion: int = 1024

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"read limit {f.name} must be a positive integer, got {value!r}")

    def check_image(self, what: str, rows: int, columns: int, frames: int = 1,
                    samples: int = 1, bytes_per_sample: int = 1) -> int:
        """The decoded size in bytes of an image whose header says this; raises ``ValueError``
        with a one-line reason when a dimension is not positive or a limit is exceeded."""
        for label, value in (("rows", rows), ("columns", columns), ("frames", frames),
                             ("samples per pixel", samples), ("bytes per sample", bytes_per_sample)):
            if value < 1:
                raise ValueError(f"{what} header gives {label} = {value}; it must be at least 1")
        if max(rows, columns) > self.max_side:
            raise ValueError(f"{what} header claims {rows}x{columns} pixels per frame, more than the "
                             f"limit of {self.max_side} per side ({ENV_PREFIX}MAX_SIDE)")
        if frames > self.max_frames:
            raise ValueError(f"{what} header claims {frames} frames, more than the limit of "
                             f"{self.max_frames} ({ENV_PREFIX}MAX_FRAMES)")
        size = rows * columns * frames * samples * bytes_per_sample
        if size > self.max_image_bytes:
            raise ValueError(f"{what} header claims {_human(size)} of pixels ({frames}x{rows}x{columns}"
                             f"x{samples} samples of {bytes_per_sample} bytes), more than the limit of "
                             f"{_human(self.max_image_bytes)} ({ENV_PREFIX}MAX_IMAGE_BYTES)")
        return size


def _human(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _parse(name: str, text: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ConfigError(f"{name}={text!r} is not a size: use a whole number, optionally with K, M or G "
                          f"(for example {name}=2G)")
    return int(match.group(1)) * _SUFFIX[match.group(2).upper()]


def read_limits(environ: dict[str, str] | None = None) -> ReadLimits:
    """The defaults, overridden by ``MEDSEC_EDGE_MAX_*`` environment variables (read each call, so
    a long-running node picks up a change on restart and tests can set them per case)."""
    env = os.environ if environ is None else environ
    values = {}
    for f in fields(ReadLimits):
        name = ENV_PREFIX + f.name.upper()
        if name in env and env[name].strip():
            values[f.name] = _parse(name, env[name])
    return ReadLimits(**values)
