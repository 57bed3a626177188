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


def _write_in_place(out_dir: Path, bundle_dir: Path, data: dict, files: dict, private) -> Path:
    """write_bundle, keeping the files of ``bundle_dir`` that its manifest does not list (another
    model waiting for its entry, e.g. fp_encoder.onnx) when the bundle is rewritten in place:
    write_bundle replaces the directory whole, and this export must replace only its own entry."""
    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    keep: dict[str, bytes] = {}
    if out_dir.resolve() == bundle_dir.resolve() and bundle_dir.is_dir():
        listed = {"manifest.json", "manifest.sig", *(str(e.get("file", "")) for e in data["models"].values())}
        listed |= {Path(p).name for p in files.values()}
        keep = {p.name: p.read_bytes() for p in bundle_dir.iterdir() if p.is_file() and p.name not in listed}
    out = write_bundle(out_dir, data, files, private, overwrite=True)
    for name, blob in keep.items():
        (out / name).write_bytes(blob)
        log.info("kept %s (in the bundle folder, not in its manifest)", name)
    return out


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
        # The evaluation recorded for the previous detector says nothing about this one: dropped
        # until record_evaluation() writes this detector's own (medsec-edge eval tamper).
        if isinstance(data.get("evaluation"), dict):
            data["evaluation"].pop("tamper", None)
        data.setdefault("budgets_ms", {}).update({"check_512": 30, "check_2048": 300})
        data.setdefault("calibration", {})["tamper"] = calibration
        session.close()
        out = _write_in_place(out_dir, bundle_dir, data, files, private)
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


def evaluation_summary(eval_json: Path, report: str = "docs/tamper/tamper_eval.md") -> dict:
    """The manifest's ``evaluation.tamper`` from a ``medsec-edge eval tamper`` tamper_eval.json."""
    summary = json.loads(Path(eval_json).read_text())
    blind = summary["blind"]
    points = {}
    for name, row in blind["operating_points"].items():
        points[name] = {"tpr_trained": row["tpr_trained"]["rate"], "tpr_held_out": row["tpr_held_out"]["rate"],
                        "fpr_genuine": row["fpr_genuine"]["rate"], "fpr_benign": row["fpr_benign"]["rate"],
                        "fpr_by_benign_step": {k: v["rate"] for k, v in row["per_benign_step"].items()}}
    return {
        "command": summary.get("meta", {}).get("command", ""),
        "held_out": "pydicom-data (deduplicated), never trained on nor used for thresholds",
        "images": len(summary.get("images", [])),
        "counts": summary["counts"],
        "auc_trained": blind["roc_trained"]["auc"],
        "auc_held_out_family": blind["roc_held_out"]["auc"],
        "held_out_family": _held_out_family(),
        "roc_tpr_at_fpr": {"trained": {k: blind["roc_trained"][f"roc_tpr_at_{k}"] for k in ("fpr1", "fpr0.1")},
                           "held_out": {k: blind["roc_held_out"][f"roc_tpr_at_{k}"] for k in ("fpr1", "fpr0.1")}},
        "operating_points": points,
        "pixel_iou": blind["pixel"]["iou_mean"],
        "report": report,
    }


def resign_manifest(bundle_dir: Path, update, *, signing_key: Path = DEFAULT_SIGNING_KEY,
                    trusted_dir: Path | None = None) -> Path:
    """Re-sign the bundle in place with ``update(data)`` applied to its manifest dict; model files
    and every other entry stay as they are."""
    bundle_dir = Path(bundle_dir)
    private = load_signing_key(signing_key)
    bundle = open_bundle(bundle_dir) if trusted_dir is None else open_bundle(bundle_dir, trusted_keys=trusted_dir)
    data = bundle.manifest.to_dict()
    for key in ("version", "created", "key_id"):
        data.pop(key, None)
    data["models"] = {name: {k: v for k, v in entry.items() if k != "sha256"} for name, entry in data["models"].items()}
    update(data)
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for name in bundle.manifest.models:
            path = Path(tmp) / f"{name}.src"
            path.write_bytes(bundle.model_bytes(name))
            files[name] = path
        return _write_in_place(bundle_dir, bundle_dir, data, files, private)


def record_evaluation(bundle_dir: Path, eval_json: Path, *, signing_key: Path = DEFAULT_SIGNING_KEY,
                      trusted_dir: Path | None = None, report: str = "docs/tamper/tamper_eval.md") -> Path:
    """Write the detector's held-out evaluation into the bundle's manifest (``evaluation.tamper``)
    and re-sign it; model files and every other entry stay as they are."""
    summary = evaluation_summary(eval_json, report)
    out = resign_manifest(bundle_dir, lambda data: data.setdefault("evaluation", {}).__setitem__("tamper", summary),
                          signing_key=signing_key, trusted_dir=trusted_dir)
    log.info("evaluation.tamper recorded in %s", out)
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m medsec_edge.export.tamper_export record-eval BUNDLE TAMPER_EVAL_JSON [--signing-key K]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m medsec_edge.export.tamper_export")
    sub = parser.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record-eval", help="write a tamper_eval.json summary into the bundle's manifest")
    rec.add_argument("bundle", type=Path)
    rec.add_argument("eval_json", type=Path)
    rec.add_argument("--signing-key", type=Path, default=DEFAULT_SIGNING_KEY)
    rec.add_argument("--report", default="docs/tamper/tamper_eval.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    record_evaluation(args.bundle, args.eval_json, signing_key=args.signing_key, report=args.report)


if __name__ == "__main__":
    main()
