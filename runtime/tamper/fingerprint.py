"""Content fingerprint (issue 9): signed local display means per frame, to say where it changed; runtime layer."""

# What a cell holds, and why only that: the display-windowed frame (DESIGN.md, Measures; colour
# frames by their luma) smoothed with a Gaussian of sigma = cell / 2 and sampled at the cell's
# centre, i.e. a Gaussian-weighted local mean, quantised to ``QUANT_LEVELS`` display levels. The
# probe in issue 9 (sigma 4 px every 8 px) is this at cell 8. No second value (local contrast or
# gradient) is stored: a fine-scale texture statistic is exactly what the benign steps change
# (noise 1% of the range adds tens of display levels of pixel noise to a CT, JPEG and blur remove
# texture), and a coarse-scale gradient is already in the recorded grid (a later scorer can derive
# it from neighbouring cells to normalise deviations by local structure), so storing it would
# double the bytes for nothing new.
#
# Cell size rule (``cell_size_for``): 8 px for frames up to 512 px a side, then growing with the
# square root of the longer side (8 * sqrt(side / 512), rounded up), so the code grows with the side
# rather than the area: 16 px at 2048, 23 px at 4096 (179 x 179 cells).
#
# Smoothing is evaluated only at the cell centres: the separable Gaussian becomes two small dense
# weight matrices (rows normalised, so borders are a normalised convolution) and the grid is
# ``Wy @ display @ Wx.T``, which BLAS does in a few milliseconds even at 2048 x 2048.
#
# Encoding (``Fingerprint.to_bytes``, version 1): a fixed little-endian header (magic, version,
# frames, rows, columns, cell, quantisation, colour flag), each frame's display window (lower,
# upper, slope, intercept as float64, inverted flag), then zlib over the quantised grid stored as
# differences along each row (the first column against the row above), zigzag, in one byte for
# |difference| < 32 levels and two otherwise (``_pack_deltas``): smooth content takes ~1 byte a cell
# before zlib and well under after. ``from_bytes`` checks every field and the decompressed
# size against the header before it allocates anything the header chose.
#
# Authentication (``sign_fingerprint``/``verify_fingerprint``): Ed25519 with the device's seal key
# (``SealSigner``/``SealVerifier``), over a message under this module's own domain tag, so neither a
# seal signature nor anything else we sign can be replayed as a fingerprint signature and an editor
# without the key cannot recompute the fingerprint after an edit.
#
# Comparison (``compare`` / ``compare_display``): the raw per-cell absolute deviation in display
# levels at the recorded geometry, and a 2 x 2 max pooling of it (the measure the learned
# fingerprint's comparison is set beside). ``check``'s verdict does not use it: ``scoring.py``
# aligns, explains benign change away, normalises and thresholds with calibrated constants.
# ``DEFAULT_THRESHOLD`` (5.2 display levels) is the first probe, uncalibrated.

from __future__ import annotations

import functools
import math
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from medsec_edge.runtime.crypto.keyset import SealSigner, SealVerifier
from medsec_edge.runtime.errors import InputError, UsageError
from medsec_edge.runtime.io.image import MedicalImage, display_window, luminance
from medsec_edge.runtime.tamper.signed_record import (
    FrameWindow,
    open_record,
    pack_windows,
    read_windows,
    record_key_id,
    seal_record,
)

__all__ = [
    "DEFAULT_THRESHOLD",
    "FINGERPRINT_VERSION",
    "CellRegion",
    "DeviationMap",
    "Fingerprint",
    "FrameWindow",
    "cell_size_for",
    "compare",
    "compare_display",
    "compute_fingerprint",
    "display_frames",
    "sign_fingerprint",
    "signed_key_id",
    "verify_fingerprint",
]

FINGERPRINT_VERSION = 1
BASE_CELL = 8  # the probe's sampling step, kept at native resolution up to BASE_SIDE
BASE_SIDE = 512
QUANT_LEVELS = 2  # steps per display level: 0.5 levels, max error 0.25, far below any threshold
MAX_CODE = 255 * QUANT_LEVELS
# The probe's largest benign deviation (JPEG q50-90 of the display, noise 1-2%, blur 1, lossless)
# on 9 held-out images; a placeholder until calibration on validation images replaces it.
DEFAULT_THRESHOLD = 5.2

