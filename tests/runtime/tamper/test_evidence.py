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
