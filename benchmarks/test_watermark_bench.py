"""Embed and extract latency at 512x512 and 2048x2048 16-bit, beside invisible-watermark's dwtDct.

Run: python -m pytest benchmarks -q --benchmark-group-by=group --benchmark-columns=median,mean,min,max
Every benchmark also checks its result; the dwtDct peer is timed in the same run on the same
image's 8-bit display (it needs 8-bit input), so the ratio is meaningful on a noisy machine.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from medsec_edge.runtime.io.image import display_window

PAYLOAD = bytes.fromhex("0123456789abcdef")


def _display_u8(image) -> np.ndarray:
    return np.rint(display_window(image.meta, image.pixels).to_display(image.pixels)).astype(np.uint8)


@pytest.fixture(scope="module")
def dwtdct():
    from medsec_edge.evaluation.baselines import BASELINES

    peer = BASELINES["dwtDct"]()
    if not peer.is_available():
        pytest.skip("invisible-watermark is not installed (pip install 'medsec-edge[baselines]')")
    return peer


@pytest.mark.parametrize("size", ["512", "2048"])
def test_embed(benchmark, watermarker, image_512, image_2048, size):
    image = image_512 if size == "512" else image_2048
    benchmark.group = f"embed {size}x{size} 16-bit"
    benchmark.name = "medsec-edge"
    result = benchmark(watermarker.embed, image, PAYLOAD)
    marked = replace(image, pixels=result.pixels)
    assert watermarker.extract(marked).payload == PAYLOAD.hex()


@pytest.mark.parametrize("size", ["512", "2048"])
def test_extract(benchmark, watermarker, image_512, image_2048, size):
    image = image_512 if size == "512" else image_2048
    benchmark.group = f"extract {size}x{size} 16-bit"
    benchmark.name = "medsec-edge"
    marked = replace(image, pixels=watermarker.embed(image, PAYLOAD).pixels)
    ex = benchmark(watermarker.extract, marked)
    assert ex.found and ex.payload == PAYLOAD.hex()


@pytest.mark.parametrize("size", ["512", "2048"])
def test_extract_unmarked(benchmark, watermarker, image_512, image_2048, size):
    """The common case beside a scanner: no mark, answered by the presence gate (issue 11)."""
    image = image_512 if size == "512" else image_2048
    benchmark.group = f"extract unmarked {size}x{size} 16-bit"
    benchmark.name = "medsec-edge"
    ex = benchmark(watermarker.extract, image)
    assert not ex.found


@pytest.mark.parametrize("size", ["512", "2048"])
def test_dwtdct_embed(benchmark, dwtdct, image_512, image_2048, size):
    image = image_512 if size == "512" else image_2048
    benchmark.group = f"embed {size}x{size} 16-bit"
    benchmark.name = "dwtDct (8-bit display)"
    bits = np.random.default_rng(0).integers(0, 2, 64).astype(bool)
    display = _display_u8(image)
    marked = benchmark(dwtdct.embed, display, bits)
    assert marked.shape == display.shape and not np.array_equal(marked, display)


@pytest.mark.parametrize("size", ["512", "2048"])
def test_dwtdct_extract(benchmark, dwtdct, image_512, image_2048, size):
    image = image_512 if size == "512" else image_2048
    benchmark.group = f"extract {size}x{size} 16-bit"
    benchmark.name = "dwtDct (8-bit display)"
    bits = np.random.default_rng(0).integers(0, 2, 64).astype(bool)
    marked = dwtdct.embed(_display_u8(image), bits)
    got = benchmark(dwtdct.extract, marked)
    assert np.mean(got == bits) >= 0.8
