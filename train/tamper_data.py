"""Training samples for the blind tamper detector: genuine, benign-processed and manipulated crops.

Layer: train (numpy; torch only in the Dataset wrapper). Genuine frames are real acquisitions by
default: :func:`medsec_edge.train.real_data.real_frames` (CT, MR, DX, US, XA, ... from offline
packages, split by patient/volume so validation never shares a patient with training), with a
small share of synthetic phantoms (8-16 bit, signed or not, random window and grain) for the
bit depths and sign conventions the real sources lack. Where that module or its packages are
absent (CI), pydicom's own training-safe test files stand in. pydicom-data is never read, nor any
file of ``shared/notes/heldout-overlap.txt`` (they share studies with it).
Manipulations and benign steps come from :mod:`evaluation.manipulations` and
:mod:`evaluation.benign`, the definitions the evaluation uses. Each sample is a pure function of
``(seed, index)``, so training can stop and resume and see the same stream.
"""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medsec_edge.evaluation.benign import benign
from medsec_edge.evaluation.manipulations import MANIPULATIONS, manipulate
from medsec_edge.runtime.errors import UsageError
from medsec_edge.runtime.io.image import ImageMeta, display_window, stored_range
from medsec_edge.runtime.tamper.detector_input import normalise
from medsec_edge.train.data import phantom

log = logging.getLogger(__name__)

HELD_OUT_FAMILY = "splice"  # never trained on: the evaluation reports it separately
TRAIN_FAMILIES = tuple(k for k in MANIPULATIONS if k != HELD_OUT_FAMILY)
# pydicom's own test files that share no study with pydicom-data (heldout-overlap.txt), by split:
# the fallback when the real-data packages are absent. (examples_rgb_color.dcm, used before, is
# on the overlap list and is no longer read.)
FALLBACK_FILES = {"train": ("CT_small.dcm", "MR_small.dcm"), "val": ("image_dfl.dcm",)}
SPLITS = ("train", "val")
SOURCE_SIDE = 256  # manipulated and processed at this size, then cut to the training crop
META8 = ImageMeta(bits_stored=8, signed=False, source_format="jpeg")


@dataclass(frozen=True)
class Source:
    frame: np.ndarray  # stored units, native dtype
    meta: ImageMeta
    group: str = ""  # patient / volume id (real frames)


def synthetic_source(rng: np.random.Generator, side: int = SOURCE_SIDE) -> Source:
    """A phantom as stored integers with a scanner-like grain, bit depth, sign and window."""
    display = phantom(rng, side).astype(np.float64)
    bits = int(rng.choice([8, 10, 12, 12, 16]))
    signed = bool(rng.random() < 0.3) and bits > 8
    span = float(2**bits - 1) * rng.uniform(0.3, 1.0)
    lo, _ = stored_range(ImageMeta(bits, signed), np.int32)
    base = lo + rng.uniform(0.0, (2**bits - 1) - span)
    values = base + display * span
    grain = rng.standard_normal(values.shape)
    if rng.random() < 0.5:  # CT/MR noise is correlated; radiograph and 8-bit noise closer to white
        grain = ndimage.gaussian_filter(grain, rng.uniform(0.5, 1.5))
        grain /= grain.std() + 1e-12
    values += grain * span * rng.uniform(0.0, 0.02)
    dtype = np.uint8 if bits == 8 else (np.int16 if signed else np.uint16)
    hi_ = lo + 2**bits - 1
    frame = np.clip(np.rint(values), lo, hi_).astype(dtype)
    window = None
    if rng.random() < 0.6:
        center = base + span * rng.uniform(0.3, 0.7)
        width = span * rng.uniform(0.2, 1.0)
        window = (float(center), float(max(width, 2.0)))
    return Source(frame, ImageMeta(bits_stored=bits, signed=signed, window=window))


def _fallback_real(split: str) -> list[Source]:
    """pydicom's own training-safe test files (never those sharing a study with pydicom-data)."""
    from pydicom.data import get_testdata_file

    from medsec_edge.runtime.io.readers import read_image

    names = FALLBACK_FILES["train"] + FALLBACK_FILES["val"] if split == "all" else FALLBACK_FILES[split]
    out = []
    for name in names:
        path = get_testdata_file(name, download=False)
        if path is None:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = read_image(path)
        for frame in image.frames()[:4]:
            out.append(Source(np.ascontiguousarray(frame), image.meta, name))
    return out