_MAGIC = b"MEFP"
_SIG_MAGIC = b"MEFS"
_DOMAIN = b"medsec-edge fingerprint v1"  # differs from the seal's "medsec-edge seal v1"
_HEADER = struct.Struct("<4sBBHIIHBB")  # magic, version, flags, frames, rows, cols, cell, quant, 0
_LENGTH = struct.Struct("<I")
# Bounds a header must respect before anything is allocated: those of the readers' defaults
# (limits.ReadLimits: 32768 px a side, 4096 frames) and a total cell budget no real image needs.
_MAX_SIDE = 32768
_MAX_FRAMES = 4096
_MAX_TOTAL_CELLS = 64 * 2**20  # 128 MiB of int16 grid at most
_FLAG_COLOUR = 1


def cell_size_for(shape_hw: tuple[int, int]) -> int:
    """Cell side in native pixels: 8 up to 512 px a side, then 8 * sqrt(side / 512) rounded up."""
    side = max(int(shape_hw[0]), int(shape_hw[1]))
    if side <= BASE_SIDE:
        return BASE_CELL
    return math.ceil(BASE_CELL * math.sqrt(side / BASE_SIDE) - 1e-9)


def _grid_shape(shape_hw: tuple[int, int], cell: int) -> tuple[int, int]:
    return -(-shape_hw[0] // cell), -(-shape_hw[1] // cell)


@dataclass(frozen=True)
class Fingerprint:
    """Quantised cell grids of every frame plus the geometry and windows they were made with.

    ``codes``: uint16 (frames, grid_h, grid_w), display value * QUANT_LEVELS, rounded.
    """

    shape_hw: tuple[int, int]
    cell: int
    windows: tuple[FrameWindow, ...]
    codes: np.ndarray = field(repr=False, compare=False)
    colour: bool = False
    version: int = FINGERPRINT_VERSION

    @property
    def n_frames(self) -> int:
        return len(self.windows)

    @property
    def grid_shape(self) -> tuple[int, int]:
        return _grid_shape(self.shape_hw, self.cell)

    @property
    def values(self) -> np.ndarray:
        """The recorded cell values in display levels (float32, frames x grid)."""
        return self.codes.astype(np.float32) / np.float32(QUANT_LEVELS)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Fingerprint):
            return NotImplemented
        return (self.shape_hw, self.cell, self.windows, self.colour, self.version) == (
            other.shape_hw, other.cell, other.windows, other.colour, other.version
        ) and np.array_equal(self.codes, other.codes)

    __hash__ = None  # type: ignore[assignment] - holds an array

    def to_bytes(self) -> bytes:
        """The versioned, compact encoding (see the module docstring)."""
        if not 1 <= self.n_frames <= _MAX_FRAMES:
            raise UsageError(f"a fingerprint holds 1..{_MAX_FRAMES} frames, this one {self.n_frames}")
        body = zlib.compress(_pack_deltas(self.codes), 9)
        flags = _FLAG_COLOUR if self.colour else 0
        parts = [_HEADER.pack(_MAGIC, self.version, flags, self.n_frames, self.shape_hw[0],
                              self.shape_hw[1], self.cell, QUANT_LEVELS, 0)]
        parts.append(pack_windows(self.windows))
        parts += [_LENGTH.pack(len(body)), body]
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> Fingerprint:
        """Parse ``to_bytes``' output; anything malformed or inconsistent is an ``InputError``."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InputError(f"a fingerprint record is bytes, not {type(data).__name__}")
        data = bytes(data)
        if len(data) < _HEADER.size:
            raise InputError(f"fingerprint record is {len(data)} bytes, shorter than its "
                             f"{_HEADER.size}-byte header: truncated or not a fingerprint")
        magic, version, flags, frames, rows, cols, cell, quant, reserved = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise InputError("not a medsec-edge fingerprint record (wrong magic)")
        if version != FINGERPRINT_VERSION:
            raise InputError(f"fingerprint record has version {version}, this medsec-edge reads "
                             f"version {FINGERPRINT_VERSION}: upgrade medsec-edge")
        if flags & ~_FLAG_COLOUR or reserved != 0 or quant != QUANT_LEVELS:
            raise InputError("fingerprint record has unknown flags or quantisation")
        if not (1 <= frames <= _MAX_FRAMES and 1 <= rows <= _MAX_SIDE and 1 <= cols <= _MAX_SIDE):
            raise InputError(f"fingerprint record claims {frames} frames of {rows}x{cols} px, "
                             f"outside 1..{_MAX_FRAMES} frames and 1..{_MAX_SIDE} px a side")
        if cell != cell_size_for((rows, cols)):
            raise InputError(f"fingerprint record has cells of {cell} px, the rule gives "
                             f"{cell_size_for((rows, cols))} for {rows}x{cols}: corrupt record")
        gh, gw = _grid_shape((rows, cols), cell)
        n_cells = frames * gh * gw
        if n_cells > _MAX_TOTAL_CELLS:
            raise InputError(f"fingerprint record claims {n_cells} cells, more than "
                             f"{_MAX_TOTAL_CELLS}")
        windows, offset = read_windows(data, _HEADER.size, frames, "fingerprint")
        if len(data) < offset + _LENGTH.size:
            raise InputError("fingerprint record is truncated after its window table")
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += _LENGTH.size
        if length != len(data) - offset:
            raise InputError(f"fingerprint record says {length} bytes of cells, "
                             f"{len(data) - offset} follow: truncated or padded")
        inflater = zlib.decompressobj()
        try:
            # max_length bounds what a hostile stream can make us allocate (no zlib bomb)
            raw = inflater.decompress(data[offset:], 2 * n_cells + 1)
        except zlib.error:
            raise InputError("fingerprint record's cell data are not valid zlib") from None
        if not inflater.eof or inflater.unused_data:
            raise InputError("fingerprint record's cell data are truncated or hold more than "
                             "its header implies: corrupt record")
        codes = _unpack_deltas(raw, (frames, gh, gw))
        return cls((rows, cols), cell, tuple(windows), codes.astype(np.uint16),
                   bool(flags & _FLAG_COLOUR), version)


def _pack_deltas(codes: np.ndarray) -> bytes:
    """Codes -> differences along rows (first column: down the column), zigzag, then two byte
    streams: every cell's low 7 bits with a continuation flag, then the high bits of the flagged
    ones. Neighbouring cells of smooth content differ by little, so most cells take one byte."""
    c = np.ascontiguousarray(codes, dtype=np.int32)
    d = np.empty_like(c)
    d[:, :, 1:] = c[:, :, 1:] - c[:, :, :-1]
    d[:, 1:, 0] = c[:, 1:, 0] - c[:, :-1, 0]
    d[:, 0, 0] = c[:, 0, 0]
    z = np.where(d >= 0, 2 * d, -2 * d - 1).ravel()
    wide = z >= 128
    low = ((z & 127) | (wide.astype(np.int32) << 7)).astype(np.uint8)
    return low.tobytes() + (z[wide] >> 7).astype(np.uint8).tobytes()


def _unpack_deltas(raw: bytes, shape: tuple[int, int, int]) -> np.ndarray:
    """Inverse of ``_pack_deltas``; InputError unless ``raw`` is exactly one canonical encoding."""
    n_cells = shape[0] * shape[1] * shape[2]
    if len(raw) < n_cells:
        raise InputError(f"fingerprint record's cell data hold {len(raw)} bytes, fewer than its "
                         f"{n_cells} cells: corrupt record")
    low = np.frombuffer(raw, dtype=np.uint8, count=n_cells).astype(np.int32)
    wide = low >= 128
    high = np.frombuffer(raw, dtype=np.uint8, offset=n_cells).astype(np.int32)
    if high.size != int(wide.sum()) or (high.size and high.min() < 1):
        raise InputError("fingerprint record's cell data do not match their own layout: corrupt record")
    z = low & 127
    z[wide] |= high << 7
    d = np.where(z & 1, -(z + 1) // 2, z // 2).reshape(shape)
    codes = d.copy()
    codes[:, :, 0] = np.cumsum(d[:, :, 0], axis=1)
    codes = np.cumsum(codes, axis=2)
    if codes.min() < 0 or codes.max() > MAX_CODE:
        raise InputError("fingerprint record's cell values leave the display range")
    return codes


# --------------------------------------------------------------------------------------------
# computing


@functools.lru_cache(maxsize=32)  # a scanner makes few frame sizes; these take ~0.3 ms at 512
def _gaussian_weights(n_pixels: int, n_cells: int, cell: int) -> np.ndarray:
    """(n_cells, n_pixels) float32: row i is a Gaussian (sigma = cell / 2) centred on cell i's
    centre, truncated at 3 sigma and normalised to sum 1 (a normalised convolution at borders)."""
    sigma = cell / 2.0
    centres = (np.arange(n_cells, dtype=np.float64) + 0.5) * cell - 0.5
    centres = np.minimum(centres, n_pixels - 1)  # a partial last cell: its part inside the frame
    x = np.arange(n_pixels, dtype=np.float64)
    d = (x[None, :] - centres[:, None]) / sigma
    w = np.exp(-0.5 * d * d)
    w[np.abs(d) > 3.0] = 0.0
    w /= w.sum(axis=1, keepdims=True)
    w = w.astype(np.float32)
    w.setflags(write=False)  # shared by every caller through the cache
    return w


def _cell_means(display: np.ndarray, cell: int) -> np.ndarray:
    """Gaussian-smoothed display values at the cell centres (float32, grid_h x grid_w)."""
    h, w = display.shape
    gh, gw = _grid_shape((h, w), cell)
    wy = _gaussian_weights(h, gh, cell)
    wx = _gaussian_weights(w, gw, cell)
    return (wy @ display) @ wx.T


def _grey(frame: np.ndarray, colour: bool) -> np.ndarray:
    return luminance(frame) if colour else frame


def display_frames(image: MedicalImage,
                   windows: Sequence[FrameWindow] | None = None) -> tuple[list[np.ndarray], list[FrameWindow]]:
    """Each frame as display values 0..255 (float32), with the window used (given, or the image's)."""
    colour = image.meta.is_colour
    frames = image.frames()
    out, used = [], []
    for i, frame in enumerate(frames):
        if windows is None:
            window = FrameWindow.from_display_window(display_window(image.meta, frame))
        else:
            window = windows[i]
        out.append(window.to_display_window().to_display(_grey(frame, colour)))
        used.append(window)
    return out, used


def compute_fingerprint(image: MedicalImage) -> Fingerprint:
    """The fingerprint of every frame of ``image`` (its own display window per frame)."""
    shape_hw = image.shape_hw
    cell = cell_size_for(shape_hw)
    displays, windows = display_frames(image)
    codes = np.empty((len(displays), *_grid_shape(shape_hw, cell)), dtype=np.uint16)
    for i, display in enumerate(displays):
        means = _cell_means(display, cell)
        codes[i] = np.clip(np.rint(means * QUANT_LEVELS), 0, MAX_CODE).astype(np.uint16)
    return Fingerprint(shape_hw, cell, tuple(windows), codes, image.meta.is_colour)


# --------------------------------------------------------------------------------------------
# signing


def sign_fingerprint(fp: Fingerprint, signer: SealSigner) -> bytes:
    """The fingerprint's bytes in the signed envelope of ``signed_record`` (magic ``MEFS``)."""
    return seal_record(_SIG_MAGIC, _DOMAIN, fp.to_bytes(), signer)


def signed_key_id(blob: bytes) -> str:
    """The key id a signed fingerprint names (to tell "unknown key" from "invalid")."""
    return record_key_id(bytes(blob), _SIG_MAGIC, "fingerprint")


def verify_fingerprint(blob: bytes,
                       verifiers: Mapping[str, SealVerifier] | Iterable[SealVerifier] | SealVerifier,
                       ) -> Fingerprint | None:
    """The fingerprint if one of ``verifiers`` signed exactly these bytes, else None.

    A blob that is not a signed fingerprint at all (wrong magic, truncated) is an ``InputError``;
    an unknown key or a signature that does not verify is None (a verdict, not an error).
    """
    body = open_record(blob, _SIG_MAGIC, _DOMAIN, "fingerprint", verifiers)
    return None if body is None else Fingerprint.from_bytes(body)


# --------------------------------------------------------------------------------------------
# comparing


@dataclass(frozen=True)
class CellRegion:
    """A connected group of flagged cells, as a box in native pixels (end exclusive)."""

    frame: int
    y0: int
    x0: int
    y1: int
    x1: int
    peak: float  # the largest deviation inside, display levels
    cells: int


@dataclass(frozen=True)
class DeviationMap:
    """Per-cell absolute deviation from the recorded fingerprint, in display levels.

    ``status``: ``compared``, or ``geometry_mismatch`` (then ``cells``/``pooled`` are None and
    ``reason`` says what differs). ``pooled`` is the max over each 2 x 2 block of cells starting at
    that cell (edge-replicated), so an edit straddling a cell border is seen whole by one cell.
    """

    status: str
    shape_hw: tuple[int, int]
    cell: int
    cells: np.ndarray | None = field(default=None, repr=False, compare=False)
    pooled: np.ndarray | None = field(default=None, repr=False, compare=False)
    reason: str = ""

    @property
    def compared(self) -> bool:
        return self.status == "compared"

    @property
    def max_deviation(self) -> float | None:
        return float(self.cells.max()) if self.compared else None

    def mask(self, threshold: float = DEFAULT_THRESHOLD, *, pooled: bool = False) -> np.ndarray:
        """Boolean (frames, grid_h, grid_w): cells whose deviation exceeds ``threshold``."""
        if not self.compared:
            raise UsageError(f"no deviation map to threshold ({self.status}): {self.reason}")
        return (self.pooled if pooled else self.cells) > threshold

    def regions(self, threshold: float = DEFAULT_THRESHOLD, *, pooled: bool = False) -> list[CellRegion]:
        """Connected (8-neighbour) flagged cells as boxes in native pixels, largest peak first."""
        mask = self.mask(threshold, pooled=pooled)
        values = self.pooled if pooled else self.cells
        h, w = self.shape_hw
        span = 2 if pooled else 1  # a pooled cell speaks for its 2 x 2 block
        found: list[CellRegion] = []
        for f in range(mask.shape[0]):
            seen = np.zeros_like(mask[f])
            for i, j in zip(*np.nonzero(mask[f])):
                if seen[i, j]:
                    continue
                stack, members = [(int(i), int(j))], []
                seen[i, j] = True
                while stack:
                    a, b = stack.pop()
                    members.append((a, b))
                    for da in (-1, 0, 1):
                        for db in (-1, 0, 1):
                            y, x = a + da, b + db
                            if (0 <= y < mask.shape[1] and 0 <= x < mask.shape[2]
                                    and mask[f, y, x] and not seen[y, x]):
                                seen[y, x] = True
                                stack.append((y, x))
                ys = [m[0] for m in members]
                xs = [m[1] for m in members]
                found.append(CellRegion(
                    frame=f, y0=min(ys) * self.cell, x0=min(xs) * self.cell,
                    y1=min((max(ys) + span) * self.cell, h), x1=min((max(xs) + span) * self.cell, w),
                    peak=float(max(values[f, y, x] for y, x in members)), cells=len(members),
                ))
        return sorted(found, key=lambda r: -r.peak)


def _pool_max_2x2(dev: np.ndarray) -> np.ndarray:
    padded = np.pad(dev, ((0, 0), (0, 1), (0, 1)), mode="edge")
    return np.maximum.reduce([padded[:, :-1, :-1], padded[:, 1:, :-1],
                              padded[:, :-1, 1:], padded[:, 1:, 1:]])


def _mismatch(recorded: Fingerprint, reason: str) -> DeviationMap:
    return DeviationMap("geometry_mismatch", recorded.shape_hw, recorded.cell, reason=reason)


def compare_display(recorded: Fingerprint, displays: Sequence[np.ndarray]) -> DeviationMap:
    """Compare frames already in display values 0..255 (an 8-bit export, a JPEG of the display)."""
    if len(displays) != recorded.n_frames:
        return _mismatch(recorded, f"{len(displays)} frames, the fingerprint has {recorded.n_frames}")
    for display in displays:
        if tuple(display.shape[:2]) != recorded.shape_hw or display.ndim != 2:
            return _mismatch(recorded, f"frame of {tuple(display.shape)}, the fingerprint was made on "
                                       f"{recorded.shape_hw[0]}x{recorded.shape_hw[1]}")
    recorded_values = recorded.values
    dev = np.empty(recorded_values.shape, dtype=np.float32)
    for i, display in enumerate(displays):
        now = _cell_means(np.asarray(display, dtype=np.float32), recorded.cell)
        dev[i] = np.abs(now - recorded_values[i])
    return DeviationMap("compared", recorded.shape_hw, recorded.cell, dev, _pool_max_2x2(dev))


def compare(recorded: Fingerprint, image: MedicalImage) -> DeviationMap:
    """Recompute on ``image`` with the recorded windows and geometry; deviation per cell."""
    if image.meta.is_colour != recorded.colour:
        return _mismatch(recorded, "colour and greyscale differ from the fingerprinted image")
    if image.n_frames != recorded.n_frames or image.shape_hw != recorded.shape_hw:
        return _mismatch(recorded, f"{image.n_frames} frame(s) of {image.shape_hw[0]}x"
                                   f"{image.shape_hw[1]}, the fingerprint has {recorded.n_frames} of "
                                   f"{recorded.shape_hw[0]}x{recorded.shape_hw[1]}")
    displays, _ = display_frames(image, recorded.windows)
    return compare_display(recorded, displays)
