"""Embed and extract the CNN watermark on a MedicalImage at its native bit depth.

Layer: runtime (numpy; models run through a backend session). The residual is shaped in the
display window (where visibility is defined), then mapped back to stored units, rounded and
clipped to BitsStored; the extractor reads display values, so it also reads what hospitals
export (8-bit PNG/JPEG of the display, MONOCHROME1 shown inverted).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from medsec_edge.runtime.errors import InputError
from medsec_edge.runtime.io.image import DisplayWindow, MedicalImage, display_window, luminance, stored_range
from medsec_edge.runtime.watermark.payload import Decoded, PayloadCodec
from medsec_edge.runtime.watermark.spec import TILE, working_factor
from medsec_edge.runtime.watermark.sync import (
    NOMINAL,
    Lattice,
    box_downsample,
    estimate_lattices,
    fold,
    read_bits,
    readout_spectrum,
    upsample_bilinear,
)

MAX_FRAMES_READ = 16  # frames pooled by the extractor (evenly spaced through the series)
# Tile periods the lattice search considers, in working pixels: from a 0.4x downscale to a
# crop of a quarter of the image read at the factor of the smaller size (2x), with margin.
MIN_PERIOD, MAX_PERIOD = TILE / 2.6, TILE * 2.6
MAX_LATTICES = 6  # lattice candidates decoded per working resolution (each try is a few ms)


class WatermarkModels(Protocol):
    """The three networks and the readout, however they are run."""

    readout_gain: float

    def strength(self, work: np.ndarray) -> np.ndarray: ...

    def signal(self, work: np.ndarray) -> np.ndarray: ...

    def tile(self, bits_pm1: np.ndarray) -> np.ndarray: ...

    @property
    def readout(self) -> np.ndarray: ...


@dataclass(frozen=True)
class EmbedResult:
    pixels: np.ndarray
    code_bits: np.ndarray
    target_psnr_db: float
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class WatermarkReading:
    """How a found watermark was read, kept for the tamper check's local map (wm_consistency).

    ``signals`` are the decoder maps of the frames ``frame_indices`` at working factor
    ``factor``, read along ``lattice``; ``code_bits`` the decoded code word (128 bits, 0/1).
    """

    lattice: Lattice
    factor: int
    frame_indices: tuple[int, ...]
    signals: tuple[np.ndarray, ...]
    code_bits: np.ndarray


@dataclass(frozen=True)
class Extraction:
    """The extractor's verdict: ``found`` False is a result, not an error."""

    found: bool
    payload: str | None
    confidence: float
    bits_corrected: int
    logits: np.ndarray = field(repr=False)
    period_px: float = float(TILE)
    angle_deg: float = 0.0
    timings_ms: dict[str, float] = field(default_factory=dict)
    reading: "WatermarkReading | None" = field(default=None, repr=False)  # set when found
    # "identity" (the identity MAC) or "user" (set with --payload); None when not found.
    payload_kind: str | None = None
    # The strongest readout response (energy at the best shift over the mean of all shifts) of the
    # nominal read and the first search level's candidates: about 1.4 with no mark; None when the
    # nominal read succeeded or no search ran. Below the bundle's presence threshold the search
    # stops there.
    presence: float | None = None

    def raw_bit_accuracy(self, code_bits: np.ndarray) -> float:
        return float(np.mean((self.logits > 0) == (np.asarray(code_bits) > 0)))


def _frame_work(image: MedicalImage, frame: np.ndarray, factor: int) -> tuple[np.ndarray, DisplayWindow]:
    """Working-resolution display image (0..1) of one frame, and the frame's display window.

    The frame is box-averaged in stored units first and windowed after: one cheap pass over the
    native pixels instead of several (the window is linear but for its clipping, which then acts
    on block means; embedder and extractor do the same, so they agree).
    """
    window = display_window(image.meta, frame)
    grey = luminance(frame) if image.meta.is_colour else frame
    small = box_downsample(grey, factor)
    return window.to_display(small) * np.float32(1 / 255), window


