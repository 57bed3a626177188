"""Learned content fingerprint (issue 9): per-cell codes of a small CNN encoder, signed and compared
cell by cell like the non-learned one; runtime layer (numpy + an inference backend, no torch).

What a cell holds: the ``fp_encoder`` model's code (``dims`` values, 4 for the default encoder) for
a cell of ``cell`` native pixels, computed on the display-windowed frame (colour frames by their
luma; ``fingerprint.display_frames``), divided by 255. The encoder has stride 16 (train/
fingerprint_model.py); the native cell is ``learned_cell_size_for``: twice the non-learned rule's
cell (16 px up to 512 a side, 32 at 2048, 46 at 4096), and frames whose cell is above 16 px are
area-resampled by 16 / cell before the encoder, so the code stays within the issue's byte budget
(<= 4 kB at 512 x 512, <= 64 kB at 4096 x 4096; 4 values a cell at 16, 32 and 46 px cells).
The frame is first edge-padded to whole cells.

Quantisation: each value is rounded to int8 (the encoder's unit is one step; it was trained with
that rounding's noise on the recorded side and keeps its codes within +-110).

Encoding (``LearnedFingerprint.to_bytes``, version 1): a fixed little-endian header (magic
``MELF``, version, flags, frames, rows, columns, cell, dims, reserved, the first 8 bytes of the
encoder's SHA-256), each frame's display window (as ``fingerprint.FrameWindow``), then zlib over
the int8 codes (frame, dim, row, column order) stored as differences modulo 256 from the left
neighbour (the first column: from the cell above), one byte each. ``from_bytes`` checks every
field, the cell rule and the exact decompressed size before it allocates anything the header chose.

Authentication: ``sign_learned_fingerprint``/``verify_learned_fingerprint``, Ed25519 with the seal
key under this module's own domain tag (neither the seal's nor the non-learned fingerprint's
signatures can be replayed as this one's).

Comparison (``compare_learned``): the recorded windows and geometry are applied to the image under
test, its codes computed (not rounded) and the per-cell L2 distance (or, with ``distance="max"``,
the largest absolute difference) to the recorded (int8) codes is returned as a ``fingerprint.DeviationMap`` (values in code units, not display levels), with the
same 2 x 2 max pooling, so the same scorer takes either fingerprint. Codes from another encoder
(a different SHA-256 prefix) are a ``encoder_mismatch``, not a comparison.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from medsec_edge.runtime.crypto.keyset import SealSigner, SealVerifier
from medsec_edge.runtime.errors import InputError, UsageError
from medsec_edge.runtime.io.image import MedicalImage
from medsec_edge.runtime.tamper.fingerprint import (
    DeviationMap,
    FrameWindow,
    _pool_max_2x2,
    cell_size_for,
    display_frames,
)
from medsec_edge.runtime.tamper.signed_record import (
    open_record,
    pack_windows,
    read_windows,
    seal_record,
)

__all__ = [
    "ENCODER_STRIDE",
    "LEARNED_FINGERPRINT_VERSION",
    "MODEL_NAME",
    "FingerprintEncoder",
    "LearnedFingerprint",
    "compare_learned",
    "compare_learned_display",
    "compute_learned_fingerprint",
    "encoder_input",
    "learned_cell_size_for",
    "sign_learned_fingerprint",
    "verify_learned_fingerprint",
]

LEARNED_FINGERPRINT_VERSION = 1
MODEL_NAME = "fp_encoder"  # the bundle's model entry
ENCODER_STRIDE = 16  # the encoder's stride in its input pixels (train/fingerprint_model.py CELL)
CODE_LIMIT = 127

_MAGIC = b"MELF"
_SIG_MAGIC = b"MELS"
_DOMAIN = b"medsec-edge learned fingerprint v1"
_HEADER = struct.Struct("<4sBBHIIHBB8s")  # magic, version, flags, frames, rows, cols, cell, dims, 0, encoder id
_LENGTH = struct.Struct("<I")
_MAX_SIDE = 32768
_MAX_FRAMES = 4096
_MAX_DIMS = 64
_MAX_TOTAL_VALUES = 64 * 2**20
_FLAG_COLOUR = 1


def learned_cell_size_for(shape_hw: tuple[int, int]) -> int:
    """Native cell side: twice the non-learned rule's (16 px up to 512 a side, 32 at 2048, 46 at 4096)."""
    return 2 * cell_size_for(shape_hw)


