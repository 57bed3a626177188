"""The tamper check at run time: detector input, components, operating points, verdicts, pipeline."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from medsec_edge.runtime.errors import BundleError, UsageError
from medsec_edge.runtime.io.image import ImageMeta, MedicalImage
from medsec_edge.runtime.tamper.checker import (
    MODEL_NAME,
    OperatingPoint,
    Region,
    TamperChecker,
    TamperVerdict,
    components,
)
from medsec_edge.runtime.tamper.detector_input import (
    CLIP,
    MAX_NATIVE_SIDE,
    STRIDE,
    detector_factor,
    detector_input,
    normalise,
)
from tests.tamper_fixtures import *  # noqa: F401,F403 - fixtures

ALL = OperatingPoint("all", 0.5, blind_logit=-1e9, wm_deficit=1e9, pixel_logit=-1e9)
NONE = OperatingPoint("none", 0.0, blind_logit=1e9, wm_deficit=1e9)


# --- tamper_input ------------------------------------------------------------------------------


def test_normalise_maps_the_window_to_0_1_and_clips():
    # window (center 100.5, width 201): lower = 0, upper = 200 in modality units
    meta = ImageMeta(bits_stored=12, signed=True, window=(100.5, 201.0))
    frame = np.array([[0, 200, 100, 50], [-1000, 1000, 300, -100]], dtype=np.int16)
    x = normalise(frame, meta)
    assert x.dtype == np.float32 and x.shape == frame.shape
    np.testing.assert_allclose(x, [[0.0, 1.0, 0.5, 0.25], [CLIP[0], CLIP[1], 1.5, -0.5]], atol=1e-6)
    # rescale slope/intercept apply first: modality = 2 * stored - 100, so stored 50 -> 0, 150 -> 1
    rescaled = replace(meta, slope=2.0, intercept=-100.0)
    np.testing.assert_allclose(normalise(np.array([[50, 150, 100]], np.int16), rescaled), [[0.0, 1.0, 0.5]],
                               atol=1e-6)
    # MONOCHROME1 is not inverted (forensics does not care which way is bright)
    np.testing.assert_array_equal(normalise(frame, replace(meta, photometric="MONOCHROME1")), x)


def test_normalise_keeps_over_and_under_exposure_up_to_the_clip():
    meta = ImageMeta(bits_stored=16, signed=False, window=(100.5, 201.0))
    x = normalise(np.array([[240, 260, 400, 65535]], np.uint16), meta)
    np.testing.assert_allclose(x, [[1.2, 1.3, 1.5, 1.5]], atol=1e-6)


def test_normalise_reduces_colour_to_luma():
    meta = ImageMeta(bits_stored=8, signed=False, photometric="RGB")
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[0, 1] = (0, 255, 0)
    rgb[0, 2] = (0, 0, 255)
    rgb[1, :] = (255, 255, 255)
    x = normalise(rgb, meta)
    assert x.shape == (2, 3)
    np.testing.assert_allclose(x, [[0.299, 0.587, 0.114], [1.0, 1.0, 1.0]], atol=1e-5)


@pytest.mark.parametrize(("shape", "factor", "padded"), [
    ((64, 64), 1, (64, 64)),
    ((61, 70), 1, (64, 72)),
    ((2048, 40), 1, (2048, 40)),
    ((2049, 9), 2, (1032, 8)),
    ((3000, 40), 2, (1504, 24)),
    ((40, 3000), 2, (24, 1504)),
    ((4097, 16), 3, (1368, 8)),
])
def test_detector_input_pads_to_the_stride_and_box_averages_large_frames(shape, factor, padded):
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, shape).astype(np.uint8)
    meta = ImageMeta(bits_stored=8, signed=False, window=(128.0, 256.0))
    x, f = detector_input(frame, meta)
    assert f == factor == detector_factor(shape)
    assert max(shape) / f <= MAX_NATIVE_SIDE
    assert x.shape == (1, 1, *padded) and x.dtype == np.float32 and x.flags["C_CONTIGUOUS"]
    assert padded[0] % STRIDE == 0 and padded[1] % STRIDE == 0
    h, w = -(-shape[0] // f), -(-shape[1] // f)
    assert padded == (-(-h // STRIDE) * STRIDE, -(-w // STRIDE) * STRIDE)
    norm = normalise(frame, meta)
    hh, ww = shape[0] // f, shape[1] // f  # whole blocks only
    blocks = norm[:hh * f, :ww * f].reshape(hh, f, ww, f).mean(axis=(1, 3))
    np.testing.assert_allclose(x[0, 0, :hh, :ww], blocks, atol=1e-5)
    # padding replicates the last row / column
    np.testing.assert_array_equal(x[0, 0, h:, :w], np.broadcast_to(x[0, 0, h - 1, :w], (padded[0] - h, w)))
    np.testing.assert_array_equal(x[0, 0, :, w:], np.broadcast_to(x[0, 0, :, w - 1:w], (padded[0], padded[1] - w)))


# --- components and operating points -----------------------------------------------------------


def test_components_boxes_areas_and_order():
    mask = np.zeros((10, 12), bool)
    mask[1:4, 1:5] = True  # 3x4 rectangle, area 12
    mask[6, 1:4] = True  # an L: 3 + 2 = area 5
    mask[7:9, 1] = True
    mask[0, 9] = True  # single pixel
    mask[1, 10] = True  # touches it only diagonally: a separate component (4-connectivity)
    mask[5:10, 8:10] = True  # 5x2 block, area 10
    mask[9, 10:12] = True  # attached to it: area 12, box rows 5..9, cols 8..11
    got = components(mask)
    assert got[:3] == [(1, 4, 1, 5, 12), (5, 10, 8, 12, 12), (6, 9, 1, 4, 5)] or \
        got[:3] == [(5, 10, 8, 12, 12), (1, 4, 1, 5, 12), (6, 9, 1, 4, 5)]
    assert sorted(got[3:]) == [(0, 1, 9, 10, 1), (1, 2, 10, 11, 1)]
    assert [b[4] for b in got] == sorted((b[4] for b in got), reverse=True)
    assert sum(b[4] for b in got) == mask.sum()
    assert components(np.zeros((4, 4), bool)) == []
    assert components(np.ones((3, 5), bool)) == [(0, 3, 0, 5, 15)]


def test_components_of_a_large_region_do_not_recurse():
    mask = np.ones((300, 300), bool)  # 90k pixels: a recursive flood fill would overflow
    mask[150, :] = False
    assert components(mask) == [(0, 150, 0, 300, 45000), (151, 300, 0, 300, 44700)]


def test_operating_point_from_dict():
    op = OperatingPoint.from_dict("fpr1", {"target_fpr": 0.01, "blind_logit": "1.5", "wm_deficit": 6})
    assert op == OperatingPoint("fpr1", 0.01, 1.5, 6.0, 0.0)
    assert OperatingPoint.from_dict("x", {"target_fpr": 0.01, "blind_logit": 1, "wm_deficit": 2,
                                          "pixel_logit": -0.5}).pixel_logit == -0.5


@pytest.mark.parametrize("data", [
    {"blind_logit": 1.0, "wm_deficit": 2.0},  # no target_fpr
    {"target_fpr": 0.01, "wm_deficit": 2.0},  # no blind_logit
    {"target_fpr": 0.01, "blind_logit": "high", "wm_deficit": 2.0},
    {"target_fpr": 0.01, "blind_logit": None, "wm_deficit": 2.0},
    {"target_fpr": 0.01, "blind_logit": 1.0, "wm_deficit": [2.0]},
    {"target_fpr": 0.01, "blind_logit": 1.0, "wm_deficit": 2.0, "pixel_logit": "x"},
])
def test_malformed_operating_point_is_a_bundle_error(data):
    with pytest.raises(BundleError, match="operating point 'fpr1' is malformed"):
        OperatingPoint.from_dict("fpr1", data)


def test_regions_are_cells_scaled_to_native_pixels_and_clipped_to_the_frame():
    cells = np.zeros((4, 5), bool)
    cells[2:4, 1:3] = True
    cells[0, 4] = True
    regions = TamperChecker._regions(cells, 4.0, 3, "blind", (14, 18))
    assert regions == [Region(4, 8, 8, 6, 3, "blind"), Region(16, 0, 2, 4, 3, "blind")]


# --- the checker on a real bundle --------------------------------------------------------------


@pytest.fixture
def bundle(tamper_env):
    from medsec_edge.runtime.bundle import open_bundle

    return open_bundle(tamper_env.calibrated)


@pytest.fixture
def watermarker(bundle):
    from medsec_edge.runtime.watermark.watermarker import Watermarker
    from medsec_edge.runtime.watermark.models import BundleWatermarkModels

    return Watermarker(BundleWatermarkModels(bundle, threads=1))


def _checker(bundle, watermarker=None, key=None, **ops) -> TamperChecker:
    points = {name: replace(op, name=name) for name, op in ops.items()}
    return TamperChecker(bundle.session(MODEL_NAME, threads=1), points, watermarker, key)


def test_checker_needs_operating_points(bundle):
    with pytest.raises(BundleError, match="no tamper operating points"):
        TamperChecker(bundle.session(MODEL_NAME, threads=1), {})


def test_a_bundle_without_a_detector_is_refused(tamper_env):
    from medsec_edge.runtime.pipeline import load_checker

    with pytest.raises(BundleError, match="no 'tamper_detector' model.*export tamper"):
        load_checker(tamper_env.no_detector, threads=1)


def test_check_real_image_verdict_follows_the_frozen_threshold(tamper_env, ct_image):
    from medsec_edge.runtime.pipeline import load_checker

    checker = load_checker(tamper_env.calibrated, threads=1)
    assert set(checker.operating_points) == {"fpr1", "fpr0.1"}
    verdict = checker.check(ct_image)
    assert isinstance(verdict, TamperVerdict)
    assert verdict.operating_point == "fpr0.1"  # the default
    assert isinstance(verdict.tampered, bool) and isinstance(verdict.score, float)
    assert isinstance(verdict.blind_logit, float) and math.isfinite(verdict.blind_logit)
    assert verdict.score == pytest.approx(1 / (1 + math.exp(-verdict.blind_logit)))
    assert verdict.watermark == "absent" and verdict.watermark_deficit is None
    assert isinstance(verdict.reasons, tuple) and isinstance(verdict.regions, tuple)
    assert verdict.mask.shape == ct_image.shape_hw == (128, 128) and verdict.mask.dtype == bool
    assert verdict.mask_frame == 0
    assert {"blind_ms", "watermark_ms", "total_ms"} <= set(verdict.timings_ms)
    # the decision is the manifest's threshold, nothing else (no watermark on this image)
    op = checker.operating_point(None)
    assert verdict.tampered == (verdict.blind_logit >= op.blind_logit)
    assert verdict.reasons == (("blind detector",) if verdict.tampered else ())
    if not verdict.tampered:
        assert not verdict.mask.any() and verdict.regions == ()
    # the same frame through the detector directly gives the same logit
    assert checker.blind(ct_image.pixels, ct_image.meta).logit == pytest.approx(verdict.blind_logit)
    row = verdict.to_dict()
    text = json.dumps(row, allow_nan=False)
    assert json.loads(text) == row
    assert set(row) == {"tampered", "score", "operating_point", "watermark", "payload_kind", "watermark_deficit",
                        "reasons", "regions"}
    assert row["payload_kind"] is None  # nothing found
    assert checker.check(ct_image, "fpr0.1").operating_point == "fpr0.1"


@pytest.mark.parametrize("shape", [(128, 128), (100, 90), (2100, 64)])
def test_blind_rule_flags_with_a_threshold_below_any_logit(bundle, ct_image, shape):
    pixels = np.resize(ct_image.pixels, shape) if shape[0] > 128 else ct_image.pixels[:shape[0], :shape[1]]
    image = MedicalImage(np.ascontiguousarray(pixels), ct_image.meta)
    checker = _checker(bundle, all=ALL, none=NONE)
    verdict = checker.check(image, "all")
    assert verdict.tampered is True and verdict.reasons == ("blind detector",)
    assert verdict.operating_point == "all"
    assert verdict.mask.shape == shape and verdict.mask.all()  # pixel_logit -1e9: every cell
    # one region, the whole frame: cells (at 1/4, or 1/8 after box averaging) scaled and clipped
    assert verdict.regions == (Region(0, 0, shape[1], shape[0], 0, "blind"),)
    quiet = checker.check(image, "none")
    assert quiet.tampered is False and quiet.reasons == () and quiet.regions == ()
    assert not quiet.mask.any() and quiet.mask.shape == shape
    assert quiet.blind_logit == pytest.approx(verdict.blind_logit)


def test_regions_stay_inside_the_frame_at_the_calibrated_pixel_threshold(bundle, ct_image):
    op = replace(ALL, pixel_logit=bundle.manifest.calibration["tamper"]["operating_points"]["fpr1"]["pixel_logit"])
    verdict = _checker(bundle, low=op).check(ct_image, "low")
    assert verdict.tampered and verdict.reasons == ("blind detector",)
    for r in verdict.regions:
        assert r.source == "blind" and r.frame == 0
        assert 0 <= r.x and 0 <= r.y and r.width > 0 and r.height > 0
        assert r.x + r.width <= 128 and r.y + r.height <= 128
        assert verdict.mask[r.y:r.y + r.height, r.x:r.x + r.width].any()


def test_multi_frame_mask_is_the_frame_with_the_highest_score(bundle, ct_image):
    frames = [ct_image.pixels[::-1, :], ct_image.pixels, ct_image.pixels[:, ::-1].copy() // 2]
    image = MedicalImage(np.ascontiguousarray(np.stack(frames)), ct_image.meta)
    checker = _checker(bundle, all=ALL)
    logits = [checker.blind(f, ct_image.meta).logit for f in frames]
    assert len(set(np.round(logits, 6))) == 3, "frames must differ for this test to mean anything"
    verdict = checker.check(image, "all")
    assert verdict.mask_frame == int(np.argmax(logits))
    assert verdict.blind_logit == pytest.approx(max(logits))
    assert {r.frame for r in verdict.regions} == {verdict.mask_frame}


def test_unknown_operating_point_is_a_usage_error(bundle, ct_image):
    checker = _checker(bundle, **{"fpr1": NONE, "fpr0.1": NONE})
    with pytest.raises(UsageError, match="unknown operating point 'fpr5'.*fpr1"):
        checker.check(ct_image, "fpr5")
    assert checker.operating_point(None).name == "fpr0.1"  # None is the default, fpr0.1
    custom = _checker(bundle, custom=NONE)
    with pytest.raises(UsageError, match="unknown operating point 'fpr0.1': this bundle has custom"):
        custom.check(ct_image)  # the default is not in this checker


def test_watermark_absent_present_and_mismatch(bundle, watermarker, ct_image, tmp_path):
    from medsec_edge.runtime.crypto.watermark_key import create_key
    from medsec_edge.runtime.watermark.identity import payload_for

    key = create_key(tmp_path / "wm.key")
    other = create_key(tmp_path / "other.key")
    with_key = _checker(bundle, watermarker, key, none=NONE)
    keyless = _checker(bundle, watermarker, None, none=NONE)

    absent = with_key.check(ct_image, "none")
    assert absent.watermark == "absent" and absent.watermark_deficit is None and not absent.tampered

    own, mode = payload_for(ct_image, key, None)
    assert mode == "identity-hmac"
    marked = replace(ct_image, pixels=watermarker.embed(ct_image, own).pixels)
    present = with_key.check(marked, "none")
    assert present.watermark == "present" and present.tampered is False and present.reasons == ()
    assert present.payload_kind == "identity" and present.to_dict()["payload_kind"] == "identity"
    assert isinstance(present.watermark_deficit, float) and math.isfinite(present.watermark_deficit)
    assert "watermark_ms" in present.timings_ms

    foreign, _ = payload_for(ct_image, other, None)  # the identity MAC under another key
    assert foreign != own
    stranger = replace(ct_image, pixels=watermarker.embed(ct_image, foreign).pixels)
    mismatch = with_key.check(stranger, "none")
    assert mismatch.watermark == "mismatch" and mismatch.tampered is True
    assert mismatch.reasons == ("watermark names another image",)
    assert mismatch.to_dict()["watermark"] == "mismatch"
    # without a key the identity cannot be told: the watermark is just present
    assert keyless.check(stranger, "none").watermark == "present"
    # arbitrary bytes marked as an identity MAC are another image's identity
    posing = replace(ct_image, pixels=watermarker.embed(ct_image, bytes(range(8)), kind="identity").pixels)
    assert with_key.check(posing, "none").watermark == "mismatch"


def test_a_user_payload_is_present_never_a_mismatch(bundle, watermarker, ct_image, tmp_path):
    """`embed --payload HEX` then `check` with the key: the user's bytes name no image, so they
    cannot name another one (before payload kinds this read `mismatch`, tampered)."""
    from medsec_edge.runtime.crypto.watermark_key import create_key
    from medsec_edge.runtime.watermark.identity import identity_match, payload_for

    key = create_key(tmp_path / "wm.key")
    payload, mode = payload_for(ct_image, key, bytes.fromhex("0123456789abcdef"))
    assert mode == "explicit"
    user = replace(ct_image, pixels=watermarker.embed(ct_image, payload, kind="user").pixels)
    extraction = watermarker.extract(user)
    assert extraction.found and extraction.payload == "0123456789abcdef" and extraction.payload_kind == "user"
    assert identity_match(user, extraction, key) is None
    verdict = _checker(bundle, watermarker, key, none=NONE).check(user, "none", extraction=extraction)
    assert verdict.watermark == "present" and verdict.payload_kind == "user"
    assert verdict.tampered is False and verdict.reasons == ()
    row = verdict.to_dict()
    assert row["watermark"] == "present" and row["payload_kind"] == "user" and row["tampered"] is False
    # The local map is built from the user code word that was embedded, not the identity one.
    assert verdict.watermark_deficit is not None
    assert extraction.reading.code_bits.tolist() == watermarker.codec.encode(payload, "user").tolist()


def test_watermark_rule_flags_a_region_at_its_threshold(bundle, watermarker, ct_image):
    marked = replace(ct_image, pixels=watermarker.embed(ct_image, bytes(range(8))).pixels)
    loose = replace(NONE, wm_deficit=-1e9)  # any readable window counts as lost
    checker = _checker(bundle, watermarker, None, none=NONE, loose=loose)
    extraction = watermarker.extract(marked)
    assert extraction.found
    maps = checker.watermark_map(marked, extraction)
    assert [index for index, _ in maps] == [0]
    cmap = maps[0][1]
    assert cmap.deficit_z.shape == extraction.reading.signals[0].shape

    quiet = checker.check(marked, "none", extraction=extraction)
    assert quiet.watermark == "present" and not quiet.tampered
    assert quiet.watermark_deficit == pytest.approx(cmap.score)

    flagged = checker.check(marked, "loose", extraction=extraction)
    assert flagged.tampered and flagged.reasons == ("watermark lost in a region",)
    assert flagged.regions and {r.source for r in flagged.regions} == {"watermark"}
    assert flagged.mask.shape == (128, 128) and flagged.mask.any()
    for r in flagged.regions:
        assert r.x + r.width <= 128 and r.y + r.height <= 128


# --- the pipeline's check stage ----------------------------------------------------------------


def test_watermark_file_refuses_a_tampered_image_and_keeps_it_aside(tamper_env, ct_path, tmp_path):
    from medsec_edge.runtime.crypto.watermark_key import create_key
    from medsec_edge.runtime.pipeline import load_checker, load_watermarker, watermark_file

    key = create_key(tmp_path / "wm.key")
    watermarker, bndl = load_watermarker(tamper_env.strict, threads=1)
    checker = load_checker(tamper_env.strict, key=key, threads=1)
    assert checker.key is key and checker.watermarker is not None
    before = ct_path.read_bytes()
    out = tmp_path / "out" / "ct.dcm"
    aside = tmp_path / "out" / "tampered" / "ct.dcm"
    record = watermark_file(ct_path, out, watermarker, bndl, key, None, checker=checker, aside_path=aside)
    assert record.status == "tampered" and record.output == str(aside)
    assert record.reason.startswith("tamper check: blind detector") and "not watermarked" in record.reason
    assert record.tamper["tampered"] is True and record.tamper["reasons"] == ["blind detector"]
    assert "check" in record.latency_ms and "embed" not in record.latency_ms
    assert not out.exists()
    assert aside.read_bytes() == before == ct_path.read_bytes()
    reason = json.loads(aside.with_name("ct.dcm.reason.json").read_text())
    assert reason["tampered"] is True and reason["image_id"] == record.image_id
    assert sorted(p.name for p in aside.parent.iterdir()) == ["ct.dcm", "ct.dcm.reason.json"]
    # without aside_path nothing is written at all
    bare = watermark_file(ct_path, out, watermarker, bndl, key, None, checker=checker)
    assert bare.status == "tampered" and bare.output is None and not out.exists()


def test_watermark_file_with_a_passing_check_watermarks(tamper_env, ct_path, tmp_path):
    from medsec_edge.runtime.crypto.watermark_key import create_key
    from medsec_edge.runtime.pipeline import load_checker, load_watermarker, watermark_file

    key = create_key(tmp_path / "wm.key")
    watermarker, bndl = load_watermarker(tamper_env.lenient, threads=1)
    checker = load_checker(tamper_env.lenient, key=key, threads=1)
    out = tmp_path / "out" / "ct.dcm"
    out.parent.mkdir()  # as `run` does: write_image wants the folder to exist
    record = watermark_file(ct_path, out, watermarker, bndl, key, None, checker=checker,
                            aside_path=tmp_path / "out" / "tampered" / "ct.dcm")
    assert record.status == "ok" and record.output == str(out) and out.exists()
    assert record.tamper == {"tampered": False, "score": record.tamper["score"], "watermark": "absent",
                             "reasons": [], "regions": []}
    assert {"check", "embed", "verify", "write"} <= set(record.latency_ms)
    assert not (tmp_path / "out" / "tampered").exists()
    # the written image passes the check with the same key: watermark present and its own
    from medsec_edge.runtime.io.readers import read_image

    assert checker.check(read_image(out)).watermark == "present"
