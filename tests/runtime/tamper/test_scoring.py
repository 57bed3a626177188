"""The fingerprint scorer on real pydicom test images: alignment, benign steps, edits, masks."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medsec_edge.runtime.io.readers import read_image
from medsec_edge.runtime.tamper.fingerprint import compute_fingerprint, display_frames
from medsec_edge.runtime.tamper.scoring import DEFAULT_PARAMS, align, pixel_mask, score_displays


@pytest.fixture(scope="module")
def ct():
    image = read_image(get_testdata_file("CT_small.dcm", download=False))
    fp = compute_fingerprint(image)
    return fp, display_frames(image, fp.windows)[0][0]


def _jpeg(display: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.rint(display), 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf), dtype=np.float32)


def _resize(display: np.ndarray, scale: float) -> np.ndarray:
    h, w = display.shape
    img = Image.fromarray(display.astype(np.float32), mode="F")
    return np.asarray(img.resize((round(w * scale), round(h * scale)), Image.Resampling.BILINEAR))


def test_the_same_geometry_is_the_identity_and_scores_near_zero(ct):
    fp, display = ct
    result = score_displays(fp, [display])
    assert result.alignment.exact and result.covered_share == 1.0
    assert result.score < 1.0 and not result.tampered and result.regions == ()


@pytest.mark.parametrize(("scale", "crop"), [(0.75, None), (1.6, None), (1.0, (10, 5, 118, 110)),
                                             (0.6, (20, 3, 128, 100))])
def test_alignment_recovers_scale_and_crop_offset(ct, scale, crop):
    fp, display = ct
    part = display if crop is None else display[crop[0]:crop[2], crop[1]:crop[3]]
    test = _resize(part, scale) if scale != 1.0 else part
    a = align(fp.values[0], fp.cell, fp.shape_hw, test)
    assert a is not None and not a.exact
    assert a.scale == pytest.approx(scale, rel=0.02)
    # bilinear resampling maps test pixel i to source (i + 0.5) / s - 0.5: offset 0.5 / s - 0.5 more
    expect_y = (0 if crop is None else crop[0]) + 0.5 / scale - 0.5
    expect_x = (0 if crop is None else crop[1]) + 0.5 / scale - 0.5
    assert a.offset_y == pytest.approx(expect_y, abs=0.6) and a.offset_x == pytest.approx(expect_x, abs=0.6)


@pytest.mark.parametrize("step", ["jpeg75", "resize0.6", "crop", "noise"])
def test_benign_steps_stay_below_the_threshold(ct, step):
    fp, display = ct
    rng = np.random.default_rng(3)
    test = {
        "jpeg75": lambda: _jpeg(display, 75),
        "resize0.6": lambda: _resize(display, 0.6),
        "crop": lambda: display[7:121, 13:128],
        "noise": lambda: np.clip(display + rng.normal(0, 3, display.shape), 0, 255),
    }[step]()
    result = score_displays(fp, [test])
    assert not result.tampered, (step, result.score)
    assert result.score < DEFAULT_PARAMS.threshold / 2


def test_a_local_edit_is_found_where_it_is_also_after_export_and_crop(ct):
    fp, display = ct
    edited = display.copy()
    edited[48:80, 56:88] = np.clip(edited[48:80, 56:88] + 0.1 * 255, 0, 255)  # 32 px, 10% of the window
    for test, offset in ((edited, (0, 0)), (_jpeg(edited, 90)[8:, 4:], (8, 4))):
        result = score_displays(fp, [test])
        assert result.tampered and result.score > DEFAULT_PARAMS.threshold
        mask = pixel_mask(result, 0, fp.cell, test.shape, DEFAULT_PARAMS)
        truth = np.zeros(display.shape, bool)
        truth[48:80, 56:88] = True
        truth = truth[offset[0]:, offset[1]:]
        iou = (mask & truth).sum() / (mask | truth).sum()
        assert iou > 0.5, iou
        r = result.regions[0]
        assert r.y0 <= 48 + 8 and r.y1 >= 80 - 8 and r.x0 <= 56 + 8 and r.x1 >= 88 - 8


def test_an_unrelated_image_does_not_align_as_a_good_match(ct):
    fp, _ = ct
    other = read_image(get_testdata_file("MR_small.dcm", download=False))
    display = display_frames(other)[0][0]
    big = _resize(display, 1.7)
    a = align(fp.values[0], fp.cell, fp.shape_hw, big)
    assert a is None or a.match < 0.95
