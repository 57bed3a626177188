"""The non-learned content fingerprint: sizes, encoding, signature, and deviations on real images."""

from __future__ import annotations

import struct
import warnings
import zlib
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from medsec_edge.runtime.crypto.keyset import SealSigner
from medsec_edge.runtime.errors import InputError, UsageError
from medsec_edge.runtime.io.image import ImageMeta, MedicalImage, stored_range
from medsec_edge.runtime.tamper.fingerprint import (
    DEFAULT_THRESHOLD,
    Fingerprint,
    cell_size_for,
    compare,
    compare_display,
    compute_fingerprint,
    sign_fingerprint,
    signed_key_id,
    verify_fingerprint,
)

# Measured on these files (CT_small, MR_small, emri_small) when this was written: self-deviation
# <= 0.25 (the quantisation), JPEG q90 of the display <= 0.96, noise 1% <= 0.94 display levels.
BENIGN_MARGIN = 2.5  # levels: asserted bounds are the measured maxima plus this, still < 5.2


def _read(name: str) -> MedicalImage:
    from medsec_edge.runtime.io.readers import read_image
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not installed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_image(path)


@pytest.fixture(scope="module")
def ct_small() -> MedicalImage:
    return _read("CT_small.dcm")


@pytest.fixture(scope="module")
def mr_small() -> MedicalImage:
    return _read("MR_small.dcm")


@pytest.fixture(scope="module")
def emri() -> MedicalImage:
    return _read("emri_small.dcm")


@pytest.fixture(scope="module", params=["CT_small.dcm", "MR_small.dcm", "emri_small.dcm"])
def real(request) -> MedicalImage:
    return _read(request.param)


@pytest.fixture(scope="module")
def mr_blob(mr_small) -> bytes:
    return compute_fingerprint(mr_small).to_bytes()


@pytest.fixture(scope="module")
def signer() -> SealSigner:
    return SealSigner.generate()


def _upsampled(image: MedicalImage, side: int) -> MedicalImage:
    """A real frame replicated up to ``side`` x ``side`` (pixel replication keeps real content)."""
    frame = image.frames()[0]
    reps = -(-side // frame.shape[0])
    big = np.kron(frame, np.ones((reps, reps), frame.dtype))[:side, :side]
    return replace(image, pixels=np.ascontiguousarray(big))


# --- geometry and size ---------------------------------------------------------------------------


def test_cell_rule_is_8_px_up_to_512_then_grows_with_the_square_root_of_the_side():
    assert cell_size_for((64, 64)) == cell_size_for((512, 300)) == 8
    assert cell_size_for((2048, 2048)) == 16
    assert cell_size_for((4096, 1024)) == 23  # ceil(8 * sqrt(8))


def test_records_geometry_windows_and_version(emri):
    fp = compute_fingerprint(emri)
    assert fp.n_frames == 10 and fp.shape_hw == (64, 64) and fp.cell == 8
    assert fp.grid_shape == (8, 8) and fp.codes.shape == (10, 8, 8) and fp.version == 1
    assert not fp.colour and all(w.upper > w.lower for w in fp.windows)
    # emri has no VOI window: each frame gets its own percentile window, so frames differ
    assert len({(w.lower, w.upper) for w in fp.windows}) > 1


def test_signed_fingerprint_of_a_512_frame_fits_in_4_kB(ct_small, signer):
    fp = compute_fingerprint(_upsampled(ct_small, 512))
    assert fp.cell == 8 and fp.grid_shape == (64, 64)
    assert len(sign_fingerprint(fp, signer)) <= 4096


def test_signed_fingerprint_of_a_4096_frame_fits_in_64_kB(ct_small, signer):
    fp = compute_fingerprint(_upsampled(ct_small, 4096))
    assert fp.cell == 23 and fp.grid_shape == (179, 179)
    assert len(sign_fingerprint(fp, signer)) <= 65536
    # a synthetic frame with no smooth structure at all (cell-sized random blocks) still fits
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 4096, (179, 179)).astype(np.uint16).repeat(23, 0).repeat(23, 1)
    worst = MedicalImage(blocks[:4096, :4096], ImageMeta(bits_stored=12, signed=False))
    assert len(sign_fingerprint(compute_fingerprint(worst), signer)) <= 65536


# --- encoding ------------------------------------------------------------------------------------


def test_bytes_round_trip(real):
    fp = compute_fingerprint(real)
    again = Fingerprint.from_bytes(fp.to_bytes())
    assert again == fp and again.codes.dtype == np.uint16
    np.testing.assert_array_equal(again.codes, fp.codes)


