"""Every registry attack: documented kind and shape, deterministic per seed, really changes pixels."""

import math

import numpy as np
import pytest

from medsec_edge.evaluation.attacks import (
    ATTACK_SERIES,
    ATTACKS,
    AttackedFrame,
    apply_series,
    attack_image,
    attacked_image,
    get_attack,
)
from medsec_edge.runtime.errors import UsageError
from medsec_edge.runtime.io.image import ImageMeta, MedicalImage, display_window

EXPECTED_NAMES = [
    "none", "jpeg90", "jpeg75", "jpeg50", "j2k10", "j2k20", "noise1", "noise2", "blur1",
    "resize0.75", "resize0.5", "crop50", "crop25", "rot2", "rot5", "export8", "crop70_jpeg75",
]  # fmt: skip
DISPLAY8 = {"jpeg90", "jpeg75", "jpeg50", "export8", "crop70_jpeg75"}


def _texture(h, w, rng, lo, hi):
    y, x = np.mgrid[:h, :w]
    base = 0.5 + 0.3 * np.sin(x / 7.0) * np.cos(y / 11.0) + rng.normal(0, 0.08, (h, w))
    return lo + np.clip(base, 0, 1) * (hi - lo)


def _images() -> dict[str, MedicalImage]:
    rng = np.random.default_rng(42)
    u16 = np.rint(_texture(512, 512, rng, 0, 4095)).astype(np.uint16)
    u8 = np.rint(_texture(256, 256, rng, 10, 240)).astype(np.uint8)
    small = np.rint(_texture(64, 64, rng, 200, 3000)).astype(np.uint16)
    rgb = np.stack([np.rint(_texture(96, 128, rng, 0, 255)).astype(np.uint8) for _ in range(3)], axis=-1)
    return {
        "u16_12bit": MedicalImage(u16, ImageMeta(bits_stored=12, signed=False, window=(2048, 3000))),
        "u8": MedicalImage(u8, ImageMeta(bits_stored=8, signed=False, source_format="png")),
        "small64": MedicalImage(small, ImageMeta(bits_stored=12, signed=False, photometric="MONOCHROME1")),
        "rgb": MedicalImage(rgb, ImageMeta(bits_stored=8, signed=False, photometric="RGB")),
    }


IMAGES = _images()


def _expected_hw(name, h, w):
    side = {"crop50": 0.5, "crop25": 0.25, "crop70_jpeg75": 0.7}
    if name in side:
        s = math.sqrt(side[name])
        return round(h * s), round(w * s)
    if name.startswith("resize"):
        s = float(name[len("resize") :])
        return round(h * s), round(w * s)
    return h, w


def test_registry_has_exactly_the_shared_names():
    assert list(ATTACKS) == EXPECTED_NAMES
    with pytest.raises(UsageError):
        get_attack("jpeg10")


@pytest.mark.parametrize("image_name", list(IMAGES))
@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_attack_kind_shape_determinism_and_effect(name, image_name):
    image = IMAGES[image_name]
    frame = image.pixels
    window = display_window(image.meta, frame)
    h, w = frame.shape[:2]

    out = attack_image(image, name, np.random.default_rng(7))
    again = attack_image(image, name, np.random.default_rng(7))
    np.testing.assert_array_equal(out.pixels, again.pixels)

    assert out.pixels.shape[:2] == _expected_hw(name, h, w)
    assert out.pixels.shape[2:] == frame.shape[2:]
    if name in DISPLAY8:
        assert out.pixels.dtype == np.uint8
        assert out.meta.bits_stored == 8 and out.meta.window is None and not out.meta.signed
        assert out.meta.photometric == ("RGB" if image.meta.is_colour else "MONOCHROME2")
        # Compare with the plain windowed export: compression must change it.
        reference = np.rint(window.to_display(frame)).astype(np.uint8)
        if name == "export8":
            np.testing.assert_array_equal(out.pixels, reference)
        elif name.startswith("jpeg"):
            assert not np.array_equal(out.pixels, reference)
    else:
        assert out.pixels.dtype == frame.dtype
        assert out.meta == image.meta
        hi = 2**image.meta.bits_stored - 1
        assert out.pixels.min() >= 0 and out.pixels.max() <= hi
        if out.pixels.shape == frame.shape:
            changed = not np.array_equal(out.pixels, frame)
            assert changed == (name != "none")


