"""The crypto evaluation: the seed's CNN cipher (a research transform) beside AES-256-GCM, measured
on the same held-out images (``medsec-edge eval crypto``).

Layer: evaluation. The statistics (NPCR/UACI with their critical values, entropy, chi-square,
adjacent-pixel correlation) are plain numpy/scipy and import no torch. ``run_crypto_eval`` is the
one evaluation that needs torch (the transform under test is a torch model, and the attacker is
trained during the run): it imports :mod:`medsec_edge.train.cnn_cipher` inside the function, so
importing this module, like the rest of the evaluation package, stays torch-free.
AES-256-GCM is the shipped code path, ``runtime.encryption.encrypt_bytes`` / ``decrypt_bytes``
(random 96-bit nonce per message, associated data binding the image's UIDs), measured on the
8-bit display bytes (what the CNN cipher sees) and on the native stored bytes (what the product
encrypts). Outputs: ``crypto_eval.json`` (everything, per image), ``crypto_eval.md`` (one table)
and ``crypto_eval.png`` (panels + attack curve).

Decisions the numbers depend on:

- Images: every input through ``collect_inputs`` and the pydicom-data de-duplication of
  :func:`.watermark_eval.deduplicate`; the FIRST frame; colour as its BT.601 luma. Display values
  are the DESIGN.md window (``display_window``) rounded to 8 bits. Each frame is centre-cropped
  to at most ``max_side`` pixels a side (default 512) so the run fits ~10 minutes on 2 cores; the
  native bytes are cropped the same way.
- Keys: one "victim" key per run for the CNN cipher (256 bits) and one AES data key, both drawn
  from ``seed``; wrong keys and flipped bits drawn per image from ``[seed, crc32(name)]``. AES
  nonces are random by design, so AES statistics vary slightly between runs; CNN numbers do not.
- NPCR/UACI (Wu, Noonan & Agaian 2011): between two 8-bit cipher images of the centre crop of at
  most ``npcr_side`` (256) pixels a side, for (a) the same image encrypted twice, (b) a one-pixel
  change of the plaintext (+1 grey level, 255 -> 254), ``trials`` times in total, cycling over the
  images, each trial a random pixel, and (c) one key bit flipped. The critical values are computed
  for the crop's pixel count by the paper's formulas (they give the published 256x256 values,
  stated below, exactly). AES-GCM's "cipher image" is its ciphertext without nonce and tag,
  which has the plaintext's length.
- Known-plaintext attack: a ``SurrogateDecoder`` (train/cnn_cipher) trained on N (plaintext,
  cipher image) pairs of the victim key, the plaintexts synthetic 128x128 phantoms (never the
  held-out images), ``surrogate_steps`` Adam steps; scored by the PSNR of its decode of the
  held-out cipher images. Control: the same attacker trained on pairs of ANOTHER key. For AES-GCM
  the attack has nothing to learn (a fresh nonce per message); its row reports the ciphertext-only
  baseline, the PSNR of the best constant guess (each image's own mean: an upper bound for any
  guess that ignores the ciphertext).
- Tamper: one byte of the ciphertext (CNN: one cipher pixel, its top bit flipped) at a random
  position. AES-GCM must refuse (``DecryptionError`` from ``InvalidTag``); the CNN cipher has no
  integrity check and decodes whatever it is given.
- Time: median of ``timing_repeats`` wall-clock calls (``time.perf_counter``) after one untimed
  call per image, the CNN on torch's CPU threads of this process; the host's load average is
  recorded beside them.

The PNG shows image content (plaintext and decodes). With the public pydicom-data images that is
harmless; with private images pass ``panels=False`` (``--no-panels``).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import platform
import statistics
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from medsec_edge.runtime.errors import DecryptionError, UsageError
from medsec_edge.runtime.io.image import MedicalImage, display_window, luminance

from .held_out import read_held_out
from .measures import psnr_window, ssim_window

log = logging.getLogger(__name__)

JSON_NAME, MARKDOWN_NAME, PLOT_NAME = "crypto_eval.json", "crypto_eval.md", "crypto_eval.png"
CNN = "cnn_cipher"
AES8 = "aes_gcm_display8"
AES_NATIVE = "aes_gcm_native"
LABELS = {
    CNN: "CNN cipher (research transform)",
    AES8: "AES-256-GCM, 8-bit display bytes",
    AES_NATIVE: "AES-256-GCM, native stored bytes",
}

# Wu, Y., Noonan, J. P., & Agaian, S. (2011). NPCR and UACI randomness tests for image
# encryption. Cyber Journals: Multidisciplinary Journals in Science and Technology, Journal of
# Selected Areas in Telecommunications (JSAT), April 2011, 31-38. Critical values for 8-bit
# 256x256 cipher images at alpha = 0.05: NPCR must be >= NPCR*, UACI inside (UACI*-, UACI*+).
NPCR_CRITICAL_256_ALPHA05_PCT = 99.5693
UACI_CRITICAL_256_ALPHA05_PCT = (33.2824, 33.6447)
ALPHA = 0.05
GREY_LEVELS = 256
SEED_CLAIM = {"psnr_db": 30.2, "seconds_per_image": 1.5,
              "source": "the seed's claim (issue 4): CNN encoder-decoder 'encryption'"}

_BINDING_UIDS = ("1.2.826.0.1.3680043.10.1", "1.2.826.0.1.3680043.10.2")  # fixed, not patient data


# --- statistics (numpy/scipy only) ---------------------------------------------------------------


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise UsageError(f"cannot compare cipher images of shape {a.shape} and {b.shape}")
    return a, b


def npcr_pct(a: np.ndarray, b: np.ndarray) -> float:
    """Number of pixels change rate: share of positions where the two cipher images differ, in %."""
    a, b = _pair(a, b)
    return float(np.mean(a != b) * 100.0)


def uaci_pct(a: np.ndarray, b: np.ndarray, levels: int = GREY_LEVELS) -> float:
    """Unified averaged changed intensity: mean |a - b| / (levels - 1), in %."""
    a, b = _pair(a, b)
    return float(np.mean(np.abs(a.astype(np.int64) - b.astype(np.int64))) / (levels - 1) * 100.0)


def npcr_critical_pct(n_pixels: int, alpha: float = ALPHA, levels: int = GREY_LEVELS) -> float:
    """NPCR* (Wu et al. 2011, eq. for the one-sided test): NPCR below it rejects "random-like"."""
    from scipy.stats import norm

    f = levels - 1
    mu = f / (f + 1)
    sigma = math.sqrt(f / ((f + 1) ** 2 * n_pixels))
    return float((mu - norm.ppf(1 - alpha) * sigma) * 100.0)


def uaci_critical_pct(n_pixels: int, alpha: float = ALPHA, levels: int = GREY_LEVELS) -> tuple[float, float]:
    """(UACI*-, UACI*+) (Wu et al. 2011, two-sided): UACI outside rejects "random-like"."""
    from scipy.stats import norm

    f = levels - 1
    mu = (f + 2) / (3 * f + 3)
    var = (f + 2) * (f * f + 2 * f + 3) / (18 * (f + 1) ** 2 * n_pixels * f)
    z = norm.ppf(1 - alpha / 2)
    return float((mu - z * math.sqrt(var)) * 100.0), float((mu + z * math.sqrt(var)) * 100.0)


def _byte_counts(data: bytes | np.ndarray) -> np.ndarray:
    arr = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray)) else np.asarray(data)
    if arr.dtype != np.uint8:
        raise UsageError(f"byte statistics take uint8 values, got {arr.dtype}")
    return np.bincount(arr.ravel(), minlength=256)


def entropy_bits_per_byte(data: bytes | np.ndarray) -> float:
    """Shannon entropy of the byte histogram in bits per byte (8 = every value equally often)."""
    counts = _byte_counts(data)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def chi_square_uniformity(data: bytes | np.ndarray) -> tuple[float, float]:
    """(chi-square, p-value) of the 256-bin histogram against uniform (255 degrees of freedom)."""
    from scipy.stats import chi2

    counts = _byte_counts(data).astype(np.float64)
    expected = counts.sum() / 256.0
    stat = float(((counts - expected) ** 2 / expected).sum())
    return stat, float(chi2.sf(stat, 255))


def adjacent_correlation(image: np.ndarray) -> dict[str, float]:
    """Pearson correlation of all horizontally, vertically and diagonally adjacent pixel pairs
    (NaN where one side is constant)."""
    img = np.asarray(image, np.float64)
    pairs = {
        "horizontal": (img[:, :-1], img[:, 1:]),
        "vertical": (img[:-1, :], img[1:, :]),
        "diagonal": (img[:-1, :-1], img[1:, 1:]),
    }
    out = {}
    for name, (a, b) in pairs.items():
        a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
        denom = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
        out[name] = float((a * b).sum() / denom) if denom > 0 else float("nan")
    return out


def constant_guess_psnr(display_u8: np.ndarray) -> float:
    """PSNR (peak 255) of guessing every pixel as the image's own mean: the best constant guess."""
    var = float(np.var(np.asarray(display_u8, np.float64)))
    return math.inf if var == 0 else 10 * math.log10(255.0**2 / var)


