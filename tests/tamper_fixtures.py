"""Shared fixtures for the tamper check's tests: a real bundle WITH a tamper detector.

Import with ``from tests.tamper_fixtures import *``. The bundle is built for real, once per test
session: an untrained ``TamperNet`` (width 4) checkpoint goes through ``add_to_bundle`` (ONNX
export, onnx.checker, parity with torch, calibration through the runtime's own path on a small
validation set) on top of ``bundles/default``, signed by a new Ed25519 key that only
``trust_dir`` vouches for.

Two more bundles are derived from it by re-signing a changed manifest with the same key (same
model files, only thresholds differ), so tests can force a decision without touching the code:

* ``strict``: every operating point has ``blind_logit = pixel_logit = -1e9`` (every image is
  flagged by the blind detector, the whole frame is its mask);
* ``lenient``: ``blind_logit = wm_deficit = 1e9`` (nothing is flagged, unless the watermark
  names another image).

An untrained detector's calibrated thresholds say nothing about which real image it flags, so
tests on the calibrated bundle check the decision rule against the frozen threshold, not an
outcome.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = [
    "PATIENT_NAME",
    "REPO",
    "TamperBundles",
    "base_env",
    "build_tamper_bundles",
    "ct_image",
    "ct_path",
    "derive_bundle",
    "restore_logging",
    "tamper_bundles",
    "tamper_env",
]

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BUNDLE = REPO / "bundles" / "default"
PATIENT_NAME = "CompressedSamples^CT1"  # CT_small.dcm's PatientName: must never be written by us
CAL_GENUINE, CAL_TAMPERED, CAL_WATERMARKED = 30, 6, 9

_CACHE: dict[str, "TamperBundles"] = {}  # one build per session, whichever module asks first


@dataclass(frozen=True)
class TamperBundles:
    calibrated: Path  # as add_to_bundle wrote it
    strict: Path  # every image flagged by the blind rule, whole-frame masks
    lenient: Path  # nothing flagged by the blind or the watermark-deficit rule
    trust_dir: Path  # the new signing key's .pub (and the repo's default key)
    signing_key: Path
    public_key: Path
    key_id: str
    checkpoint: Path
    default_hashes: dict  # sha256 of bundles/default's files before the build
    no_detector: Path  # the watermark models only (as bundles/default was before issue 3)


def _hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def derive_bundle(source: Path, target: Path, signing_key: Path, trust_dir: Path, **thresholds: float) -> Path:
    """``source`` re-signed to ``target`` with every tamper operating point's ``thresholds`` set."""
    from medsec_edge.runtime.bundle import open_bundle, write_bundle

    bundle = open_bundle(source, trusted_keys=trust_dir)
    data = bundle.manifest.to_dict()
    for point in data["calibration"]["tamper"]["operating_points"].values():
        point.update(thresholds)
    files = {name: source / entry.file for name, entry in bundle.manifest.models.items()}
    return write_bundle(target, data, files, signing_key)


def strip_detector(source: Path, target: Path, signing_key: Path, trust_dir: Path) -> Path:
    """``source`` without its tamper detector and thresholds (the watermark models only), re-signed."""
    from medsec_edge.runtime.bundle import open_bundle, write_bundle
    from medsec_edge.runtime.tamper.checker import MODEL_NAME

    bundle = open_bundle(source, trusted_keys=trust_dir)
    data = bundle.manifest.to_dict()
    del data["models"][MODEL_NAME]
    data["calibration"].pop("tamper", None)
    files = {name: source / entry.file for name, entry in bundle.manifest.models.items() if name != MODEL_NAME}
    return write_bundle(target, data, files, signing_key)


