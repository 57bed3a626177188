"""A small PNG codec for 16-bit colour, which Pillow cannot hold: the writer encodes with it and
the reader decodes with it (every PNG filter type).

Layer: runtime (io; numpy and zlib only). The decoder skips Pillow and so Pillow's
decompression-bomb guard: it checks the IHDR against the read limits before inflating, and
inflates at most the bytes that IHDR describes, so a small file cannot claim gigabytes.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
from medsec_edge.runtime.io.limits import ReadLimits, read_limits

# 16-bit colour PNG (Pillow reads it as 8-bit and cannot write it)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png16_encode(rgb_u16: np.ndarray) -> bytes:
    height, width = rgb_u16.shape[:2]
    rows = rgb_u16.astype(">u2").reshape(height, width * 3).view(np.uint8)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1)  # filter 0 per row
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        _PNG_SIGNATURE
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
        + _png_chunk(b"IEND", b"")
    )


class PngError(ValueError):
    """The PNG cannot be decoded (the reader turns this into a refusal naming the file)."""


def png16_decode(data: bytes, limits: ReadLimits | None = None) -> np.ndarray:
    """Decode a non-interlaced 16-bit PNG of colour type 2 (RGB), 4 (grey+alpha) or 6 (RGBA) to
    (H, W, channels) uint16, alpha included; ``PngError`` for anything else or beyond ``limits``."""
    limits = limits or read_limits()
    pos, idat, header = 8, [], None
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if len(body) != length or pos + 12 + length > len(data):
            raise PngError("truncated PNG chunk")
        if kind == b"IHDR":
            if length != 13:
                raise PngError("corrupt PNG header (IHDR is not 13 bytes)")
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None or not idat:
        raise PngError("PNG without IHDR or IDAT")
    width, height, depth, colour_type, _c, _f, interlace = header
    if interlace:
        raise PngError("interlaced 16-bit PNG is not supported")
    if depth != 16 or colour_type not in (2, 4, 6):
        raise PngError(f"PNG bit depth {depth} colour type {colour_type} is not 16-bit RGB, grey+alpha or RGBA")
    channels = {2: 3, 4: 2, 6: 4}[colour_type]
    try:
        limits.check_image("PNG", height, width, 1, channels, 2)
    except ValueError as exc:
        raise PngError(str(exc)) from None
    bpp = 2 * channels
    stride = width * bpp
    expected = height * (stride + 1)
    try:
        # max_length bounds the output: a bomb inflates no further than the IHDR's claim.
        raw = np.frombuffer(zlib.decompressobj().decompress(b"".join(idat), expected), np.uint8)
    except zlib.error:
        raise PngError("corrupt PNG image data (zlib stream)") from None
    if raw.size < expected:
        raise PngError("truncated PNG image data")
    raw = raw[: height * (stride + 1)].reshape(height, stride + 1)
    out = np.zeros((height, stride), np.uint8)
    prev = np.zeros(stride, np.uint8)
    for y in range(height):
        kind, line = raw[y, 0], raw[y, 1:]
        if kind == 0:
            row = line.copy()
        elif kind == 1:
            sums = np.cumsum(line.reshape(width, bpp), axis=0, dtype=np.uint64)
            row = (sums % 256).astype(np.uint8).ravel()
        elif kind == 2:
            row = line + prev
        elif kind in (3, 4):
            row = _png_unfilter_slow(int(kind), line, prev, bpp)
        else:
            raise PngError(f"corrupt PNG (filter type {kind})")
        out[y] = row
        prev = row
    return out.view(">u2").reshape(height, width, channels).astype(np.uint16)


def _png_unfilter_slow(kind: int, line: np.ndarray, prev: np.ndarray, bpp: int) -> np.ndarray:
    cur = bytearray(line.tobytes())
    up = prev.tobytes()
    for i in range(len(cur)):
        a = cur[i - bpp] if i >= bpp else 0
        b = up[i]
        if kind == 3:
            cur[i] = (cur[i] + ((a + b) >> 1)) & 0xFF
        else:
            c = up[i - bpp] if i >= bpp else 0
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            pred = a if (pa <= pb and pa <= pc) else (b if pb <= pc else c)
            cur[i] = (cur[i] + pred) & 0xFF
    return np.frombuffer(bytes(cur), np.uint8)