# --- images ---------------------------------------------------------------------------------------


def _centre_crop(arr: np.ndarray, side: int) -> np.ndarray:
    h, w = arr.shape[:2]
    y0, x0 = max(0, (h - side) // 2), max(0, (w - side) // 2)
    return np.ascontiguousarray(arr[y0 : y0 + min(h, side), x0 : x0 + min(w, side)])


def held_out_frame(image: MedicalImage, max_side: int) -> tuple[np.ndarray, np.ndarray]:
    """(8-bit display (H, W), native stored frame) of the first frame, centre-cropped alike."""
    frame = image.frames()[0]
    display = display_window(image.meta, frame).to_display(frame)
    if image.meta.is_colour:
        display = luminance(display)
    display_u8 = np.clip(np.rint(display), 0, 255).astype(np.uint8)
    return _centre_crop(display_u8, max_side), _centre_crop(frame, max_side)


def load_held_out(images: Sequence[Path], *, max_side: int, dedup: bool = True, min_side: int = 16):
    images_read, skipped, dropped = read_held_out(images, dedup=dedup)
    loaded = []
    for path, image in images_read:
        display_u8, native = held_out_frame(image, max_side)
        if min(display_u8.shape) < min_side:
            skipped.append({"name": path.name, "reason": f"{display_u8.shape} is below {min_side} px"})
            continue
        loaded.append({"name": path.name, "image_id": image.meta.image_id, "display": display_u8,
                       "native": native, "source_shape": list(image.frames()[0].shape),
                       "native_dtype": str(native.dtype)})
    return loaded, skipped, dropped


# --- AES-256-GCM through the runtime -------------------------------------------------------------


class _Aes:
    """The runtime's AES-256-GCM blobs, and the ciphertext part of them as a cipher image."""

    def __init__(self, rng: np.random.Generator):
        from medsec_edge.runtime.crypto.encryption import DataKey

        self.key = DataKey(rng.bytes(16), rng.bytes(32))

    def binding(self, image_id: str):
        from medsec_edge.runtime.crypto.encryption import Binding

        return Binding(_BINDING_UIDS[0], _BINDING_UIDS[1], image_id or "unknown")

    def encrypt(self, plaintext: bytes, binding, key=None) -> bytes:
        from medsec_edge.runtime.crypto.encryption import encrypt_bytes

        return encrypt_bytes(key or self.key, plaintext, binding)

    def decrypt(self, blob: bytes, binding, key=None) -> bytes | None:
        """The plaintext, or None where AES-GCM refuses (wrong key, changed data)."""
        from medsec_edge.runtime.crypto.encryption import decrypt_bytes

        try:
            return decrypt_bytes(key or self.key, blob, binding)
        except DecryptionError:
            return None

    @staticmethod
    def ciphertext(blob: bytes, n: int) -> np.ndarray:
        """The n ciphertext bytes (without header, nonce and 16-byte tag)."""
        return np.frombuffer(blob[len(blob) - 16 - n : len(blob) - 16], np.uint8)

    def other_key(self, secret: bytes):
        from medsec_edge.runtime.crypto.encryption import DataKey

        return DataKey(self.key.key_id, secret)  # same id: the refusal is the tag's, not the id check


def _flip_bit(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 0x80 >> (bit % 8)
    return bytes(out)


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    result = fn()  # untimed: first-use allocations
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return result, float(statistics.median(times))


def _rng(seed: int, name: str, *parts: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode()), *parts])


