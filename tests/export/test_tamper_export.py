"""Export of the tamper detector: a re-signed bundle with the detector, its thresholds and provenance."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest

pytest.importorskip("torch", reason="export needs torch: pip install 'medsec-edge[export]'")
pytest.importorskip("onnx", reason="export needs onnx: pip install 'medsec-edge[export]'")

from medsec_edge.runtime.bundle import open_bundle  # noqa: E402
from medsec_edge.runtime.errors import BundleError  # noqa: E402
from medsec_edge.runtime.tamper.checker import MODEL_NAME  # noqa: E402
from tests.tamper_fixtures import *  # noqa: E402,F401,F403 - fixtures
from tests.tamper_fixtures import CAL_GENUINE, CAL_TAMPERED, CAL_WATERMARKED, DEFAULT_BUNDLE  # noqa: E402

WM_MODELS = {"wm_strength", "wm_decoder", "wm_message", "wm_readout"}


@pytest.fixture
def bundle(tamper_bundles):
    return open_bundle(tamper_bundles.calibrated, trusted_keys=tamper_bundles.trust_dir)


def test_bundle_opens_signed_by_the_new_key_with_the_detector(bundle, tamper_bundles):
    assert bundle.key_id == tamper_bundles.key_id == bundle.manifest.key_id
    assert WM_MODELS | {MODEL_NAME} <= set(bundle.manifest.models)  # plus fp_encoder where the source has it
    assert bundle.compatibility[MODEL_NAME] is None
    entry = bundle.model(MODEL_NAME)
    assert entry.file == "tamper_detector.onnx" and entry.target == "onnxruntime"
    assert [s.name for s in entry.inputs] == ["image"]
    assert [s.name for s in entry.outputs] == ["mask_logits", "score"]
    assert hashlib.sha256((tamper_bundles.calibrated / entry.file).read_bytes()).hexdigest() == entry.sha256


def test_bundle_is_refused_without_trusting_the_new_key(tamper_bundles):
    from medsec_edge.runtime.bundle import default_trust_dir

    with pytest.raises(BundleError):
        open_bundle(tamper_bundles.calibrated, trusted_keys=default_trust_dir())


def test_operating_points_are_frozen_in_the_manifest(bundle):
    tamper = bundle.manifest.calibration["tamper"]
    points = tamper["operating_points"]
    assert set(points) == {"fpr1", "fpr0.1"}
    assert points["fpr1"]["target_fpr"] == 0.01 and points["fpr0.1"]["target_fpr"] == 0.001
    for point in points.values():
        assert {"blind_logit", "wm_deficit", "pixel_logit", "target_fpr"} <= set(point)
        for key in ("blind_logit", "wm_deficit", "pixel_logit", "target_fpr"):
            assert isinstance(point[key], float) and math.isfinite(point[key])
        assert point["measured_fpr_blind"] <= point["target_fpr"] + 1 / CAL_GENUINE
    # a lower target false-positive rate never has a lower threshold
    assert points["fpr0.1"]["blind_logit"] >= points["fpr1"]["blind_logit"]
    assert points["fpr0.1"]["wm_deficit"] >= points["fpr1"]["wm_deficit"]
    validation = tamper["validation"]
    assert (validation["genuine_frames"], validation["tampered_frames"], validation["watermarked_frames"]) == \
        (CAL_GENUINE, CAL_TAMPERED, CAL_WATERMARKED)
    assert "pydicom-data" in validation["sources"]  # says it was NOT used ("never pydicom-data")
    # the runtime reads them as they are written
    from medsec_edge.runtime.tamper.checker import OperatingPoint

    for name, point in points.items():
        op = OperatingPoint.from_dict(name, point)
        assert (op.blind_logit, op.wm_deficit, op.pixel_logit) == \
            (point["blind_logit"], point["wm_deficit"], point["pixel_logit"])


def test_provenance_and_budgets(bundle, tamper_bundles):
    manifest = bundle.manifest
    assert manifest.training["tamper"] == {"command": "test", "commands": ["test"], "config": {"width": 4}, "steps": 0,
                                           "final": {}, "checkpoint": "checkpoint.pt", "best": {}, "real_frames": {},
                                           "held_out_family": "splice"}
    default = open_bundle(DEFAULT_BUNDLE, trusted_keys=tamper_bundles.trust_dir).manifest
    for key, value in default.training.items():  # the watermark's training record is kept
        if key != "tamper":  # the default bundle's own detector, replaced by the fixture's
            assert manifest.training[key] == value
    export = manifest.export["tamper"]
    assert export["parity_max_abs_error"] < 1e-3 and export["onnx_checker"].startswith("passed")
    assert export["opset"] >= 13
    assert manifest.budgets_ms["check_512"] == 30 and manifest.budgets_ms["check_2048"] == 300
    for key, value in default.budgets_ms.items():
        if not key.startswith("check_"):
            assert manifest.budgets_ms[key] == value
    assert manifest.name == default.name and manifest.payload == default.payload


def test_watermark_models_are_unchanged(bundle, tamper_bundles):
    default = open_bundle(DEFAULT_BUNDLE, trusted_keys=tamper_bundles.trust_dir)
    for name in WM_MODELS:
        assert bundle.manifest.models[name].sha256 == default.manifest.models[name].sha256
        assert bundle.model_bytes(name) == default.model_bytes(name)
    # and the source bundle itself was not touched (out_dir was given)
    from tests.tamper_fixtures import _hashes

    assert _hashes(DEFAULT_BUNDLE) == tamper_bundles.default_hashes


def test_shipped_detector_computes_what_the_checkpoint_does(bundle, tamper_bundles):
    import torch

    from medsec_edge.export.tamper_export import load_detector

    net, state = load_detector(tamper_bundles.checkpoint)
    assert state["step"] == 0
    session = bundle.session(MODEL_NAME, threads=1)
    x = np.random.default_rng(0).uniform(-0.5, 1.5, (1, 1, 72, 48)).astype(np.float32)
    out = session.run({"image": x})
    assert out["mask_logits"].shape == (1, 1, 18, 12) and out["score"].shape == (1, 1)
    with torch.no_grad():
        logits, score = net(torch.from_numpy(x))
    np.testing.assert_allclose(out["mask_logits"], logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(out["score"], score.numpy(), atol=1e-4)
    # the score is the largest 2x2-averaged mask logit (what the runtime's image decision uses)
    m = out["mask_logits"][0, 0]
    pooled = (m[:-1, :-1] + m[1:, :-1] + m[:-1, 1:] + m[1:, 1:]) / 4
    assert float(out["score"][0, 0]) == pytest.approx(float(pooled.max()), abs=1e-5)
    session.close()


def test_derived_bundles_differ_only_in_thresholds(tamper_bundles):
    base = manifest_of(tamper_bundles.calibrated)
    for derived in (tamper_bundles.strict, tamper_bundles.lenient):
        data = manifest_of(derived)
        assert data["models"] == base["models"]
        assert data["key_id"] == base["key_id"]
        assert {k: v for k, v in data.items() if k not in ("calibration", "created")} == \
            {k: v for k, v in base.items() if k not in ("calibration", "created")}
    assert all(p["blind_logit"] == -1e9 for p in
               manifest_of(tamper_bundles.strict)["calibration"]["tamper"]["operating_points"].values())


def test_export_tamper_cli_with_a_missing_checkpoint_exits_2(tmp_path, restore_logging):
    from typer.testing import CliRunner

    from medsec_edge.runtime.cli import app

    out = tmp_path / "bundle"
    res = CliRunner().invoke(app, ["export", "tamper", "--checkpoint", str(tmp_path / "missing.pt"),
                                   "--bundle", str(DEFAULT_BUNDLE), "--out", str(out),
                                   "--signing-key", str(tmp_path / "sk" / "sign.pem")])
    assert res.exit_code == 2
    assert "does not exist" in " ".join(res.stderr.split()) and "train tamper" in " ".join(res.stderr.split())
    assert not out.exists()


def test_add_to_bundle_writes_the_public_key_next_to_the_private_one(tamper_bundles):
    from medsec_edge.runtime.bundle import key_id, load_public_key, load_signing_key

    assert key_id(load_signing_key(tamper_bundles.signing_key)) == \
        key_id(load_public_key(tamper_bundles.public_key)) == tamper_bundles.key_id
    assert (tamper_bundles.signing_key.stat().st_mode & 0o777) == 0o600
    assert json.loads((tamper_bundles.calibrated / "manifest.json").read_text())["key_id"] == tamper_bundles.key_id


def test_a_new_detector_drops_the_previous_detectors_evaluation(tamper_bundles):
    """The default bundle's evaluation.tamper measured another detector: not carried over."""
    assert "tamper" not in (manifest_of(tamper_bundles.calibrated).get("evaluation") or {})


