"""Export the learned content fingerprint's encoder to ONNX, with a parity check in ONNX Runtime.

Layer: export. ``python -m medsec_edge.export.fingerprint_export --checkpoint runs/fingerprint/best.pt
--out bundles/default/fp_encoder.onnx`` writes the model (opset 17, input ``image`` [1, 1, H, W]
float32 display / 255 with H, W multiples of 16, output ``codes`` [1, K, H/16, W/16]), checks it
with onnx.checker, compares ONNX Runtime with torch on real display frames of the TRAIN split at
several sizes (pydicom-data is never read), and prints the bundle manifest entry it needs (the
bundle's manifest and signature are not touched here: the bundle is re-signed by its owner).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np
from medsec_edge.export.watermark_export import OPSET
from medsec_edge.runtime.errors import UsageError

log = logging.getLogger(__name__)
PARITY_TOLERANCE = 1e-3  # code units; one quantisation step is 1


def load_encoder(checkpoint: Path):
    import torch
    from medsec_edge.train.fingerprint_model import FingerprintNet

    if not Path(checkpoint).is_file():
        raise UsageError(f"checkpoint {checkpoint} does not exist: train one with 'medsec-edge train fingerprint'")
    state = torch.load(checkpoint, weights_only=False, map_location="cpu")
    net = FingerprintNet(state["config"]["dims"], state["config"]["width"])
    net.load_state_dict(state["net"])
    return net.eval(), state


def _probes() -> list[np.ndarray]:
    """Encoder inputs from real TRAIN frames (and a constant frame), several sizes."""
    from medsec_edge.runtime.io.image import display_window
    from medsec_edge.runtime.tamper.learned_fingerprint import encoder_input
    from medsec_edge.train.tamper_data import load_real

    sources, _ = load_real("train", 512)
    probes = []
    for src, (h, w) in zip(sources[:: max(1, len(sources) // 4)], ((512, 512), (160, 160), (256, 384), (100, 70))):
        frame = src.frame if src.frame.ndim == 2 else src.frame[..., :3].mean(axis=-1)
        display = display_window(src.meta, frame).to_display(frame)[:h, :w]
        probes.append(encoder_input(display, 16))
    probes.append(np.full((1, 1, 64, 48), 0.5, np.float32))
    return probes


def export_onnx(checkpoint: Path, path: Path) -> tuple[float, dict]:
    """Write the ONNX file; returns (parity max abs error in code units, checkpoint state)."""
    import onnx
    import onnxruntime as ort
    import torch

    net, state = load_encoder(checkpoint)
    torch.onnx.export(
        net, torch.zeros(1, 1, 64, 64), str(path), input_names=["image"], output_names=["codes"],
        dynamic_axes={"image": {2: "height", 3: "width"}, "codes": {2: "height_16", 3: "width_16"}},
        opset_version=OPSET, dynamo=False,
    )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    with torch.no_grad():
        for probe in _probes():
            ref = net(torch.from_numpy(probe)).numpy()
            got = sess.run(None, {"image": probe})[0]
            if got.shape != ref.shape:
                raise UsageError(f"ONNX output shape {got.shape} differs from torch's {ref.shape}")
            worst = max(worst, float(np.max(np.abs(ref - got))))
    if worst > PARITY_TOLERANCE:
        raise UsageError(f"ONNX parity failed: max abs error {worst:.2e} > {PARITY_TOLERANCE} code units")
    log.info("fingerprint encoder: onnx.checker ok, parity max abs error %.2e code units", worst)
    return worst, state


def manifest_entry(path: Path, state: dict, parity: float, command: str) -> dict:
    """The bundle manifest's ``models.fp_encoder`` entry (sha256 of the written file) plus provenance."""
    data = Path(path).read_bytes()
    return {
        "file": Path(path).name,
        "inputs": [{"dtype": "float32", "name": "image", "shape": [1, 1, "height", "width"]}],
        "outputs": [{"dtype": "float32", "name": "codes",
                     "shape": [1, int(state["config"]["dims"]), "height_16", "width_16"]}],
        "normalisation": {
            "image": "display values / 255 of one grey frame (colour: luma), edge-padded to whole cells "
                     "and area-resampled by 16 / cell (runtime/tamper/learned_fingerprint.py encoder_input)",
            "stride": 16,
            "cell": "2 * fingerprint.cell_size_for(shape): 16 px up to 512 a side",
            "quantisation": "int8, one code unit a step",
        },
        "precision": "fp32",
        "sha256": hashlib.sha256(data).hexdigest(),
        "target": "onnxruntime",
        "training": {"commands": state.get("commands", [state.get("command", "")]), "step": state.get("step"),
                     "best_val_tpr_fpr1e-3": state.get("best"), "data": state.get("data_origin", "")},
        "export": {"command": command, "opset": OPSET, "parity_max_abs": parity},
    }


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m medsec_edge.export.fingerprint_export")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="ONNX file to write")
    parser.add_argument("--entry", type=Path, default=None, help="write the manifest entry (JSON) here too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("medsec_edge.train.real_data").setLevel(logging.ERROR)
    command = shlex.join(["python", "-m", "medsec_edge.export.fingerprint_export", *argv])
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp) / "fp_encoder.onnx"
        parity, state = export_onnx(args.checkpoint, tmp_path)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_bytes(tmp_path.read_bytes())
    entry = manifest_entry(args.out, state, parity, command)
    text = json.dumps({"fp_encoder": entry}, indent=2)
    if args.entry is not None:
        args.entry.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
