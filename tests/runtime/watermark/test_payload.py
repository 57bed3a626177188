"""PayloadCodec: round trips, correction limits, false detection, identity MAC, hex parsing."""

from __future__ import annotations

import hashlib
import hmac
import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medsec_edge.runtime.errors import PayloadError
from medsec_edge.runtime.watermark.payload import (
    CODE_BITS,
    IDENTITY_FIELDS,
    PAYLOAD_VERSION,
    WHITENING_MASK,
    PayloadCodec,
    bits_to_bytes,
    bytes_to_bits,
    false_accept_bound,
    identity_payload,
    parse_payload_hex,
)

CODEC = PayloadCodec()
HARD = PayloadCodec(soft=False)  # errors-only: the properties of the code itself
data8 = st.binary(min_size=8, max_size=8)


def _logits(bits: np.ndarray, magnitude: float = 1.0) -> np.ndarray:
    return (bits.astype(np.float64) * 2.0 - 1.0) * magnitude


def _corrupt(bits: np.ndarray, flips: dict[int, int]) -> np.ndarray:
    word = bytearray(bits_to_bytes(bits))
    for pos, xor in flips.items():
        word[pos] ^= xor
    return bytes_to_bits(bytes(word))


# -- structure ---------------------------------------------------------------------------------


def test_encode_shape_dtype_and_layout():
    data = bytes(range(8))
    bits = CODEC.encode(data)
    assert bits.shape == (CODE_BITS,) and bits.dtype == np.uint8
    assert set(np.unique(bits)) <= {0, 1}
    # Unwhitened, the first byte is the version and the next 8 the data (systematic RS code).
    code = bytes(a ^ b for a, b in zip(bits_to_bytes(bits), WHITENING_MASK))
    assert code[0] == PAYLOAD_VERSION
    assert code[1:9] == data
    assert code[9:11] == hashlib.sha256(bytes([PAYLOAD_VERSION]) + data).digest()[:2]


def test_bits_helpers_msb_first_and_validation():
    assert list(bytes_to_bits(b"\x80\x01")) == [1] + [0] * 7 + [0] * 7 + [1]
    assert bits_to_bytes(np.array([1, 0, 0, 0, 0, 0, 0, 1])) == b"\x81"
    with pytest.raises(PayloadError):
        bits_to_bytes(np.ones(7))
    with pytest.raises(PayloadError):
        bits_to_bytes(np.full(8, 2))


@pytest.mark.parametrize("bad", [b"", b"1234567", b"123456789", "12345678", 12345678])
def test_encode_refuses_wrong_data(bad):
    with pytest.raises(PayloadError):
        CODEC.encode(bad)


@pytest.mark.parametrize("shape", [(127,), (129,), (2, 128)])
def test_decode_refuses_wrong_size(shape):
    with pytest.raises(PayloadError, match="128"):
        CODEC.decode(np.ones(shape))


def test_decode_accepts_batch_of_one_and_refuses_nan():
    bits = CODEC.encode(b"abcdefgh")
    assert CODEC.decode(_logits(bits)[None, :]).data == b"abcdefgh"
    bad = _logits(bits)
    bad[3] = np.nan
    with pytest.raises(PayloadError, match="NaN"):
        CODEC.decode(bad)


def test_embedded_bits_are_balanced_even_for_constant_data():
    for data in (bytes(8), b"\xff" * 8):
        assert 0.3 < CODEC.encode(data).mean() < 0.7


# -- round trips and correction ----------------------------------------------------------------


@given(data8)
def test_round_trip_exact(data):
    bits = CODEC.encode(data)
    out = CODEC.decode(_logits(bits, 3.7))
    assert out.found and out.data == data and out.version == PAYLOAD_VERSION and out.kind == "identity"
    assert out.bits_corrected == 0 and out.bit_errors_raw == 0
    assert out.confidence == pytest.approx(math.tanh(2.0))
    assert out.payload_hex == data.hex()


@given(
    data8,
    st.dictionaries(
        st.integers(0, 15), st.integers(1, 255), min_size=1, max_size=2
    ),
)
def test_up_to_two_corrupted_bytes_are_corrected(data, flips):
    bits = _corrupt(CODEC.encode(data), flips)
    flipped = sum(bin(x).count("1") for x in flips.values())
    out = CODEC.decode(_logits(bits))
    assert out.found and out.data == data
    assert out.bits_corrected == flipped == out.bit_errors_raw
    assert 0.0 < out.confidence < math.tanh(2.0)


