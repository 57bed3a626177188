"""Payload kinds: the code word says whether its data is the identity MAC or user-set, old marks
read as identity, and a second kind does not let random words through."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import reedsolo
from hypothesis import given, settings
from hypothesis import strategies as st

from medsec_edge.runtime.errors import PayloadError
from medsec_edge.runtime.watermark.payload import (
    PAYLOAD_KINDS,
    PAYLOAD_VERSION,
    WHITENING_MASK,
    PayloadCodec,
    bits_to_bytes,
    bytes_to_bits,
)

CODEC = PayloadCodec()
HARD = PayloadCodec(soft=False)
data8 = st.binary(min_size=8, max_size=8)
kinds = st.sampled_from(PAYLOAD_KINDS)
# Raw code words made by the codec before payload kinds existed (see "made_by" in the file).
BEFORE = json.loads((Path(__file__).parent / "data" / "payload_v1_before_kinds.json").read_text())["code_words"]


def _logits(bits: np.ndarray, magnitude: float = 1.0) -> np.ndarray:
    return (bits.astype(np.float64) * 2.0 - 1.0) * magnitude


def _unwhiten(word: bytes) -> bytes:
    return bytes(a ^ b for a, b in zip(word, WHITENING_MASK))


def _whiten(code: bytes) -> bytes:
    return _unwhiten(code)  # XOR is its own inverse


@given(data8, kinds)
def test_both_kinds_round_trip(data, kind):
    out = CODEC.decode(_logits(CODEC.encode(data, kind), 2.5))
    assert out.found and out.data == data and out.kind == kind and out.version == PAYLOAD_VERSION


@given(data8)
def test_user_header_is_the_version_with_the_top_bit_and_checks_over_it(data):
    code = _unwhiten(CODEC.code_word(data, "user"))
    assert code[0] == 0x80 | PAYLOAD_VERSION and code[1:9] == data
    assert code[9:11] == hashlib.sha256(bytes([0x81]) + data).digest()[:2]
    assert _unwhiten(CODEC.code_word(data))[0] == PAYLOAD_VERSION  # identity stays the default


@given(data8)
def test_the_two_kinds_of_one_payload_are_a_full_code_distance_apart(data):
    # The kind sits in the protected message: turning one kind into the other takes >= 6 wrong
    # bytes, more than any decoding attempt corrects, so a mark never reads as the other kind.
    a, b = CODEC.code_word(data, "identity"), CODEC.code_word(data, "user")
    assert sum(x != y for x, y in zip(a, b)) >= 6


@given(data8, kinds, st.dictionaries(st.integers(0, 15), st.integers(1, 255), min_size=1, max_size=2))
def test_corrected_words_keep_their_kind(data, kind, flips):
    word = bytearray(CODEC.code_word(data, kind))
    for pos, xor in flips.items():
        word[pos] ^= xor
    out = CODEC.decode(_logits(bytes_to_bits(bytes(word))))
    assert out.found and out.data == data and out.kind == kind


@given(st.binary(min_size=16, max_size=16))
@settings(max_examples=2000)
def test_random_code_words_are_not_accepted(word):
    # Accepted with probability ~6.7e-9 per word (false_accept_bound): 2000 words, none.
    logits = _logits(bytes_to_bits(word))
    assert not HARD.decode(logits).found
    assert not CODEC.decode(logits).found


def test_only_the_two_headers_with_their_check_are_accepted():
    """Valid Reed-Solomon words whose message has a random header or check: the header byte and
    the check value are all that stand between them and a false detection."""
    rs = reedsolo.RSCodec(5)
    rng = np.random.default_rng(8)
    data = rng.integers(0, 256, (256, 8), np.uint8)

    def decode(header: int, payload: bytes, check: bytes):
        code = bytes(rs.encode(bytes([header]) + payload + check))
        return HARD.decode(_logits(bytes_to_bits(_whiten(code))))

    for header in range(256):
        payload = data[header].tobytes()
        right = hashlib.sha256(bytes([header]) + payload).digest()[:2]
        out = decode(header, payload, right)
        expected = {0x01: "identity", 0x81: "user"}.get(header)
        assert out.found == (expected is not None) and out.kind == expected, header
        # The other kind's check value never opens this header.
        other = hashlib.sha256(bytes([header ^ 0x80]) + payload).digest()[:2]
        if other != right:
            assert not decode(header, payload, other).found
    # Random check values on the accepted headers: expected 20000 * 2^-16 = 0.3 passes.
    passes = sum(
        decode(header, rng.integers(0, 256, 8, np.uint8).tobytes(), rng.integers(0, 256, 2, np.uint8).tobytes()).found
        for header in (0x01, 0x81) for _ in range(10_000)
    )
    assert passes <= 3


def test_unknown_kind_is_refused():
    with pytest.raises(PayloadError, match="identity, user"):
        CODEC.encode(bytes(8), "USER")


# -- marks made before kinds existed -----------------------------------------------------------


@pytest.mark.parametrize("entry", BEFORE, ids=[e["data"] for e in BEFORE])
def test_code_words_from_before_kinds_read_as_identity(entry):
    word, data = bytes.fromhex(entry["code_word"]), bytes.fromhex(entry["data"])
    out = CODEC.decode(_logits(bytes_to_bits(word)))
    assert out.found and out.data == data and out.kind == "identity"
    # Identity marks are bit for bit what they were: old and new marks are one format.
    assert bits_to_bytes(CODEC.encode(data, "identity")) == word
    assert bits_to_bytes(CODEC.encode(data, "user")) != word
