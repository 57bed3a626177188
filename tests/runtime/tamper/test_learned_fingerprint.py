"""The learned content fingerprint: cell rule, encoding, signature, comparison; with the bundle's
encoder (skipped when bundles/default/fp_encoder.onnx is absent) sizes, latency and deviations."""

from __future__ import annotations

import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from medsec_edge.runtime.crypto.keyset import SealSigner
from medsec_edge.runtime.errors import InputError, UsageError
from medsec_edge.runtime.io.image import ImageMeta, MedicalImage
from medsec_edge.runtime.tamper.fingerprint import FrameWindow
from medsec_edge.runtime.tamper.learned_fingerprint import (
    FingerprintEncoder,
    LearnedFingerprint,
    compare_learned,
    compare_learned_display,
    compute_learned_fingerprint,
    encoder_input,
    learned_cell_size_for,
    sign_learned_fingerprint,
    verify_learned_fingerprint,
)

ENCODER = Path(__file__).resolve().parents[3] / "bundles" / "default" / "fp_encoder.onnx"
WINDOW = FrameWindow(-160.0, 240.0, 1.0, -1024.0, False)


def _record(frames=1, shape=(200, 300), dims=4, seed=0, colour=False) -> LearnedFingerprint:
    cell = learned_cell_size_for(shape)
    gh, gw = -(-shape[0] // cell), -(-shape[1] // cell)
    rng = np.random.default_rng(seed)
    codes = rng.integers(-127, 128, (frames, dims, gh, gw)).astype(np.int8)
    return LearnedFingerprint(shape, cell, (WINDOW,) * frames, codes, b"encoder1", colour)


class _BoxSession:
    """Stands in for the ONNX encoder: codes = 200 * (2 x 2 box sub-means - 0.5), as at init."""

    def run(self, inputs):
        x = inputs["image"][0, 0]
        h, w = x.shape
        sub = x.reshape(h // 8, 8, w // 8, 8).mean(axis=(1, 3))
        codes = np.stack([sub[i::2, j::2] for i in (0, 1) for j in (0, 1)])
        return {"codes": (200.0 * (codes - 0.5))[None].astype(np.float32)}

    def close(self):
        pass


@pytest.fixture(scope="module")
def box_encoder() -> FingerprintEncoder:
    return FingerprintEncoder(_BoxSession(), b"encoder1")


@pytest.fixture(scope="module")
def signer() -> SealSigner:
    return SealSigner.generate()


def _phantom(shape=(256, 256), seed=1) -> MedicalImage:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    body = 1000 + 400 * np.sin(yy / 17.0) * np.cos(xx / 23.0) + rng.normal(0, 10, shape)
    return MedicalImage(np.clip(body, 0, 4095).astype(np.uint16),
                        ImageMeta(bits_stored=12, signed=False, window=(1000.0, 1000.0)))


# --- geometry and encoding (always run) -------------------------------------------------------


def test_cell_rule_is_twice_the_non_learned_one():
    assert learned_cell_size_for((512, 512)) == 16
    assert learned_cell_size_for((100, 40)) == 16
    assert learned_cell_size_for((2048, 2048)) == 32
    assert learned_cell_size_for((4096, 4096)) == 46


def test_encoder_input_pads_to_whole_cells_and_resamples_large_cells():
    display = np.arange(40 * 50, dtype=np.float32).reshape(40, 50) % 255
    x = encoder_input(display, 16)
    assert x.shape == (1, 1, 48, 64) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, 0, :40, :50], display / 255.0, rtol=1e-6)
    np.testing.assert_allclose(x[0, 0, 45, :50], display[-1] / 255.0, rtol=1e-6)  # edge replicated
    big = np.random.default_rng(0).uniform(0, 255, (96, 64)).astype(np.float32)
    y = encoder_input(big, 32)  # whole factor 2: block means
    assert y.shape == (1, 1, 48, 32)
    np.testing.assert_allclose(y[0, 0], big.reshape(48, 2, 32, 2).mean(axis=(1, 3)) / 255.0, rtol=1e-5)
    z = encoder_input(big, 46)  # non-integer factor: area weights keep the mean
    assert z.shape == (1, 1, 48, 32)
    assert abs(float(z.mean()) - float(np.pad(big, ((0, 42), (0, 28)), mode="edge").mean() / 255.0)) < 1e-3