@given(
    data8,
    st.dictionaries(st.integers(0, 15), st.integers(1, 255), min_size=3, max_size=3),
)
def test_three_corrupted_bytes_are_always_detected(data, flips):
    # Minimum distance 6: a word 3 bytes from a code word is more than 2 from every code word.
    out = HARD.decode(_logits(_corrupt(CODEC.encode(data), flips)))
    assert not out.found and out.data is None and out.bit_errors_raw is None
    assert out.confidence == 0.0 and out.bits_corrected == 0


@given(
    data8,
    st.dictionaries(st.integers(0, 15), st.integers(1, 255), min_size=4, max_size=16),
)
@settings(max_examples=300)
def test_four_or_more_corrupted_bytes_never_yield_found(data, flips):
    # Decoding to the original is impossible (distance >= 4 > 2); decoding to another code word
    # then passing version + check has probability 2^-24, so found must be False.
    out = HARD.decode(_logits(_corrupt(CODEC.encode(data), flips)))
    assert not out.found
    assert out.data is None
    # Soft decoding may recover the original, but never reports another payload.
    soft = CODEC.decode(_logits(_corrupt(CODEC.encode(data), flips)))
    assert not soft.found or soft.data == data


@given(data8, st.lists(st.integers(0, 15), min_size=3, max_size=4, unique=True), st.integers(0, 2**32 - 1))
@settings(max_examples=200)
def test_soft_decoding_recovers_weak_wrong_bytes(data, positions, seed):
    """Up to 4 wrong bytes are recovered when their wrong bits are the least reliable ones."""
    rng = np.random.default_rng(seed)
    bits = CODEC.encode(data)
    logits = _logits(bits) * rng.uniform(0.6, 1.0, CODE_BITS)
    for pos in positions:
        bit = pos * 8 + int(rng.integers(0, 8))
        logits[bit] = -np.sign(logits[bit]) * 0.05
    assert not HARD.decode(logits).found
    out = CODEC.decode(logits)
    assert out.found and out.data == data and out.bits_corrected == len(positions)


@given(data8, st.integers(0, 2**32 - 1), st.floats(0.05, 0.6))
@settings(max_examples=200)
def test_soft_logits_with_noise(data, seed, sigma):
    rng = np.random.default_rng(seed)
    bits = CODEC.encode(data)
    logits = _logits(bits) + rng.normal(0.0, sigma, CODE_BITS)
    hard = (logits > 0).astype(np.uint8)
    wrong_bytes = int(np.count_nonzero(np.packbits(hard) != np.packbits(bits)))
    wrong_bits = int(np.count_nonzero(hard != bits))
    out = HARD.decode(logits)
    if wrong_bytes <= 2:
        assert out.found and out.data == data and out.bits_corrected == wrong_bits
        assert 0.0 < out.confidence <= 1.0
    else:
        assert not out.found
    soft = CODEC.decode(logits)
    assert soft.found if wrong_bytes <= 2 else (not soft.found or soft.data == data)


def test_confidence_is_scale_invariant_and_falls_with_weak_or_wrong_bits():
    bits = CODEC.encode(b"\x10\x20\x30\x40\x50\x60\x70\x80")
    clean = _logits(bits)
    c_clean = CODEC.decode(clean).confidence
    assert CODEC.decode(clean * 1000.0).confidence == pytest.approx(c_clean)
    weak = clean.copy()
    weak[::2] *= 0.1  # half the bits barely above zero, all still right
    flipped = clean.copy()
    flipped[[0, 1, 2, 9]] *= -1  # two wrong bytes, corrected
    rng = np.random.default_rng(7)
    noisy = clean + rng.normal(0.0, 0.3, CODE_BITS)
    results = [CODEC.decode(x) for x in (weak, flipped, noisy)]
    assert all(r.found and r.data == b"\x10\x20\x30\x40\x50\x60\x70\x80" for r in results)
    assert all(0.0 < r.confidence < c_clean for r in results)
    assert results[1].bits_corrected == 4