def _grid_shape(shape_hw: tuple[int, int], cell: int) -> tuple[int, int]:
    return -(-shape_hw[0] // cell), -(-shape_hw[1] // cell)


def encoder_id(model_bytes: bytes) -> bytes:
    """The 8 bytes that name an encoder in a record: the start of its SHA-256."""
    return hashlib.sha256(model_bytes).digest()[:8]


# --------------------------------------------------------------------------------------------
# the record


@dataclass(frozen=True)
class LearnedFingerprint:
    """int8 codes (frames, dims, grid_h, grid_w) of every frame, with geometry, windows, encoder."""

    shape_hw: tuple[int, int]
    cell: int
    windows: tuple[FrameWindow, ...]
    codes: np.ndarray = field(repr=False, compare=False)
    encoder: bytes = b"\0" * 8
    colour: bool = False
    version: int = LEARNED_FINGERPRINT_VERSION

    @property
    def n_frames(self) -> int:
        return len(self.windows)

    @property
    def dims(self) -> int:
        return int(self.codes.shape[1])

    @property
    def grid_shape(self) -> tuple[int, int]:
        return _grid_shape(self.shape_hw, self.cell)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LearnedFingerprint):
            return NotImplemented
        return (self.shape_hw, self.cell, self.windows, self.encoder, self.colour, self.version) == (
            other.shape_hw, other.cell, other.windows, other.encoder, other.colour, other.version
        ) and np.array_equal(self.codes, other.codes)

    __hash__ = None  # type: ignore[assignment] - holds an array

    def to_bytes(self) -> bytes:
        if not 1 <= self.n_frames <= _MAX_FRAMES:
            raise UsageError(f"a fingerprint holds 1..{_MAX_FRAMES} frames, this one {self.n_frames}")
        codes = np.asarray(self.codes)
        gh, gw = self.grid_shape
        if codes.dtype != np.int8 or codes.shape != (self.n_frames, codes.shape[1], gh, gw):
            raise UsageError(f"codes must be int8 (frames, dims, {gh}, {gw}), got {codes.dtype} {codes.shape}")
        if not 1 <= codes.shape[1] <= _MAX_DIMS or len(self.encoder) != 8:
            raise UsageError("a learned fingerprint has 1..64 dims and an 8-byte encoder id")
        body = zlib.compress(_pack(codes), 9)
        flags = _FLAG_COLOUR if self.colour else 0
        parts = [_HEADER.pack(_MAGIC, self.version, flags, self.n_frames, self.shape_hw[0], self.shape_hw[1],
                              self.cell, codes.shape[1], 0, bytes(self.encoder))]
        parts.append(pack_windows(self.windows))
        parts += [_LENGTH.pack(len(body)), body]
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> LearnedFingerprint:
        """Parse ``to_bytes``' output; anything malformed or inconsistent is an ``InputError``."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InputError(f"a learned fingerprint record is bytes, not {type(data).__name__}")
        data = bytes(data)
        if len(data) < _HEADER.size:
            raise InputError(f"learned fingerprint record is {len(data)} bytes, shorter than its "
                             f"{_HEADER.size}-byte header: truncated or not a learned fingerprint")
        magic, version, flags, frames, rows, cols, cell, dims, reserved, enc = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise InputError("not a medsec-edge learned fingerprint record (wrong magic)")
        if version != LEARNED_FINGERPRINT_VERSION:
            raise InputError(f"learned fingerprint record has version {version}, this medsec-edge reads "
                             f"version {LEARNED_FINGERPRINT_VERSION}: upgrade medsec-edge")
        if flags & ~_FLAG_COLOUR or reserved != 0:
            raise InputError("learned fingerprint record has unknown flags")
        if not (1 <= frames <= _MAX_FRAMES and 1 <= rows <= _MAX_SIDE and 1 <= cols <= _MAX_SIDE):
            raise InputError(f"learned fingerprint record claims {frames} frames of {rows}x{cols} px, "
                             f"outside 1..{_MAX_FRAMES} frames and 1..{_MAX_SIDE} px a side")
        if not 1 <= dims <= _MAX_DIMS:
            raise InputError(f"learned fingerprint record claims {dims} values a cell, outside 1..{_MAX_DIMS}")
        if cell != learned_cell_size_for((rows, cols)):
            raise InputError(f"learned fingerprint record has cells of {cell} px, the rule gives "
                             f"{learned_cell_size_for((rows, cols))} for {rows}x{cols}: corrupt record")
        gh, gw = _grid_shape((rows, cols), cell)
        n_values = frames * dims * gh * gw
        if n_values > _MAX_TOTAL_VALUES:
            raise InputError(f"learned fingerprint record claims {n_values} values, more than {_MAX_TOTAL_VALUES}")
        windows, offset = read_windows(data, _HEADER.size, frames, "learned fingerprint")
        if len(data) < offset + _LENGTH.size:
            raise InputError("learned fingerprint record is truncated after its window table")
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += _LENGTH.size
        if length != len(data) - offset:
            raise InputError(f"learned fingerprint record says {length} bytes of codes, "
                             f"{len(data) - offset} follow: truncated or padded")
        inflater = zlib.decompressobj()
        try:
            raw = inflater.decompress(data[offset:], n_values + 1)  # bounded: no zlib bomb
        except zlib.error:
            raise InputError("learned fingerprint record's codes are not valid zlib") from None
        if not inflater.eof or inflater.unused_data or len(raw) != n_values:
            raise InputError(f"learned fingerprint record's codes hold {len(raw)} bytes (or more), its "
                             f"header implies {n_values}: corrupt record")
        codes = _unpack(raw, (frames, dims, gh, gw))
        if codes.min() < -CODE_LIMIT:
            raise InputError("learned fingerprint record holds a code outside +-127")
        return cls((rows, cols), cell, tuple(windows), codes, enc, bool(flags & _FLAG_COLOUR), version)


def _pack(codes: np.ndarray) -> bytes:
    """int8 codes -> differences mod 256 from the left neighbour (first column: from above)."""
    c = codes.astype(np.int16)
    d = np.empty_like(c)
    d[..., 1:] = c[..., 1:] - c[..., :-1]
    d[..., 1:, 0] = c[..., 1:, 0] - c[..., :-1, 0]
    d[..., 0, 0] = c[..., 0, 0]
    return (d & 0xFF).astype(np.uint8).tobytes()


def _unpack(raw: bytes, shape: tuple[int, int, int, int]) -> np.ndarray:
    d = np.frombuffer(raw, dtype=np.uint8).reshape(shape).astype(np.int64)
    c = d.copy()
    c[..., :, 0] = np.cumsum(d[..., :, 0], axis=-1)
    c = np.cumsum(c, axis=-1) & 0xFF
    return c.astype(np.uint8).view(np.int8)


# --------------------------------------------------------------------------------------------
# computing


def _area_resample(plane: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Area averaging of ``plane`` down to ``size_hw``: block means for a whole factor, else PIL's
    box filter (exact pixel-area weights)."""
    h, w = plane.shape
    fy, fx = h / size_hw[0], w / size_hw[1]
    if fy == fx and fy.is_integer():
        f = int(fy)
        cols = plane[:, 0::f].astype(np.float32)  # strided slice sums: far faster than a reduce
        for i in range(1, f):  # over a short last axis
            cols += plane[:, i::f]
        out = cols[0::f].copy()
        for i in range(1, f):
            out += cols[i::f]
        return out * np.float32(1.0 / (f * f))
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32), mode="F")
    return np.asarray(img.resize((size_hw[1], size_hw[0]), resample=Image.Resampling.BOX), dtype=np.float32)


