"""Bundles: write and sign, open and verify (signature, version, hashes, compatibility), tar
packing and its path-traversal refusal, keys and the trust store."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medsec_edge.runtime import bundle as bundle_mod
from medsec_edge.runtime.backends import tensorrt_backend as trt_backend
from medsec_edge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from medsec_edge.runtime.bundle import (
    MANIFEST_VERSION,
    Bundle,
    Manifest,
    ModelEntry,
    TensorSpec,
    generate_signing_key,
    key_id,
    load_public_key,
    load_signing_key,
    open_bundle,
    pack_tar,
    trusted_public_keys,
    write_bundle,
)
from medsec_edge.runtime.errors import BundleError, KeyFileError, UsageError

CONV_MODEL = {
    "precision": "fp32",
    "target": "onnxruntime",
    "inputs": [{"name": "x", "dtype": "float32", "shape": ["N", 1, 8, 8]}],
    "outputs": [{"name": "y", "dtype": "float32", "shape": ["N", 2, 8, 8]}],
    "normalisation": {"scale": 1.0, "offset": 0.0},
}


def _manifest(**models) -> dict:
    return {
        "name": "test-bundle",
        "models": models or {"conv": dict(CONV_MODEL)},
        "payload": {"bits": 64},
        "budgets_ms": {"watermark": 50},
        "training": {"command": "medsec-edge train --tiny"},
        "export": {"command": "medsec-edge export"},
        "evaluation": {"psnr_window_db": 45.0},
    }


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    kid = generate_signing_key(root / "signing.key", root / "trusted" / "signing.pub")
    other = generate_signing_key(root / "other.key", root / "others" / "other.pub")
    return {
        "private": root / "signing.key",
        "public": root / "trusted" / "signing.pub",
        "trusted_dir": root / "trusted",
        "id": kid,
        "other_private": root / "other.key",
        "other_public": root / "others" / "other.pub",
        "other_id": other,
    }


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, conv_relu_onnx):
    path = tmp_path_factory.mktemp("model") / "conv.onnx"
    path.write_bytes(conv_relu_onnx.model_bytes)
    return path


@pytest.fixture
def bundle_dir(tmp_path, keys, model_file):
    return write_bundle(tmp_path / "bundle", _manifest(), {"conv": model_file}, keys["private"])


def _resign(directory, data: dict, private_key_path) -> None:
    raw = json.dumps(data, indent=2, sort_keys=True).encode() + b"\n"
    (directory / "manifest.json").write_bytes(raw)
    (directory / "manifest.sig").write_bytes(load_signing_key(private_key_path).sign(raw))


# --- the good path --------------------------------------------------------------------------


def test_write_open_run(bundle_dir, keys, conv_relu_onnx):
    assert sorted(p.name for p in bundle_dir.iterdir()) == ["conv.onnx", "manifest.json", "manifest.sig"]
    assert len((bundle_dir / "manifest.sig").read_bytes()) == 64
    bundle = open_bundle(bundle_dir, public_key=keys["public"])
    manifest = bundle.manifest
    assert isinstance(manifest, Manifest)
    assert manifest.version == MANIFEST_VERSION == 1
    assert manifest.name == "test-bundle" and manifest.created
    assert manifest.key_id == bundle.key_id == keys["id"]
    entry = manifest.models["conv"]
    assert entry == ModelEntry(
        name="conv",
        file="conv.onnx",
        sha256=hashlib.sha256(conv_relu_onnx.model_bytes).hexdigest(),
        precision="fp32",
        target="onnxruntime",
        inputs=[TensorSpec("x", "float32", ("N", 1, 8, 8))],
        outputs=[TensorSpec("y", "float32", ("N", 2, 8, 8))],
        normalisation={"scale": 1.0, "offset": 0.0},
    )
    assert manifest.budgets_ms == {"watermark": 50}
    assert bundle.compatibility == {"conv": None}
    assert bundle.model_bytes("conv") == conv_relu_onnx.model_bytes
    x = np.random.default_rng(3).standard_normal((2, 1, 8, 8)).astype(np.float32)
    with bundle.session("conv", threads=1) as session:
        np.testing.assert_allclose(session.run({"x": x})["y"], conv_relu_onnx.reference(x), atol=1e-5)
    with bundle.session("conv", backend="onnxruntime") as session:
        assert session.providers == ["CPUExecutionProvider"]


def test_manifest_bytes_are_canonical_and_round_trip(bundle_dir, keys):
    raw = (bundle_dir / "manifest.json").read_bytes()
    manifest = Manifest.from_json_bytes(raw)
    assert manifest.to_json_bytes() == raw
    assert Manifest.from_dict(manifest.to_dict()) == manifest


def test_write_bundle_from_manifest_object(tmp_path, bundle_dir, keys, model_file):
    manifest = open_bundle(bundle_dir, public_key=keys["public"]).manifest
    again = write_bundle(tmp_path / "again", manifest, {"conv": model_file}, keys["other_private"])
    reopened = open_bundle(again, public_key=keys["other_public"])
    assert reopened.key_id == keys["other_id"]
    assert reopened.manifest.models == manifest.models
    with pytest.raises(UsageError, match="already exists"):
        write_bundle(again, manifest, {"conv": model_file}, keys["private"])
    write_bundle(again, manifest, {"conv": model_file}, keys["private"], overwrite=True)
    assert open_bundle(again, public_key=keys["public"]).key_id == keys["id"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "bundle"]  # no staging left


def test_write_bundle_needs_a_file_per_model(tmp_path, keys, model_file):
    with pytest.raises(UsageError, match=r"no file given for models \['conv'\]"):
        write_bundle(tmp_path / "b", _manifest(), {}, keys["private"])
    with pytest.raises(UsageError, match="does not have"):
        write_bundle(tmp_path / "b", _manifest(), {"conv": model_file, "x": model_file}, keys["private"])
    assert not (tmp_path / "b").exists()


def test_trust_store_from_directory_and_env(bundle_dir, keys, monkeypatch):
    assert set(trusted_public_keys(keys["trusted_dir"])) == {keys["id"]}
    assert open_bundle(bundle_dir, trusted_keys=keys["trusted_dir"]).key_id == keys["id"]
    monkeypatch.setenv(bundle_mod.TRUSTED_KEYS_ENV, os.pathsep.join([str(keys["other_public"]), str(keys["trusted_dir"])]))
    assert set(trusted_public_keys()) == {keys["id"], keys["other_id"]}
    assert open_bundle(bundle_dir).key_id == keys["id"]
    assert Bundle.open(bundle_dir).key_id == keys["id"]


def test_public_key_formats(keys):
    key = load_public_key(keys["public"])
    raw = key.public_bytes(bundle_mod.serialization.Encoding.Raw, bundle_mod.serialization.PublicFormat.Raw)
    openssh = key.public_bytes(
        bundle_mod.serialization.Encoding.OpenSSH, bundle_mod.serialization.PublicFormat.OpenSSH
    )
    for form in (raw, raw.hex().encode(), __import__("base64").b64encode(raw), openssh, keys["public"].read_bytes()):
        assert key_id(load_public_key(form)) == keys["id"]
    with pytest.raises(KeyFileError, match="not an Ed25519 public key"):
        load_public_key(b"definitely not a key")


# --- refusals -------------------------------------------------------------------------------


def test_tampered_model_names_the_file(bundle_dir, keys):
    model = bundle_dir / "conv.onnx"
    original = model.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError) as info:
        open_bundle(bundle_dir, public_key=keys["public"])
    message = str(info.value)
    expected = hashlib.sha256(original).hexdigest()[:12]
    found = hashlib.sha256(bytes(data)).hexdigest()[:12]
    assert "'conv.onnx'" in message and expected in message and found in message


def test_model_tampered_after_open_is_never_loaded(bundle_dir, keys, monkeypatch):
    bundle = open_bundle(bundle_dir, public_key=keys["public"])
    (bundle_dir / "conv.onnx").write_bytes(b"replaced after the check")
    loads = []
    monkeypatch.setattr(OnnxRuntimeBackend, "load", lambda self, *a, **k: loads.append(a))
    with pytest.raises(BundleError, match="conv.onnx"):
        bundle.session("conv")
    assert loads == []  # the backend never saw the bytes


def test_missing_model_file(bundle_dir, keys):
    (bundle_dir / "conv.onnx").unlink()
    with pytest.raises(BundleError, match="'conv.onnx' is missing"):
        open_bundle(bundle_dir, public_key=keys["public"])


def test_tampered_manifest_fails_signature(bundle_dir, keys):
    path = bundle_dir / "manifest.json"
    path.write_bytes(path.read_bytes().replace(b'"watermark": 50', b'"watermark": 500'))
    with pytest.raises(BundleError, match="signature check failed"):
        open_bundle(bundle_dir, public_key=keys["public"])
    with pytest.raises(BundleError, match="signature check failed"):
        open_bundle(bundle_dir, trusted_keys=keys["trusted_dir"])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7))
def test_any_flipped_manifest_bit_is_refused(bundle_dir, keys, position, bit):
    raw = (bundle_dir / "manifest.json").read_bytes()
    data = bytearray(raw)
    data[position % len(data)] ^= 1 << bit
    (bundle_dir / "manifest.json").write_bytes(bytes(data))
    try:
        with pytest.raises(BundleError):
            open_bundle(bundle_dir, public_key=keys["public"])
    finally:
        (bundle_dir / "manifest.json").write_bytes(raw)


def test_wrong_key_is_refused(bundle_dir, keys, tmp_path):
    with pytest.raises(BundleError, match=f"signed by key {keys['id']}, but the given public key is {keys['other_id']}"):
        open_bundle(bundle_dir, public_key=keys["other_public"])
    # Not in the trust store.
    with pytest.raises(BundleError, match=f"unknown key id {keys['id']}.*{keys['other_id']}"):
        open_bundle(bundle_dir, trusted_keys=keys["other_public"].parent)
    # A manifest that claims no key id is tried against every trusted key, and still fails.
    data = json.loads((bundle_dir / "manifest.json").read_bytes())
    data["key_id"] = ""
    _resign(bundle_dir, data, keys["private"])
    with pytest.raises(BundleError, match="signature check failed"):
        open_bundle(bundle_dir, trusted_keys=keys["other_public"].parent)
    assert open_bundle(bundle_dir, trusted_keys=keys["trusted_dir"]).key_id == keys["id"]
    # An empty trust store says how to fill it.
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BundleError, match="no trusted public keys"):
        open_bundle(bundle_dir, trusted_keys=empty)


def test_missing_or_malformed_signature(bundle_dir, keys):
    sig = bundle_dir / "manifest.sig"
    sig.write_bytes(sig.read_bytes()[:63])
    with pytest.raises(BundleError, match="has 63 bytes"):
        open_bundle(bundle_dir, public_key=keys["public"])
    sig.unlink()
    with pytest.raises(BundleError, match="no manifest.sig"):
        open_bundle(bundle_dir, public_key=keys["public"])


def test_unsupported_version_is_refused(bundle_dir, keys):
    data = json.loads((bundle_dir / "manifest.json").read_bytes())
    data["version"] = 2
    _resign(bundle_dir, data, keys["private"])
    with pytest.raises(BundleError, match="manifest version 2 is not supported.*version 1"):
        open_bundle(bundle_dir, public_key=keys["public"])


@pytest.mark.parametrize(
    "change, pattern",
    [
        (lambda d: d.pop("models"), "lacks models"),
        (lambda d: d.update(surprise=1), r"unknown fields \['surprise'\].*extra"),
        (lambda d: d["models"]["conv"].update(precision="int4"), "precision 'int4'"),
        (lambda d: d["models"]["conv"].update(file="../conv.onnx"), "plain relative path"),
        (lambda d: d["models"]["conv"].update(sha256="abc"), "64 hex digits"),
        (lambda d: d["models"]["conv"].pop("inputs"), "lacks inputs"),
    ],
)
def test_malformed_manifest_is_refused(bundle_dir, keys, change, pattern):
    data = json.loads((bundle_dir / "manifest.json").read_bytes())
    change(data)
    _resign(bundle_dir, data, keys["private"])
    with pytest.raises(BundleError, match=pattern):
        open_bundle(bundle_dir, public_key=keys["public"])


def test_declared_tensors_must_match_the_model(tmp_path, keys, model_file):
    model = dict(CONV_MODEL, inputs=[{"name": "image", "dtype": "float32", "shape": ["N", 1, 8, 8]}])
    directory = write_bundle(tmp_path / "b", _manifest(conv=model), {"conv": model_file}, keys["private"])
    bundle = open_bundle(directory, public_key=keys["public"])
    with pytest.raises(BundleError, match=r"declares inputs \[image: float32 rank 4\], the model has \[x: float32 rank 4\]"):
        bundle.session("conv")
    with pytest.raises(UsageError, match="has no model 'nope'"):
        bundle.session("nope")


# --- compatibility --------------------------------------------------------------------------


def _trt_bundle(tmp_path, keys, model_file, target):
    engine = tmp_path / "conv.plan"
    engine.write_bytes(b"a TensorRT engine is never deserialized by these tests")
    models = {
        "conv": dict(CONV_MODEL),
        "conv_trt": dict(CONV_MODEL, precision="fp16", target=target),
    }
    files = {"conv": model_file, "conv_trt": engine}
    return write_bundle(tmp_path / "trt-bundle", _manifest(**models), files, keys["private"])


def test_tensorrt_target_checked_against_device(tmp_path, keys, model_file):
    directory = _trt_bundle(tmp_path, keys, model_file, "tensorrt-10.8-sm_87")
    device = trt_backend.DeviceInfo("10.13.0.35", "sm_90")
    expected = (
        "engine built for TensorRT 10.8 / sm_87, this device has 10.13 / sm_90: "
        "rebuild with 'medsec-edge build'"
    )
    with pytest.raises(BundleError) as info:
        open_bundle(directory, public_key=keys["public"], device_probe=lambda: device, require=["conv_trt"])
    assert expected in str(info.value)
    # Without `require`, the bundle opens for what can run; the engine is refused at session time.
    bundle = open_bundle(directory, public_key=keys["public"], device_probe=lambda: device)
    assert bundle.compatibility == {"conv": None, "conv_trt": expected}
    with pytest.raises(BundleError, match="rebuild with 'medsec-edge build'"):
        bundle.session("conv_trt")
    bundle.session("conv", threads=1).close()
    # A matching device passes the check.
    ok = open_bundle(
        directory,
        public_key=keys["public"],
        device_probe=lambda: trt_backend.DeviceInfo("10.8.0.1", "sm_87"),
        require=["conv_trt"],
    )
    assert ok.compatibility["conv_trt"] is None
    with pytest.raises(BundleError, match="backend 'onnxruntime' cannot run"):
        ok.session("conv_trt", backend="onnxruntime")


def test_tensorrt_target_without_tensorrt(tmp_path, keys, model_file):
    directory = _trt_bundle(tmp_path, keys, model_file, "tensorrt-10.8-sm_87")
    bundle = open_bundle(directory, public_key=keys["public"], device_probe=lambda: None)
    assert "pip install 'medsec-edge[tensorrt]'" in bundle.compatibility["conv_trt"]
    with pytest.raises(BundleError, match=r"medsec-edge\[tensorrt\]"):
        open_bundle(directory, public_key=keys["public"], device_probe=lambda: None, require=["conv_trt"])


def test_bundle_refused_when_nothing_can_run(tmp_path, keys, model_file):
    models = {"conv": dict(CONV_MODEL, target="openvino")}
    directory = write_bundle(tmp_path / "b", _manifest(**models), {"conv": model_file}, keys["private"])
    with pytest.raises(BundleError, match="cannot run here: conv: unknown target 'openvino'"):
        open_bundle(directory, public_key=keys["public"])
    bundle = open_bundle(directory, public_key=keys["public"], check_compatibility=False)
    assert bundle.manifest.models["conv"].target == "openvino"


# --- tar ------------------------------------------------------------------------------------


def test_tar_round_trip(bundle_dir, keys, tmp_path, conv_relu_onnx):
    tar_path = pack_tar(bundle_dir, tmp_path / "bundle.tar")
    assert pack_tar(bundle_dir, tmp_path / "again.tar").read_bytes() == tar_path.read_bytes()
    with tarfile.open(tar_path) as archive:
        assert sorted(archive.getnames()) == ["bundle/conv.onnx", "bundle/manifest.json", "bundle/manifest.sig"]
    bundle = open_bundle(tar_path, public_key=keys["public"])
    assert bundle.model_bytes("conv") == conv_relu_onnx.model_bytes
    x = np.ones((1, 1, 8, 8), np.float32)
    with bundle.session("conv", threads=1) as session:
        np.testing.assert_allclose(session.run({"x": x})["y"], conv_relu_onnx.reference(x), atol=1e-5)


def test_flat_tar_is_accepted(bundle_dir, keys, tmp_path):
    tar_path = tmp_path / "flat.tar"
    with tarfile.open(tar_path, "w") as archive:
        for path in sorted(bundle_dir.iterdir()):
            archive.add(path, arcname=path.name)
    assert open_bundle(tar_path, public_key=keys["public"]).manifest.name == "test-bundle"


def _tar_with(bundle_dir, tar_path, extra: tarfile.TarInfo, data: bytes = b"") -> None:
    with tarfile.open(tar_path, "w") as archive:
        for path in sorted(bundle_dir.iterdir()):
            archive.add(path, arcname=f"bundle/{path.name}")
        extra.size = len(data) if extra.isfile() else 0
        archive.addfile(extra, io.BytesIO(data) if extra.isfile() else None)


@pytest.mark.parametrize("name", ["../evil", "bundle/../../evil", "/etc/evil"])
def test_tar_path_traversal_is_refused(bundle_dir, keys, tmp_path, name):
    tar_path = tmp_path / "evil.tar"
    _tar_with(bundle_dir, tar_path, tarfile.TarInfo(name), b"owned")
    with pytest.raises(BundleError, match="points outside the bundle"):
        open_bundle(tar_path, public_key=keys["public"])
    assert not (tmp_path.parent / "evil").exists()


def test_tar_links_are_refused(bundle_dir, keys, tmp_path):
    link = tarfile.TarInfo("bundle/link")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    tar_path = tmp_path / "link.tar"
    _tar_with(bundle_dir, tar_path, link)
    with pytest.raises(BundleError, match="link or special file"):
        open_bundle(tar_path, public_key=keys["public"])


def test_not_a_bundle(tmp_path, keys):
    with pytest.raises(BundleError, match="does not exist"):
        open_bundle(tmp_path / "absent", public_key=keys["public"])
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all" * 64)
    with pytest.raises(BundleError, match="not a readable tar"):
        open_bundle(junk, public_key=keys["public"])
    empty = tmp_path / "emptydir"
    empty.mkdir()
    with pytest.raises(BundleError, match="no manifest.json"):
        open_bundle(empty, public_key=keys["public"])


# --- keys -----------------------------------------------------------------------------------


def test_signing_key_files(tmp_path, keys):
    assert stat.S_IMODE(keys["private"].stat().st_mode) == 0o600
    assert key_id(load_signing_key(keys["private"])) == keys["id"] == key_id(load_public_key(keys["public"]))
    assert b"PRIVATE" not in keys["public"].read_bytes()
    with pytest.raises(KeyFileError, match="already exists"):
        generate_signing_key(keys["private"], tmp_path / "x.pub")
    loose = tmp_path / "loose.key"
    shutil.copyfile(keys["private"], loose)
    loose.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_signing_key(loose)
    with pytest.raises(KeyFileError, match="does not exist"):
        load_signing_key(tmp_path / "absent.key")
    bad = tmp_path / "bad.key"
    bad.write_bytes(b"garbage")
    bad.chmod(0o600)
    with pytest.raises(KeyFileError, match="not an unencrypted PEM"):
        load_signing_key(bad)


# --- requires: the medsec-edge version and the ONNX opset a bundle needs -------------------------


def test_old_manifests_without_requires_keep_their_bytes():
    shipped = (Path(__file__).resolve().parents[2] / "bundles" / "default" / "manifest.json").read_bytes()
    assert Manifest.from_json_bytes(shipped).requires  # the default bundle states what it needs
    data = json.loads(shipped)
    del data["requires"]  # as manifests were before "requires" existed
    raw = Manifest.from_dict(data).to_json_bytes()
    manifest = Manifest.from_json_bytes(raw)
    assert manifest.requires == {} and b'"requires"' not in raw
    assert manifest.to_json_bytes() == raw  # re-serialised as signed: no empty "requires" added


def test_requires_round_trips(tmp_path, keys, model_file):
    data = dict(_manifest(), requires={"runtime": ">=0.1.0, <99", "onnx_opset": 17})
    directory = write_bundle(tmp_path / "b", data, {"conv": model_file}, keys["private"])
    bundle = open_bundle(directory, public_key=keys["public"])
    assert bundle.manifest.requires == {"runtime": ">=0.1.0, <99", "onnx_opset": 17}
    raw = (directory / "manifest.json").read_bytes()
    assert Manifest.from_json_bytes(raw).to_json_bytes() == raw


def test_default_requires_is_what_this_runtime_meets(tmp_path, keys, model_file):
    requires = bundle_mod.default_requires(17)
    major, minor = bundle_mod.runtime_version().split(".")[:2]
    assert requires == {"runtime": f">={major}.{minor}.0", "onnx_opset": 17}
    assert bundle_mod.default_requires() == {"runtime": f">={major}.{minor}.0"}
    directory = write_bundle(tmp_path / "b", dict(_manifest(), requires=requires), {"conv": model_file}, keys["private"])
    assert open_bundle(directory, public_key=keys["public"]).compatibility == {"conv": None}


def test_a_newer_runtime_requirement_is_refused(tmp_path, keys, model_file):
    data = dict(_manifest(), requires={"runtime": ">=99.0"})
    directory = write_bundle(tmp_path / "b", data, {"conv": model_file}, keys["private"])
    have = bundle_mod.runtime_version()
    with pytest.raises(BundleError) as info:
        open_bundle(directory, public_key=keys["public"])
    message = str(info.value)
    assert f"requires medsec-edge >=99.0, this is medsec-edge {have}" in message
    assert "pip install -U medsec-edge" in message
    # integrity alone still checks out (what `bundle inspect` reports as "cannot run here")
    assert open_bundle(directory, public_key=keys["public"], check_compatibility=False).manifest.name == "test-bundle"


def test_a_newer_opset_is_refused_for_onnxruntime_models_only(tmp_path, keys, model_file):
    highest = bundle_mod.onnxruntime_max_opset()
    assert highest is not None and highest >= 20
    data = dict(_manifest(), requires={"onnx_opset": highest + 1})
    directory = write_bundle(tmp_path / "b", data, {"conv": model_file}, keys["private"])
    ort_version = bundle_mod._onnxruntime_version()
    with pytest.raises(BundleError) as info:
        open_bundle(directory, public_key=keys["public"])
    assert (f"conv: needs ONNX opset {highest + 1}, onnxruntime {ort_version} runs opsets up to {highest}: "
            "pip install -U onnxruntime") in str(info.value)
    ok = dict(_manifest(), requires={"onnx_opset": highest})
    assert open_bundle(write_bundle(tmp_path / "ok", ok, {"conv": model_file}, keys["private"]),
                       public_key=keys["public"]).compatibility == {"conv": None}
    # a TensorRT engine is not an ONNX model: the opset does not apply to it
    trt = _trt_bundle(tmp_path, keys, model_file, "tensorrt-10.8-sm_87")
    data = json.loads((trt / "manifest.json").read_bytes())
    data["requires"] = {"onnx_opset": highest + 1}
    _resign(trt, data, keys["private"])
    bundle = open_bundle(trt, public_key=keys["public"], device_probe=lambda: trt_backend.DeviceInfo("10.8.0.1", "sm_87"))
    assert bundle.compatibility["conv_trt"] is None and "needs ONNX opset" in bundle.compatibility["conv"]


@pytest.mark.parametrize("version, expected", [
    ("1.16.3", None), ("1.17.0", 20), ("1.18.1", 21), ("1.20.1", 21), ("1.21.0", 22), ("1.22.2", 23),
    ("1.23.0", 23), ("1.32.0", 23), ("2.0.0", 23),
])
def test_onnxruntime_opset_table(version, expected):
    assert bundle_mod.onnxruntime_max_opset(version) == expected


@pytest.mark.parametrize("version, spec, expected", [
    ("0.1.0", ">=0.1.0", True), ("0.1.0", ">=0.1", True), ("0.1.0", ">0.1", False), ("0.1.0", "<0.2.0", True),
    ("0.2.0", ">=0.1.0, <0.2.0", False), ("0.1.5", ">=0.1.0, <0.2.0", True), ("0.1.0", "==0.1", True),
    ("0.1.0", "!=0.1.0", False), ("0.10.0", ">=0.9", True), ("0.2.0rc1", "==0.2.0", True), ("1.0", "<=1.0.0", True),
])
def test_version_satisfies(version, spec, expected):
    assert bundle_mod.version_satisfies(version, spec) is expected


@pytest.mark.parametrize("requires, pattern", [
    ({"cuda": "12"}, r"requires asks for \['cuda'\].*use a newer medsec-edge"),
    ({"runtime": "~=0.1"}, "requires.runtime must be a version spec"),
    ({"runtime": ">=0.1.x"}, "requires.runtime must be a version spec"),
    ({"runtime": 1}, "requires.runtime must be a version spec"),
    ({"onnx_opset": "17"}, "requires.onnx_opset must be a positive integer"),
    ({"onnx_opset": True}, "requires.onnx_opset must be a positive integer"),
    ({"onnx_opset": 0}, "requires.onnx_opset must be a positive integer"),
    ([], "requires must be a JSON object"),
])
def test_malformed_requires_is_refused(bundle_dir, keys, requires, pattern):
    data = json.loads((bundle_dir / "manifest.json").read_bytes())
    data["requires"] = requires
    _resign(bundle_dir, data, keys["private"])
    with pytest.raises(BundleError, match=pattern):
        open_bundle(bundle_dir, public_key=keys["public"])


# --- a .tar accounts for every byte ---------------------------------------------------------------


def _flipped(data: bytes, position: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[position] ^= mask
    return bytes(out)


def test_tar_bytes_that_change_no_file_are_still_refused(bundle_dir, keys, tmp_path):
    tar_path = pack_tar(bundle_dir, tmp_path / "b.tar")
    data = tar_path.read_bytes()
    with tarfile.open(tar_path) as archive:
        members = archive.getmembers()
    first = members[0]
    cases = {
        "padding": (first.offset_data + first.size, "followed by non-zero padding"),
        "trailer": (len(data) - 1, "non-zero bytes after its last member"),
        "checksum terminator": (first.offset + 155, "malformed checksum field"),
        "later header": (members[1].offset + 10, "not a readable tar|non-zero bytes after its last member"),
    }
    assert first.size % 512, "the padding case needs a member that does not fill its last block"
    for what, (position, pattern) in cases.items():
        altered = tmp_path / f"{what}.tar"
        altered.write_bytes(_flipped(data, position))
        with pytest.raises(BundleError, match=pattern):
            open_bundle(altered, public_key=keys["public"])
    junk = tmp_path / "junk.tar"
    junk.write_bytes(data + b"more")
    with pytest.raises(BundleError, match="after its last member"):
        open_bundle(junk, public_key=keys["public"])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: first.offset_data + 100])
    with pytest.raises(BundleError):
        open_bundle(cut, public_key=keys["public"])


def test_compressed_tar_opens_and_a_damaged_one_is_refused(bundle_dir, keys, tmp_path):
    import gzip

    packed = gzip.compress(pack_tar(bundle_dir, tmp_path / "b.tar").read_bytes(), mtime=0)
    good = tmp_path / "b.tar.gz"
    good.write_bytes(packed)
    assert open_bundle(good, public_key=keys["public"]).manifest.name == "test-bundle"
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(_flipped(packed, len(packed) // 2))
    with pytest.raises(BundleError, match="not a readable tar archive"):
        open_bundle(bad, public_key=keys["public"])


def test_tar_with_extended_headers_opens_and_their_padding_is_checked(bundle_dir, keys, tmp_path):
    tar_path = tmp_path / "pax.tar"
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as archive:
        for path in sorted(bundle_dir.iterdir()):
            info = archive.gettarinfo(path, arcname=f"bundle/{path.name}")
            info.pax_headers = {"comment": "written by a tar that adds pax records"}
            with path.open("rb") as handle:
                archive.addfile(info, handle)
    assert open_bundle(tar_path, public_key=keys["public"]).manifest.name == "test-bundle"
    data = tar_path.read_bytes()
    with tarfile.open(tar_path) as archive:
        first = archive.getmembers()[0]
    assert first.offset_data - first.offset == 3 * 512  # pax header, its records, the member's header
    records_end = data.index(b"\x00", first.offset + 512)
    altered = tmp_path / "altered.tar"
    altered.write_bytes(_flipped(data, records_end + 5))
    with pytest.raises(BundleError, match="followed by non-zero padding"):
        open_bundle(altered, public_key=keys["public"])