def _quality(ref: np.ndarray, test: np.ndarray) -> dict[str, float]:
    a, b = ref.astype(np.float64), test.astype(np.float64)
    return {"psnr_db": psnr_window(a, b), "ssim": ssim_window(a, b)}


def _stats(cipher_u8: np.ndarray) -> dict[str, Any]:
    chi, p = chi_square_uniformity(cipher_u8)
    return {"entropy_bits": entropy_bits_per_byte(cipher_u8), "chi_square": chi, "chi_square_p": p,
            "correlation": adjacent_correlation(cipher_u8)}


# --- per image -------------------------------------------------------------------------------------


def _cnn_image(model, item: dict, key: np.ndarray, rng: np.random.Generator, repeats: int,
               npcr_side: int) -> tuple[dict, dict]:
    from medsec_edge.train.cnn_cipher import KEY_BITS, decrypt_u8, encrypt_u8, random_key_bits

    x = item["display"]
    cipher, enc_ms = _timed(lambda: encrypt_u8(model, x, key), repeats)
    decoded, dec_ms = _timed(lambda: decrypt_u8(model, cipher, key), repeats)
    wrong_key = random_key_bits(rng)
    bit = int(rng.integers(KEY_BITS))
    flipped = key.copy()
    flipped[bit] ^= 1
    wrong = decrypt_u8(model, cipher, wrong_key)
    flip_decode = decrypt_u8(model, cipher, flipped)
    r, c = int(rng.integers(x.shape[0])), int(rng.integers(x.shape[1]))
    tampered = cipher.copy()
    tampered[r, c] ^= 0x80
    tamper_decode = decrypt_u8(model, tampered, key)
    small = _centre_crop(x, npcr_side)
    small_cipher = encrypt_u8(model, small, key)
    small_flipped = encrypt_u8(model, small, flipped)
    row = {
        "right_key": _quality(x, decoded),
        "wrong_key": {**_quality(x, wrong), "refused": False},
        "key_bit_flip": {"bit": bit, **_quality(x, flip_decode), "refused": False,
                         "cipher_npcr_pct": npcr_pct(small_cipher, small_flipped),
                         "cipher_uaci_pct": uaci_pct(small_cipher, small_flipped)},
        "cipher": _stats(cipher),
        "same_image_twice_npcr_pct": npcr_pct(small_cipher, encrypt_u8(model, small, key)),
        "tamper": {"refused": False, "decoded_pixels_changed": int(np.count_nonzero(tamper_decode != decoded)),
                   "psnr_vs_untampered_decode_db": psnr_window(decoded.astype(np.float64),
                                                               tamper_decode.astype(np.float64)),
                   "psnr_vs_plaintext_db": psnr_window(x.astype(np.float64), tamper_decode.astype(np.float64))},
        "time_ms": {"encrypt": enc_ms, "decrypt": dec_ms},
    }
    arrays = {"cipher": cipher, "decoded": decoded, "wrong": wrong}
    return row, arrays


def _aes_display_image(aes: _Aes, item: dict, rng: np.random.Generator, repeats: int,
                       npcr_side: int) -> tuple[dict, np.ndarray]:
    x = item["display"]
    binding = aes.binding(item["image_id"])
    plain = x.tobytes()
    blob, enc_ms = _timed(lambda: aes.encrypt(plain, binding), repeats)
    back, dec_ms = _timed(lambda: aes.decrypt(blob, binding), repeats)
    exact = back == plain
    decoded = np.frombuffer(back, np.uint8).reshape(x.shape) if exact else x * 0
    cipher = aes.ciphertext(blob, len(plain)).reshape(x.shape)
    bit = int(rng.integers(256))
    flipped_key = aes.other_key(_flip_bit(aes.key.secret, bit))
    small = _centre_crop(x, npcr_side)
    small_blob = aes.encrypt(small.tobytes(), binding)
    small_cipher = aes.ciphertext(small_blob, small.size)
    flip_cipher = aes.ciphertext(aes.encrypt(small.tobytes(), binding, flipped_key), small.size)
    twice = aes.ciphertext(aes.encrypt(small.tobytes(), binding), small.size)
    pos = len(blob) - 16 - len(plain) + int(rng.integers(len(plain)))
    tampered = bytearray(blob)
    tampered[pos] ^= 0x80
    row = {
        "right_key": {**_quality(x, decoded), "bit_exact": exact},
        "wrong_key": {"refused": aes.decrypt(blob, binding, aes.other_key(rng.bytes(32))) is None},
        "key_bit_flip": {"bit": bit, "refused": aes.decrypt(blob, binding, flipped_key) is None,
                         "cipher_npcr_pct": npcr_pct(small_cipher, flip_cipher),
                         "cipher_uaci_pct": uaci_pct(small_cipher, flip_cipher)},
        "cipher": _stats(cipher),
        "same_image_twice_npcr_pct": npcr_pct(small_cipher, twice),
        "tamper": {"refused": aes.decrypt(bytes(tampered), binding) is None},
        "time_ms": {"encrypt": enc_ms, "decrypt": dec_ms},
    }
    return row, cipher