def test_colour_image_is_fingerprinted_on_its_luminance():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (96, 80, 3)).astype(np.uint8)
    image = MedicalImage(rgb, ImageMeta(bits_stored=8, signed=False, photometric="RGB"))
    fp = compute_fingerprint(image)
    assert fp.colour and fp.grid_shape == (12, 10)
    assert Fingerprint.from_bytes(fp.to_bytes()) == fp
    assert compare(fp, image).max_deviation <= 0.25 + 1e-3


def test_truncated_or_padded_records_are_input_errors(mr_small):
    blob = compute_fingerprint(mr_small).to_bytes()
    for cut in range(len(blob)):
        with pytest.raises(InputError):
            Fingerprint.from_bytes(blob[:cut])
    with pytest.raises(InputError):
        Fingerprint.from_bytes(blob + b"\0")


def test_malformed_headers_are_input_errors(mr_small):
    blob = bytearray(compute_fingerprint(mr_small).to_bytes())
    for offset, value in ((0, ord("X")), (4, 2), (5, 0x80), (16, 9), (18, 3), (19, 1)):
        bad = bytearray(blob)
        bad[offset] = value
        with pytest.raises(InputError):
            Fingerprint.from_bytes(bytes(bad))
    empty_window = bytearray(blob)
    struct.pack_into("<dd", empty_window, 20, 10.0, 10.0)
    with pytest.raises(InputError):
        Fingerprint.from_bytes(bytes(empty_window))


def test_a_hostile_header_allocates_nothing_it_claims():
    # 4096 frames of 32768 x 32768 px would be 68 G cells: refused before any decompression
    header = struct.pack("<4sBBHIIHBB", b"MEFP", 1, 0, 4096, 32768, 32768, 64, 2, 0)
    with pytest.raises(InputError, match="cells"):
        Fingerprint.from_bytes(header + b"\0" * 64)
    # a plausible header with a zlib bomb: decompression stops at what the header implies
    header = struct.pack("<4sBBHIIHBB", b"MEFP", 1, 0, 1, 64, 64, 8, 2, 0)
    window = struct.pack("<ddddB", 0.0, 100.0, 1.0, 0.0, 0)
    bomb = zlib.compress(b"\0" * 50_000_000, 9)
    with pytest.raises(InputError):
        Fingerprint.from_bytes(header + window + struct.pack("<I", len(bomb)) + bomb)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_from_bytes_on_random_bytes_raises_only_input_error(data):
    try:
        fp = Fingerprint.from_bytes(data)
    except InputError:
        return
    assert Fingerprint.from_bytes(fp.to_bytes()) == fp  # whatever parses is a consistent record


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=10_000), st.binary(min_size=1, max_size=8))
def test_from_bytes_on_corrupted_records_raises_only_input_error(mr_blob, position, junk):
    blob = bytearray(mr_blob)
    at = position % len(blob)
    blob[at:at + len(junk)] = junk
    try:
        fp = Fingerprint.from_bytes(bytes(blob))
    except InputError:
        return
    assert fp.codes.shape == (fp.n_frames, *fp.grid_shape) and int(fp.codes.max()) <= 510




# --- signature -----------------------------------------------------------------------------------


def test_sign_and_verify(mr_small, signer):
    fp = compute_fingerprint(mr_small)
    blob = sign_fingerprint(fp, signer)
    assert signed_key_id(blob) == signer.key_id
    assert verify_fingerprint(blob, [signer.verifier]) == fp
    assert verify_fingerprint(blob, {signer.key_id: signer.verifier}) == fp


def test_another_key_is_refused(mr_small, signer):
    blob = sign_fingerprint(compute_fingerprint(mr_small), signer)
    other = SealSigner.generate()
    assert verify_fingerprint(blob, [other.verifier]) is None
    # the other key's signature under our key id does not verify either
    forged = blob[:20] + other.sign(b"anything").ljust(64, b"\0")[:64] + blob[84:]
    assert verify_fingerprint(forged, [signer.verifier]) is None