class Watermarker:
    def __init__(self, models: WatermarkModels, codec: PayloadCodec | None = None,
                 target_psnr_db: float = 42.5, presence_threshold: float | None = None):
        """``presence_threshold``: below it the lattice search stops ("no mark here"); None takes
        the models' own (a bundle's calibrated ``calibration.watermark``; a bundle without one
        always searches), 0 always searches."""
        self.models = models
        self.presence_threshold = (getattr(models, "presence_threshold", None) if presence_threshold is None
                                   else float(presence_threshold))
        self.codec = codec or PayloadCodec()
        self.target_psnr_db = float(target_psnr_db)
        self._readout_fft = readout_spectrum(models.readout)

    # -- embedding -------------------------------------------------------------------------
    def embed(self, image: MedicalImage, payload: bytes, *, kind: str = "identity",
              target_psnr_db: float | None = None) -> EmbedResult:
        """Embed ``payload``; ``kind`` says what it is (``"identity"``: the identity MAC, ``"user"``:
        set with ``--payload``), so that a reader never takes a user payload for an identity.
        ``target_psnr_db`` overrides the watermarker's target for this image (a stronger retry)."""
        target = self.target_psnr_db if target_psnr_db is None else float(target_psnr_db)
        t0 = time.perf_counter()
        code_bits = self.codec.encode(payload, kind)
        tile = np.asarray(self.models.tile(code_bits.astype(np.float32) * 2 - 1), dtype=np.float32)
        timings = {"encode_ms": (time.perf_counter() - t0) * 1e3}
        out = np.empty_like(image.pixels)
        frames_out = out if out.ndim == (3 if image.meta.is_colour else 2) else None
        lo, hi = stored_range(image.meta, image.pixels.dtype)
        model_ms = 0.0
        for i, frame in enumerate(image.frames()):
            t1 = time.perf_counter()
            h, w = frame.shape[:2]
            factor = working_factor(h, w)
            work, window = _frame_work(image, frame, factor)
            t2 = time.perf_counter()
            strength = np.asarray(self.models.strength(work), dtype=np.float32)
            model_ms += (time.perf_counter() - t2) * 1e3
            reps = (-(-strength.shape[0] // TILE), -(-strength.shape[1] // TILE))
            small = strength * np.tile(tile, reps)[: strength.shape[0], : strength.shape[1]]
            # Bilinear upsampling of (strength x tile) places the tile's samples at the centres of
            # the blocks the extractor averages, so its box-downsampled view is the working tile.
            residual = upsample_bilinear(small, factor, h, w)
            flat = residual.ravel()
            rms = float(np.sqrt(np.dot(flat, flat) / flat.size))
            if rms <= 1e-9:
                raise InputError(f"{_name(image)}: frame {i} has no unsaturated display pixels to carry a watermark")
            # display residual -> stored units (the gain's sign undoes MONOCHROME1's inversion)
            scale = 255.0 * 10 ** (-target / 20) / rms / window.gain
            np.multiply(residual, np.float32(scale), out=residual)
            work_dtype = np.float64 if frame.dtype.itemsize >= 4 else np.float32
            marked = frame.astype(work_dtype)
            marked += residual[..., None] if image.meta.is_colour else residual
            np.rint(marked, out=marked)
            np.clip(marked, lo, hi, out=marked)
            if frames_out is not None:
                out[...] = marked
            else:
                out[i] = marked
            timings["frames_ms"] = timings.get("frames_ms", 0.0) + (time.perf_counter() - t1) * 1e3
        timings["model_ms"] = model_ms
        timings["total_ms"] = (time.perf_counter() - t0) * 1e3
        return EmbedResult(out, code_bits, target, timings)

    # -- extraction ------------------------------------------------------------------------
    def _signals(self, image: MedicalImage, frames: list[np.ndarray], factor: int) -> list[np.ndarray]:
        return [np.asarray(self.models.signal(_frame_work(image, f, factor)[0]), dtype=np.float32)
                for f in frames]

    def _decode(self, signals: list[np.ndarray], lattice: Lattice) -> tuple[Decoded, np.ndarray, float]:
        folded = np.mean([fold(s, lattice) for s in signals], axis=0)
        logits, energy = read_bits(folded, self._readout_fft, self.models.readout_gain)
        return self.codec.decode(logits), logits, energy

    def extract(self, image: MedicalImage, *, search: bool = True) -> Extraction:
        """Read the watermark; ``search=False`` reads only at the nominal geometry (no lattice
        search for a rotated or rescaled image: a few ms instead of up to hundreds)."""
        t0 = time.perf_counter()
        frames = image.frames()
        picks = list(range(len(frames)))
        if len(frames) > MAX_FRAMES_READ:
            picks = np.linspace(0, len(frames) - 1, MAX_FRAMES_READ).round().astype(int).tolist()
            frames = [frames[i] for i in picks]
        h, w = frames[0].shape[:2]
        factor = working_factor(h, w)
        signals = self._signals(image, frames, factor)
        timings = {"model_ms": (time.perf_counter() - t0) * 1e3}
        # Fast path: an image that kept its geometry reads on the nominal lattice.
        decoded, logits, best_energy = self._decode(signals, NOMINAL)
        lattice, lattice_factor, lattice_signals = NOMINAL, factor, signals
        presence = None
        if not decoded.found and search:
            t1 = time.perf_counter()
            tried = {factor}
            queue: list[tuple[int, list[np.ndarray] | None]] = [(factor, signals)]
            while queue and not decoded.found:
                level, level_signals = queue.pop(0)
                if level_signals is None:
                    level_signals = self._signals(image, frames, level)
                lattices = estimate_lattices(level_signals[0], MIN_PERIOD, MAX_PERIOD, MAX_LATTICES)
                # Autocorrelation peaks also come from structure inside the tile or the image;
                # the check value decides which lattice is the tile's (each try is a few ms).
                for candidate in lattices:
                    result = self._decode(level_signals, candidate)
                    if result[0].found or result[2] > best_energy:
                        decoded, logits, best_energy = result
                        lattice, lattice_factor, lattice_signals = candidate, level, level_signals
                    if decoded.found:
                        break
                    # A downscaled image shows the tile smaller than it was made; the decoder
                    # reads it better at a finer working resolution, so queue that level once.
                    # (never below 0.4x the level: spurious short periods would otherwise send a
                    # 2k radiograph through the network at full resolution, seconds for nothing)
                    finer = max(1, int(level * candidate.period / TILE), math.ceil(0.4 * level))
                    if candidate.period < 0.8 * TILE and finer not in tried and len(tried) < 3:
                        tried.add(finer)
                        queue.append((finer, None))
                if presence is None:
                    # The strongest readout response so far (nominal read and this level's
                    # candidates): about 1.4 where no mark is. Below the bundle's threshold no
                    # finer level and no list decoding follow: "no mark here".
                    presence = best_energy
                    if self.presence_threshold is not None and presence < self.presence_threshold:
                        break
            timings["search_ms"] = (time.perf_counter() - t1) * 1e3
        present = presence is not None and (self.presence_threshold is None or presence >= self.presence_threshold)
        if not decoded.found and present:
            # Something responds like a mark but did not decode: the best read's weakest bits
            # may be its only wrong ones, so list-decode it once (tens of ms; unmarked images
            # almost never get here, and a nominal-only read, search=False, never lists).
            t2 = time.perf_counter()
            listed = self.codec.decode_list(logits)
            if listed.found:
                decoded = listed
            timings["list_ms"] = (time.perf_counter() - t2) * 1e3
        timings["total_ms"] = (time.perf_counter() - t0) * 1e3
        reading = None
        if decoded.found:
            reading = WatermarkReading(lattice, lattice_factor, tuple(picks), tuple(lattice_signals),
                                       self.codec.encode(decoded.data, decoded.kind))
        return Extraction(
            reading=reading,
            found=decoded.found,
            payload=decoded.payload_hex,
            confidence=decoded.confidence,
            bits_corrected=decoded.bits_corrected,
            payload_kind=decoded.kind,
            logits=logits,
            period_px=lattice.period * lattice_factor,
            angle_deg=lattice.angle_deg,
            timings_ms=timings,
            presence=presence,
        )


def _name(image: MedicalImage) -> str:
    return image.path.name if image.path is not None else f"image {image.meta.image_id}"