def _aes_native_image(aes: _Aes, item: dict, rng: np.random.Generator, repeats: int) -> dict:
    native = item["native"]
    le = native.dtype.newbyteorder("<") if native.dtype.byteorder == ">" else native.dtype
    plain = np.ascontiguousarray(native, dtype=le).tobytes()
    binding = aes.binding(item["image_id"])
    blob, enc_ms = _timed(lambda: aes.encrypt(plain, binding), repeats)
    back, dec_ms = _timed(lambda: aes.decrypt(blob, binding), repeats)
    cipher = aes.ciphertext(blob, len(plain))
    twice = aes.ciphertext(aes.encrypt(plain, binding), len(plain))
    pos = len(blob) - 16 - len(plain) + int(rng.integers(len(plain)))
    tampered = bytearray(blob)
    tampered[pos] ^= 0x80
    chi, p = chi_square_uniformity(cipher)
    return {
        "bytes": len(plain), "dtype": str(native.dtype),
        "right_key": {"bit_exact": back == plain},
        "wrong_key": {"refused": aes.decrypt(blob, binding, aes.other_key(rng.bytes(32))) is None},
        "cipher": {"entropy_bits": entropy_bits_per_byte(cipher), "chi_square": chi, "chi_square_p": p},
        "same_image_twice_npcr_pct": npcr_pct(cipher, twice),
        "tamper": {"refused": aes.decrypt(bytes(tampered), binding) is None},
        "time_ms": {"encrypt": enc_ms, "decrypt": dec_ms},
    }


def _one_pixel_trials(model, aes: _Aes, loaded: list[dict], key: np.ndarray, *, trials: int, seed: int,
                      npcr_side: int) -> list[dict]:
    """NPCR/UACI of a one-pixel plaintext change, ``trials`` in total cycling over the images."""
    from medsec_edge.train.cnn_cipher import encrypt_u8

    rows = []
    cnn_base: dict[int, np.ndarray] = {}
    for t in range(trials):
        i = t % len(loaded)
        item = loaded[i]
        x = _centre_crop(item["display"], npcr_side)
        rng = _rng(seed, item["name"], 3, t)
        r, c = int(rng.integers(x.shape[0])), int(rng.integers(x.shape[1]))
        x2 = x.copy()
        x2[r, c] = x[r, c] + 1 if x[r, c] < 255 else 254
        if i not in cnn_base:
            cnn_base[i] = encrypt_u8(model, x, key)
        cnn2 = encrypt_u8(model, x2, key)
        binding = aes.binding(item["image_id"])
        aes1 = aes.ciphertext(aes.encrypt(x.tobytes(), binding), x.size)
        aes2 = aes.ciphertext(aes.encrypt(x2.tobytes(), binding), x.size)
        n_crit = npcr_critical_pct(x.size)
        u_lo, u_hi = uaci_critical_pct(x.size)
        row = {"trial": t, "image": item["name"], "pixels": int(x.size), "npcr_critical_pct": n_crit,
               "uaci_critical_pct": [u_lo, u_hi]}
        for method, (a, b) in ((CNN, (cnn_base[i], cnn2)), (AES8, (aes1, aes2))):
            npcr, uaci = npcr_pct(a, b), uaci_pct(a, b)
            row[method] = {"npcr_pct": npcr, "uaci_pct": uaci, "npcr_pass": npcr >= n_crit,
                           "uaci_pass": u_lo <= uaci <= u_hi}
        rows.append(row)
    return rows


