"""The attacks of DESIGN.md (Measures), in numpy/PIL/OpenJPEG, applied to one watermarked frame.

Layer: evaluation. The extractor sees the result as is: nothing is resized, re-aligned or
re-windowed back. The same names are used by the differentiable torch attacks in ``train/``.

Interface: an attack is ``attack(frame, window, rng, *, value_range=None) -> AttackedFrame``.

- ``frame`` is ONE frame in stored units at native dtype, ``(H, W)`` grey or ``(H, W, 3)`` RGB;
- ``window`` is the frame's :class:`DisplayWindow` (what "visible" and "8-bit export" mean);
- ``rng`` is a seeded :class:`numpy.random.Generator`, the only source of randomness;
- ``value_range`` is the stored range ``(lo, hi)`` results are clipped to; ``None`` means the
  dtype's own range. :func:`attack_image` passes ``stored_range(meta, dtype)`` (BitsStored, sign).

The result's ``kind`` says what the pixels are:

- ``"stored"``: still native stored values, same dtype, rounded and clipped to ``value_range``
  (noise, blur, resize, crop, rotation, JPEG 2000 at native depth);
- ``"display8"``: an 8-bit display image as a hospital exports it, ``uint8`` 0..255 already
  windowed (MONOCHROME1 already inverted): window export, JPEG of the display, crop + JPEG.

Decisions (documented here because the numbers in every report depend on them):

- JPEG q90/75/50: window to 8 bits (round), then PIL JPEG at that quality (PIL's default 4:2:0
  chroma subsampling for RGB, as an exporter would use) -> display8.
- JPEG 2000 10:1 and 20:1: lossy (9/7) OpenJPEG at native depth. The ratio is DICOM's Lossy
  Image Compression Ratio (0028,2112): uncompressed size (BitsAllocated per sample) over
  compressed size, so 10:1 on 12-in-16-bit data is 1.6 bit/pixel. The codec is told the true
  precision (BitsStored, or more bits if the data exceed it) and its own ratio, which counts that
  precision, is scaled to match (12-in-16 at 10:1 is the codec's 7.5:1). Frames OpenJPEG refuses
  (float NPY data) fall back to JPEG 2000 of the 8-bit display -> display8, with a ``note`` saying
  so and a log line. Frames smaller than 64 px a side are edge-padded for the codec (its 6 DWT
  levels need the room) and cropped back.
- Gaussian noise sigma 1%/2% "of the image's stored value range": of the frame's actual
  max - min (not of 2**BitsStored, which for 12-bit CT with a narrow body range would inflate the
  noise several times); a constant frame uses range 1.
- Resize: PIL float ("F" mode, per channel) bilinear, which is antialiased when downscaling (the
  filter support grows with the scale, like torch's ``interpolate(antialias=True)``); the output
  is round(H*s) x round(W*s) and is not resized back.
- Crop keeping a fraction ``a`` of the area: a window of side sqrt(a) of each side, placed near
  the centre with a random offset of up to a quarter of the free margin on each axis.
- Rotation: bilinear about the centre, same canvas, corners filled with the frame's minimum.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from typing import Callable, Literal, Protocol

import numpy as np
from PIL import Image
from scipy import ndimage

from medsec_edge.runtime.errors import UsageError
from medsec_edge.runtime.io.image import DisplayWindow, ImageMeta, MedicalImage, display_window, stored_range

log = logging.getLogger(__name__)

AttackKind = Literal["stored", "display8"]


@dataclass(frozen=True)
class AttackedFrame:
    """One attacked frame: ``pixels`` as described by ``kind`` (see the module docstring)."""

    pixels: np.ndarray
    kind: AttackKind
    note: str = ""  # set when the attack had to deviate from its definition (e.g. a codec fallback)


class Attack(Protocol):
    def __call__(
        self,
        frame: np.ndarray,
        window: DisplayWindow,
        rng: np.random.Generator,
        *,
        value_range: tuple[float, float] | None = None,
    ) -> AttackedFrame: ...


# --- helpers ---------------------------------------------------------------------------------


def _is_colour(frame: np.ndarray) -> bool:
    return frame.ndim == 3 and frame.shape[2] in (3, 4)


def _check_frame(frame: np.ndarray) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.ndim == 2 or _is_colour(frame):
        return frame
    raise UsageError(
        f"an attack takes one frame, (H, W) grey or (H, W, 3) colour; got shape {frame.shape}: "
        "apply attacks frame by frame (attack_image does)"
    )


def _range_of(frame: np.ndarray, value_range: tuple[float, float] | None) -> tuple[float, float]:
    if value_range is not None:
        return float(value_range[0]), float(value_range[1])
    if frame.dtype.kind in "ui":
        info = np.iinfo(frame.dtype)
        return float(info.min), float(info.max)
    if frame.dtype.kind == "b":
        return 0.0, 1.0
    return -math.inf, math.inf


def _to_stored(values: np.ndarray, like: np.ndarray, value_range: tuple[float, float] | None) -> np.ndarray:
    """Float results back to the frame's stored dtype: rounded (integers) and clipped."""
    lo, hi = _range_of(like, value_range)
    values = np.asarray(values, dtype=np.float64)
    if like.dtype.kind in "uib":
        values = np.rint(values)
    values = np.clip(values, lo, hi)
    return values.astype(like.dtype)


