"""Content fingerprint latency at 512x512 and 2048x2048 16-bit, beside SHA-256 of the same pixels.

Run: python -m pytest benchmarks/test_fingerprint_bench.py -q --benchmark-group-by=group
Targets (issue 9, 2 CPU cores): creation (compute, encode, sign) adds <= 5 ms to `run` at
512x512; the check with the fingerprint (verify, recompute, compare) <= 30 ms at 512x512 and
<= 300 ms at 2048x2048. SHA-256 of the pixel bytes, the cost of the exact check the seal already
makes, is timed in the same run as the reference. Every benchmark checks its result.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from medsec_edge.runtime.crypto.keyset import SealSigner
from medsec_edge.runtime.tamper.fingerprint import (
    DEFAULT_THRESHOLD,
    compare,
    compute_fingerprint,
    sign_fingerprint,
    verify_fingerprint,
)


@pytest.fixture(scope="module")
def signer() -> SealSigner:
    return SealSigner.generate()


def _pick(image_512, image_2048, size):
    return image_512 if size == "512" else image_2048


def _create(image, signer):
    return sign_fingerprint(compute_fingerprint(image), signer)


def _check(blob, verifier, image):
    recorded = verify_fingerprint(blob, [verifier])
    return compare(recorded, image)


@pytest.mark.parametrize("size", ["512", "2048"])
def test_fingerprint_create(benchmark, signer, image_512, image_2048, size):
    """What `run` adds per image: compute the fingerprint, encode it, sign it."""
    image = _pick(image_512, image_2048, size)
    benchmark.group = f"fingerprint {size}x{size} 16-bit"
    benchmark.name = "fingerprint create (compute + encode + sign)"
    blob = benchmark(_create, image, signer)
    assert len(blob) <= (4096 if size == "512" else 65536)
    assert verify_fingerprint(blob, [signer.verifier]) is not None


@pytest.mark.parametrize("size", ["512", "2048"])
def test_fingerprint_check(benchmark, signer, image_512, image_2048, size):
    """What `check` adds when the seal is broken: verify the record, recompute, compare."""
    image = _pick(image_512, image_2048, size)
    blob = _create(image, signer)
    benchmark.group = f"fingerprint {size}x{size} 16-bit"
    benchmark.name = "fingerprint check (verify + recompute + compare)"
    deviation = benchmark(_check, blob, signer.verifier, image)
    assert deviation.compared and deviation.max_deviation <= 0.25 + 1e-3
    assert deviation.regions(DEFAULT_THRESHOLD) == []


@pytest.mark.parametrize("size", ["512", "2048"])
def test_sha256_of_the_pixels(benchmark, image_512, image_2048, size):
    """The reference: SHA-256 over the same pixel bytes (what the seal's exact check costs)."""
    image = _pick(image_512, image_2048, size)
    pixels = np.ascontiguousarray(image.pixels)
    expected = hashlib.sha256(pixels.tobytes()).hexdigest()
    benchmark.group = f"fingerprint {size}x{size} 16-bit"
    benchmark.name = "SHA-256 of the pixel bytes (reference)"
    digest = benchmark(lambda: hashlib.sha256(memoryview(pixels).cast("B")).hexdigest())
    assert digest == expected