@pytest.mark.parametrize("frames,shape,dims,colour", [(1, (200, 300), 4, False), (3, (64, 48), 2, True),
                                                      (1, (512, 512), 4, False), (2, (17, 1), 1, False)])
def test_bytes_round_trip(frames, shape, dims, colour):
    fp = _record(frames, shape, dims, colour=colour)
    back = LearnedFingerprint.from_bytes(fp.to_bytes())
    assert back == fp and back.codes.dtype == np.int8 and back.colour == colour


def test_a_512_record_of_smooth_codes_fits_in_4_kB():
    yy, xx = np.mgrid[0:32, 0:32]
    base = (60 * np.sin(yy / 5.0) + 40 * np.cos(xx / 7.0)).astype(np.int64)
    codes = np.stack([base + d for d in range(4)])[None]
    codes = np.clip(codes + np.random.default_rng(0).integers(-3, 4, codes.shape), -127, 127).astype(np.int8)
    fp = LearnedFingerprint((512, 512), 16, (WINDOW,), codes, b"encoder1")
    assert len(fp.to_bytes()) <= 4096


def test_to_bytes_refuses_codes_of_the_wrong_shape_or_type():
    fp = _record()
    with pytest.raises(UsageError):
        LearnedFingerprint(fp.shape_hw, fp.cell, fp.windows, fp.codes.astype(np.int16), fp.encoder).to_bytes()
    with pytest.raises(UsageError):
        LearnedFingerprint(fp.shape_hw, fp.cell, fp.windows, fp.codes[..., :-1], fp.encoder).to_bytes()


def test_truncated_or_padded_records_are_input_errors():
    blob = _record().to_bytes()
    for bad in (blob[:-1], blob + b"\0", blob[:10], b""):
        with pytest.raises(InputError):
            LearnedFingerprint.from_bytes(bad)


def _header_fields(blob: bytes) -> list:
    return list(struct.unpack_from("<4sBBHIIHBB8s", blob))


def _with_header(blob: bytes, **changes) -> bytes:
    names = ["magic", "version", "flags", "frames", "rows", "cols", "cell", "dims", "reserved", "encoder"]
    fields = _header_fields(blob)
    for k, v in changes.items():
        fields[names.index(k)] = v
    return struct.pack("<4sBBHIIHBB8s", *fields) + blob[struct.calcsize("<4sBBHIIHBB8s"):]


@pytest.mark.parametrize("change", [{"magic": b"MEFP"}, {"version": 2}, {"flags": 2}, {"reserved": 1},
                                    {"cell": 8}, {"cell": 32}, {"dims": 0}, {"dims": 65}, {"dims": 3},
                                    {"frames": 0}, {"frames": 2}, {"rows": 0}, {"rows": 40000},
                                    {"cols": 321}])
def test_malformed_headers_are_input_errors(change):
    with pytest.raises(InputError):
        LearnedFingerprint.from_bytes(_with_header(_record().to_bytes(), **change))


def test_a_hostile_header_allocates_nothing_it_claims():
    blob = _with_header(_record().to_bytes(), rows=32768, cols=32768, frames=4096)
    with pytest.raises(InputError):
        LearnedFingerprint.from_bytes(blob)


def test_a_zlib_stream_of_the_wrong_length_is_an_input_error():
    fp = _record()
    blob = fp.to_bytes()
    prefix_len = struct.calcsize("<4sBBHIIHBB8s") + struct.calcsize("<ddddB")
    n = fp.codes.size
    for raw in (b"\0" * (n - 1), b"\0" * (n + 1)):
        body = zlib.compress(raw)
        bad = blob[:prefix_len] + struct.pack("<I", len(body)) + body
        with pytest.raises(InputError):
            LearnedFingerprint.from_bytes(bad)
    bad = blob[:prefix_len] + struct.pack("<I", 5) + b"notzl"
    with pytest.raises(InputError):
        LearnedFingerprint.from_bytes(bad)


