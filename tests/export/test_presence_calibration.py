"""The presence threshold: from the weakest mark only the search found, into the signed manifest."""

from __future__ import annotations

import pytest

from medsec_edge.export.presence_calibration import record, summarise
from medsec_edge.runtime.bundle import generate_signing_key, open_bundle, write_bundle
from medsec_edge.runtime.watermark.models import BundleWatermarkModels
from medsec_edge.runtime.watermark.watermarker import Watermarker

REPO_BUNDLE = "bundles/default"


def _raw(found, unmarked):
    return {"frames": 3, "attacks": ["none", "rot5"], "seed": 1, "per_group": 1, "marked_read_nominal": 4,
            "marked_found_by_search": [("rot5", p, 32.0) for p in found], "marked_missed": [],
            "unmarked": [("none", p) for p in unmarked], "unmarked_found": 0}


def test_threshold_keeps_ninety_percent_of_the_weakest_found_mark_above_chance():
    summary = summarise(_raw([2.0, 3.5, 1.9], [1.4, 1.5, 1.95]))
    assert summary["threshold"] == pytest.approx(1 + 0.9 * 0.9)
    assert summary["marked_min"] == pytest.approx(1.9) and summary["unmarked_max"] == pytest.approx(1.95)
    assert summary["unmarked_answered_at_once"] == pytest.approx(2 / 3, abs=1e-4)
    with pytest.raises(ValueError, match="nothing to calibrate"):
        summarise(_raw([], [1.4]))


def test_recorded_threshold_is_signed_into_the_bundle_and_used(tmp_path):
    repo = open_bundle(REPO_BUNDLE)
    key, trust = tmp_path / "k.pem", tmp_path / "trust"
    generate_signing_key(key, tmp_path / "k.pub")
    data = repo.manifest.to_dict()
    for k in ("version", "created", "key_id"):
        data.pop(k)
    data["models"] = {n: {k: v for k, v in e.items() if k != "sha256"} for n, e in data["models"].items()}
    data["calibration"] = {}
    files = {}
    for name in repo.manifest.models:
        files[name] = tmp_path / f"{name}.onnx"
        files[name].write_bytes(repo.model_bytes(name))
    trust.mkdir()
    (trust / "k.pub").write_bytes((tmp_path / "k.pub").read_bytes())
    bundle_dir = write_bundle(tmp_path / "bundle", data, files, key)
    assert Watermarker(BundleWatermarkModels(open_bundle(bundle_dir, trusted_keys=trust))).presence_threshold is None

    record(bundle_dir, summarise(_raw([1.8], [1.4])), signing_key=key, trusted_dir=trust)
    again = open_bundle(bundle_dir, trusted_keys=trust)
    assert again.manifest.calibration["watermark"]["presence"]["threshold"] == pytest.approx(1.72)
    assert Watermarker(BundleWatermarkModels(again)).presence_threshold == pytest.approx(1.72)
    assert again.model_bytes("wm_decoder") == repo.model_bytes("wm_decoder")