def encoder_input(display: np.ndarray, cell: int) -> np.ndarray:
    """(1, 1, gh*16, gw*16) float32 display/255: edge-padded to whole cells, area-resampled by
    16/cell when the cell is larger than the encoder's stride."""
    display = np.asarray(display, dtype=np.float32)
    h, w = display.shape
    gh, gw = _grid_shape((h, w), cell)
    if (gh * cell, gw * cell) == (h, w):
        padded = display
    else:
        padded = np.pad(display, ((0, gh * cell - h), (0, gw * cell - w)), mode="edge")
    if cell != ENCODER_STRIDE:
        if cell < ENCODER_STRIDE:
            raise UsageError(f"cells of {cell} px are below the encoder's stride {ENCODER_STRIDE}")
        padded = _area_resample(padded, (gh * ENCODER_STRIDE, gw * ENCODER_STRIDE))
    return np.ascontiguousarray(padded[None, None] * np.float32(1.0 / 255.0), dtype=np.float32)


class FingerprintEncoder:
    """The ``fp_encoder`` model in a backend session, with its id (SHA-256 prefix of its bytes)."""

    def __init__(self, session, model_id: bytes):
        self.session, self.id = session, bytes(model_id)

    @classmethod
    def from_bytes(cls, model: bytes, *, backend: str = "onnxruntime", threads: int | None = 1
                   ) -> FingerprintEncoder:
        from medsec_edge.runtime.backends import get_backend

        return cls(get_backend(backend).load(bytes(model), threads=threads), encoder_id(model))

    @classmethod
    def from_path(cls, path: Path | str, **kwargs) -> FingerprintEncoder:
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"fingerprint encoder {path} does not exist")
        return cls.from_bytes(path.read_bytes(), **kwargs)

    @classmethod
    def from_bundle(cls, bundle, **kwargs) -> FingerprintEncoder:
        return cls.from_bytes(bundle.model_bytes(MODEL_NAME), **kwargs)

    def codes(self, display: np.ndarray, cell: int) -> np.ndarray:
        """float32 (dims, gh, gw) codes of one display frame (0..255) at native cell ``cell``."""
        x = encoder_input(display, cell)
        out = self.session.run({"image": x})
        codes = next(iter(out.values())) if "codes" not in out else out["codes"]
        gh, gw = _grid_shape(np.shape(display), cell)
        if codes.ndim != 4 or codes.shape[0] != 1 or codes.shape[2:] != (gh, gw):
            raise UsageError(f"fingerprint encoder gave codes of shape {codes.shape}, expected (1, K, {gh}, {gw})")
        return codes[0].astype(np.float32)

    def close(self) -> None:
        self.session.close()