def _plaintext_attack(model, loaded: list[dict], key: np.ndarray, *, pairs: Sequence[int], seed: int,
                      steps: int, progress_cb: Callable[[], None]) -> tuple[dict, dict]:
    from medsec_edge.train.cnn_cipher import (encrypt_u8, random_key_bits, surrogate_decode_u8,
                                               train_surrogate)
    from medsec_edge.train.data import phantom

    tile = int(model.config["tile"])
    rng = np.random.default_rng([seed, 0xA77A])
    n_max = max(pairs)
    plain = np.stack([np.rint(phantom(rng, 128) * 255).astype(np.uint8) for _ in range(n_max)])
    cipher = np.concatenate([encrypt_u8(model, plain[i : i + 50], key) for i in range(0, n_max, 50)])
    held_cipher = [encrypt_u8(model, item["display"], key) for item in loaded]
    curve, decodes = [], {}
    for n in pairs:
        surrogate = train_surrogate(plain[:n], cipher[:n], tile=tile, steps=steps, seed=seed + n)
        rows = []
        for item, c in zip(loaded, held_cipher):
            guess = surrogate_decode_u8(surrogate, c)
            rows.append({"image": item["name"], **_quality(item["display"], guess)})
            if n == n_max:
                decodes[item["name"]] = guess
        curve.append({"pairs": n, "psnr_db": _mean([r["psnr_db"] for r in rows]),
                      "ssim": _mean([r["ssim"] for r in rows]), "rows": rows})
        log.info("surrogate on %d pairs: %.1f dB", n, curve[-1]["psnr_db"])
        progress_cb()
    # Control: the same attacker, as many pairs, but of another key.
    other = random_key_bits(np.random.default_rng([seed, 0xC0A7]))
    n_control = n_max
    other_cipher = np.concatenate([encrypt_u8(model, plain[i : i + 50], other) for i in range(0, n_control, 50)])
    surrogate = train_surrogate(plain[:n_control], other_cipher, tile=tile, steps=steps, seed=seed + 7)
    control_rows = [{"image": item["name"], **_quality(item["display"], surrogate_decode_u8(surrogate, c))}
                    for item, c in zip(loaded, held_cipher)]
    progress_cb()
    result = {
        "surrogate_steps": steps, "pair_images": "synthetic phantoms 128x128 (train.data.phantom)",
        "curve": curve,
        "control_other_key": {"pairs": n_control, "psnr_db": _mean([r["psnr_db"] for r in control_rows]),
                              "ssim": _mean([r["ssim"] for r in control_rows]), "rows": control_rows},
        "ciphertext_only_constant_guess_psnr_db": _mean([constant_guess_psnr(i["display"]) for i in loaded]),
    }
    return result, decodes


# --- aggregation and reports ----------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return float("nan")
    return float(np.mean(vals))