def test_crops_are_unresized_near_centre_sub_blocks():
    h = w = 200
    frame = (np.arange(h)[:, None] * 1000 + np.arange(w)[None, :]).astype(np.int32)  # value = position
    window = display_window(ImageMeta(32, True), frame)
    for seed in range(5):
        for area in (0.5, 0.25):
            out = get_attack(f"crop{int(area * 100)}")(frame, window, np.random.default_rng(seed)).pixels
            y0, x0 = divmod(int(out[0, 0]), 1000)
            np.testing.assert_array_equal(out, frame[y0 : y0 + out.shape[0], x0 : x0 + out.shape[1]])
            free_y = h - out.shape[0]
            assert abs(y0 - free_y // 2) <= free_y // 4


def test_crop_offset_depends_on_the_seed():
    frame = (np.arange(300)[:, None] * 1000 + np.arange(300)[None, :]).astype(np.int32)
    window = display_window(ImageMeta(32, True), frame)
    corners = {int(get_attack("crop25")(frame, window, np.random.default_rng(s)).pixels[0, 0]) for s in range(8)}
    assert len(corners) > 1


def test_noise_sigma_is_a_fraction_of_the_frame_range():
    frame = np.full((256, 256), 1000, dtype=np.uint16)
    frame[0, 0], frame[0, 1] = 500, 2500  # range 2000 -> sigma 20 (1%) and 40 (2%)
    window = display_window(ImageMeta(12, False), frame)
    for name, sigma in (("noise1", 20.0), ("noise2", 40.0)):
        out = ATTACKS[name](frame, window, np.random.default_rng(0), value_range=(0, 4095)).pixels
        measured = np.std(out[1:].astype(np.float64) - 1000)
        assert measured == pytest.approx(sigma, rel=0.05)


def test_stored_results_are_clipped_to_bits_stored():
    frame = np.full((64, 64), 4090, dtype=np.uint16)
    frame[0, 0] = 0
    image = MedicalImage(frame, ImageMeta(bits_stored=12, signed=False))
    out = attack_image(image, "noise2", np.random.default_rng(0))
    assert out.pixels.max() == 4095  # clipped to BitsStored, not to the uint16 range


def test_rotation_fills_corners_with_the_frame_minimum():
    frame = np.full((128, 128), 3000, dtype=np.uint16)
    frame[60:68, 60:68] = 700
    window = display_window(ImageMeta(12, False), frame)
    out = ATTACKS["rot5"](frame, window, np.random.default_rng(0)).pixels
    assert out[0, 0] == 700 and out[-1, -1] == 700
    assert out[64, 64] == 700 and out[64, 10] == 3000


def test_j2k_keeps_native_depth_and_sign():
    rng = np.random.default_rng(5)
    frame = np.rint(_texture(128, 128, rng, -1024, 1500)).astype(np.int16)
    image = MedicalImage(frame, ImageMeta(bits_stored=12, signed=True))
    ten = attack_image(image, "j2k10", np.random.default_rng(0)).pixels
    twenty = attack_image(image, "j2k20", np.random.default_rng(0)).pixels
    assert ten.dtype == np.int16 and ten.min() < 0
    err10 = np.abs(ten.astype(float) - frame).mean()
    err20 = np.abs(twenty.astype(float) - frame).mean()
    assert 0 < err10 < err20 < 200


def test_j2k_falls_back_to_the_display_for_float_frames_and_says_so():
    frame = _texture(64, 64, np.random.default_rng(6), -1.0, 1.0).astype(np.float32)
    window = display_window(ImageMeta(32, True), frame)
    out = ATTACKS["j2k10"](frame, window, np.random.default_rng(0))
    assert out.kind == "display8" and out.pixels.dtype == np.uint8
    assert "8-bit display" in out.note


def test_export8_inverts_monochrome1():
    image = IMAGES["small64"]
    out = attack_image(image, "export8", np.random.default_rng(0)).pixels
    frame = image.pixels
    assert out[frame == frame.max()].max() <= 1  # brightest stored value shown black


@pytest.mark.parametrize("series", list(ATTACK_SERIES))
def test_series_run_at_every_strength(series):
    image = IMAGES["small64"]
    frame, window = image.pixels, display_window(image.meta, image.pixels)
    assert len(ATTACK_SERIES[series]) >= 4
    for strength in ATTACK_SERIES[series]:
        out = apply_series(series, strength, frame, window, np.random.default_rng(0), value_range=(0, 4095))
        assert isinstance(out, AttackedFrame)
        assert out.kind == ("display8" if series == "jpeg" else "stored")
        if series == "resize":
            assert out.pixels.shape == (round(64 * strength), round(64 * strength))
        if series == "crop":
            side = round(64 * math.sqrt(strength))
            assert out.pixels.shape == (side, side)
    with pytest.raises(UsageError):
        apply_series("sharpen", 1.0, frame, window, np.random.default_rng(0))


def test_multi_frame_images_are_attacked_frame_by_frame():
    rng = np.random.default_rng(9)
    frames = np.stack([np.rint(_texture(64, 64, rng, 0, 4095)).astype(np.uint16) for _ in range(3)])
    image = MedicalImage(frames, ImageMeta(bits_stored=12, signed=False))
    out = attack_image(image, "resize0.5", np.random.default_rng(0))
    assert out.pixels.shape == (3, 32, 32) and out.n_frames == 3
    jpg = attack_image(image, "jpeg75", np.random.default_rng(0))
    assert jpg.pixels.shape == (3, 64, 64) and jpg.pixels.dtype == np.uint8


def test_attacked_image_refuses_mixed_kinds():
    a = AttackedFrame(np.zeros((4, 4), np.uint8), "display8")
    b = AttackedFrame(np.zeros((4, 4), np.uint16), "stored")
    with pytest.raises(UsageError):
        attacked_image([a, b], ImageMeta(12, False))
