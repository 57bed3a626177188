"""The 128-bit watermark payload: what the bits mean, how they are protected, how they are checked.

Layer: runtime (numpy, reedsolo, hashlib/hmac only). The watermark model carries exactly
``CODE_BITS = 128`` bits per image; this module turns 8 data bytes into those bits and soft
model outputs back into data, and decides whether a watermark was *found* at all.

Code word layout (DESIGN.md, Payload)::

    message (11 bytes) = header (1) | data (8) | check (2)        check = sha256(header|data)[:2]
    header             = version, plus 0x80 when the payload is user-set (kind "user")
    code    (16 bytes) = Reed-Solomon(16, 11) over GF(256) of message (reedsolo, nsym=5)
    word    (16 bytes) = code XOR WHITENING_MASK     mask = sha256(b"medsec-edge payload v1")[:16]
    bits    (128)      = word, MSB first per byte

Why each part:

- **Header and payload kinds**: the data is either the identity MAC (kind ``identity``, header
  ``0x01``, exactly the version byte of every mark made before kinds existed, so old marks read
  as identity) or set by the user with ``--payload`` (kind ``user``, header ``0x81``). The kind
  lives in the Reed-Solomon-protected message, not in a check-value domain: with one header and
  two check domains, 1 in 2^16 user payloads would pass both checks and read as identity (then
  as another image's identity), while two headers make the kind as certain as the data. It costs
  no data bits; a random word now has two accepted headers instead of one, which doubles the
  false-detection bound (below).

- **Reed-Solomon, nsym=5**: minimum distance 6, so up to 2 wrong bytes (any bits inside them) are
  corrected and 3 wrong bytes are always detected (no code word lies within 2 of a word that is 3
  away from another code word). Byte symbols suit the burst-like errors of a watermark decoder.
  The decoder corrects errors only, never erasures: erasure decoding (up to 5 unknown bytes) would
  let almost any word decode, and the false detection rate would rest on the header and check
  bits alone (2/256 * 2^-16 = 1.2e-7), not "far below 1e-6".
- **Check bytes**: a decoder that "corrects" random bits into a valid code word is a false
  detection. Reed-Solomon alone accepts about 7.1e-6 of random words (those within 2 symbols of a
  code word); the 16 check bits and the header byte (2 accepted values of 256) cut that to about
  8.5e-13 for errors-only decoding (``false_accept_bound``).
- **Whitening**: Reed-Solomon is linear, so the all-zero word is a code word, and words near it
  decode. An unwatermarked image, a flat region or a model that saw nothing tends to give
  constant bits (all 0 or all 1), i.e. exactly the inputs that are *not* uniformly random, so the
  random-word bound above would not apply to them. XOR with a fixed pseudo-random mask maps the
  constant patterns to the mask and its complement, which lie at least 4 bytes away from every
  code word (tested): they, and anything within one wrong byte of them, fail Reed-Solomon
  decoding before the check is even consulted. The mask also balances the embedded bits (about
  half ones) whatever the data, which keeps the embedder from seeing a biased target.

Confidence (a number in [0, 1], 0 when not found): with ``s_i = +1/-1`` the decoded code word's
bits and ``x_i`` the logits, ``confidence = clip(mean(s_i * tanh(2 * x_i / scale)), 0, 1)`` where
``scale`` is the RMS of the logits (so the value does not depend on the model's logit scale) or a
fixed ``logit_scale`` given to the codec. A bit whose logit agrees at RMS magnitude counts 0.96,
a weak bit (small |x|) counts little, a bit that disagrees with the corrected word counts
negative. Clean logits of equal magnitude give tanh(2) = 0.964; noise and corrected errors lower it.

reedsolo keeps its Galois field tables in module globals and swaps them in on each call; all
codecs here use the default GF(256) field, so sharing is harmless, but a codec must not be used
concurrently with an ``RSCodec`` over another field in other threads.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import reedsolo

from medsec_edge.runtime.errors import PayloadError

__all__ = [
    "CODE_BITS",
    "CODE_BYTES",
    "DATA_BYTES",
    "PAYLOAD_VERSION",
    "KNOWN_VERSIONS",
    "PAYLOAD_KINDS",
    "IDENTITY_FIELDS",
    "WHITENING_MASK",
    "Decoded",
    "PayloadCodec",
    "bits_to_bytes",
    "bytes_to_bits",
    "false_accept_bound",
    "identity_payload",
    "parse_payload_hex",
]

CODE_BITS = 128
CODE_BYTES = CODE_BITS // 8
DATA_BYTES = 8
CHECK_BYTES = 2
RS_NSYM = 5
MESSAGE_BYTES = 1 + DATA_BYTES + CHECK_BYTES  # 11 = CODE_BYTES - RS_NSYM
RS_CORRECTABLE = RS_NSYM // 2  # byte errors Reed-Solomon corrects without erasures
# Soft decoding: when errors-only decoding fails, the e least reliable bytes (smallest |logit| of
# their bits) are erased and decoding is tried again, for each e here in turn (Chase-style).
SOFT_ERASURES = (1, 2, 3, 4)
CHASE_FLIPS = 8  # least reliable bits whose sign patterns decode_list tries (255 attempts)

PAYLOAD_VERSION = 1
KNOWN_VERSIONS = frozenset({PAYLOAD_VERSION})
# What the 8 data bytes are: the identity MAC over the image's DICOM identity, or set by the user.
PAYLOAD_KINDS = ("identity", "user")
_USER_FLAG = 0x80  # header bit of a user-set payload; versions stay below 0x80
# Every header byte a decoder accepts, and what it says: (version, kind).
_HEADERS = {
    version | (_USER_FLAG if kind == "user" else 0): (version, kind)
    for version in KNOWN_VERSIONS
    for kind in PAYLOAD_KINDS
}

WHITENING_MASK = hashlib.sha256(b"medsec-edge payload v1").digest()[:CODE_BYTES]
_MASK_U8 = np.frombuffer(WHITENING_MASK, dtype=np.uint8)

# Order is part of the payload format: changing it changes every identity payload.
IDENTITY_FIELDS = ("study_uid", "series_uid", "patient_id", "sop_uid")
_IDENTITY_DOMAIN = b"medsec-edge identity v1"


def bytes_to_bits(data: bytes) -> np.ndarray:
    """Bytes to a uint8 array of 0/1, MSB first per byte."""
    return np.unpackbits(np.frombuffer(bytes(data), dtype=np.uint8))


def bits_to_bytes(bits: np.ndarray) -> bytes:
    """A 0/1 array (length a multiple of 8, MSB first per byte) to bytes."""
    arr = np.asarray(bits).ravel()
    if arr.size % 8:
        raise PayloadError(f"bit count must be a multiple of 8, got {arr.size}")
    if arr.size and not np.isin(arr, (0, 1)).all():
        raise PayloadError("bits must be 0 or 1")
    return np.packbits(arr.astype(np.uint8)).tobytes()


def _header(kind: str) -> int:
    if kind not in PAYLOAD_KINDS:
        raise PayloadError(f"payload kind must be one of {', '.join(PAYLOAD_KINDS)}, got {kind!r}")
    return PAYLOAD_VERSION | (_USER_FLAG if kind == "user" else 0)


def _check_value(header: int, data: bytes) -> bytes:
    return hashlib.sha256(bytes((header,)) + data).digest()[:CHECK_BYTES]


def _accept_probability(erasures: int) -> float:
    """Chance that Reed-Solomon decoding of a uniformly random word succeeds with ``erasures``
    bytes erased and up to (5 - erasures) // 2 errors corrected elsewhere: the punctured code has
    16 - e bytes and 5 - e redundancy bytes, and its spheres of that radius are disjoint."""
    n, redundancy = CODE_BYTES - erasures, RS_NSYM - erasures
    radius = redundancy // 2
    sphere = sum(math.comb(n, i) * 255**i for i in range(radius + 1))
    return sphere / 256**redundancy


def false_accept_bound() -> float:
    """Probability that a uniformly random 128-bit word is reported ``found``.

    Reed-Solomon(16, 11) has minimum distance 6, so the Hamming spheres of radius 2 around its
    256^11 code words are disjoint; a random word decodes with probability
    ``sum_{i<=2} C(16, i) 255^i / 256^5`` (about 7.1e-6). By linearity the code word it decodes
    to is uniform, so its message is uniform: the header byte is one of the two accepted ones
    (identity or user, ``_HEADERS``) with probability 2/256 and the two check bytes match with
    probability 2^-16. The product, about 8.5e-13 (4.2e-13 before payload kinds: the second
    header doubles it, no more), is exact for uniform words; whitening is a bijection, so it
    does not change it.

    Soft decoding (``SOFT_ERASURES``) adds one attempt per erasure count, each accepted with
    ``_accept_probability(e)`` times the same 2/256 * 2^-16; the union bound over all attempts is
    about 6.7e-9 per decode (3.4e-9 before kinds), still far below 1e-6 even when an extractor
    tries a few lattices.
    """
    attempts = (0, *SOFT_ERASURES)
    return sum(_accept_probability(e) for e in attempts) * len(_HEADERS) / 256 * 2.0 ** (-8 * CHECK_BYTES)


@dataclass(frozen=True)
class Decoded:
    """What an extraction yields from 128 soft bits; a verdict, not an exception.

    ``found``: Reed-Solomon decoding succeeded, the header is known and the check bytes match.
    ``kind``: ``"identity"`` or ``"user"`` (``PAYLOAD_KINDS``) when found, else ``None``.
    ``bits_corrected``: code bits the decoder changed (0 when not found).
    ``bit_errors_raw``: hard-decision bits that differ from the Reed-Solomon-decoded code word;
    known whenever Reed-Solomon decoding succeeded (even if the header or check then failed),
    ``None`` when it did not. When found it equals ``bits_corrected``.
    """

    found: bool
    data: bytes | None
    version: int | None
    bits_corrected: int
    confidence: float
    bit_errors_raw: int | None
    kind: str | None = None

    @property
    def payload_hex(self) -> str | None:
        return None if self.data is None else self.data.hex()


_NOT_DECODED = Decoded(
    found=False, data=None, version=None, bits_corrected=0, confidence=0.0, bit_errors_raw=None
)


class PayloadCodec:
    """Versioned, error-corrected, checked and whitened 128-bit code for 8 data bytes.

    ``logit_scale``: if given, the confidence normalises logits by this fixed value instead of
    their RMS, so that uniformly weak logits give a low confidence. ``soft``: after errors-only
    decoding fails, retry with the least reliable bytes erased (``SOFT_ERASURES``).
    """

    code_bits = CODE_BITS
    data_bytes = DATA_BYTES
    version = PAYLOAD_VERSION

    def __init__(self, *, logit_scale: float | None = None, soft: bool = True) -> None:
        if logit_scale is not None and not (math.isfinite(logit_scale) and logit_scale > 0):
            raise PayloadError(f"logit_scale must be a positive finite number, got {logit_scale!r}")
        self.logit_scale = logit_scale
        self.soft = soft
        self._rs = reedsolo.RSCodec(RS_NSYM)

    def __repr__(self) -> str:
        return f"PayloadCodec(version={self.version}, logit_scale={self.logit_scale})"

    def code_word(self, data: bytes, kind: str = "identity") -> bytes:
        """The 16 whitened code-word bytes for 8 data bytes of ``kind`` (``PAYLOAD_KINDS``)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise PayloadError(f"payload data must be bytes, got {type(data).__name__}")
        data = bytes(data)
        if len(data) != DATA_BYTES:
            raise PayloadError(
                f"payload data must be exactly {DATA_BYTES} bytes, got {len(data)}"
            )
        header = _header(kind)
        message = bytes((header,)) + data + _check_value(header, data)
        code = np.frombuffer(bytes(self._rs.encode(message)), dtype=np.uint8)
        return (code ^ _MASK_U8).tobytes()

    def encode(self, data: bytes, kind: str = "identity") -> np.ndarray:
        """8 data bytes of ``kind`` to 128 code bits (uint8 0/1, MSB first per byte)."""
        return bytes_to_bits(self.code_word(data, kind))

    def decode(self, logits: np.ndarray) -> Decoded:
        """128 soft values (positive means bit 1, magnitude = confidence) to a ``Decoded``.

        Raises ``PayloadError`` only for inputs that are not 128 finite numbers: a model that
        emits NaN is broken, and hiding that as "no watermark" would be wrong.
        """
        x = np.asarray(logits, dtype=np.float64).ravel()
        if x.size != CODE_BITS:
            raise PayloadError(f"expected {CODE_BITS} logits, got {x.size}")
        if not np.isfinite(x).all():
            raise PayloadError("logits contain NaN or infinity: the extractor output is broken")
        received = np.packbits(x > 0) ^ _MASK_U8
        received_bytes = received.tobytes()
        decoded = self._decode_hard(x, received_bytes, ())
        if decoded.found or not self.soft:
            return decoded
        # Bytes ordered from least to most reliable: a byte is as weak as its weakest bit.
        order = np.argsort(np.abs(x).reshape(CODE_BYTES, 8).min(axis=1), kind="stable")
        for erasures in SOFT_ERASURES:
            soft = self._decode_hard(x, received_bytes, tuple(int(i) for i in order[:erasures]))
            if soft.found:
                return soft
        return decoded

    def decode_list(self, logits: np.ndarray, flips: int = CHASE_FLIPS) -> Decoded:
        """``decode``, then, if nothing was found, a Chase search: every pattern of sign flips among
        the ``flips`` least reliable bits, fewest flips first, each decoded errors-only.

        A read whose few wrong bits are the weakest ones (the common failure after noise or
        compression) comes back; each attempt is accepted by a random word with probability
        8.5e-13 (``false_accept_bound``'s errors-only term), so the 2^flips - 1 attempts add at
        most 2.2e-10 per list for 8 flips. 255 attempts take 10-25 ms: the extractor lists once per read.
        """
        decoded = self.decode(logits)
        if decoded.found or flips <= 0:
            return decoded
        x = np.asarray(logits, dtype=np.float64).ravel()
        weakest = np.argsort(np.abs(x), kind="stable")[:flips]
        for count in range(1, flips + 1):
            for chosen in itertools.combinations(weakest, count):
                flipped = x.copy()
                flipped[list(chosen)] *= -1
                received = (np.packbits(flipped > 0) ^ _MASK_U8).tobytes()
                attempt = self._decode_hard(flipped, received, ())
                if attempt.found:
                    # confidence and corrections count against the logits as read, not as flipped
                    bits = self.encode(attempt.data, attempt.kind)
                    unwhitened = (np.packbits(bits) ^ _MASK_U8).tobytes()
                    corrected = int(np.sum((x > 0) != (bits > 0)))
                    return replace(attempt, confidence=self._confidence(x, unwhitened),
                                   bits_corrected=corrected, bit_errors_raw=corrected)
        return decoded

    def _decode_hard(self, x: np.ndarray, received_bytes: bytes, erase: tuple[int, ...]) -> Decoded:
        """One Reed-Solomon attempt with the given bytes erased, then header and check."""
        try:
            message, full, _ = self._rs.decode(received_bytes, erase_pos=list(erase) or None)
        except reedsolo.ReedSolomonError:
            return _NOT_DECODED
        full_bytes = bytes(full)
        diff = int.from_bytes(full_bytes, "big") ^ int.from_bytes(received_bytes, "big")
        # Defensive: never trust a decoder result beyond the code's correction radius, the
        # false-accept bound depends on it.
        changed = [i for i, (a, b) in enumerate(zip(full_bytes, received_bytes)) if a != b]
        errors_outside = sum(1 for i in changed if i not in erase)
        if 2 * errors_outside + len(erase) > RS_NSYM:
            return _NOT_DECODED
        bit_errors = diff.bit_count()
        header = message[0]
        data = bytes(message[1 : 1 + DATA_BYTES])
        check = bytes(message[1 + DATA_BYTES :])
        if header not in _HEADERS or not hmac.compare_digest(check, _check_value(header, data)):
            return Decoded(
                found=False,
                data=None,
                version=None,
                bits_corrected=0,
                confidence=0.0,
                bit_errors_raw=bit_errors,
            )
        version, kind = _HEADERS[header]
        return Decoded(
            found=True,
            data=data,
            version=version,
            bits_corrected=bit_errors,
            confidence=self._confidence(x, full_bytes),
            bit_errors_raw=bit_errors,
            kind=kind,
        )

    def _confidence(self, x: np.ndarray, full_bytes: bytes) -> float:
        scale = self.logit_scale
        if scale is None:
            scale = float(np.sqrt(np.mean(x * x)))
            if scale == 0.0:
                return 0.0
        code = np.frombuffer(full_bytes, dtype=np.uint8) ^ _MASK_U8
        signs = np.unpackbits(code).astype(np.float64) * 2.0 - 1.0
        value = float(np.mean(signs * np.tanh(2.0 * x / scale)))
        return min(1.0, max(0.0, value))