def quantise(codes: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(codes), -CODE_LIMIT, CODE_LIMIT).astype(np.int8)


def compute_learned_fingerprint(image: MedicalImage, encoder: FingerprintEncoder) -> LearnedFingerprint:
    """The learned fingerprint of every frame of ``image`` (its own display window per frame)."""
    shape_hw = image.shape_hw
    cell = learned_cell_size_for(shape_hw)
    displays, windows = display_frames(image)
    codes = np.stack([quantise(encoder.codes(d, cell)) for d in displays])
    return LearnedFingerprint(shape_hw, cell, tuple(windows), codes, encoder.id, image.meta.is_colour)


# --------------------------------------------------------------------------------------------
# signing


def sign_learned_fingerprint(fp: LearnedFingerprint, signer: SealSigner) -> bytes:
    """The record's bytes in the signed envelope of ``signed_record`` (magic ``MELS``)."""
    return seal_record(_SIG_MAGIC, _DOMAIN, fp.to_bytes(), signer)


def verify_learned_fingerprint(blob: bytes,
                               verifiers: Mapping[str, SealVerifier] | Iterable[SealVerifier] | SealVerifier,
                               ) -> LearnedFingerprint | None:
    """The record if one of ``verifiers`` signed exactly these bytes, else None (unknown key or bad
    signature); a blob that is not a signed learned fingerprint at all is an ``InputError``."""
    body = open_record(blob, _SIG_MAGIC, _DOMAIN, "learned fingerprint", verifiers)
    return None if body is None else LearnedFingerprint.from_bytes(body)


