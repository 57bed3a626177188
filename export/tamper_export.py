"""Export the blind tamper detector to ONNX, freeze its thresholds, and add both to a bundle.

Layer: export. The detector joins an existing bundle (the watermark models stay as they are):
its ONNX file is checked (onnx.checker, parity with torch on real inputs of several sizes), the
thresholds are calibrated through the runtime's own code path (:mod:`tamper_calibration`), and the
bundle is re-signed with the manifest recording how the detector was trained, exported and
calibrated.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np

from medsec_edge.export.watermark_export import DEFAULT_SIGNING_KEY, OPSET
from medsec_edge.runtime.bundle import generate_signing_key, load_signing_key, open_bundle, write_bundle
from medsec_edge.runtime.errors import UsageError
from medsec_edge.runtime.tamper.checker import MODEL_NAME

log = logging.getLogger(__name__)


def load_detector(checkpoint: Path):
    import torch

    from medsec_edge.train.tamper_model import TamperNet

    if not Path(checkpoint).is_file():
        raise UsageError(f"checkpoint {checkpoint} does not exist: train one with 'medsec-edge train tamper'")
    state = torch.load(checkpoint, weights_only=False, map_location="cpu")
    net = TamperNet(state["config"]["width"])
    net.load_state_dict(state["net"])
    return net.eval(), state


def _held_out_family() -> str:
    from medsec_edge.train.tamper_data import HELD_OUT_FAMILY

    return HELD_OUT_FAMILY


def _probes() -> list[np.ndarray]:
    """Detector inputs from real validation frames (training-safe) and a phantom, several sizes (mult. of 8)."""
    from medsec_edge.runtime.tamper.detector_input import detector_input
    from medsec_edge.train.tamper_data import TamperSamples

    gen = TamperSamples(12345, crop=64, side=256, split="val")
    real = gen.real
    picks = [real[i] for i in sorted({0, len(real) // 2, len(real) - 1})] if real else []
    probes = [detector_input(src.frame, src.meta)[0] for src in picks]
    frame, meta, _, _ = gen.make(0)
    probes.append(detector_input(frame, meta)[0])
    return probes


def export_onnx(checkpoint: Path, path: Path) -> tuple[float, dict]:
    """Write the ONNX file; returns (parity max abs error over both outputs, checkpoint state)."""
    import onnx
    import onnxruntime as ort
    import torch

    net, state = load_detector(checkpoint)
    torch.onnx.export(
        net, torch.zeros(1, 1, 64, 64), str(path), input_names=["image"], output_names=["mask_logits", "score"],
        dynamic_axes={"image": {2: "height", 3: "width"}, "mask_logits": {2: "height_4", 3: "width_4"}},
        opset_version=OPSET, dynamo=False,
    )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    with torch.no_grad():
        for probe in _probes():
            ref = [t.numpy() for t in net(torch.from_numpy(probe))]
            got = sess.run(None, {"image": probe})
            worst = max(worst, *(float(np.max(np.abs(r - g))) for r, g in zip(ref, got)))
    if worst > 1e-3:
        raise UsageError(f"ONNX parity failed: max abs error {worst:.2e} > 1e-3 between torch and ONNX Runtime")
    log.info("tamper detector: onnx.checker ok, parity max abs error %.2e", worst)
    return worst, state


def add_to_bundle(checkpoint: Path, bundle_dir: Path, *, out_dir: Path | None = None,
                  signing_key: Path = DEFAULT_SIGNING_KEY, trusted_dir: Path | None = None, sizes=None,
                  progress: bool = True) -> Path:
    """Export + calibrate the detector and write ``out_dir`` (default: ``bundle_dir`` in place).

    With ``trusted_dir`` the signing key's public half is put there as ``<key id>.pub``, so the
    new bundle opens (a key created here would otherwise be trusted nowhere).
    """
    if not Path(checkpoint).is_file():
        raise UsageError(f"checkpoint {checkpoint} does not exist: train one with 'medsec-edge train tamper'")
    from medsec_edge.export.tamper_calibration import CalibrationSizes, calibrate
    from medsec_edge.runtime.backends import get_backend
    from medsec_edge.runtime.tamper.checker import OperatingPoint, TamperChecker
    from medsec_edge.runtime.watermark.watermarker import Watermarker
    from medsec_edge.runtime.watermark.models import BundleWatermarkModels

    bundle_dir = Path(bundle_dir)
    out_dir = Path(out_dir) if out_dir is not None else bundle_dir
    if not signing_key.exists():
        generate_signing_key(signing_key, signing_key.with_suffix(".pub"))
    private = load_signing_key(signing_key)
    bundle = open_bundle(bundle_dir)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        onnx_path = tmp / "tamper_detector.onnx"
        parity, state = export_onnx(checkpoint, onnx_path)
        session = get_backend("onnxruntime").load(onnx_path.read_bytes(), threads=None)
        watermarker = Watermarker(BundleWatermarkModels(bundle))
        provisional = {"fpr1": OperatingPoint("fpr1", 0.01, 0.0, 1e9)}
        checker = TamperChecker(session, provisional, watermarker)
        calibration = calibrate(checker, sizes or CalibrationSizes(), progress=progress)
        files = {}
        for name in bundle.manifest.models:
            path = tmp / f"{name}.src"
            path.write_bytes(bundle.model_bytes(name))
            files[name] = path
        files[MODEL_NAME] = onnx_path
        data = bundle.manifest.to_dict()
        for key in ("version", "created", "key_id"):
            data.pop(key, None)
        data["models"] = {name: {k: v for k, v in entry.items() if k != "sha256"}
                          for name, entry in data["models"].items() if name != MODEL_NAME}
        data["models"][MODEL_NAME] = {
            "file": "tamper_detector.onnx", "precision": "fp32", "target": "onnxruntime",
            "inputs": [{"name": "image", "dtype": "float32", "shape": [1, 1, "height", "width"]}],
            "outputs": [{"name": "mask_logits", "dtype": "float32", "shape": [1, 1, "height_4", "width_4"]},
                        {"name": "score", "dtype": "float32", "shape": [1, 1]}],
            "normalisation": {"image": "window lower->0, upper->1, clipped to -0.5..1.5, padded to a multiple "
                                       "of 8 (runtime/tamper/detector_input.py)", "mask_stride": 4},
        }
        history = state.get("history", [])
        data.setdefault("training", {})["tamper"] = {
            "command": state.get("command", ""), "commands": state.get("commands", [state.get("command", "")]),
            "config": state["config"], "steps": state["step"],
            # checkpoint_best.pt: the best validation AUC on the trained families (real frames of
            # validation patients; the held-out family never chooses)
            "checkpoint": Path(checkpoint).name, "best": state.get("best", {}), "real_frames": state.get("real_origin", {}),
            "held_out_family": _held_out_family(),
            "final": history[-1] if history else {},
        }
        data.setdefault("export", {})["tamper"] = {
            "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]), "opset": OPSET,
            "parity_max_abs_error": parity, "onnx_checker": "passed (full_check)",
        }
        data.setdefault("budgets_ms", {}).update({"check_512": 30, "check_2048": 300})
        data.setdefault("calibration", {})["tamper"] = calibration
        session.close()
        out = write_bundle(out_dir, data, files, private, overwrite=True)
    if trusted_dir is not None:
        from cryptography.hazmat.primitives import serialization

        from medsec_edge.runtime.bundle import key_id

        trusted_dir.mkdir(parents=True, exist_ok=True)
        pub = private.public_key()
        pem = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        (trusted_dir / f"{key_id(pub)}.pub").write_bytes(pem)
    log.info("bundle written to %s; tamper operating points %s", out,
             json.dumps(calibration["operating_points"]))
    return out