def _to_display8(frame: np.ndarray, window: DisplayWindow) -> np.ndarray:
    """What a windowed 8-bit export writes: display values rounded to uint8."""
    return np.rint(window.to_display(frame)).astype(np.uint8)


def _jpeg_u8(display_u8: np.ndarray, quality: int) -> np.ndarray:
    mode = "RGB" if _is_colour(display_u8) else "L"
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(display_u8[..., :3] if mode == "RGB" else display_u8), mode).save(
        buf, format="JPEG", quality=int(quality)
    )
    buf.seek(0)
    with Image.open(buf) as decoded:
        return np.asarray(decoded.convert(mode), dtype=np.uint8).copy()


def _per_channel(frame_f: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    if frame_f.ndim == 2:
        return fn(frame_f)
    return np.stack([fn(frame_f[..., c]) for c in range(frame_f.shape[2])], axis=-1)


def _resize_f(plane: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    img = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32), mode="F")
    out = img.resize((size_hw[1], size_hw[0]), resample=Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.float32)


def _crop_box(shape_hw: tuple[int, int], area: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    h, w = shape_hw
    side = math.sqrt(area)
    ch, cw = max(1, round(h * side)), max(1, round(w * side))
    offsets = []
    for full, part in ((h, ch), (w, cw)):
        free = full - part
        jitter = free // 4
        offset = free // 2 + int(rng.integers(-jitter, jitter + 1))
        offsets.append(min(max(offset, 0), free))
    return offsets[0], offsets[1], ch, cw


# --- the attacks -----------------------------------------------------------------------------


def no_attack(frame, window, rng, *, value_range=None) -> AttackedFrame:
    return AttackedFrame(_check_frame(frame).copy(), "stored")


def jpeg(frame, window, rng, *, quality: int, value_range=None) -> AttackedFrame:
    """Window to 8 bits, then JPEG at ``quality`` -> display8."""
    frame = _check_frame(frame)
    return AttackedFrame(_jpeg_u8(_to_display8(frame, window), quality), "display8")


def export8(frame, window, rng, *, value_range=None) -> AttackedFrame:
    """16-to-8-bit windowed export, no compression -> display8."""
    return AttackedFrame(_to_display8(_check_frame(frame), window), "display8")


_J2K_MIN_SIDE = 64


def _j2k_roundtrip(data: np.ndarray, ratio: float, bits: int, colour: bool) -> np.ndarray:
    import openjpeg

    encode = getattr(openjpeg, "encode_array", None) or openjpeg.encode
    h, w = data.shape[:2]
    pad_h, pad_w = max(0, _J2K_MIN_SIDE - h), max(0, _J2K_MIN_SIDE - w)
    if pad_h or pad_w:
        pad = ((0, pad_h), (0, pad_w)) + (((0, 0),) if data.ndim == 3 else ())
        data = np.pad(data, pad, mode="edge")
    stream = encode(
        np.ascontiguousarray(data),
        bits_stored=bits,
        photometric_interpretation=1 if colour else 2,
        compression_ratios=[float(ratio)],
    )
    decoded = openjpeg.decode(stream)
    return np.asarray(decoded)[:h, :w]


def _precision(frame: np.ndarray, value_range: tuple[float, float] | None) -> int:
    """Bits the codec must carry: those of the stored range, widened if the data exceed it."""
    lo, hi = _range_of(frame, value_range)
    lo, hi = min(lo, float(frame.min())), max(hi, float(frame.max()))
    if lo < 0:
        bits = max(math.ceil(math.log2(hi + 1)) if hi > 0 else 0, math.ceil(math.log2(-lo))) + 1
    else:
        bits = math.ceil(math.log2(hi + 1)) if hi > 0 else 1
    return int(min(max(bits, 1), frame.dtype.itemsize * 8))


def j2k(frame, window, rng, *, ratio: float, value_range=None) -> AttackedFrame:
    """Lossy JPEG 2000 at native depth; ``ratio`` counts the stored container (BitsAllocated)."""
    frame = _check_frame(frame)
    colour = _is_colour(frame)
    data = frame[..., :3] if colour else frame
    if frame.dtype.kind in "ui" and frame.dtype.itemsize <= 2:
        try:
            precision = _precision(frame, value_range)
            codec_ratio = max(1.0, ratio * precision / (frame.dtype.itemsize * 8))
            decoded = _j2k_roundtrip(data, codec_ratio, precision, colour)
            return AttackedFrame(_to_stored(decoded, frame, value_range), "stored")
        except (RuntimeError, ValueError) as exc:
            reason = f"OpenJPEG refused {frame.dtype} data ({exc})"
    else:
        reason = f"OpenJPEG cannot code {frame.dtype} stored values"
    note = f"{reason}: JPEG 2000 {ratio:g}:1 applied to the 8-bit display instead"
    log.info(note)
    decoded = _j2k_roundtrip(_to_display8(frame, window), ratio, 8, colour)
    return AttackedFrame(decoded.astype(np.uint8), "display8", note)


def gaussian_noise(frame, window, rng, *, fraction: float, value_range=None) -> AttackedFrame:
    """Add N(0, sigma) with sigma = ``fraction`` of the frame's max - min."""
    frame = _check_frame(frame)
    span = float(frame.max()) - float(frame.min())
    sigma = fraction * (span if span > 0 else 1.0)
    noisy = frame.astype(np.float64) + rng.normal(0.0, sigma, size=frame.shape)
    return AttackedFrame(_to_stored(noisy, frame, value_range), "stored")


def gaussian_blur(frame, window, rng, *, sigma: float, value_range=None) -> AttackedFrame:
    frame = _check_frame(frame)
    sigmas = (sigma, sigma, 0.0) if frame.ndim == 3 else sigma
    blurred = ndimage.gaussian_filter(frame.astype(np.float64), sigmas, mode="reflect")
    return AttackedFrame(_to_stored(blurred, frame, value_range), "stored")


def resize(frame, window, rng, *, scale: float, value_range=None) -> AttackedFrame:
    """Antialiased bilinear resize to round(H*scale) x round(W*scale); not resized back."""
    frame = _check_frame(frame)
    h, w = frame.shape[:2]
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    out = _per_channel(frame.astype(np.float32), lambda p: _resize_f(p, size))
    return AttackedFrame(_to_stored(out, frame, value_range), "stored")


def crop(frame, window, rng, *, area: float, value_range=None) -> AttackedFrame:
    """Keep a near-centre window of ``area`` of the frame's area; not resized back."""
    frame = _check_frame(frame)
    y, x, ch, cw = _crop_box(frame.shape[:2], area, rng)
    return AttackedFrame(frame[y : y + ch, x : x + cw].copy(), "stored")


def rotate(frame, window, rng, *, degrees: float, value_range=None) -> AttackedFrame:
    """Bilinear rotation about the centre, same canvas, corners filled with the frame's minimum."""
    frame = _check_frame(frame)
    fill = float(frame.min())
    turned = ndimage.rotate(
        frame.astype(np.float64), degrees, axes=(1, 0), reshape=False, order=1, mode="constant", cval=fill
    )
    return AttackedFrame(_to_stored(turned, frame, value_range), "stored")


def crop_jpeg(frame, window, rng, *, area: float, quality: int, value_range=None) -> AttackedFrame:
    """Crop (as :func:`crop`) then windowed JPEG export -> display8."""
    cropped = crop(frame, window, rng, area=area, value_range=value_range).pixels
    return jpeg(cropped, window, rng, quality=quality, value_range=value_range)


def _bind(fn: Callable[..., AttackedFrame], **params) -> Attack:
    def attack(frame, window, rng, *, value_range=None) -> AttackedFrame:
        return fn(frame, window, rng, value_range=value_range, **params)

    attack.__name__ = fn.__name__
    attack.__doc__ = f"{fn.__name__}({', '.join(f'{k}={v!r}' for k, v in params.items())})"
    return attack


ATTACKS: dict[str, Attack] = {
    "none": no_attack,
    "jpeg90": _bind(jpeg, quality=90),
    "jpeg75": _bind(jpeg, quality=75),
    "jpeg50": _bind(jpeg, quality=50),
    "j2k10": _bind(j2k, ratio=10),
    "j2k20": _bind(j2k, ratio=20),
    "noise1": _bind(gaussian_noise, fraction=0.01),
    "noise2": _bind(gaussian_noise, fraction=0.02),
    "blur1": _bind(gaussian_blur, sigma=1.0),
    "resize0.75": _bind(resize, scale=0.75),
    "resize0.5": _bind(resize, scale=0.5),
    "crop50": _bind(crop, area=0.5),
    "crop25": _bind(crop, area=0.25),
    "rot2": _bind(rotate, degrees=2.0),
    "rot5": _bind(rotate, degrees=5.0),
    "export8": export8,
    "crop70_jpeg75": _bind(crop_jpeg, area=0.7, quality=75),
}

# Strength series for the robustness-vs-strength plot; strengths are in each attack's own unit:
# JPEG quality, noise sigma as a fraction of the frame's range, resize scale, kept crop area
# fraction, rotation degrees. Ordered from mild to strong.
ATTACK_SERIES: dict[str, list[float]] = {
    "jpeg": [95, 90, 80, 70, 60, 50, 40, 30, 20],
    "noise": [0.005, 0.01, 0.02, 0.03, 0.05, 0.08],
    "resize": [0.9, 0.75, 0.6, 0.5, 0.4, 0.3],
    "crop": [0.9, 0.7, 0.5, 0.35, 0.25, 0.15],
    "rotation": [1.0, 2.0, 5.0, 10.0, 15.0, 30.0],
}

_SERIES_FN: dict[str, Callable[[float], Attack]] = {
    "jpeg": lambda s: _bind(jpeg, quality=int(round(s))),
    "noise": lambda s: _bind(gaussian_noise, fraction=float(s)),
    "resize": lambda s: _bind(resize, scale=float(s)),
    "crop": lambda s: _bind(crop, area=float(s)),
    "rotation": lambda s: _bind(rotate, degrees=float(s)),
}


def get_attack(name: str) -> Attack:
    try:
        return ATTACKS[name]
    except KeyError:
        raise UsageError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}") from None