# --------------------------------------------------------------------------------------------
# comparing


def _mismatch(recorded: LearnedFingerprint, status: str, reason: str) -> DeviationMap:
    return DeviationMap(status, recorded.shape_hw, recorded.cell, reason=reason)


DISTANCES = ("l2", "max")


def compare_learned_display(recorded: LearnedFingerprint, displays: Sequence[np.ndarray],
                            encoder: FingerprintEncoder, *, distance: str = "l2") -> DeviationMap:
    """Compare frames already in display values 0..255; per-cell code distance in code units:
    ``l2`` (what the encoder was trained on) or ``max`` (largest |difference| over the values: on
    validation slightly better for small edits, which move one 8 px sub-cell's value)."""
    if distance not in DISTANCES:
        raise UsageError(f"distance must be one of {DISTANCES}, got {distance!r}")
    if encoder.id != recorded.encoder:
        return _mismatch(recorded, "encoder_mismatch", f"recorded with encoder {recorded.encoder.hex()}, "
                                                       f"this bundle's is {encoder.id.hex()}")
    if len(displays) != recorded.n_frames:
        return _mismatch(recorded, "geometry_mismatch",
                         f"{len(displays)} frames, the fingerprint has {recorded.n_frames}")
    for display in displays:
        if np.ndim(display) != 2 or tuple(np.shape(display)) != recorded.shape_hw:
            return _mismatch(recorded, "geometry_mismatch",
                             f"frame of {tuple(np.shape(display))}, the fingerprint was made on "
                             f"{recorded.shape_hw[0]}x{recorded.shape_hw[1]}")
    rec = recorded.codes.astype(np.float32)
    dev = np.empty((recorded.n_frames, *recorded.grid_shape), dtype=np.float32)
    for i, display in enumerate(displays):
        now = encoder.codes(display, recorded.cell)
        if now.shape != rec[i].shape:
            return _mismatch(recorded, "encoder_mismatch", f"encoder gives {now.shape[0]} values a cell, "
                                                           f"the record holds {rec.shape[1]}")
        diff = now - rec[i]
        dev[i] = np.sqrt((diff**2).sum(axis=0)) if distance == "l2" else np.abs(diff).max(axis=0)
    return DeviationMap("compared", recorded.shape_hw, recorded.cell, dev, _pool_max_2x2(dev))


def compare_learned(recorded: LearnedFingerprint, image: MedicalImage, encoder: FingerprintEncoder, *,
                    distance: str = "l2") -> DeviationMap:
    """Recompute on ``image`` with the recorded windows and geometry; L2 code distance per cell."""
    if image.meta.is_colour != recorded.colour:
        return _mismatch(recorded, "geometry_mismatch", "colour and greyscale differ from the fingerprinted image")
    if image.n_frames != recorded.n_frames or image.shape_hw != recorded.shape_hw:
        return _mismatch(recorded, "geometry_mismatch",
                         f"{image.n_frames} frame(s) of {image.shape_hw[0]}x{image.shape_hw[1]}, the "
                         f"fingerprint has {recorded.n_frames} of {recorded.shape_hw[0]}x{recorded.shape_hw[1]}")
    displays, _ = display_frames(image, recorded.windows)
    return compare_learned_display(recorded, displays, encoder, distance=distance)