def _min(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(min(vals)) if vals else float("nan")


def _share(flags: Sequence[bool]) -> dict[str, int]:
    return {"yes": int(sum(bool(f) for f in flags)), "of": len(flags)}


def aggregate(rows: list[dict], trials: list[dict], attack: dict) -> dict:
    """Per-method summary of the per-image rows, the one-pixel trials and the attack."""
    summary: dict[str, Any] = {}
    for method in (CNN, AES8):
        r = [row[method] for row in rows]
        corr = {d: _mean([abs(x["cipher"]["correlation"][d]) for x in r]) for d in ("horizontal", "vertical", "diagonal")}
        s = {
            "right_key_psnr_db": _mean([x["right_key"]["psnr_db"] for x in r]) if method == CNN else math.inf,
            "right_key_psnr_db_worst": _min([x["right_key"]["psnr_db"] for x in r]) if method == CNN else math.inf,
            "right_key_ssim": _mean([x["right_key"]["ssim"] for x in r]),
            "right_key_ssim_worst": _min([x["right_key"]["ssim"] for x in r]),
            "wrong_key_refused": _share([x["wrong_key"]["refused"] for x in r]),
            "key_bit_flip_refused": _share([x["key_bit_flip"]["refused"] for x in r]),
            "key_bit_flip_cipher_npcr_pct": _mean([x["key_bit_flip"]["cipher_npcr_pct"] for x in r]),
            "key_bit_flip_cipher_uaci_pct": _mean([x["key_bit_flip"]["cipher_uaci_pct"] for x in r]),
            "entropy_bits": _mean([x["cipher"]["entropy_bits"] for x in r]),
            "chi_square": _mean([x["cipher"]["chi_square"] for x in r]),
            "chi_square_p_median": float(np.median([x["cipher"]["chi_square_p"] for x in r])),
            "chi_square_pass": _share([x["cipher"]["chi_square_p"] > ALPHA for x in r]),
            "abs_correlation": corr,
            "same_image_twice_npcr_pct": _mean([x["same_image_twice_npcr_pct"] for x in r]),
            "tamper_refused": _share([x["tamper"]["refused"] for x in r]),
            "encrypt_ms_median": float(np.median([x["time_ms"]["encrypt"] for x in r])),
            "decrypt_ms_median": float(np.median([x["time_ms"]["decrypt"] for x in r])),
            "one_pixel_npcr_pct": _mean([t[method]["npcr_pct"] for t in trials]),
            "one_pixel_uaci_pct": _mean([t[method]["uaci_pct"] for t in trials]),
            "one_pixel_npcr_pass": _share([t[method]["npcr_pass"] for t in trials]),
            "one_pixel_uaci_pass": _share([t[method]["uaci_pass"] for t in trials]),
        }
        if method == CNN:
            s["wrong_key_psnr_db"] = _mean([x["wrong_key"]["psnr_db"] for x in r])
            s["wrong_key_ssim"] = _mean([x["wrong_key"]["ssim"] for x in r])
            s["key_bit_flip_psnr_db"] = _mean([x["key_bit_flip"]["psnr_db"] for x in r])
            s["tamper_pixels_changed_mean"] = _mean([x["tamper"]["decoded_pixels_changed"] for x in r])
            s["tamper_decode_changed"] = _share([x["tamper"]["decoded_pixels_changed"] > 0 for x in r])
            s["tamper_psnr_vs_untampered_db_median"] = float(np.median(
                [x["tamper"]["psnr_vs_untampered_decode_db"] for x in r]))
            s["plaintext_attack_psnr_db"] = {str(c["pairs"]): c["psnr_db"] for c in attack["curve"]}
            s["plaintext_attack_control_psnr_db"] = attack["control_other_key"]["psnr_db"]
        else:
            s["right_key_bit_exact"] = _share([x["right_key"]["bit_exact"] for x in r])
        summary[method] = s
    native = [row[AES_NATIVE] for row in rows]
    summary[AES_NATIVE] = {
        "right_key_bit_exact": _share([x["right_key"]["bit_exact"] for x in native]),
        "wrong_key_refused": _share([x["wrong_key"]["refused"] for x in native]),
        "entropy_bits": _mean([x["cipher"]["entropy_bits"] for x in native]),
        "chi_square": _mean([x["cipher"]["chi_square"] for x in native]),
        "chi_square_p_median": float(np.median([x["cipher"]["chi_square_p"] for x in native])),
        "chi_square_pass": _share([x["cipher"]["chi_square_p"] > ALPHA for x in native]),
        "same_image_twice_npcr_pct": _mean([x["same_image_twice_npcr_pct"] for x in native]),
        "tamper_refused": _share([x["tamper"]["refused"] for x in native]),
        "encrypt_ms_median": float(np.median([x["time_ms"]["encrypt"] for x in native])),
        "decrypt_ms_median": float(np.median([x["time_ms"]["decrypt"] for x in native])),
    }
    summary["plaintext_correlation"] = {
        d: _mean([abs(row["plaintext"]["correlation"][d]) for row in rows]) for d in ("horizontal", "vertical", "diagonal")}
    summary["ciphertext_only_constant_guess_psnr_db"] = attack["ciphertext_only_constant_guess_psnr_db"]
    return summary


def _f(v: Any, digits: int = 1, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float) and math.isinf(v):
        return "inf (bit-exact)" if v > 0 else "-inf"
    return f"{v:.{digits}f}{unit}"


def _frac(share: dict) -> str:
    return f"{share['yes']}/{share['of']}"


def render_markdown(summary: dict, meta: dict) -> str:
    c, a, n = summary[CNN], summary[AES8], summary[AES_NATIVE]
    pairs = meta["pairs"]
    crit_n, (crit_lo, crit_hi) = meta["npcr_critical_pct"], meta["uaci_critical_pct"]
    corr = lambda s: " / ".join(_f(s["abs_correlation"][d], 3) for d in ("horizontal", "vertical", "diagonal"))  # noqa: E731
    pc = summary["plaintext_correlation"]
    rows = [
        ("right-key decode: PSNR / SSIM, mean (worst)",
         f"{_f(c['right_key_psnr_db'])} dB / {_f(c['right_key_ssim'], 3)} "
         f"({_f(c['right_key_psnr_db_worst'])} / {_f(c['right_key_ssim_worst'], 3)})",
         f"bit-exact {_frac(a['right_key_bit_exact'])}", f"bit-exact {_frac(n['right_key_bit_exact'])}"),
        ("wrong key (random)",
         f"decodes silently: PSNR {_f(c['wrong_key_psnr_db'])} dB, SSIM {_f(c['wrong_key_ssim'], 3)}",
         f"refused {_frac(a['wrong_key_refused'])}", f"refused {_frac(n['wrong_key_refused'])}"),
        ("one key bit flipped: decode",
         f"decodes silently: PSNR {_f(c['key_bit_flip_psnr_db'])} dB", f"refused {_frac(a['key_bit_flip_refused'])}", "as 8-bit"),
        ("one key bit flipped: cipher change NPCR / UACI",
         f"{_f(c['key_bit_flip_cipher_npcr_pct'], 2)}% / {_f(c['key_bit_flip_cipher_uaci_pct'], 2)}%",
         f"{_f(a['key_bit_flip_cipher_npcr_pct'], 2)}% / {_f(a['key_bit_flip_cipher_uaci_pct'], 2)}%", "as 8-bit"),
        ("cipher entropy, bits/byte (ideal 8)", _f(c["entropy_bits"], 4), _f(a["entropy_bits"], 4), _f(n["entropy_bits"], 4)),
        (f"chi-square, 256 bins: mean; p > {ALPHA} (uniform not rejected)",
         f"{_f(c['chi_square'])}; {_frac(c['chi_square_pass'])}", f"{_f(a['chi_square'])}; {_frac(a['chi_square_pass'])}",
         f"{_f(n['chi_square'])}; {_frac(n['chi_square_pass'])}"),
        (f"adjacent correlation abs(r) h / v / d (plaintext {' / '.join(_f(pc[d], 3) for d in ('horizontal', 'vertical', 'diagonal'))})",
         corr(c), corr(a), "-"),
        ("same image encrypted twice: NPCR",
         f"{_f(c['same_image_twice_npcr_pct'], 2)}%" + (" (deterministic)" if c["same_image_twice_npcr_pct"] == 0 else ""),
         f"{_f(a['same_image_twice_npcr_pct'], 2)}% (fresh nonce)", f"{_f(n['same_image_twice_npcr_pct'], 2)}% (bytes)"),
        (f"one-pixel change ({meta['trials']} trials): NPCR / UACI mean",
         f"{_f(c['one_pixel_npcr_pct'], 3)}% / {_f(c['one_pixel_uaci_pct'], 3)}%",
         f"{_f(a['one_pixel_npcr_pct'], 3)}% / {_f(a['one_pixel_uaci_pct'], 3)}%", "-"),
        (f"one-pixel trials passing NPCR* / UACI* (for {meta['npcr_critical_pixels']} px: {_f(crit_n, 4)}% / "
         f"{_f(crit_lo, 4)}-{_f(crit_hi, 4)}%)",
         f"{_frac(c['one_pixel_npcr_pass'])} / {_frac(c['one_pixel_uaci_pass'])}",
         f"{_frac(a['one_pixel_npcr_pass'])} / {_frac(a['one_pixel_uaci_pass'])}", "-"),
        ("known-plaintext attack: surrogate decode PSNR with " + " / ".join(str(p) for p in pairs) + " pairs",
         " / ".join(_f(c["plaintext_attack_psnr_db"][str(p)]) for p in pairs) + " dB",
         "nothing to learn (fresh nonces); ciphertext-only best constant guess "
         f"{_f(summary['ciphertext_only_constant_guess_psnr_db'])} dB",
         "as 8-bit"),
        (f"attack control: {max(pairs)} pairs of another key", f"{_f(c['plaintext_attack_control_psnr_db'])} dB", "-", "-"),
        ("tamper: one cipher byte flipped",
         f"decodes silently ({_frac(c['tamper_refused'])} refused); decode changed on {_frac(c['tamper_decode_changed'])} "
         f"images, {_f(c['tamper_pixels_changed_mean'], 1)} pixels on average, median PSNR "
         f"{_f(c['tamper_psnr_vs_untampered_db_median'])} dB vs the untampered decode",
         f"refused {_frac(a['tamper_refused'])}", f"refused {_frac(n['tamper_refused'])}"),
        ("time per image, encrypt / decrypt (median ms)",
         f"{_f(c['encrypt_ms_median'], 2)} / {_f(c['decrypt_ms_median'], 2)}",
         f"{_f(a['encrypt_ms_median'], 3)} / {_f(a['decrypt_ms_median'], 3)}",
         f"{_f(n['encrypt_ms_median'], 3)} / {_f(n['decrypt_ms_median'], 3)}"),
    ]
    lines = [
        "# Crypto evaluation: the seed's CNN cipher vs AES-256-GCM",
        "",
        "The CNN cipher is a RESEARCH TRANSFORM rebuilt from the seed's claim (right-key PSNR "
        f"{SEED_CLAIM['psnr_db']} dB, {SEED_CLAIM['seconds_per_image']} s per image); no medsec-edge command uses it "
        "on real data. The product encrypts with AES-256-GCM (`runtime/crypto/encryption.py`), measured here through the same code.",
        "",
        f"Held-out images: {meta['n_images']} (first frame, display window, 8 bits, centre crop <= {meta['max_side']} px); "
        f"NPCR/UACI on centre crops <= {meta['npcr_side']} px. Seed {meta['seed']}; cipher `{meta['cipher_checkpoint']}`; "
        f"torch threads {meta.get('torch_threads')}; load average {meta.get('load_average')}.",
        "",
        f"| measure | {LABELS[CNN]} | {LABELS[AES8]} | {LABELS[AES_NATIVE]} |",
        "|---|---|---|---|",
        *[f"| {m} | {x} | {y} | {z} |" for m, x, y, z in rows],
        "",
        "NPCR*/UACI*: Wu, Noonan & Agaian (2011), 'NPCR and UACI randomness tests for image encryption', "
        f"alpha {ALPHA}, computed for the crop size (256x256: NPCR* {NPCR_CRITICAL_256_ALPHA05_PCT}%, "
        f"UACI* {UACI_CRITICAL_256_ALPHA05_PCT[0]}-{UACI_CRITICAL_256_ALPHA05_PCT[1]}%). The surrogate knows the cipher's "
        "construction (Kerckhoffs) but not the key or the weights; it is trained on synthetic phantoms only. "
        "AES-GCM draws a fresh random nonce per message, so its numbers vary slightly between runs.",
    ]
    if meta.get("command"):
        lines += ["", f"Command: `{meta['command']}`"]
    return "\n".join(lines) + "\n"


def plot(panels: list[dict], attack: dict, summary: dict, path: Path) -> Path:
    """Panels (plaintext, CNN cipher, right/wrong-key and surrogate decodes, AES cipher) and the
    attack's PSNR against the number of pairs."""
    from matplotlib.figure import Figure

    cols = ["plaintext", "CNN cipher", "CNN right key", "CNN wrong key", "surrogate decode", "AES-GCM cipher"]
    n_rows = len(panels) + 1
    fig = Figure(figsize=(2.2 * len(cols), 2.3 * n_rows))
    grid = fig.add_gridspec(n_rows, len(cols))
    for r, p in enumerate(panels):
        for k, (title, key) in enumerate(zip(cols, ("plain", "cipher", "decoded", "wrong", "surrogate", "aes"))):
            ax = fig.add_subplot(grid[r, k])
            if p.get(key) is not None:
                ax.imshow(p[key], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            label = title
            if key in p.get("psnr", {}):
                label += f"\n{_f(p['psnr'][key])} dB"
            ax.set_title(label, fontsize=8)
        fig.axes[-len(cols)].set_ylabel(p["name"][:22], fontsize=7)
    ax = fig.add_subplot(grid[n_rows - 1, :])
    xs = [c["pairs"] for c in attack["curve"]]
    ax.plot(xs, [c["psnr_db"] for c in attack["curve"]], "o-", color="#d62728",
            label="surrogate decoder (pairs of the victim key)")
    ax.axhline(summary[CNN]["right_key_psnr_db"], color="#2ca02c", ls="--", label="CNN right-key decode")
    ax.axhline(attack["control_other_key"]["psnr_db"], color="#7f7f7f", ls=":",
               label=f"control: {attack['control_other_key']['pairs']} pairs of another key")
    ax.axhline(attack["ciphertext_only_constant_guess_psnr_db"], color="#1f77b4", ls="-.",
               label="AES-GCM: ciphertext-only best constant guess")
    ax.set_xscale("log")
    ax.set_xlabel("known (plaintext, cipher image) pairs")
    ax.set_ylabel("PSNR of decode (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return path


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return _json_safe(obj.item())
    return obj


# --- the run ----------------------------------------------------------------------------------------


def run_crypto_eval(images: Sequence[Path], out: Path, *, cipher_checkpoint: Path, seed: int = 0,
                    trials: int = 100, pairs: Sequence[int] = (1, 10, 100, 1000), max_side: int = 512,
                    npcr_side: int = 256, surrogate_steps: int = 500, timing_repeats: int = 3,
                    panels: bool = True, dedup: bool = True, threads: int | None = None,
                    progress: bool = True, command: str = "") -> dict:
    """Measure the CNN cipher and AES-256-GCM on ``images``; write JSON, markdown and PNG into ``out``."""
    from rich.progress import Progress

    try:
        import torch

        from medsec_edge.train.cnn_cipher import load_cipher, random_key_bits
    except ImportError as exc:
        raise UsageError(f"the crypto evaluation needs torch: pip install 'medsec-edge[train]' ({exc.name} missing)") from None
    if trials < 1 or not pairs or min(pairs) < 1 or surrogate_steps < 1:
        raise UsageError("--trials, every number of pairs and the surrogate steps must be at least 1")
    pairs = tuple(sorted(set(int(p) for p in pairs)))
    if threads:
        torch.set_num_threads(threads)
    checkpoint = Path(cipher_checkpoint)
    if not checkpoint.exists():
        raise UsageError(f"{checkpoint}: no CNN cipher there: train one with "
                         "'python -m medsec_edge.train.cnn_cipher --out runs/cipher'")
    try:
        model = load_cipher(checkpoint)
    except Exception as exc:  # a wrong or damaged file: say which and what was expected
        raise UsageError(f"{checkpoint.name}: not a CNN cipher (cipher.pt from 'python -m "
                         f"medsec_edge.train.cnn_cipher'): {type(exc).__name__}: {str(exc)[:200]}") from None
    loaded, skipped, dropped = load_held_out(images, max_side=max_side, dedup=dedup)
    if not loaded:
        raise UsageError("no usable image among the inputs: nothing to evaluate")
    key = random_key_bits(np.random.default_rng([seed, 1]))
    aes = _Aes(np.random.default_rng([seed, 2]))
    started = time.perf_counter()
    rows: list[dict] = []
    panel_data: list[dict] = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("crypto eval", total=len(loaded) + len(pairs) + 2)
        for item in loaded:
            rng = _rng(seed, item["name"], 0)
            cnn_row, arrays = _cnn_image(model, item, key, rng, timing_repeats, npcr_side)
            aes_row, aes_cipher = _aes_display_image(aes, item, _rng(seed, item["name"], 1), timing_repeats, npcr_side)
            native_row = _aes_native_image(aes, item, _rng(seed, item["name"], 2), timing_repeats)
            rows.append({"image": item["name"], "image_id": item["image_id"], "shape": list(item["display"].shape),
                         "source_shape": item["source_shape"],
                         "plaintext": {"entropy_bits": entropy_bits_per_byte(item["display"]),
                                       "correlation": adjacent_correlation(item["display"])},
                         CNN: cnn_row, AES8: aes_row, AES_NATIVE: native_row})
            if panels and len(panel_data) < 3:
                panel_data.append({"name": item["name"], "plain": item["display"], "cipher": arrays["cipher"],
                                   "decoded": arrays["decoded"], "wrong": arrays["wrong"], "aes": aes_cipher,
                                   "psnr": {"decoded": cnn_row["right_key"]["psnr_db"],
                                            "wrong": cnn_row["wrong_key"]["psnr_db"]}})
            bar.advance(task)
        log.info("per-image measures done (%d images, %.0f s)", len(loaded), time.perf_counter() - started)
        trial_rows = _one_pixel_trials(model, aes, loaded, key, trials=trials, seed=seed, npcr_side=npcr_side)
        bar.advance(task)
        log.info("one-pixel trials done (%.0f s)", time.perf_counter() - started)
        attack, decodes = _plaintext_attack(model, loaded, key, pairs=pairs, seed=seed, steps=surrogate_steps,
                                            progress_cb=lambda: bar.advance(task))
    for p in panel_data:
        p["surrogate"] = decodes.get(p["name"])
        if p["surrogate"] is not None:
            p["psnr"]["surrogate"] = psnr_window(p["plain"].astype(np.float64), p["surrogate"].astype(np.float64))
    summary = aggregate(rows, trial_rows, attack)
    # The header quotes the critical values of the most common trial crop; each trial row has its own.
    common = statistics.mode([t["pixels"] for t in trial_rows])
    meta = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "command": command,
        "seed": seed, "trials": trials, "pairs": list(pairs), "surrogate_steps": surrogate_steps,
        "max_side": max_side, "npcr_side": npcr_side, "timing_repeats": timing_repeats,
        "cipher_checkpoint": str(checkpoint), "cipher_config": dict(model.config),
        "n_images": len(loaded), "seconds": round(time.perf_counter() - started, 1),
        "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "npcr_critical_pixels": common, "npcr_critical_pct": npcr_critical_pct(common),
        "uaci_critical_pct": list(uaci_critical_pct(common)),
        "critical_values_published_256": {"npcr_pct": NPCR_CRITICAL_256_ALPHA05_PCT,
                                          "uaci_pct": list(UACI_CRITICAL_256_ALPHA05_PCT), "alpha": ALPHA,
                                          "source": "Wu, Noonan & Agaian 2011"},
        "seed_claim": SEED_CLAIM,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"meta": meta, "summary": summary, "images": rows, "one_pixel_trials": trial_rows,
              "plaintext_attack": attack, "skipped": skipped, "dropped": dropped}
    (out / JSON_NAME).write_text(json.dumps(_json_safe(report), indent=1))
    (out / MARKDOWN_NAME).write_text(render_markdown(summary, meta))
    plot(panel_data if panels else [], attack, summary, out / PLOT_NAME)
    return {"meta": meta, "summary": summary}