def test_fixed_logit_scale_makes_weak_logits_low_confidence():
    bits = CODEC.encode(bytes(8))
    fixed = PayloadCodec(logit_scale=4.0)
    assert fixed.decode(_logits(bits, 0.05)).confidence < 0.05
    assert fixed.decode(_logits(bits, 20.0)).confidence > 0.99
    with pytest.raises(PayloadError):
        PayloadCodec(logit_scale=0.0)


# -- false detection ---------------------------------------------------------------------------


def test_false_accept_bound_is_tiny_and_matches_formula():
    p = false_accept_bound()
    hard = (1 + 16 * 255 + math.comb(16, 2) * 255**2) / 256**5
    # soft attempts: 1 erasure + 2 errors, 2 + 1, 3 + 1, 4 + 0 (punctured codes, disjoint spheres)
    soft = ((1 + 15 * 255 + math.comb(15, 2) * 255**2) / 256**4 + (1 + 14 * 255) / 256**3
            + (1 + 13 * 255) / 256**2 + 1 / 256)
    # two accepted header bytes (identity, user) of 256, then 16 check bits
    assert p == pytest.approx((hard + soft) * 2 / 256 / 2**16)
    assert p < 1e-8
    assert HARD.decode(np.zeros(CODE_BITS)).found is False


@pytest.mark.parametrize(
    "pattern",
    [np.zeros(CODE_BITS), np.ones(CODE_BITS), -np.ones(CODE_BITS), np.tile([1.0, -1.0], 64)],
    ids=["all-zero-logits", "all-one", "all-zero-bits", "alternating"],
)
def test_flat_patterns_do_not_even_decode(pattern):
    out = HARD.decode(pattern)
    assert not out.found and out.bit_errors_raw is None
    assert not CODEC.decode(pattern).found


@pytest.mark.parametrize("fill", [0, 0xFF])
def test_constant_words_with_one_wrong_byte_do_not_decode(fill):
    # Whitening puts the constant patterns >= 4 bytes from every code word: a near-flat output
    # fails Reed-Solomon itself, it does not rest on the check bytes.
    for pos in range(16):
        for value in range(256):
            word = bytearray([fill] * 16)
            word[pos] = value
            out = HARD.decode(_logits(bytes_to_bits(bytes(word))))
            assert not out.found and out.bit_errors_raw is None, (pos, value)


def _count_found(n: int, seed: int, codec: PayloadCodec = CODEC) -> tuple[int, int]:
    rng = np.random.default_rng(seed)
    found = rs_decoded = 0
    chunk = 10_000
    for start in range(0, n, chunk):
        for logits in rng.standard_normal((min(chunk, n - start), CODE_BITS)):
            out = codec.decode(logits)
            found += out.found
            rs_decoded += out.bit_errors_raw is not None
    return found, rs_decoded


def test_random_logits_are_never_found():
    # 200k errors-only decodes take about 6-7 s with reedsolo's pure-Python decoder (32 us each).
    found, rs_decoded = _count_found(200_000, seed=20240601, codec=HARD)
    assert found == 0
    # RS alone accepts ~7.1e-6 of random words (expected 1.4 here); far more would mean a bug.
    assert rs_decoded <= 12
    # Soft decoding tries five times per word; 20k words, none found.
    assert _count_found(20_000, seed=7)[0] == 0


@pytest.mark.slow
def test_random_logits_are_never_found_million():
    found, rs_decoded = _count_found(1_000_000, seed=99, codec=HARD)
    assert found == 0
    assert rs_decoded <= 25  # expected 7.1
    assert _count_found(200_000, seed=98)[0] == 0  # soft decoding, expected 7e-4 found


def test_decode_is_fast():
    bits = CODEC.encode(b"timing!!")
    logits = _logits(bits)
    CODEC.decode(logits)
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        CODEC.decode(logits)
    per_call_ms = (time.perf_counter() - t0) / n * 1e3
    assert per_call_ms < 1.0


# -- identity payload --------------------------------------------------------------------------

IDENTITY = {
    "study_uid": "1.2.826.0.1.3680043.8.498.1",
    "series_uid": "1.2.826.0.1.3680043.8.498.2",
    "patient_id": "PAT-0001",
    "sop_uid": "1.2.826.0.1.3680043.8.498.3",
}
KEY = bytes(range(32))


