"""Classical blind watermarks we compare against, wrapped behind one small interface.

Layer: evaluation. Each baseline is a plugin resolved when used (CONVENTIONS.md): its package is
imported inside the methods, ``is_available()`` says whether it can run here, and a missing one
raises :class:`BackendUnavailableError` naming the extra (``pip install 'medsec-edge[baselines]'``).

All baselines work on 8-bit display images (they cannot take native-depth pixels: that is part of
what the comparison shows) and carry a 64-bit payload. Grey displays ``(H, W)`` are given to them
as 3 equal BGR channels and their output is turned back to grey; RGB displays ``(H, W, 3)`` are
passed as BGR and returned as RGB.

Measured choices (4 display images at 512x512 x 3 payloads, clean round trip through grey):

- invisible-watermark embeds in the U chroma channel by default (``scales=[0, 36, 0]``). For a grey
  image that mark cannot survive any return to grey: a grey image re-expanded to 3 channels has
  U = 128 everywhere (bit accuracy 0.42, i.e. all bits read as 0, whether the grey is the channel
  mean, the luma or the B channel alone). We therefore embed in the luma channel Y
  (``scales=[s, 0, 0]``); the three channels then change equally, so the channel mean is exactly
  the embedded luma and is the grey we keep. ``dwtDctSvd`` keeps its default strength 36 (bit
  accuracy 1.00 on all 12 cases). ``dwtDct`` picks the largest-magnitude coefficient of each block,
  which is unstable on luma: at strength 36 it read 0.66 on the CT image; strength 18 was the best
  tried (min 0.94; 27: 0.88, 45: 0.84, 54: 0.83), so that is its default here.
  invisible-watermark writes its float result into a uint8 array without clipping, so pixels
  near 0 or 255 can wrap around; this is the library's behaviour and stays in its PSNR.
- blind-watermark embeds in Y, U and V and reads all three. The grey we keep is the BT.601 luma of
  its output, which is exactly its Y channel (before rounding); the channel mean mixes its chroma
  marks back in as noise (same bit accuracy, 1.00, but PSNR 38.6 dB against 42.3 dB for luma). Its ``bit`` mode reads with a 1-D k-means threshold, so a
  constant payload (all 0 or all 1) is not recoverable by construction.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import multiprocessing
import warnings
from typing import ClassVar

import numpy as np

from medsec_edge.runtime.errors import BackendUnavailableError, UsageError

PAYLOAD_BITS = 64
_EXTRA = "pip install 'medsec-edge[baselines]'"


def _check_display(display_u8: np.ndarray) -> np.ndarray:
    display_u8 = np.asarray(display_u8)
    if display_u8.dtype != np.uint8:
        raise UsageError(
            f"baselines take 8-bit display images, got {display_u8.dtype}: "
            "window the frame to uint8 first (attacks.export8 does)"
        )
    if not (display_u8.ndim == 2 or (display_u8.ndim == 3 and display_u8.shape[2] == 3)):
        raise UsageError(f"baselines take (H, W) grey or (H, W, 3) RGB, got shape {display_u8.shape}")
    return display_u8


def _check_bits(bits: np.ndarray) -> list[int]:
    bits = np.asarray(bits).reshape(-1)
    if bits.size != PAYLOAD_BITS:
        raise UsageError(f"baselines carry {PAYLOAD_BITS} payload bits, got {bits.size}")
    return [int(b) for b in bits.astype(bool)]


def _to_bgr(display_u8: np.ndarray) -> np.ndarray:
    if display_u8.ndim == 2:
        return np.repeat(display_u8[..., None], 3, axis=2)
    return np.ascontiguousarray(display_u8[..., ::-1])


def _luma_bgr(bgr: np.ndarray) -> np.ndarray:
    bgr = bgr.astype(np.float64)
    return 0.114 * bgr[..., 0] + 0.587 * bgr[..., 1] + 0.299 * bgr[..., 2]


def _to_u8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


class Baseline:
    """A classical watermark on 8-bit displays: ``embed`` 64 bits, ``extract`` 64 bits."""

    name: ClassVar[str] = ""
    module: ClassVar[str] = ""

    @classmethod
    def is_available(cls) -> bool:
        return importlib.util.find_spec(cls.module) is not None

    def _require(self) -> None:
        if not self.is_available():
            raise BackendUnavailableError(
                f"baseline {self.name!r} needs the Python package {self.module!r}, which is not "
                f"installed: {_EXTRA}"
            )

    def embed(self, display_u8: np.ndarray, bits: np.ndarray) -> np.ndarray:
        """The watermarked display, uint8, same shape as ``display_u8``."""
        self._require()
        display_u8 = _check_display(display_u8)
        return self._embed(display_u8, _check_bits(bits))

    def extract(self, display_u8: np.ndarray) -> np.ndarray:
        """The 64 read bits (bool), whether or not a mark is present."""
        self._require()
        display_u8 = _check_display(display_u8)
        return np.asarray(self._extract(display_u8), dtype=bool).reshape(PAYLOAD_BITS)

    def _embed(self, display_u8: np.ndarray, bits: list[int]) -> np.ndarray:
        raise NotImplementedError

    def _extract(self, display_u8: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class InvisibleWatermark(Baseline):
    """invisible-watermark (``imwatermark``) ``dwtDct`` / ``dwtDctSvd``, embedded in luma."""

    module = "imwatermark"
    MIN_PIXELS = 256 * 256  # the library refuses smaller images

    def __init__(self, method: str, strength: float) -> None:
        self.method = method
        self.strength = float(strength)

    @property
    def _configs(self) -> dict:
        return {"scales": [self.strength, 0, 0]}

    def _check_size(self, display_u8: np.ndarray) -> None:
        h, w = display_u8.shape[:2]
        if h * w < self.MIN_PIXELS:
            raise UsageError(f"{self.name} needs at least 256x256 pixels, got {h}x{w}")

    def _embed(self, display_u8, bits):
        from imwatermark import WatermarkEncoder

        self._check_size(display_u8)
        encoder = WatermarkEncoder()
        encoder.set_watermark("bits", bits)
        out = encoder.encode(_to_bgr(display_u8), self.method, **self._configs)
        if display_u8.ndim == 2:
            return _to_u8(out.astype(np.float64).mean(axis=2))
        return np.ascontiguousarray(out[..., ::-1]).astype(np.uint8)

    def _extract(self, display_u8):
        from imwatermark import WatermarkDecoder

        self._check_size(display_u8)
        decoder = WatermarkDecoder("bits", PAYLOAD_BITS)
        return decoder.decode(_to_bgr(display_u8), self.method, **self._configs)


class DwtDct(InvisibleWatermark):
    name = "dwtDct"

    def __init__(self, strength: float = 18) -> None:
        super().__init__("dwtDct", strength)


class DwtDctSvd(InvisibleWatermark):
    name = "dwtDctSvd"

    def __init__(self, strength: float = 36) -> None:
        super().__init__("dwtDctSvd", strength)


@contextlib.contextmanager
def _contained_blind_watermark_import():
    """Import blind_watermark without its process-wide side effects.

    Its ``pool`` module calls ``multiprocessing.set_start_method('fork')`` at import: that fails
    (and the import with it) when a start method is already set, and otherwise silently changes
    it for the whole process. Clear it for the import and restore what was there.
    """
    before = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method(None, force=True)
    try:
        yield
    finally:
        multiprocessing.set_start_method(before, force=True)


def _blind_watermark():
    import sys

    if "blind_watermark" not in sys.modules:
        with _contained_blind_watermark_import(), contextlib.redirect_stdout(io.StringIO()):
            import blind_watermark  # noqa: F401
    import blind_watermark

    blind_watermark.bw_notes.close()  # it prints a banner on first use otherwise
    return blind_watermark


class BlindWatermark(Baseline):
    """blind-watermark (``blind_watermark.WaterMark``), ``bit`` mode, in-memory arrays only."""

    name = "blind_watermark"
    module = "blind_watermark"

    def __init__(self, password_wm: int = 1, password_img: int = 1) -> None:
        self.password_wm = password_wm
        self.password_img = password_img

    def _watermark(self):
        bw = _blind_watermark()
        with contextlib.redirect_stdout(io.StringIO()):
            return bw.WaterMark(password_wm=self.password_wm, password_img=self.password_img)

    @staticmethod
    def _check_size(display_u8: np.ndarray) -> None:
        # One bit per 4x4 block of the half-resolution DWT band; the library wants more blocks
        # than payload bits and fails with an assertion otherwise.
        h, w = display_u8.shape[:2]
        blocks = ((h + 1) // 2 // 4) * ((w + 1) // 2 // 4)
        if blocks <= PAYLOAD_BITS:
            raise UsageError(f"blind_watermark needs more than {PAYLOAD_BITS} 8x8 blocks, {h}x{w} has {blocks}")

    def _embed(self, display_u8, bits):
        self._check_size(display_u8)
        wm = self._watermark()
        with contextlib.redirect_stdout(io.StringIO()):
            wm.read_img(img=_to_bgr(display_u8).astype(np.float32))
            wm.read_wm(np.array(bits, dtype=bool), mode="bit")
            out = wm.embed()  # float BGR, already clipped to 0..255; no filename: nothing written
        if display_u8.ndim == 2:
            return _to_u8(_luma_bgr(out))
        return _to_u8(out[..., ::-1])

    def _extract(self, display_u8):
        self._check_size(display_u8)
        wm = self._watermark()
        # Its 1-D k-means averages an empty cluster when all blocks read alike (a flat or unmarked
        # image); the bits are then all False, which is a fair reading, so the warning is noise.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            return wm.extract(embed_img=_to_bgr(display_u8).astype(np.float32), wm_shape=PAYLOAD_BITS, mode="bit")


BASELINES: dict[str, type[Baseline]] = {cls.name: cls for cls in (DwtDct, DwtDctSvd, BlindWatermark)}


def available_baselines() -> list[Baseline]:
    """An instance (default settings) of every baseline whose package is installed."""
    return [cls() for cls in BASELINES.values() if cls.is_available()]
