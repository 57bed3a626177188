"""Export a trained watermark checkpoint to ONNX, check parity with torch, write a signed bundle.

Layer: export (torch, onnx, onnxruntime). Parity is measured on random inputs and on real
images of several sizes (the decoder and strength models take any size), and the maximum
absolute error goes into the manifest.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np

from medsec_edge.runtime.bundle import default_requires, generate_signing_key, key_id, load_signing_key, write_bundle
from medsec_edge.runtime.watermark.spec import CODE_BITS, TILE, WORK_SIDE

log = logging.getLogger(__name__)

OPSET = 17
# The learned tile and readout change with every trained model, so a bundle reads the marks of its
# own model only: 1 the first release, 2 the masked model of issue 11.
MARK_VERSION = 2
DEFAULT_SIGNING_KEY = Path.home() / ".config" / "medsec-edge" / "bundle-signing.pem"


def _load_net(checkpoint: Path):
    import torch

    from medsec_edge.train.models import WatermarkNet

    state = torch.load(checkpoint, weights_only=False, map_location="cpu")
    cfg = state["config"]
    net = WatermarkNet(seed=cfg["seed"], width=cfg["width"], jnd_power=cfg.get("jnd_power", 0.0))
    net.load_state_dict(state["net"])
    net.eval()
    return net, state


def _wrappers(net):
    """Each exported model: (module, input name, output name). The two CNNs export as they are;
    the message and readout layers as a plain matrix product (their normalisation stays numpy)."""
    import torch
    from torch import nn

    class Linear(nn.Module):
        def __init__(self, weight):
            super().__init__()
            self.register_buffer("w", weight.detach().reshape(CODE_BITS, TILE * TILE).clone())

        def forward(self, bits):
            return torch.matmul(bits, self.w)

    return {
        "wm_strength": (net.strength, "image", "strength"),
        "wm_decoder": (net.decoder, "image", "signal"),
        "wm_message": (Linear(net.message.basis), "bits", "tile"),
        "wm_readout": (Linear(net.readout.patterns), "bits", "tile"),
    }


def _real_inputs() -> list[np.ndarray]:
    """Display images at working resolution from training-safe pydicom files, several sizes."""
    from medsec_edge.train.data import real_images

    out = []
    for img in real_images():
        out.append(img[:WORK_SIDE, :WORK_SIDE])
        out.append(img[: WORK_SIDE // 2 + 37, : WORK_SIDE - 21])  # odd, non-square
    return out


def export_onnx(checkpoint: Path, out_dir: Path) -> tuple[dict[str, Path], dict[str, float], dict, object]:
    """Write the four ONNX files; return their paths, parity errors, the checkpoint state and net."""
    import onnx
    import onnxruntime as ort
    import torch

    net, state = _load_net(checkpoint)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, parity, parity_rel = {}, {}, {}
    rng = np.random.default_rng(0)
    for name, (module, in_name, out_name) in _wrappers(net).items():
        path = out_dir / f"{name}.onnx"
        if in_name == "image":
            example = torch.rand(1, 1, 64, 96)
            dynamic = {in_name: {2: "height", 3: "width"}, out_name: {2: "height", 3: "width"}}
            probes = [rng.random((1, 1, 64, 64), dtype=np.float32), rng.random((1, 1, 200, 77), dtype=np.float32)]
            probes += [img[None, None].astype(np.float32) for img in _real_inputs()]
        else:
            example = torch.ones(1, CODE_BITS)
            dynamic = {in_name: {0: "batch"}, out_name: {0: "batch"}}
            probes = [np.sign(rng.standard_normal((3, CODE_BITS))).astype(np.float32),
                      np.eye(CODE_BITS, dtype=np.float32)]
        torch.onnx.export(module, (example,), str(path), input_names=[in_name], output_names=[out_name],
                          dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        worst, scale = 0.0, 0.0
        with torch.no_grad():
            for probe in probes:
                ref = module(torch.from_numpy(probe)).numpy()
                got = sess.run(None, {in_name: probe})[0]
                worst = max(worst, float(np.max(np.abs(ref - got))))
                scale = max(scale, float(np.max(np.abs(ref))))
        parity[name] = worst
        # the masked strength map grows as a power of the local variance: its float32 rounding
        # is judged against the map's own scale
        parity_rel[name] = worst / max(scale, 1e-12)
        paths[name] = path
        log.info("%s: onnx.checker ok, parity max abs error %.2e", name, worst)
    return paths, {"abs": parity, "rel": parity_rel}, state, net


def _spec(in_name: str, out_name: str) -> tuple[list, list]:
    if in_name == "image":
        return ([{"name": in_name, "dtype": "float32", "shape": [1, 1, "height", "width"]}],
                [{"name": out_name, "dtype": "float32", "shape": [1, 1, "height", "width"]}])
    return ([{"name": in_name, "dtype": "float32", "shape": ["batch", CODE_BITS]}],
            [{"name": out_name, "dtype": "float32", "shape": ["batch", TILE * TILE]}])


WATERMARK_MODELS = ("wm_strength", "wm_decoder", "wm_message", "wm_readout")
OTHER_SECTIONS = ("tamper", "fp_encoder", "tamper_candidate_not_shipped")  # kept within training/export/evaluation


def _keep_other_models(bundle_dir: Path, manifest: dict, paths: dict, tmp: Path,
                       trusted_dir: Path | None = None) -> tuple[dict, dict]:
    """A bundle that already sits at ``bundle_dir`` keeps its other models (tamper detector,
    fingerprint encoder), their entries and calibration: re-exporting the watermark replaces the
    watermark's four models and sections only. Its key must be trusted (bundles/trusted_keys)."""
    if not (Path(bundle_dir) / "manifest.json").is_file():
        return manifest, paths
    from medsec_edge.runtime.bundle import open_bundle

    old = open_bundle(bundle_dir) if trusted_dir is None else open_bundle(bundle_dir, trusted_keys=trusted_dir)
    data = old.manifest.to_dict()
    paths = dict(paths)
    for name, entry in data["models"].items():
        if name in WATERMARK_MODELS:
            continue
        src = tmp / f"{name}.kept"
        src.write_bytes(old.model_bytes(name))
        paths[name] = src
        manifest["models"][name] = {k: v for k, v in entry.items() if k != "sha256"}
    for section in ("training", "export", "evaluation"):
        kept = {k: v for k, v in (data.get(section) or {}).items() if k in OTHER_SECTIONS}
        manifest[section] = {**(manifest.get(section) or {}), **kept}
    for section in ("calibration", "extra"):
        if data.get(section):
            manifest[section] = data[section]
    manifest["budgets_ms"] = {**data.get("budgets_ms", {}), **manifest["budgets_ms"]}
    return manifest, paths