def test_every_flipped_bit_is_refused(mr_small, signer):
    blob = sign_fingerprint(compute_fingerprint(mr_small), signer)
    for i in range(len(blob) * 8):
        bad = bytearray(blob)
        bad[i // 8] ^= 1 << (i % 8)
        try:
            assert verify_fingerprint(bytes(bad), [signer.verifier]) is None, i
        except InputError:
            pass


def test_domain_separation_refuses_a_signature_over_the_bare_record(mr_small, signer):
    body = compute_fingerprint(mr_small).to_bytes()
    bare = b"MEFS" + signer.key_id.encode() + signer.sign(body) + len(body).to_bytes(4, "little") + body
    assert verify_fingerprint(bare, [signer.verifier]) is None


def test_the_envelope_survives_the_even_length_pad_of_a_dicom_ob_value_and_nothing_else(mr_small, signer):
    blob = sign_fingerprint(compute_fingerprint(mr_small), signer)
    assert len(blob) % 2 == 0  # written as an OB value, it is never padded
    body_end = len(blob) - (1 if blob.endswith(b"\0") and verify_fingerprint(blob[:-1], [signer.verifier]) else 0)
    assert verify_fingerprint(blob[:body_end] + b"\0", [signer.verifier]) is not None
    with pytest.raises(InputError):
        verify_fingerprint(blob[:body_end] + b"\0\0", [signer.verifier])
    with pytest.raises(InputError):
        verify_fingerprint(blob[:body_end] + b"x", [signer.verifier])


def test_garbage_is_not_a_signed_fingerprint(signer):
    for blob in (b"", b"MEFS", b"MEFP" + b"\0" * 100):
        with pytest.raises(InputError):
            verify_fingerprint(blob, [signer.verifier])


# --- comparison: benign ------------------------------------------------------------------------


def test_an_image_deviates_only_by_quantisation_from_itself(real):
    deviation = compare(compute_fingerprint(real), real)
    assert deviation.compared and deviation.cells.shape == (real.n_frames, *compute_fingerprint(real).grid_shape)
    assert deviation.max_deviation <= 0.25 + 1e-3
    assert deviation.regions() == [] and not deviation.mask(pooled=True).any()


def test_jpeg_q90_of_the_display_stays_under_the_default_threshold(real):
    from medsec_edge.evaluation.attacks import jpeg

    fp = compute_fingerprint(real)
    displays = [jpeg(frame, w.to_display_window(), None, quality=90).pixels
                for frame, w in zip(real.frames(), fp.windows)]
    deviation = compare_display(fp, displays)
    assert deviation.max_deviation <= 0.96 + BENIGN_MARGIN < DEFAULT_THRESHOLD
    assert deviation.max_deviation > 0.25  # the JPEG did change something the map sees


def test_noise_of_1_percent_of_the_range_stays_under_the_default_threshold(real):
    from medsec_edge.evaluation.attacks import gaussian_noise

    fp = compute_fingerprint(real)
    rng = np.random.default_rng(7)
    noisy = np.stack([
        gaussian_noise(frame, w.to_display_window(), rng, fraction=0.01,
                       value_range=stored_range(real.meta, frame.dtype)).pixels
        for frame, w in zip(real.frames(), fp.windows)
    ]).reshape(real.pixels.shape)
    deviation = compare(fp, replace(real, pixels=noisy))
    assert deviation.max_deviation <= 0.94 + BENIGN_MARGIN < DEFAULT_THRESHOLD
    assert (deviation.cells > DEFAULT_THRESHOLD).mean() == 0.0


def test_a_different_shape_or_frame_count_is_a_geometry_mismatch(ct_small, emri):
    fp = compute_fingerprint(ct_small)
    cropped = compare(fp, replace(ct_small, pixels=ct_small.pixels[8:, :]))
    assert cropped.status == "geometry_mismatch" and cropped.cells is None and "128x128" in cropped.reason
    fewer = compare(compute_fingerprint(emri), replace(emri, pixels=emri.pixels[:9]))
    assert fewer.status == "geometry_mismatch" and fewer.max_deviation is None
    with pytest.raises(UsageError):
        fewer.mask()


def test_compare_uses_the_recorded_window_not_the_images(emri):
    """A percentile window recomputed on an edited frame would move with the edit."""
    fp = compute_fingerprint(emri)
    rewindowed = replace(emri, meta=replace(emri.meta, window=(100.0, 50.0)))
    assert compare(fp, rewindowed).max_deviation <= 0.25 + 1e-3


# --- comparison: local edits ---------------------------------------------------------------------


def _blob_edit(image: MedicalImage, fp: Fingerprint, frame: int, cy: int, cx: int, size: int = 24):
    """A 24 x 24 px disc (feathered by 2 px) raising the display by 10% of the window."""
    window = fp.windows[frame]
    delta_stored = 0.10 * (window.upper - window.lower) / window.slope
    yy, xx = np.mgrid[: image.shape_hw[0], : image.shape_hw[1]]
    r = np.hypot(yy - cy + 0.5, xx - cx + 0.5)
    alpha = np.clip((size / 2 - r) / 2 + 0.5, 0, 1)
    pixels = image.pixels.copy()
    target = pixels[frame] if image.n_frames > 1 else pixels
    low, high = stored_range(image.meta, pixels.dtype)
    target[...] = np.clip(np.rint(target + alpha * delta_stored), low, high).astype(pixels.dtype)
    return replace(image, pixels=pixels), (cy - size // 2, cx - size // 2, cy + size // 2, cx + size // 2)


def _copy_move(image: MedicalImage, frame: int, src: tuple[int, int], dst: tuple[int, int], size: int = 32):
    pixels = image.pixels.copy()
    target = pixels[frame] if image.n_frames > 1 else pixels
    patch = target[src[0]:src[0] + size, src[1]:src[1] + size].copy()
    target[dst[0]:dst[0] + size, dst[1]:dst[1] + size] = patch
    return replace(image, pixels=pixels), (dst[0], dst[1], dst[0] + size, dst[1] + size)


def _overlaps(region, box) -> bool:
    y0, x0, y1, x1 = box
    return region.y0 < y1 and y0 < region.y1 and region.x0 < x1 and x0 < region.x1


def _iou(region, box) -> float:
    y0, x0, y1, x1 = box
    inter = max(0, min(region.y1, y1) - max(region.y0, y0)) * max(0, min(region.x1, x1) - max(region.x0, x0))
    area = (region.y1 - region.y0) * (region.x1 - region.x0) + (y1 - y0) * (x1 - x0)
    return inter / (area - inter)


def _inside(deviation, frame: int, box) -> np.ndarray:
    c = deviation.cell
    y0, x0, y1, x1 = box
    return deviation.cells[frame, y0 // c: -(-y1 // c), x0 // c: -(-x1 // c)]


EDITS = {
    # image, frame, blob centre, copy-move source, copy-move destination
    "CT_small.dcm": (0, (64, 64), (10, 48), (60, 60)),
    "MR_small.dcm": (0, (32, 32), (0, 0), (24, 24)),
    "emri_small.dcm": (4, (32, 32), (0, 0), (20, 24)),
}


@pytest.mark.parametrize("name", sorted(EDITS))
def test_a_local_blob_exceeds_the_threshold_where_it_is(name):
    image = _read(name)
    frame, centre, _, _ = EDITS[name]
    fp = compute_fingerprint(image)
    edited, box = _blob_edit(image, fp, frame, *centre)
    deviation = compare(fp, edited)
    inside = _inside(deviation, frame, box)
    assert inside.max() > DEFAULT_THRESHOLD
    regions = deviation.regions()
    assert regions and all(r.frame == frame for r in regions)
    assert _overlaps(regions[0], box) and _iou(regions[0], box) >= 0.45  # measured 0.56: cells of 8 px
    others = [f for f in range(image.n_frames) if f != frame]
    assert all(deviation.cells[f].max() <= 0.25 + 1e-3 for f in others)


@pytest.mark.parametrize("name", sorted(EDITS))
def test_a_copy_move_exceeds_the_threshold_where_it_lands(name):
    image = _read(name)
    frame, _, src, dst = EDITS[name]
    fp = compute_fingerprint(image)
    edited, box = _copy_move(image, frame, src, dst)
    deviation = compare(fp, edited)
    assert _inside(deviation, frame, box).max() > DEFAULT_THRESHOLD
    pooled = deviation.regions(pooled=True)
    assert pooled and _overlaps(pooled[0], box)
    assert _iou(deviation.regions()[0], box) >= 0.35  # measured 0.44-0.64; pooled boxes are dilated
    mask = deviation.mask()
    assert mask[frame].any() and mask.sum() == mask[frame].sum()


def test_pooling_takes_the_max_of_each_2x2_block(ct_small):
    fp = compute_fingerprint(ct_small)
    edited, _ = _blob_edit(ct_small, fp, 0, 64, 64)
    d = compare(fp, edited)
    padded = np.pad(d.cells[0], ((0, 1), (0, 1)), mode="edge")
    expected = np.maximum.reduce([padded[:-1, :-1], padded[1:, :-1], padded[:-1, 1:], padded[1:, 1:]])
    np.testing.assert_array_equal(d.pooled[0], expected)
    assert d.mask(pooled=True).sum() >= d.mask().sum()
