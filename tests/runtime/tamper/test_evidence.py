"""Which evidence decides a check: a valid seal at once (the detector does not run), else the
blind detector, labelled, with the seal's finding among the reasons."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from medsec_edge.runtime.crypto.keyset import KeyRing, new_key_dir
from medsec_edge.runtime.crypto.sealing import seal_file
from medsec_edge.runtime.io.readers import read_image
from medsec_edge.runtime.pipeline import load_checker
from medsec_edge.runtime.tamper.evidence import check_image


@pytest.fixture(scope="module")
def checker():
    return load_checker(threads=1)  # the default bundle's detector, watermark-aware


@pytest.fixture
def sealed(tmp_path) -> tuple[Path, KeyRing]:
    new_key_dir(tmp_path / "keys")
    ring = KeyRing.load(tmp_path / "keys")
    out = tmp_path / "sealed.dcm"
    seal_file(Path(get_testdata_file("CT_small.dcm", download=False)), ring, out)
    return out, ring


def test_a_valid_seal_decides_untouched_without_the_detector(checker, sealed):
    path, ring = sealed
    verdict = check_image(read_image(path), checker, ring)
    assert verdict.tampered is False and verdict.evidence == "seal" and verdict.blind is None
    assert verdict.seal.status == "valid" and verdict.seal.key_id == ring.signer.key_id
    row = verdict.to_dict()
    assert row["evidence"] == "seal" and row["score"] is None and row["regions"] == []
    assert "blind_ms" not in verdict.timings_ms  # the detector did not run


def test_a_broken_seal_leaves_the_verdict_to_the_blind_detector_with_the_reason(checker, sealed, tmp_path):
    path, ring = sealed
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.copy()
    pixels[10:14, 10:14] += 40
    ds.PixelData = pixels.tobytes()
    edited = tmp_path / "edited.dcm"
    ds.save_as(edited)
    verdict = check_image(read_image(edited), checker, ring)
    assert verdict.evidence == "blind" and verdict.blind is not None
    assert verdict.tampered == verdict.blind.tampered
    assert verdict.seal.status == "invalid" and verdict.seal.changed == ("pixels",)
    assert any(r.startswith("seal broken (pixels changed") for r in verdict.reasons)


def test_another_key_set_cannot_vouch_for_the_seal(checker, sealed, tmp_path):
    path, _ = sealed
    new_key_dir(tmp_path / "other")
    verdict = check_image(read_image(path), checker, KeyRing.load(tmp_path / "other"))
    assert verdict.evidence == "blind" and verdict.seal.status == "unknown_key"
    assert "sealed by a key this key set does not hold" in verdict.reasons


def test_without_keys_or_a_seal_the_blind_detector_decides_as_before(checker, sealed):
    path, ring = sealed
    image = read_image(path)
    no_keys = check_image(image, checker, None)
    assert no_keys.evidence == "blind" and no_keys.seal is None
    assert no_keys.reasons[:-1] == checker.check(image).reasons
    assert no_keys.reasons[-1].startswith("no recorded evidence for this image: the blind detector decided")
    unsealed = check_image(read_image(Path(get_testdata_file("MR_small.dcm", download=False))), checker, ring)
    assert unsealed.evidence == "blind" and unsealed.seal.status == "unsigned"
    assert not any("seal" in r for r in unsealed.reasons)


# --------------------------------------------------------------------------------------------
# the fingerprint in the file and the registry (issue 9)


@pytest.fixture
def protected(tmp_path, checker):
    """CT_small through the real `run` job: a sealed DICOM with its fingerprint, and a registry."""
    from medsec_edge.runtime.pipeline import load_watermarker, run_batch
    from medsec_edge.runtime.tamper.registry import Registry

    new_key_dir(tmp_path / "keys")
    ring = KeyRing.load(tmp_path / "keys")
    watermarker, bundle = load_watermarker(threads=1)
    registry = Registry.open(tmp_path / "registry.sqlite3")
    src = Path(get_testdata_file("CT_small.dcm", download=False))
    report, records = run_batch([src], [Path("ct.dcm")], tmp_path / "out", watermarker, bundle, None,
                                bytes.fromhex("0123456789abcdef"), checker=None, operating_point=None,
                                check_note="skipped", ring=ring, registry=registry)
    assert report["fingerprinted"] == 1 and report["registered"] == 1, report
    assert 0 < records[0].fingerprint_bytes <= 4096 and "fingerprint" in records[0].latency_ms
    yield tmp_path / "out" / "ct.dcm", ring, registry
    registry.close()


def _save_display_png(path: Path, out: Path, *, edit=None, crop=None) -> Path:
    import numpy as np
    from PIL import Image

    from medsec_edge.runtime.tamper.fingerprint import display_frames

    display = np.clip(np.rint(display_frames(read_image(path))[0][0]), 0, 255).astype(np.uint8)
    if edit is not None:
        y, x, n, delta = edit
        display[y:y + n, x:x + n] = np.clip(display[y:y + n, x:x + n].astype(int) + delta, 0, 255)
    if crop is not None:
        display = display[crop[0]:crop[2], crop[1]:crop[3]]
    Image.fromarray(display).save(out)
    return out


def test_run_writes_the_fingerprint_under_the_seal_and_check_uses_it(checker, protected, tmp_path):
    from medsec_edge.runtime.io.dicom_writer import read_fingerprint

    path, ring, registry = protected
    ds = pydicom.dcmread(path)
    assert read_fingerprint(ds) is not None
    # a benign re-encode of one value breaks the seal; the fingerprint says: not tampered
    pixels = ds.pixel_array.copy()
    pixels[0, 0] += 1
    ds.PixelData = pixels.tobytes()
    ds.save_as(tmp_path / "touched.dcm")
    verdict = check_image(read_image(tmp_path / "touched.dcm"), checker, ring)
    assert verdict.evidence == "fingerprint", verdict.reasons
    assert verdict.tampered is False and verdict.seal.status == "invalid"
    assert verdict.fingerprint["key_id"] == ring.signer.key_id and verdict.blind is None
    # a visible 24 px square: tampered, with a mask where it is
    pixels[60:84, 30:54] += 300
    ds.PixelData = pixels.tobytes()
    ds.save_as(tmp_path / "edited.dcm")
    verdict = check_image(read_image(tmp_path / "edited.dcm"), checker, ring)
    assert verdict.evidence == "fingerprint" and verdict.tampered is True
    assert verdict.mask.shape == (1, 128, 128) and verdict.mask[0, 72, 42] and not verdict.mask[0, 10, 100]
    assert verdict.regions and verdict.regions[0].source == "fingerprint"
    # the fingerprint is signed: a key set without the device key does not use it
    new_key_dir(tmp_path / "other")
    foreign = check_image(read_image(tmp_path / "edited.dcm"), checker, KeyRing.load(tmp_path / "other"))
    assert foreign.evidence == "blind"
    assert any("which this key set does not hold" in r for r in foreign.reasons)


def test_an_export_without_header_is_found_in_the_registry_by_its_watermark(checker, protected, tmp_path):
    path, ring, registry = protected
    plain = _save_display_png(path, tmp_path / "export.png")
    verdict = check_image(read_image(plain), checker, ring, registry=registry)
    assert verdict.evidence == "registry" and verdict.tampered is False and verdict.seal is None
    cropped = _save_display_png(path, tmp_path / "crop.png", crop=(6, 9, 128, 122))
    verdict = check_image(read_image(cropped), checker, ring, registry=registry)
    assert verdict.evidence == "registry" and verdict.tampered is False
    assert verdict.fingerprint["alignment"]["offset_y"] == pytest.approx(6, abs=0.6)
    edited = _save_display_png(path, tmp_path / "edited.png", edit=(40, 40, 24, 40))
    verdict = check_image(read_image(edited), checker, ring, registry=registry)
    assert verdict.evidence == "registry" and verdict.tampered is True and verdict.mask[0, 52, 52]
    # without the registry the same export has no evidence: the blind detector decides, labelled
    blind = check_image(read_image(edited), checker, ring)
    assert blind.evidence == "blind" and blind.reasons[-1].startswith("no recorded evidence")


def test_one_frame_exported_from_a_multi_frame_image_is_compared_with_its_own_frame():
    import numpy as np

    from medsec_edge.runtime.io.image import ImageMeta, MedicalImage
    from medsec_edge.runtime.tamper import evidence
    from medsec_edge.runtime.tamper.fingerprint import compute_fingerprint, display_frames
    from medsec_edge.runtime.tamper.scoring import DEFAULT_PARAMS

    image = read_image(Path(get_testdata_file("emri_small.dcm", download=False)))  # 10 frames
    fp = compute_fingerprint(image)
    display = display_frames(image, fp.windows)[0][6]
    png = MedicalImage(np.clip(np.rint(display), 0, 255).astype(np.uint8),
                       ImageMeta(bits_stored=8, signed=False, source_format="png"))
    compared = evidence._compare(fp, png, DEFAULT_PARAMS, "0" * 16)
    assert compared.fp.n_frames == 1 and np.array_equal(compared.fp.codes[0], fp.codes[6])
    assert compared.result.score < DEFAULT_PARAMS.registry_threshold