def test_identity_payload_is_truncated_hmac_of_length_prefixed_fields():
    def field(s: str) -> bytes:
        b = s.encode()
        return len(b).to_bytes(4, "big") + b

    message = field("medsec-edge identity v1") + field("abcd1234abcd1234")
    message += b"".join(field(IDENTITY[k]) for k in IDENTITY_FIELDS)
    expected = hmac.new(KEY, message, hashlib.sha256).digest()[:8]
    assert identity_payload(IDENTITY, KEY, "abcd1234abcd1234") == expected


@pytest.mark.parametrize("name", IDENTITY_FIELDS)
def test_identity_payload_changes_with_every_field(name):
    base = identity_payload(IDENTITY, KEY, "k1")
    moved = dict(IDENTITY, **{name: IDENTITY[name] + "9"})
    assert identity_payload(moved, KEY, "k1") != base
    assert identity_payload(IDENTITY, KEY, "k2") != base
    assert identity_payload(IDENTITY, bytes(32), "k1") != base


def test_identity_payload_is_unambiguous_and_ignores_dicom_padding():
    a = dict(IDENTITY, study_uid="1.2", series_uid="3")
    b = dict(IDENTITY, study_uid="1.", series_uid="23")
    assert identity_payload(a, KEY, "k") != identity_payload(b, KEY, "k")
    padded = dict(IDENTITY, sop_uid=IDENTITY["sop_uid"] + "\x00", patient_id="PAT-0001 ")
    assert identity_payload(padded, KEY, "k") == identity_payload(IDENTITY, KEY, "k")


def test_identity_payload_refuses_missing_fields_and_short_keys():
    partial = {k: v for k, v in IDENTITY.items() if k != "patient_id"}
    with pytest.raises(PayloadError, match="patient_id"):
        identity_payload(partial, KEY, "k")
    with pytest.raises(PayloadError):
        identity_payload(IDENTITY, b"short", "k")
    with pytest.raises(PayloadError):
        identity_payload(dict(IDENTITY, study_uid=None), KEY, "k")


def test_identity_payload_round_trips_through_codec():
    data = identity_payload(IDENTITY, KEY, "k")
    assert len(data) == 8 and CODEC.decode(_logits(CODEC.encode(data))).data == data


# -- --payload HEX -----------------------------------------------------------------------------


@given(data8)
def test_parse_payload_hex_round_trip(data):
    assert parse_payload_hex(data.hex()) == data
    assert parse_payload_hex(" " + data.hex().upper() + "\n") == data


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "got 0 characters"),
        ("0011223344556677aa", "got 18 characters"),
        ("00112233445566", "got 14 characters"),
        ("00112233445566zz", "character 15"),
        ("0x11223344556677", "character 2"),
    ],
)
def test_parse_payload_hex_errors(text, fragment):
    with pytest.raises(PayloadError, match=fragment) as info:
        parse_payload_hex(text)
    if text:
        assert text not in str(info.value)


def test_parse_payload_hex_does_not_echo_long_input():
    secretish = "PATIENT-NAME-DOE-JOHN" * 50
    with pytest.raises(PayloadError) as info:
        parse_payload_hex(secretish)
    assert "PATIENT" not in str(info.value) and len(str(info.value)) < 120


def test_list_decoding_recovers_errors_on_the_weakest_bits():
    """Six wrong bits in six different bytes defeat Reed-Solomon (and its erasure retries) but not
    the Chase list when they are among the eight weakest: the common failure after noise."""
    codec = PayloadCodec()
    data = bytes.fromhex("0123456789abcdef")
    bits = codec.encode(data, "user")
    rng = np.random.default_rng(4)
    logits = (bits * 2.0 - 1.0) * rng.uniform(1.0, 3.0, 128)
    wrong = [3, 20, 41, 66, 90, 117]  # bytes 0, 2, 5, 8, 11, 14
    logits[wrong] = -0.1 * np.sign(logits[wrong])
    logits[[10, 55]] *= 0.05  # two weak but right bits among the eight weakest
    assert not codec.decode(logits).found
    listed = codec.decode_list(logits)
    assert listed.found and listed.data == data and listed.kind == "user"
    assert listed.bits_corrected == 6 and 0 < listed.confidence < 1
    assert not codec.decode_list(logits, flips=0).found, "no list: plain decoding"


def test_list_decoding_accepts_no_random_word():
    codec = PayloadCodec()
    rng = np.random.default_rng(99)
    assert not any(codec.decode_list(rng.standard_normal(128)).found for _ in range(40))