def _eval_json(path):
    rate = lambda r: {"k": 0, "n": 0, "rate": r, "ci95": [0, 1]}  # noqa: E731
    row = {"tpr_trained": rate(0.5), "tpr_held_out": rate(0.25), "fpr_genuine": rate(0.0), "fpr_benign": rate(0.01),
           "per_benign_step": {"jpeg": rate(0.02), "none": rate(0.0)}}
    roc = {"auc": 0.75, "roc_tpr_at_fpr1": 0.3, "roc_tpr_at_fpr0.1": 0.1}
    summary = {"counts": {"negatives": 10, "genuine": 2, "benign": 8, "tampered": 9},
               "blind": {"roc_trained": roc, "roc_held_out": {**roc, "auc": 0.6},
                         "operating_points": {"fpr1": row, "fpr0.1": row}, "pixel": {"iou_mean": 0.2}},
               "meta": {"command": "medsec-edge eval tamper --pydicom-data"}, "images": [{}, {}]}
    path.write_text(json.dumps(summary))
    return path


def test_record_evaluation_writes_the_summary_and_keeps_the_models(tamper_bundles, tmp_path):
    import shutil

    from medsec_edge.export.tamper_export import record_evaluation

    target = tmp_path / "bundle"
    shutil.copytree(tamper_bundles.calibrated, target)
    (target / "pending_model.onnx").write_bytes(b"another model, its manifest entry not signed yet")
    before = manifest_of(target)
    record_evaluation(target, _eval_json(tmp_path / "tamper_eval.json"), signing_key=tamper_bundles.signing_key,
                      trusted_dir=tamper_bundles.trust_dir)
    bundle = open_bundle(target, trusted_keys=tamper_bundles.trust_dir)  # still signed by a trusted key
    after = bundle.manifest.to_dict()
    assert after["models"] == before["models"]  # same files, same sha256
    assert after["calibration"] == before["calibration"] and after["training"] == before["training"]
    ev = after["evaluation"]["tamper"]
    assert ev["auc_trained"] == 0.75 and ev["auc_held_out_family"] == 0.6 and ev["held_out_family"] == "splice"
    assert ev["operating_points"]["fpr1"]["fpr_by_benign_step"] == {"jpeg": 0.02, "none": 0.0}
    assert ev["roc_tpr_at_fpr"]["trained"] == {"fpr1": 0.3, "fpr0.1": 0.1}
    assert ev["command"].startswith("medsec-edge eval tamper") and ev["images"] == 2
    # a file in the folder that the manifest does not list (yet) is kept: only our entry changes
    assert (target / "pending_model.onnx").read_bytes() == b"another model, its manifest entry not signed yet"