def _identity_field(name: str, value: object) -> bytes:
    if not isinstance(value, str):
        raise PayloadError(f"identity field {name!r} must be a string, got {type(value).__name__}")
    # DICOM pads UI values with NUL and text values with spaces; padding is not significant,
    # and the identity must survive our own write.
    encoded = value.strip(" \x00").encode("utf-8")
    return struct.pack(">I", len(encoded)) + encoded


def identity_payload(identity: Mapping[str, str], key: bytes, key_id: str) -> bytes:
    """8 data bytes binding the watermark to an image's DICOM identity and a key.

    HMAC-SHA256(key, fields) truncated to 8 bytes, where fields are, each as a 4-byte big-endian
    length and UTF-8 bytes: a domain label (``medsec-edge identity v1``), ``key_id``, then
    ``IDENTITY_FIELDS`` in order (Study and Series Instance UID, Patient ID, *source* SOP Instance
    UID). Length prefixes make the serialization unambiguous ("1.2" + "3" differs from "1" +
    "2.3"). Empty values are allowed (Patient ID is type 2), missing keys are not.
    """
    if not isinstance(key, (bytes, bytearray)) or len(key) < 16:
        raise PayloadError("watermark key must be at least 16 bytes")
    missing = [name for name in IDENTITY_FIELDS if name not in identity]
    if missing:
        raise PayloadError(
            f"identity lacks {', '.join(missing)}; expected keys {', '.join(IDENTITY_FIELDS)}"
        )
    parts = [_identity_field("domain", _IDENTITY_DOMAIN.decode())]
    parts.append(_identity_field("key_id", key_id))
    parts += [_identity_field(name, identity[name]) for name in IDENTITY_FIELDS]
    return hmac.new(bytes(key), b"".join(parts), hashlib.sha256).digest()[:DATA_BYTES]


_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def parse_payload_hex(text: str) -> bytes:
    """``--payload HEX``: exactly 16 hex digits (surrounding whitespace ignored) to 8 bytes.

    Error messages give the length and the position of a bad character, never the text itself.
    """
    if not isinstance(text, str):
        raise PayloadError(f"payload must be a hex string, got {type(text).__name__}")
    stripped = text.strip()
    want = 2 * DATA_BYTES
    if len(stripped) != want:
        raise PayloadError(
            f"payload must be exactly {want} hex digits ({DATA_BYTES} bytes), "
            f"got {len(stripped)} characters"
        )
    for i, ch in enumerate(stripped):
        if ch not in _HEX_DIGITS:
            raise PayloadError(
                f"payload must be exactly {want} hex digits ({DATA_BYTES} bytes): "
                f"character {i + 1} is not a hex digit"
            )
    return bytes.fromhex(stripped)