def apply_series(
    name: str,
    strength: float,
    frame: np.ndarray,
    window: DisplayWindow,
    rng: np.random.Generator,
    *,
    value_range: tuple[float, float] | None = None,
) -> AttackedFrame:
    """One point of a strength series (any strength, not only those in ``ATTACK_SERIES``)."""
    if name not in _SERIES_FN:
        raise UsageError(f"unknown attack series {name!r}; known: {', '.join(_SERIES_FN)}")
    return _SERIES_FN[name](strength)(frame, window, rng, value_range=value_range)


# --- whole images ----------------------------------------------------------------------------


def attacked_image(frames: list[AttackedFrame], original: ImageMeta) -> MedicalImage:
    """The attacked frames as the image the extractor is given.

    display8 -> uint8, BitsStored 8, unsigned, no window, PNG source; grey becomes MONOCHROME2
    (the display is already inverted for MONOCHROME1), colour stays RGB. stored -> the original
    metadata, window kept.
    """
    if not frames:
        raise UsageError("attacked_image needs at least one frame")
    kinds = {f.kind for f in frames}
    if len(kinds) != 1:
        raise UsageError(f"frames of one image must share one kind, got {sorted(kinds)}")
    pixels = frames[0].pixels if len(frames) == 1 else np.stack([f.pixels for f in frames])
    if frames[0].kind == "stored":
        return MedicalImage(pixels, original)
    meta = ImageMeta(
        bits_stored=8,
        signed=False,
        photometric="RGB" if original.is_colour else "MONOCHROME2",
        window=None,
        modality=original.modality,
        image_id=original.image_id,
        source_format="png",
    )
    return MedicalImage(pixels, meta)


def attack_image(image: MedicalImage, name: str, rng: np.random.Generator) -> MedicalImage:
    """Apply registry attack ``name`` to every frame (each with its own display window)."""
    attack = get_attack(name)
    results = []
    for frame in image.frames():
        window = display_window(image.meta, frame)
        rng_range = stored_range(image.meta, frame.dtype)
        value_range = None if math.isinf(rng_range[0]) else rng_range
        results.append(attack(frame, window, rng, value_range=value_range))
    return attacked_image(results, image.meta)


__all__ = [
    "ATTACKS",
    "ATTACK_SERIES",
    "Attack",
    "AttackedFrame",
    "apply_series",
    "attack_image",
    "attacked_image",
    "get_attack",
]