def build_tamper_bundles(root: Path) -> TamperBundles:
    torch = pytest.importorskip("torch", reason="the tamper bundle needs torch: pip install 'medsec-edge[export]'")
    pytest.importorskip("onnx", reason="the tamper bundle needs onnx: pip install 'medsec-edge[export]'")
    from medsec_edge.export.tamper_calibration import CalibrationSizes
    from medsec_edge.export.tamper_export import add_to_bundle
    from medsec_edge.runtime.bundle import default_trust_dir, key_id, load_public_key
    from medsec_edge.train.tamper_model import TamperNet

    default_hashes = _hashes(DEFAULT_BUNDLE)
    trust_dir = root / "trust"
    trust_dir.mkdir(parents=True)
    for pub in default_trust_dir().glob("*.pub"):  # add_to_bundle opens bundles/default
        shutil.copy(pub, trust_dir / pub.name)
    checkpoint = root / "checkpoint.pt"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        net = TamperNet(4)
        torch.save({"config": {"width": 4}, "net": net.state_dict(), "step": 0, "history": [],
                    "command": "test"}, checkpoint)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MEDSEC_EDGE_THREADS", "1")
            mp.setenv("MEDSEC_EDGE_TRUSTED_KEYS", str(trust_dir))
            signing_key = root / "sign.pem"
            calibrated = add_to_bundle(
                checkpoint, DEFAULT_BUNDLE, out_dir=root / "bundle", signing_key=signing_key,
                sizes=CalibrationSizes(genuine=CAL_GENUINE, tampered=CAL_TAMPERED, watermarked=CAL_WATERMARKED),
                progress=False,
            )
    finally:
        torch.set_num_threads(threads)
    public_key = signing_key.with_suffix(".pub")
    kid = key_id(load_public_key(public_key))
    shutil.copy(public_key, trust_dir / f"{kid}.pub")
    strict = derive_bundle(calibrated, root / "strict", signing_key, trust_dir, blind_logit=-1e9, pixel_logit=-1e9)
    lenient = derive_bundle(calibrated, root / "lenient", signing_key, trust_dir, blind_logit=1e9, wm_deficit=1e9)
    no_detector = strip_detector(calibrated, root / "no_detector", signing_key, trust_dir)
    return TamperBundles(calibrated, strict, lenient, trust_dir, signing_key, public_key, kid, checkpoint,
                         default_hashes, no_detector)


@pytest.fixture(scope="session")
def tamper_bundles(tmp_path_factory) -> TamperBundles:
    # Each importing module registers this fixture anew (a session-scoped fixture per module);
    # the module-level cache keeps it to one build per session.
    if "bundles" not in _CACHE:
        _CACHE["bundles"] = build_tamper_bundles(tmp_path_factory.mktemp("tamper"))
    return _CACHE["bundles"]


@pytest.fixture
def base_env(monkeypatch, tmp_path) -> None:
    """One inference thread, a fresh (absent) watermark key and seal key ring, the default trust store,
    no bundle override."""
    monkeypatch.setenv("MEDSEC_EDGE_THREADS", "1")
    monkeypatch.setenv("MEDSEC_EDGE_KEY", str(tmp_path / "keys" / "watermark.key"))
    monkeypatch.setenv("MEDSEC_EDGE_KEYS", str(tmp_path / "keys" / "ring"))
    monkeypatch.delenv("MEDSEC_EDGE_BUNDLE", raising=False)
    monkeypatch.delenv("MEDSEC_EDGE_TRUSTED_KEYS", raising=False)


@pytest.fixture
def tamper_env(base_env, monkeypatch, tamper_bundles) -> TamperBundles:
    """``base_env``, and the new signing key trusted (beside the repo's default key)."""
    monkeypatch.setenv("MEDSEC_EDGE_TRUSTED_KEYS", str(tamper_bundles.trust_dir))
    return tamper_bundles


@pytest.fixture
def restore_logging():
    """The CLI's callback reconfigures the root logger (force=True); put it back afterwards."""
    root, pyd = logging.getLogger(), logging.getLogger("pydicom")
    saved = (root.handlers[:], root.level, pyd.level)
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    pyd.setLevel(saved[2])


@pytest.fixture(scope="session")
def ct_path() -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm", download=False)
    if path is None:
        pytest.skip("pydicom's CT_small.dcm is not installed")
    return Path(path)


@pytest.fixture
def ct_image(ct_path):
    from medsec_edge.runtime.io.readers import read_image

    return read_image(ct_path)


def manifest_of(bundle_dir: Path) -> dict:
    return json.loads((bundle_dir / "manifest.json").read_text())


__all__.append("manifest_of")
