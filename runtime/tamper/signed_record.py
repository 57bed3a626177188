"""The pieces both content fingerprints share: the signed envelope and the window table; runtime layer.

Envelope: ``magic`` (4 bytes) + key id (16 ASCII hex) + Ed25519 signature (64) + body length (u32
LE) + body + one NUL when that makes the length odd. The signature covers the body under the
record's own domain tag (length-prefixed with the key id), so no other signature of ours can be
replayed as this one; the stated length lets a DICOM OB value's even-length pad be told from data.
Window table: per frame, the display window it was recorded with (lower, upper, slope, intercept
as float64, inverted flag), every field checked on load.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from medsec_edge.runtime.crypto.keyset import SealSigner, SealVerifier
from medsec_edge.runtime.errors import InputError
from medsec_edge.runtime.io.image import DisplayWindow

__all__ = ["FrameWindow", "open_record", "pack_windows", "read_windows", "record_key_id", "seal_record"]

@dataclass(frozen=True)
class FrameWindow:
    """The display window a frame was fingerprinted with (modality units; DESIGN.md, Measures)."""

    lower: float
    upper: float
    slope: float
    intercept: float
    inverted: bool

    @classmethod
    def from_display_window(cls, window: DisplayWindow) -> FrameWindow:
        return cls(float(window.lower), float(window.upper), float(window.slope),
                   float(window.intercept), bool(window.inverted))

    def to_display_window(self) -> DisplayWindow:
        return DisplayWindow(self.lower, self.upper, self.slope, self.intercept, self.inverted)


KEY_ID_CHARS = 16
SIGNATURE_BYTES = 64
_LENGTH = struct.Struct("<I")
_WINDOW = struct.Struct("<ddddB")


def _lp(data: bytes) -> bytes:
    return len(data).to_bytes(8, "big") + data


def _signed_message(domain: bytes, key_id: str, body: bytes) -> bytes:
    return _lp(domain) + _lp(key_id.encode("ascii")) + _lp(body)


def seal_record(magic: bytes, domain: bytes, body: bytes, signer: SealSigner) -> bytes:
    """The signed envelope of ``body`` (module docstring)."""
    key_id = signer.key_id
    if len(key_id) != KEY_ID_CHARS or not key_id.isascii():
        raise InputError(f"seal key id must be {KEY_ID_CHARS} ASCII characters")
    signature = signer.sign(_signed_message(domain, key_id, body))
    blob = magic + key_id.encode("ascii") + signature + _LENGTH.pack(len(body)) + body
    return blob + b"\0" * (len(blob) % 2)


def record_key_id(blob: bytes, magic: bytes, what: str) -> str:
    """The key id an envelope names (to tell "unknown key" from "invalid")."""
    head = len(magic) + KEY_ID_CHARS
    if len(blob) < head + SIGNATURE_BYTES or blob[: len(magic)] != magic:
        raise InputError(f"not a signed medsec-edge {what} (wrong magic or truncated)")
    try:
        return bytes(blob[len(magic):head]).decode("ascii")
    except UnicodeDecodeError:
        raise InputError(f"signed {what} has a key id that is not ASCII") from None


def _verifier_map(verifiers) -> dict[str, SealVerifier]:
    if isinstance(verifiers, SealVerifier):
        return {verifiers.key_id: verifiers}
    if isinstance(verifiers, Mapping):
        return dict(verifiers)
    return {v.key_id: v for v in verifiers}


def open_record(blob: bytes, magic: bytes, domain: bytes, what: str,
                verifiers: Mapping[str, SealVerifier] | Iterable[SealVerifier] | SealVerifier) -> bytes | None:
    """The body if one of ``verifiers`` signed it, else None (unknown key, bad signature); an
    envelope that is malformed is an ``InputError``."""
    blob = bytes(blob)
    key_id = record_key_id(blob, magic, what)
    verifier = _verifier_map(verifiers).get(key_id)
    if verifier is None:
        return None
    head = len(magic) + KEY_ID_CHARS
    signature = blob[head: head + SIGNATURE_BYTES]
    start = head + SIGNATURE_BYTES + _LENGTH.size
    if len(blob) < start:
        raise InputError(f"signed {what} is truncated before its body")
    (length,) = _LENGTH.unpack_from(blob, head + SIGNATURE_BYTES)
    body, pad = blob[start: start + length], blob[start + length:]
    if len(body) != length or pad not in (b"", b"\0"):
        raise InputError(f"signed {what} says {length} body bytes, {len(blob) - start} follow: "
                         "truncated or padded")
    if not verifier.verify(signature, _signed_message(domain, key_id, body)):
        return None
    return body


def pack_windows(windows: Sequence[FrameWindow]) -> bytes:
    return b"".join(_WINDOW.pack(w.lower, w.upper, w.slope, w.intercept, int(w.inverted)) for w in windows)


def read_windows(data: bytes, offset: int, frames: int, what: str) -> tuple[tuple[FrameWindow, ...], int]:
    """``frames`` windows from ``offset``; the offset after them. Each must be finite and non-empty."""
    if len(data) < offset + frames * _WINDOW.size:
        raise InputError(f"{what} record is truncated inside its window table")
    windows = []
    for _ in range(frames):
        lower, upper, slope, intercept, inverted = _WINDOW.unpack_from(data, offset)
        offset += _WINDOW.size
        if not all(math.isfinite(v) and abs(v) <= 1e15 for v in (lower, upper, slope, intercept)):
            raise InputError(f"{what} record has a window that is not finite")
        if not upper > lower or slope == 0 or inverted not in (0, 1):
            raise InputError(f"{what} record has an empty or malformed window")
        windows.append(FrameWindow(lower, upper, slope, intercept, bool(inverted)))
    return tuple(windows), offset