def test_a_window_that_is_not_finite_or_empty_is_an_input_error():
    prefix = struct.calcsize("<4sBBHIIHBB8s")
    blob = _record().to_bytes()
    for window in (struct.pack("<ddddB", float("nan"), 1, 1, 0, 0), struct.pack("<ddddB", 5, 5, 1, 0, 0),
                   struct.pack("<ddddB", 0, 1, 0, 0, 0), struct.pack("<ddddB", 0, 1, 1, 0, 2)):
        with pytest.raises(InputError):
            LearnedFingerprint.from_bytes(blob[:prefix] + window + blob[prefix + len(window):])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_from_bytes_on_random_bytes_raises_only_input_error(data):
    for candidate in (data, b"MELF\x01" + data):
        try:
            LearnedFingerprint.from_bytes(candidate)
        except InputError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=10_000), st.integers(min_value=0, max_value=255))
def test_from_bytes_on_corrupted_records_raises_only_input_error(position, junk):
    blob = bytearray(_record(shape=(64, 64)).to_bytes())
    blob[position % len(blob)] = junk
    try:
        LearnedFingerprint.from_bytes(bytes(blob))
    except InputError:
        pass


def test_sign_and_verify_and_refusals(signer):
    fp = _record()
    blob = sign_learned_fingerprint(fp, signer)
    assert verify_learned_fingerprint(blob, signer.verifier) == fp
    assert verify_learned_fingerprint(blob, SealSigner.generate().verifier) is None
    for i in range(0, len(blob) * 8, 97):
        flipped = bytearray(blob)
        flipped[i // 8] ^= 1 << (i % 8)
        try:
            assert verify_learned_fingerprint(bytes(flipped), signer.verifier) is None
        except InputError:
            pass
    with pytest.raises(InputError):
        verify_learned_fingerprint(b"MEFS" + blob[4:], signer.verifier)  # the other fingerprint's magic
    with pytest.raises(InputError):
        verify_learned_fingerprint(b"garbage", signer.verifier)


# --- comparison with a stand-in encoder (always run) ------------------------------------------


def test_an_image_compares_to_itself_within_quantisation(box_encoder):
    image = _phantom()
    fp = compute_learned_fingerprint(image, box_encoder)
    assert fp.cell == 16 and fp.codes.shape == (1, 4, 16, 16)
    dev = compare_learned(fp, image, box_encoder)
    assert dev.compared and dev.max_deviation <= 1.0 + 1e-6  # 4 dims, each off by at most 0.5


def test_a_local_edit_moves_only_its_cells(box_encoder):
    image = _phantom()
    fp = compute_learned_fingerprint(image, box_encoder)
    edited = image.pixels.copy()
    edited[100:124, 40:64] += 200  # 24 px, +200 of a 1000 window: +51 display levels
    dev = compare_learned(fp, MedicalImage(edited, image.meta), box_encoder)
    flagged = np.argwhere(dev.cells[0] > 5)
    assert len(flagged) and flagged[:, 0].min() >= 6 and flagged[:, 0].max() <= 7
    assert flagged[:, 1].min() >= 2 and flagged[:, 1].max() <= 3
    assert dev.regions(5.0)[0].y0 == 96


def test_max_distance_is_the_largest_value_difference(box_encoder):
    image = _phantom()
    fp = compute_learned_fingerprint(image, box_encoder)
    edited = image.pixels.copy()
    edited[96:104, 32:40] += 200  # one 8 px sub-cell of cell (6, 2): one code value moves
    now = MedicalImage(edited, image.meta)
    l2 = compare_learned(fp, now, box_encoder).cells[0, 6, 2]
    mx = compare_learned(fp, now, box_encoder, distance="max").cells[0, 6, 2]
    assert mx > 20 and abs(l2 - mx) < 1.5
    with pytest.raises(UsageError):
        compare_learned(fp, now, box_encoder, distance="l1")


def test_mismatches_are_reported_not_compared(box_encoder):
    image = _phantom()
    fp = compute_learned_fingerprint(image, box_encoder)
    other = FingerprintEncoder(_BoxSession(), b"encoder2")
    assert compare_learned(fp, image, other).status == "encoder_mismatch"
    assert compare_learned(fp, _phantom((256, 240)), box_encoder).status == "geometry_mismatch"
    assert compare_learned_display(fp, [], box_encoder).status == "geometry_mismatch"
    colour = MedicalImage(np.zeros((256, 256, 3), np.uint8), ImageMeta(8, False, photometric="RGB"))
    assert compare_learned(fp, colour, box_encoder).status == "geometry_mismatch"


def test_multi_frame_and_colour_images(box_encoder):
    frames = np.stack([_phantom(seed=s).pixels for s in range(3)])
    image = MedicalImage(frames, _phantom().meta)
    fp = compute_learned_fingerprint(image, box_encoder)
    assert fp.n_frames == 3 and compare_learned(fp, image, box_encoder).cells.shape == (3, 16, 16)
    rgb = MedicalImage(np.random.default_rng(0).integers(0, 255, (64, 80, 3)).astype(np.uint8),
                       ImageMeta(8, False, photometric="RGB"))
    fpc = compute_learned_fingerprint(rgb, box_encoder)
    assert fpc.colour and LearnedFingerprint.from_bytes(fpc.to_bytes()) == fpc


# --- with the bundle's encoder ----------------------------------------------------------------

needs_encoder = pytest.mark.skipif(not ENCODER.is_file(), reason=f"{ENCODER} is absent: export it with "
                                   "'python -m medsec_edge.export.fingerprint_export'")


@pytest.fixture(scope="module")
def encoder() -> FingerprintEncoder:
    return FingerprintEncoder.from_path(ENCODER, threads=1)


def _pydicom(name: str) -> MedicalImage:
    from medsec_edge.runtime.io.readers import read_image
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not installed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_image(path)


@needs_encoder
def test_bundle_encoder_sizes_fit_the_budget(encoder, signer):
    ct = _pydicom("CT_small.dcm")
    big = MedicalImage(np.tile(ct.pixels, (8, 8)), ct.meta)  # 512 x 512
    blob = sign_learned_fingerprint(compute_learned_fingerprint(big, encoder), signer)
    assert len(blob) <= 4096
    huge = MedicalImage(np.tile(ct.pixels, (64, 64)), ct.meta)  # 4096 x 4096
    assert len(sign_learned_fingerprint(compute_learned_fingerprint(huge, encoder), signer)) <= 64 * 1024


@needs_encoder
def test_bundle_encoder_runs_at_512_within_25_ms_on_one_thread(encoder):
    display = np.random.default_rng(0).uniform(0, 255, (512, 512)).astype(np.float32)
    encoder.codes(display, 16)
    best = min(_timed(lambda: encoder.codes(display, 16)) for _ in range(7))
    assert best < 0.025


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@needs_encoder
@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_bundle_encoder_self_jpeg_and_a_blob(encoder, name):
    from medsec_edge.evaluation.attacks import jpeg
    from medsec_edge.runtime.io.image import display_window

    image = _pydicom(name)
    fp = compute_learned_fingerprint(image, encoder)
    same = compare_learned(fp, image, encoder)
    assert same.max_deviation <= 1.5  # int8 rounding of 4 values
    window = display_window(image.meta, image.pixels)
    q90 = jpeg(image.pixels, window, np.random.default_rng(0), quality=90).pixels.astype(np.float32)
    dev_jpeg = compare_learned_display(fp, [q90], encoder)
    display = window.to_display(image.pixels)
    edited = display.copy()
    yy, xx = np.mgrid[0:display.shape[0], 0:display.shape[1]]
    disc = np.hypot(yy - display.shape[0] / 2, xx - display.shape[1] / 2) < 12
    edited[disc] = np.clip(edited[disc] + 40.0, 0, 255)
    dev_edit = compare_learned_display(fp, [edited], encoder)
    assert dev_edit.max_deviation > 2 * dev_jpeg.max_deviation
