"""Tamper-check latency at 512x512 and 2048x2048 16-bit, beside the classical baselines.

Run: python -m pytest benchmarks/test_tamper_bench.py -q --benchmark-group-by=group
Targets (issue 3): the full check <= 30 ms median at 512x512 and <= 300 ms at 2048x2048 on 2 CPU
cores. Timed in the same run on the same image: the noise-residual forensic baseline and a
SHA-256 of the pixels (the hash/signature baseline's cost). Every benchmark checks its result.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

PAYLOAD = bytes.fromhex("0123456789abcdef")


@pytest.fixture(scope="module")
def checker(watermarker):
    from medsec_edge.runtime.bundle import open_bundle
    from medsec_edge.runtime.pipeline import default_bundle_path
    from medsec_edge.runtime.tamper.checker import MODEL_NAME, TamperChecker

    bundle = open_bundle(default_bundle_path())
    if MODEL_NAME not in bundle.manifest.models:
        pytest.skip("the default bundle has no tamper detector (medsec-edge export tamper)")
    return TamperChecker.from_bundle(bundle, watermarker=watermarker, threads=2)


def _pick(image_512, image_2048, size):
    return image_512 if size == "512" else image_2048


@pytest.mark.parametrize("size", ["512", "2048"])
def test_check_unmarked(benchmark, checker, image_512, image_2048, size):
    """What `run` pays before watermarking an incoming (unmarked) image."""
    image = _pick(image_512, image_2048, size)
    benchmark.group = f"check {size}x{size} 16-bit"
    benchmark.name = "medsec-edge check (unmarked input)"
    checker.check(image)
    verdict = benchmark(checker.check, image)
    assert verdict.watermark == "absent" and 0.0 <= verdict.score <= 1.0


@pytest.mark.parametrize("size", ["512", "2048"])
def test_check_marked(benchmark, checker, watermarker, image_512, image_2048, size):
    """`check` of one of our outputs: blind detector + watermark read + local map."""
    image = _pick(image_512, image_2048, size)
    marked = replace(image, pixels=watermarker.embed(image, PAYLOAD).pixels)
    benchmark.group = f"check {size}x{size} 16-bit"
    benchmark.name = "medsec-edge check (watermarked)"
    checker.check(marked)
    verdict = benchmark(checker.check, marked)
    assert verdict.watermark == "present" and verdict.watermark_deficit is not None


@pytest.mark.parametrize("size", ["512", "2048"])
def test_noise_residual(benchmark, image_512, image_2048, size):
    from medsec_edge.evaluation.forensic_baselines import NoiseResidualBaseline

    image = _pick(image_512, image_2048, size)
    frame = image.pixels.astype(np.float64)
    baseline = NoiseResidualBaseline()
    benchmark.group = f"check {size}x{size} 16-bit"
    benchmark.name = "noise residual (classical)"
    score = benchmark(baseline.score, frame)
    assert np.isfinite(score)


@pytest.mark.parametrize("size", ["512", "2048"])
def test_sha256(benchmark, image_512, image_2048, size):
    from medsec_edge.evaluation.forensic_baselines import HashBaseline

    image = _pick(image_512, image_2048, size)
    reference = HashBaseline.reference(image.pixels)
    benchmark.group = f"check {size}x{size} 16-bit"
    benchmark.name = "SHA-256 of the pixels (hash baseline)"
    assert benchmark(HashBaseline.verdict, reference, image.pixels) is False
