"""Export: ONNX checker, parity with torch, and a bundle the runtime opens and runs."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch", reason="export needs torch: pip install 'medsec-edge[export]'")
pytest.importorskip("onnx", reason="export needs onnx: pip install 'medsec-edge[export]'")

from medsec_edge.export.watermark_export import build_bundle  # noqa: E402
from medsec_edge.runtime.bundle import open_bundle  # noqa: E402
from medsec_edge.runtime.io.image import ImageMeta, MedicalImage  # noqa: E402
from medsec_edge.runtime.watermark.watermarker import Watermarker  # noqa: E402
from medsec_edge.runtime.watermark.models import BundleWatermarkModels  # noqa: E402
from medsec_edge.train.watermark_trainer import TrainConfig, WatermarkTrainer  # noqa: E402


def test_export_parity_and_bundle_round_trip(tmp_path):
    trainer = WatermarkTrainer(TrainConfig(steps=2, batch=2, crop=64, width=4, pool_size=8), tmp_path / "run")
    trainer.run(progress=False)
    bundle_dir = build_bundle(tmp_path / "run" / "checkpoint.pt", tmp_path / "bundle",
                              signing_key=tmp_path / "sk" / "signing.pem", trusted_dir=tmp_path / "trust")
    bundle = open_bundle(bundle_dir, trusted_keys=tmp_path / "trust")
    parity = bundle.manifest.export["parity_max_abs_error"]
    assert set(parity) == {"wm_strength", "wm_decoder", "wm_message", "wm_readout"}
    assert max(parity.values()) < 1e-4
    assert bundle.manifest.training["steps"] == 2
    # the exported models run in the torch-free runtime and produce a change of the right size
    wm = Watermarker(BundleWatermarkModels(bundle, threads=1), target_psnr_db=40.0)
    rng = np.random.default_rng(0)
    pixels = (rng.random((96, 80)) * 3000 + 500).astype(np.uint16)
    image = MedicalImage(pixels, ImageMeta(bits_stored=12, signed=False, window=(2000.0, 3000.0)))
    out = wm.embed(image, bytes(8)).pixels
    diff = (out.astype(float) - pixels) * 255 / 3000
    assert 38.0 < 10 * np.log10(255**2 / np.mean(diff**2)) < 42.0


def test_re_export_keeps_the_other_models_and_carries_the_masking_prior(tmp_path):
    """Re-exporting the watermark into a bundle replaces its four models only: the tamper detector,
    fingerprint encoder, their manifest sections and calibration stay; the masking prior (a learned
    exponent) exports with the strength model and matches torch."""
    from medsec_edge.runtime.bundle import load_signing_key, write_bundle

    trainer = WatermarkTrainer(TrainConfig(steps=2, batch=2, crop=64, width=4, pool_size=8, jnd_power=0.75),
                               tmp_path / "run")
    trainer.run(progress=False)
    key, trust = tmp_path / "sk" / "signing.pem", tmp_path / "trust"
    first = build_bundle(tmp_path / "run" / "checkpoint.pt", tmp_path / "b1", signing_key=key, trusted_dir=trust)
    bundle = open_bundle(first, trusted_keys=trust)
    data = bundle.manifest.to_dict()
    for k in ("version", "created", "key_id"):
        data.pop(k)
    data["models"] = {n: {k: v for k, v in e.items() if k != "sha256"} for n, e in data["models"].items()}
    data["models"]["fp_encoder"] = {**data["models"]["wm_decoder"], "file": "fp_encoder.onnx"}
    data["training"]["fp_encoder"] = {"command": "trained elsewhere"}
    data["calibration"] = {"tamper": {"operating_points": {"fpr1": {"blind_logit": 5.0}}}}
    files = {n: first / e["file"] for n, e in bundle.manifest.to_dict()["models"].items()}
    files["fp_encoder"] = first / "wm_decoder.onnx"
    device = write_bundle(tmp_path / "device", data, files, load_signing_key(key))

    build_bundle(tmp_path / "run" / "checkpoint.pt", device, signing_key=key, trusted_dir=trust)
    again = open_bundle(device, trusted_keys=trust)
    assert set(again.manifest.models) == {"wm_strength", "wm_decoder", "wm_message", "wm_readout", "fp_encoder"}
    assert again.model_bytes("fp_encoder") == (first / "wm_decoder.onnx").read_bytes()
    assert again.manifest.training["fp_encoder"] == {"command": "trained elsewhere"}
    assert again.manifest.calibration["tamper"]["operating_points"]["fpr1"]["blind_logit"] == 5.0
    assert again.manifest.payload["mark_version"] == 2
    assert again.manifest.export["parity_max_rel_error"]["wm_strength"] < 1e-4