@functools.lru_cache(maxsize=4)
def load_real(split: str, max_side: int = 1024) -> tuple[list[Source], str]:
    """Real frames of ``split`` and where they came from (``real_data`` or ``pydicom-fallback``).

    Cached per process (generators of one split share the list; nothing mutates it)."""
    if split not in (*SPLITS, "all"):
        raise UsageError(f"split must be train, val or all, got {split!r}")
    try:
        from medsec_edge.train.real_data import real_frames

        frames = real_frames(split, max_side=max_side)
    except ImportError as exc:
        log.warning("real training frames unavailable (%s): pydicom's test files stand in", exc)
        frames = []
    out = []
    for rf in frames:
        image = rf.image
        frame = image.frames()[0]
        grey = frame[..., :3].astype(np.float32) @ np.float32([0.299, 0.587, 0.114]) if image.meta.is_colour else frame
        if float(grey.max()) - float(grey.min()) < 1.0:  # blank (between cine loops, a dark tile): no content
            continue
        out.append(Source(np.ascontiguousarray(frame), image.meta, str(rf.group)))
    if out:
        return out, "real_data"
    return _fallback_real(split), "pydicom-fallback"


class TamperSamples:
    """``sample(index) -> (x, mask, label, info)``: x float32 (crop, crop) normalised display values,
    mask float32 (crop, crop) in {0, 1}, label 1.0 if any manipulated pixel is in the crop.

    ``split`` picks the real frames (``train`` for training, ``val`` for checkpoint choice and
    calibration: other patients); ``p_real`` is the share of real frames (the rest synthetic).
    Real frames are drawn patient/volume first, then a frame of it, so a long series does not
    outweigh a single radiograph; a window of ``side`` px of the frame is the source (whole
    smaller frames are kept as they are).
    """

    def __init__(self, seed: int, crop: int = 128, *, families: tuple[str, ...] = TRAIN_FAMILIES,
                 p_tampered: float = 0.5, p_benign: float = 0.6, p_real: float = 0.9, side: int = SOURCE_SIDE,
                 p_watermark: float = 0.0, benign_ramp: int = 0, split: str = "train", max_side: int = 1024):
        if crop > side // 2:
            raise UsageError(f"crop {crop} must be at most {side // 2} (resize 0.5x of the source)")
        if split not in SPLITS:
            raise UsageError(f"split must be one of {SPLITS}, got {split!r}")
        self.seed, self.crop, self.families, self.side = int(seed), int(crop), tuple(families), int(side)
        self.p_tampered, self.p_benign, self.p_real = p_tampered, p_benign, p_real
        self.p_watermark, self.benign_ramp = p_watermark, int(benign_ramp)
        self.split, self.max_side = split, int(max_side)
        self._real: list[Source] | None = None
        self._groups: list[list[int]] = []
        self.real_origin = ""
        self._watermarker = None

    @property
    def real(self) -> list[Source]:
        if self._real is None:
            self._real, self.real_origin = load_real(self.split, self.max_side)
            by_group: dict[str, list[int]] = {}
            for i, src in enumerate(self._real):
                by_group.setdefault(src.group, []).append(i)
            self._groups = [by_group[g] for g in sorted(by_group)]
        return self._real

    def _real_source(self, rng: np.random.Generator) -> Source:
        real = self.real
        members = self._groups[int(rng.integers(len(self._groups)))]
        src = real[members[int(rng.integers(len(members)))]]
        frame = src.frame
        h, w = frame.shape[:2]
        sh, sw = min(self.side, h), min(self.side, w)
        for _ in range(8):  # an ultrasound screen or the air around a CT: skip windows with nothing in them
            y = int(rng.integers(0, h - sh + 1))
            x = int(rng.integers(0, w - sw + 1))
            window = frame[y : y + sh, x : x + sw]
            if int(window.max()) - int(window.min()) >= 1:
                break
        return Source(np.ascontiguousarray(window), src.meta, src.group)

    def _source(self, rng: np.random.Generator) -> Source:
        if rng.random() < self.p_real and self.real:
            return self._real_source(rng)
        return synthetic_source(rng, self.side)

    def _donor(self, rng: np.random.Generator) -> np.ndarray:
        """Another frame to splice from: real when real frames are in use, else synthetic."""
        if self.p_real > 0 and self.real:
            d = self._real_source(rng).frame
            if d.ndim == 3:
                d = d[..., :3].astype(np.float64) @ np.float64([0.299, 0.587, 0.114])
            if min(d.shape) >= 64:
                return d.astype(np.float64)
        return synthetic_source(rng).frame.astype(np.float64)

    @property
    def watermarker(self):
        """The default bundle's watermarker, opened on first use (in the DataLoader worker)."""
        if self._watermarker is None:
            from medsec_edge.runtime.pipeline import load_watermarker

            self._watermarker = load_watermarker(threads=1)[0]
        return self._watermarker

    def make(self, index: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, ImageMeta, np.ndarray, dict]:
        """One full source-sized frame in stored units (or display8), its meta, its mask and info.

        With ``p_watermark`` the genuine frame first gets our watermark (random payload): the
        detector must call our own outputs genuine, and manipulations of them tampered.
        ``benign_ramp``: the benign share grows from a fifth to ``p_benign`` over that many
        indices (an easier start; plain laundering-free edits are learnt first).
        """
        rng = np.random.default_rng([self.seed, int(index)]) if rng is None else rng
        src = self._source(rng)
        frame, meta = src.frame, src.meta
        if meta.is_colour:
            frame = np.rint(frame[..., :3].astype(np.float32) @ np.float32([0.299, 0.587, 0.114]))
            frame = frame.astype(np.uint8)
            meta = META8
        value_range = stored_range(meta, frame.dtype)
        mask = np.zeros(frame.shape, bool)
        info: dict = {"kind": "genuine", "benign": None, "watermarked": False}
        if self.p_watermark and rng.random() < self.p_watermark:
            from medsec_edge.runtime.errors import InputError
            from medsec_edge.runtime.io.image import MedicalImage

            try:
                payload = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
                frame = self.watermarker.embed(MedicalImage(frame, meta), payload).pixels
                info["watermarked"] = True
            except InputError:
                pass  # nothing visible to carry a mark: stays unmarked
        if rng.random() < self.p_tampered:
            kind = self.families[int(rng.integers(len(self.families)))]
            donor = self._donor(rng) if kind == "splice" else None
            neighbour = None
            if kind == "copy_move" and rng.random() < 0.3:  # an "adjacent slice": shifted, fresh grain
                shifted = ndimage.shift(frame.astype(np.float64), rng.uniform(-3, 3, 2), order=1, mode="nearest")
                neighbour = shifted + rng.standard_normal(frame.shape) * max(1.0, float(np.std(frame)) * 0.01)
            try:
                m = manipulate(frame, kind, rng, value_range=value_range, donor=donor, neighbour=neighbour)
                frame, mask = m.pixels, m.mask
                info["kind"] = kind
            except UsageError:
                pass  # a flat source with no site: stays genuine
        p_benign = self.p_benign
        if self.benign_ramp:
            p_benign *= min(1.0, 0.2 + 0.8 * index / self.benign_ramp)
        if rng.random() < p_benign:
            window = display_window(meta, frame)
            b = benign(frame, window, rng, value_range=value_range, mask=mask)
            frame, mask = b.pixels, b.mask
            info["benign"] = b.name
            if b.kind == "display8":
                meta = META8
        return frame, meta, mask, info

    def sample(self, index: int, crop: int | None = None) -> tuple[np.ndarray, np.ndarray, float, dict]:
        """One training sample; ``crop`` overrides the crop side (validation cuts whole sources)."""
        rng = np.random.default_rng([self.seed, int(index)])
        frame, meta, mask, info = self.make(index, rng)
        x = normalise(frame, meta)
        x, mask = self._cut(x, mask, rng, self.crop if crop is None else int(crop))
        label = float(mask.any())
        if not label:
            info["kind"] = "genuine" if info["kind"] == "genuine" else info["kind"] + "(cut away)"
        return x, mask.astype(np.float32), label, info

    def _cut(self, x: np.ndarray, mask: np.ndarray, rng: np.random.Generator, c: int):
        h, w = x.shape
        if h < c or w < c:
            ph, pw = max(0, c - h), max(0, c - w)
            x = np.pad(x, ((0, ph), (0, pw)), mode="reflect")
            mask = np.pad(mask, ((0, ph), (0, pw)))
            h, w = x.shape
        if mask.any():  # keep the manipulated region in the crop, anywhere in it
            ys, xs = np.nonzero(mask)
            cy, cx = int(ys.mean()), int(xs.mean())
            y0 = int(np.clip(cy - rng.integers(c // 4, 3 * c // 4), 0, h - c))
            x0 = int(np.clip(cx - rng.integers(c // 4, 3 * c // 4), 0, w - c))
        else:
            # a few tries for a crop with content: real frames (an ultrasound screen, the air
            # around a CT) have flat areas that teach nothing and make a constant input
            for _ in range(8):
                y0, x0 = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
                if x[y0 : y0 + c, x0 : x0 + c].std() > 0:
                    break
        return x[y0 : y0 + c, x0 : x0 + c], mask[y0 : y0 + c, x0 : x0 + c]