def build_bundle(checkpoint: Path, bundle_dir: Path, *, signing_key: Path = DEFAULT_SIGNING_KEY,
                 trusted_dir: Path | None = None, target_psnr_db: float = 42.5,
                 evaluation: dict | None = None, overwrite: bool = True) -> Path:
    """Export, check parity and write a signed bundle. Creates the signing key on first use."""
    if not signing_key.exists():
        generate_signing_key(signing_key, signing_key.with_suffix(".pub"))
    private = load_signing_key(signing_key)
    with tempfile.TemporaryDirectory() as tmp:
        paths, parities, state, net = export_onnx(checkpoint, Path(tmp))
        parity = parities["abs"]
        wrappers = {"wm_strength": ("image", "strength"), "wm_decoder": ("image", "signal"),
                    "wm_message": ("bits", "tile"), "wm_readout": ("bits", "tile")}
        models = {}
        for name, (in_name, out_name) in wrappers.items():
            inputs, outputs = _spec(in_name, out_name)
            norm = {"image": "display values / 255 at working resolution"} if in_name == "image" else {}
            if name == "wm_readout":
                norm = {"gain": float(net.readout.gain.detach())}
            models[name] = {"precision": "fp32", "target": "onnxruntime", "inputs": inputs,
                            "outputs": outputs, "normalisation": norm}
        history = state.get("history", [])
        manifest = {
            "name": "medsec-edge-default",
            "models": models,
            "payload": {"version": 1, "data_bits": 64, "code_bits": CODE_BITS, "ecc": "reedsolo RS(16,11) GF(256)",
                        "check": "sha256[:2] over version|data", "default": "HMAC-SHA256(identity, key)[:8]",
                        "tile": TILE, "work_side": WORK_SIDE, "target_psnr_db": target_psnr_db,
                        "mark_version": MARK_VERSION, "reads_mark_versions": [MARK_VERSION]},
            "budgets_ms": {"embed_512": 20, "extract_512": 20, "embed_2048": 200, "extract_2048": 200},
            "training": {"command": state.get("command", ""), "config": state["config"],
                         "steps": state["step"], "final": history[-1] if history else {}},
            "export": {"command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]), "opset": OPSET,
                       "parity_max_abs_error": parity, "parity_max_rel_error": parities["rel"],
                       "onnx_checker": "passed (full_check)"},
            "evaluation": evaluation or {},
            "requires": default_requires(OPSET),
        }
        manifest, paths = _keep_other_models(bundle_dir, manifest, paths, Path(tmp), trusted_dir)
        out = write_bundle(bundle_dir, manifest, paths, private, overwrite=overwrite)
    if trusted_dir is not None:
        trusted_dir.mkdir(parents=True, exist_ok=True)
        pub = private.public_key()
        from cryptography.hazmat.primitives import serialization

        pem = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        (trusted_dir / f"{key_id(pub)}.pub").write_bytes(pem)
    log.info("bundle written to %s; parity %s", out, json.dumps(parity))
    return out
