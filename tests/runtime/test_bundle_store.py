"""The device's bundle store (bundle_store.py): install side by side, switch current and previous
atomically, roll back, prune, the install log, and --bundle / $MEDSEC_EDGE_BUNDLE naming a device
directory. Bundles are small, real and signed: tiny ONNX graphs and a fresh key per module."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from medsec_edge.runtime import bundle_store
from medsec_edge.runtime.bundle import (
    generate_signing_key,
    open_bundle,
    pack_tar,
    peek_manifest,
    version_id,
    write_bundle,
)
from medsec_edge.runtime.bundle_store import (
    current_bundle,
    install_bundle,
    is_device_dir,
    read_install_log,
    resolve_bundle_path,
    rollback,
)
from medsec_edge.runtime.errors import BundleError, UsageError
from tests.conftest import make_conv_relu_onnx

REPO = Path(__file__).resolve().parents[2]

TINY_MODEL = {
    "precision": "fp32",
    "target": "onnxruntime",
    "inputs": [{"name": "x", "dtype": "float32", "shape": ["N", 1, 8, 8]}],
    "outputs": [{"name": "y", "dtype": "float32", "shape": ["N", 2, 8, 8]}],
}


def make_keys(root: Path) -> dict:
    """A trusted signing key and an untrusted one, each .pub in its own folder."""
    kid = generate_signing_key(root / "signing.key", root / "trusted" / "signing.pub")
    other = generate_signing_key(root / "other.key", root / "others" / "other.pub")
    return {"private": root / "signing.key", "trusted_dir": root / "trusted", "id": kid,
            "other_private": root / "other.key", "other_dir": root / "others", "other_id": other}


def make_bundle(directory: Path, private_key, *, name: str = "tiny", seed: int = 0, requires: dict | None = None,
                target: str = "onnxruntime", variant: bool = True) -> Path:
    """A signed bundle of a tiny Conv+Relu graph ("conv") and, with ``variant``, an alternate
    precision of it ("conv@int8-qdq", another small graph, so another file and hash)."""
    sources = directory.parent / f".{directory.name}-sources"
    sources.mkdir(parents=True, exist_ok=True)
    files, models = {}, {}
    for model, model_seed, precision in (("conv", seed, "fp32"), ("conv@int8-qdq", seed + 100, "int8-qdq")):
        if model != "conv" and not variant:
            continue
        path = sources / (model.replace("@", "_") + ".onnx")
        path.write_bytes(make_conv_relu_onnx(seed=model_seed).model_bytes)
        files[model] = path
        models[model] = dict(TINY_MODEL, precision=precision, target=target)
    manifest = {
        "name": name,
        "models": models,
        "payload": {"bits": 64},
        "budgets_ms": {"embed_512": 20},
        "training": {"command": "medsec-edge train --tiny"},
        "export": {"command": "medsec-edge export watermark --tiny", "opset": 17},
        "calibration": {"watermark": {"presence": {"threshold": 1.5, "frames": 4}}},
        "evaluation": {"false_detections": {"found": 0, "n": 10}},
    }
    if requires is not None:
        manifest["requires"] = requires
    written = write_bundle(directory, manifest, files, private_key)
    shutil.rmtree(sources)
    return written


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def releases(tmp_path_factory, keys):
    """Two releases of one bundle (different weights) and a .tar of the first."""
    root = tmp_path_factory.mktemp("releases")
    first = make_bundle(root / "v1", keys["private"], seed=0)
    second = make_bundle(root / "v2", keys["private"], seed=1)
    return {"v1": first, "v2": second, "v1_tar": pack_tar(first, root / "v1.tar")}


def _version(bundle_dir: Path) -> str:
    manifest, raw = peek_manifest(bundle_dir)
    return version_id(manifest.name, raw)


def _links(device: Path) -> tuple[str | None, str | None]:
    def read(name):
        link = device / name
        return os.readlink(link) if link.is_symlink() else None

    return read("current"), read("previous")


def test_install_switch_rollback(tmp_path, keys, releases):
    device = tmp_path / "device"
    v1, v2 = _version(releases["v1"]), _version(releases["v2"])
    assert v1 != v2 and v1.startswith("tiny-") and len(v1) == len("tiny-") + 12

    first = install_bundle(releases["v1"], device, trusted_keys=keys["trusted_dir"])
    assert (first.action, first.version, first.previous) == ("install", v1, None)
    assert _links(device) == (f"versions/{v1}", None)  # relative links
    assert current_bundle(device) == device / "versions" / v1
    assert sorted(p.name for p in (device / "versions" / v1).iterdir()) == [
        "conv.onnx", "conv_int8-qdq.onnx", "manifest.json", "manifest.sig"]
    assert open_bundle(device / "versions" / v1, trusted_keys=keys["trusted_dir"]).key_id == keys["id"]

    second = install_bundle(releases["v2"], device, trusted_keys=keys["trusted_dir"])
    assert (second.action, second.version, second.previous) == ("install", v2, v1)
    assert _links(device) == (f"versions/{v2}", f"versions/{v1}")

    again = install_bundle(releases["v2"], device, trusted_keys=keys["trusted_dir"])
    assert again.action == "unchanged" and _links(device) == (f"versions/{v2}", f"versions/{v1}")

    back = rollback(device, trusted_keys=keys["trusted_dir"])
    assert (back.action, back.version, back.previous) == ("rollback", v1, v2)
    assert _links(device) == (f"versions/{v1}", f"versions/{v2}")
    forth = rollback(device, trusted_keys=keys["trusted_dir"])
    assert (forth.version, forth.previous) == (v2, v1)

    # an installed version is switched to, not copied again
    switched = install_bundle(releases["v1"], device, trusted_keys=keys["trusted_dir"])
    assert switched.action == "switch" and _links(device) == (f"versions/{v1}", f"versions/{v2}")

    log = read_install_log(device)
    assert [r["action"] for r in log] == ["install", "install", "unchanged", "rollback", "rollback", "switch"]
    assert all(r["key_id"] == keys["id"] and r["version"].startswith("versions/tiny-") and r["time"] for r in log)
    assert set(log[1]) == {"time", "action", "version", "name", "key_id", "previous"}
    # nothing left behind: no staging folders, no temporary links
    assert sorted(p.name for p in device.iterdir()) == [".lock", "current", "install.log", "previous", "versions"]


def test_install_from_tar_extracts_only_the_signed_files(tmp_path, keys, releases):
    device = tmp_path / "device"
    change = install_bundle(releases["v1_tar"], device, trusted_keys=keys["trusted_dir"])
    assert change.version == _version(releases["v1"])  # same release as the folder it was packed from
    installed = device / "versions" / change.version
    for name in ("manifest.json", "manifest.sig", "conv.onnx", "conv_int8-qdq.onnx"):
        assert (installed / name).read_bytes() == (releases["v1"] / name).read_bytes()
    assert not any(p.is_symlink() for p in installed.rglob("*"))


def test_refused_bundle_changes_nothing(tmp_path, keys, releases):
    device = tmp_path / "device"
    install_bundle(releases["v1"], device, trusted_keys=keys["trusted_dir"])
    before = sorted(str(p.relative_to(device)) for p in device.rglob("*"))
    log_before = (device / "install.log").read_bytes()
    altered = tmp_path / "altered"
    shutil.copytree(releases["v2"], altered)
    data = bytearray((altered / "conv.onnx").read_bytes())
    data[len(data) // 3] ^= 0x40
    (altered / "conv.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="'conv.onnx' has sha256"):
        install_bundle(altered, device, trusted_keys=keys["trusted_dir"])
    untrusted = make_bundle(tmp_path / "untrusted", keys["other_private"], seed=5)
    with pytest.raises(BundleError, match=f"unknown key id {keys['other_id']}"):
        install_bundle(untrusted, device, trusted_keys=keys["trusted_dir"])
    assert sorted(str(p.relative_to(device)) for p in device.rglob("*")) == before
    assert (device / "install.log").read_bytes() == log_before


def test_a_damaged_installed_copy_is_replaced_not_reused(tmp_path, keys, releases):
    device = tmp_path / "device"
    change = install_bundle(releases["v1"], device, trusted_keys=keys["trusted_dir"])
    model = device / "versions" / change.version / "conv.onnx"
    model.write_bytes(b"rotted on the device's disk")
    again = install_bundle(releases["v1"], device, trusted_keys=keys["trusted_dir"])
    assert again.action == "install"
    assert model.read_bytes() == (releases["v1"] / "conv.onnx").read_bytes()
    assert not any(p.name.startswith(".trash-") for p in device.iterdir())


def test_rollback_needs_a_previous_and_verifies_it(tmp_path, keys, releases):
    device = tmp_path / "device"
    with pytest.raises(BundleError, match="does not exist"):
        rollback(device)
    install_bundle(releases["v1"], device, trusted_keys=keys["trusted_dir"])
    with pytest.raises(BundleError, match="has no previous bundle to roll back to"):
        rollback(device, trusted_keys=keys["trusted_dir"])
    change = install_bundle(releases["v2"], device, trusted_keys=keys["trusted_dir"])
    # the previous version rots: rollback refuses and current stays
    (device / "versions" / change.previous / "manifest.sig").write_bytes(b"\0" * 64)
    with pytest.raises(BundleError, match=r"rollback refused: .*fails verification, current stays.*signature check failed"):
        rollback(device, trusted_keys=keys["trusted_dir"])
    assert current_bundle(device).name == change.version


def test_keep_prunes_old_versions_but_never_current_or_previous(tmp_path, keys, releases):
    device = tmp_path / "device"
    third = make_bundle(tmp_path / "v3", keys["private"], seed=2)
    for bundle in (releases["v1"], releases["v2"]):
        install_bundle(bundle, device, trusted_keys=keys["trusted_dir"])
    change = install_bundle(third, device, trusted_keys=keys["trusted_dir"], keep=0)
    assert change.removed == (_version(releases["v1"]),)
    assert sorted(p.name for p in (device / "versions").iterdir()) == sorted([change.version, change.previous])
    assert read_install_log(device)[-1]["removed"] == [f"versions/{_version(releases['v1'])}"]
    with pytest.raises(UsageError):
        install_bundle(third, device, keep=-1)


def test_device_directory_resolution(tmp_path, keys, releases):
    device = tmp_path / "device"
    device.mkdir()
    assert not is_device_dir(device)
    assert resolve_bundle_path(releases["v1"]) == releases["v1"]  # a bundle is itself
    assert resolve_bundle_path(releases["v1_tar"]) == releases["v1_tar"]
    install_bundle(releases["v1"], device, trusted_keys=keys["trusted_dir"])
    assert is_device_dir(device)
    assert resolve_bundle_path(device) == device / "versions" / _version(releases["v1"])
    # a link the store would never write is refused, not followed
    (device / "current").unlink()
    (device / "current").symlink_to(releases["v2"].resolve())
    with pytest.raises(BundleError, match="expected versions/<version>"):
        current_bundle(device)
    (device / "current").unlink()
    (device / "current").symlink_to("versions/gone")
    with pytest.raises(BundleError, match="which does not exist"):
        resolve_bundle_path(device)
    with pytest.raises(UsageError, match="is a bundle, not a device directory"):
        install_bundle(releases["v2"], releases["v1"], trusted_keys=keys["trusted_dir"])


def test_install_from_another_device_directory(tmp_path, keys, releases):
    one, two = tmp_path / "one", tmp_path / "two"
    install_bundle(releases["v2"], one, trusted_keys=keys["trusted_dir"])
    change = install_bundle(one, two, trusted_keys=keys["trusted_dir"])
    assert change.version == _version(releases["v2"])


def test_interrupted_install_leftovers_are_swept(tmp_path, keys, releases):
    device = tmp_path / "device"
    install_bundle(releases["v1"], device, trusted_keys=keys["trusted_dir"])
    (device / ".staging-dead").mkdir()
    (device / ".staging-dead" / "conv.onnx").write_bytes(b"half")
    os.symlink("versions/x", device / ".current.1.abcd")
    install_bundle(releases["v2"], device, trusted_keys=keys["trusted_dir"])
    assert not (device / ".staging-dead").exists() and not (device / ".current.1.abcd").is_symlink()


# --- the image commands' --bundle and $MEDSEC_EDGE_BUNDLE ---------------------------------------


@pytest.fixture
def default_device(tmp_path, keys, monkeypatch):
    """A device directory holding the repo's default bundle and, current, a copy of it signed by
    the test key under another name (both trusted)."""
    from medsec_edge.runtime.bundle import Manifest

    monkeypatch.setenv("MEDSEC_EDGE_TRUSTED_KEYS",
                       os.pathsep.join([str(REPO / "bundles" / "trusted_keys"), str(keys["trusted_dir"])]))
    default = REPO / "bundles" / "default"
    manifest = Manifest.from_json_bytes((default / "manifest.json").read_bytes())
    files = {name: default / entry.file for name, entry in manifest.models.items()}
    from dataclasses import replace

    copy = write_bundle(tmp_path / "copy", replace(manifest, name="default-copy"), files, keys["private"])
    device = tmp_path / "device"
    install_bundle(default, device)
    install_bundle(copy, device)
    return device


def test_load_watermarker_follows_current_of_a_device_directory(default_device, monkeypatch):
    from medsec_edge.runtime.pipeline import BUNDLE_ENV, load_watermarker

    _, bundle = load_watermarker(default_device, threads=1)
    assert bundle.manifest.name == "default-copy"
    assert bundle.path == current_bundle(default_device)  # the version folder, resolved once
    rollback(default_device)
    monkeypatch.setenv(BUNDLE_ENV, str(default_device))
    _, bundle = load_watermarker(None, threads=1)
    assert bundle.manifest.name == "medsec-edge-default"


def test_a_device_directory_without_current_is_a_clear_error(tmp_path):
    from medsec_edge.runtime.pipeline import load_watermarker

    device = tmp_path / "device"
    (device / "versions").mkdir(parents=True)
    (device / "current").symlink_to("versions/none")
    with pytest.raises(BundleError, match="current points to versions/none, which does not exist"):
        load_watermarker(device)


def test_install_log_holds_no_manifest_content(tmp_path, keys, releases):
    device = tmp_path / "device"
    install_bundle(releases["v1"], device, trusted_keys=keys["trusted_dir"])
    text = (device / "install.log").read_text()
    record = json.loads(text)
    assert "--tiny" not in text and "threshold" not in text  # commands, calibration: not logged
    assert record["name"] == "tiny" and bundle_store.INSTALL_LOG == "install.log"
