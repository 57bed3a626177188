"""`medsec-edge build`: refused with exit 3 and the extra's name where TensorRT cannot run; the
choice of source, the optimization profiles and the built bundle's manifest (TensorRT itself
replaced by a stand-in, so the orchestration is tested everywhere); a real build where TensorRT
and a GPU exist (marker ``tensorrt``)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from medsec_edge.export import tensorrt_build
from medsec_edge.export.tensorrt_build import (
    DEFAULT_SIDES,
    base_name,
    build_bundle,
    engine_target,
    profile_shapes,
    profile_sides,
    select_sources,
)
from medsec_edge.runtime.backends import tensorrt_backend
from medsec_edge.runtime.bundle import (
    default_trust_dir,
    generate_signing_key,
    open_bundle,
    write_bundle,
)
from medsec_edge.runtime.cli.root import app
from medsec_edge.runtime.errors import BundleError, UsageError
from typer.testing import CliRunner

DEFAULT_BUNDLE = default_trust_dir().parent / "default"
TARGET = "tensorrt-10.8-sm_87"
runner = CliRunner()


@pytest.fixture(scope="module")
def default_manifest():
    return open_bundle(DEFAULT_BUNDLE, check_compatibility=False).manifest


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    generate_signing_key(root / "signing.pem", root / "trusted" / "signing.pub")
    return root / "signing.pem", root / "trusted"


def _variant(manifest, base, precision, file=None):
    entry = manifest.models[base]
    return replace(entry, name=f"{base}@{precision}", precision=precision, file=file or f"{base}.{precision}.onnx")


# --- without TensorRT ---------------------------------------------------------------------------


def test_build_without_tensorrt_exits_3_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setattr(tensorrt_backend, "_probe", lambda: "tensorrt cannot be imported (stand-in)")
    out = tmp_path / "built"
    result = runner.invoke(app, ["build", str(DEFAULT_BUNDLE), "--out", str(out)])
    assert result.exit_code == 3, result.output
    assert "pip install 'medsec-edge[tensorrt]'" in result.output
    assert "tensorrt cannot be imported (stand-in)" in result.output
    assert not out.exists()


def test_build_here_gives_the_real_probe_reason(tmp_path):
    """The installed command (entry point ``build``), as a user runs it, where TensorRT is absent."""
    reason = tensorrt_backend.TensorRTBackend.probe()
    if reason is None:
        pytest.skip("TensorRT can run here: the refusal is tested with a stand-in probe above")
    proc = subprocess.run(
        [sys.executable, "-m", "medsec_edge.runtime.cli", "build", str(DEFAULT_BUNDLE), "--out", str(tmp_path / "b")],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 3, proc.stderr
    assert "pip install 'medsec-edge[tensorrt]'" in proc.stderr
    assert reason in " ".join(proc.stderr.split())


# --- sources and profiles -----------------------------------------------------------------------


def test_sources_prefer_int8_then_fp16_then_fp32(default_manifest):
    models = dict(default_manifest.models)
    for variant in (_variant(default_manifest, "wm_decoder", "int8-qdq"), _variant(default_manifest, "wm_decoder", "fp16"),
                    _variant(default_manifest, "wm_strength", "fp16")):
        models[variant.name] = variant
    manifest = replace(default_manifest, models=models)
    sources = select_sources(manifest)
    assert set(sources) == {"fp_encoder", "tamper_detector", "wm_decoder", "wm_message", "wm_readout", "wm_strength"}
    assert sources["wm_decoder"].name == "wm_decoder@int8-qdq"
    assert sources["wm_strength"].name == "wm_strength@fp16"
    assert sources["wm_message"].name == "wm_message"  # the plain FP32 entry
    assert set(select_sources(manifest, ["wm_decoder"])) == {"wm_decoder"}
    with pytest.raises(UsageError, match="no model nope"):
        select_sources(manifest, ["nope"])


def test_the_calibrated_choice_for_tensorrt_wins(default_manifest):
    """``calibrate`` keeps the fingerprint encoder FP32 for TensorRT too (one encoder id)."""
    models = dict(default_manifest.models)
    for variant in (_variant(default_manifest, "fp_encoder", "int8-qdq"), _variant(default_manifest, "wm_decoder", "int8-qdq")):
        models[variant.name] = variant
    selection = {"fp_encoder": {"tensorrt": {"use": "fp32"}}, "wm_decoder": {"tensorrt": {"use": "int8-qdq"}}}
    manifest = replace(default_manifest, models=models,
                       calibration={**default_manifest.calibration, "int8": {"selection": selection}})
    sources = select_sources(manifest)
    assert sources["fp_encoder"].name == "fp_encoder"
    assert sources["wm_decoder"].name == "wm_decoder@int8-qdq"


def test_a_variant_must_declare_the_precision_it_is_named_for(default_manifest):
    wrong = replace(_variant(default_manifest, "wm_decoder", "fp16"), name="wm_decoder@int8-qdq")
    manifest = replace(default_manifest, models={**default_manifest.models, wrong.name: wrong})
    with pytest.raises(BundleError, match="named for int8-qdq but declares precision fp16"):
        select_sources(manifest, ["wm_decoder"])


def test_a_model_with_only_a_plan_cannot_be_built(default_manifest):
    plan = replace(default_manifest.models["wm_decoder"], target=TARGET, file="wm_decoder.plan")
    manifest = replace(default_manifest, models={"wm_decoder": plan})
    with pytest.raises(BundleError, match="no ONNX file"):
        select_sources(manifest)


def test_profiles_cover_the_budgeted_sizes(default_manifest):
    assert profile_sides(default_manifest) == (16, 512, 2048)  # readers' MIN_SIDE .. extract_2048
    assert profile_sides(replace(default_manifest, budgets_ms={})) == DEFAULT_SIDES
    sides = profile_sides(default_manifest)
    assert profile_shapes(default_manifest.models["wm_decoder"], sides) == {
        "image": ((1, 1, 16, 16), (1, 1, 512, 512), (1, 1, 2048, 2048))}
    assert profile_shapes(default_manifest.models["wm_message"], sides) == {
        "bits": ((1, 128), (1, 128), (8, 128))}


def test_engine_target_names_major_minor_and_sm():
    assert engine_target("10.8.0.43", "sm_87") == "tensorrt-10.8-sm_87"
    assert tensorrt_backend.EngineTarget.parse(engine_target("10.13.3.9", "sm_90")) == \
        tensorrt_backend.EngineTarget("10.13", "sm_90")
    assert base_name("wm_decoder@int8-qdq") == "wm_decoder"


# --- the orchestration, TensorRT replaced by a stand-in -----------------------------------------


@pytest.fixture
def stand_in(monkeypatch):
    """TensorRT's three contact points replaced: the probe passes, the device is a fixed one, an
    "engine" is a few bytes naming its source; the calls are recorded."""
    calls = []

    def fake_build(onnx_bytes, profiles, *, timing_cache=None, workspace_bytes=None):
        calls.append((onnx_bytes, profiles))
        return b"PLAN:" + onnx_bytes[:16]

    monkeypatch.setattr(tensorrt_build, "require_tensorrt", lambda: None)
    monkeypatch.setattr(tensorrt_build, "_device_record", lambda: {
        "tensorrt": "10.8.0.43", "cuda_runtime": "12.6", "cuda_driver": "12.8", "device": "stand-in",
        "compute_capability": "sm_87", "target": TARGET})
    monkeypatch.setattr(tensorrt_build, "build_engine", fake_build)
    monkeypatch.setattr(tensorrt_build, "_parity", lambda *a: {"checked": False, "reason": "stand-in"})
    return calls


@pytest.fixture
def source_bundle(tmp_path, keys, default_manifest):
    """The default bundle plus an INT8 variant of wm_decoder (a distinct file: its bytes must be the
    ones built from)."""
    key, _ = keys
    # a different, still valid ONNX file: the message model, declared as the decoder's variant
    variant_file = tmp_path / "wm_decoder.int8.onnx"
    variant_file.write_bytes((DEFAULT_BUNDLE / "wm_message.onnx").read_bytes())
    variant = replace(_variant(default_manifest, "wm_decoder", "int8-qdq"), file="wm_decoder.int8.onnx")
    manifest = replace(default_manifest, models={**default_manifest.models, variant.name: variant})
    files = {name: DEFAULT_BUNDLE / entry.file for name, entry in default_manifest.models.items()}
    files[variant.name] = variant_file
    return write_bundle(tmp_path / "source", manifest, files, key)


def test_built_bundle_layout(tmp_path, keys, stand_in, source_bundle, default_manifest):
    key, trusted = keys
    out, built = build_bundle(source_bundle, tmp_path / "built", signing_key=key, trusted_keys=trusted,
                              models=["wm_decoder", "wm_message"], command="medsec-edge build x --out y")
    assert set(built) == {"wm_decoder", "wm_message"}
    # built from the INT8 variant's bytes, with the profile from the manifest's sizes
    assert len(stand_in) == 2
    for onnx_bytes, _ in stand_in:
        assert onnx_bytes == (DEFAULT_BUNDLE / "wm_message.onnx").read_bytes()  # both: the variant is that file
    assert [set(profiles) for _, profiles in stand_in] == [{"image"}, {"bits"}]  # decoder first: the order asked

    bundle = open_bundle(out, trusted_keys=trusted)  # signed, hashes right; the ONNX models run here
    models = bundle.manifest.models
    assert models["wm_decoder"].file == "wm_decoder.plan" and models["wm_decoder"].target == TARGET
    assert models["wm_decoder"].precision == "int8-qdq"
    assert models["wm_decoder"].inputs == default_manifest.models["wm_decoder"].inputs
    assert models["wm_decoder"].normalisation == default_manifest.models["wm_decoder"].normalisation
    assert models["wm_message"].precision == "fp32" and models["wm_message"].is_tensorrt
    assert bundle.model_bytes("wm_decoder") == b"PLAN:" + (DEFAULT_BUNDLE / "wm_message.onnx").read_bytes()[:16]
    # the former plain ONNX entries are kept as <model>@<precision>, byte for byte
    assert models["wm_decoder@fp32"].sha256 == default_manifest.models["wm_decoder"].sha256
    assert models["wm_message@fp32"].sha256 == default_manifest.models["wm_message"].sha256
    assert models["wm_decoder@int8-qdq"].file == "wm_decoder.int8.onnx"
    # models not asked for stay as they were
    for name in ("wm_strength", "wm_readout", "tamper_detector", "fp_encoder"):
        assert models[name] == default_manifest.models[name]
    record = bundle.manifest.export["tensorrt"]
    assert record["command"] == "medsec-edge build x --out y"
    assert record["tensorrt"] == "10.8.0.43" and record["compute_capability"] == "sm_87"
    assert record["models"]["wm_decoder"]["source"] == "wm_decoder@int8-qdq"
    assert record["models"]["wm_message"]["profiles"]["bits"] == {"min": [1, 128], "opt": [1, 128], "max": [8, 128]}
    assert record["models"]["wm_decoder"]["build_s"] >= 0
    assert bundle.manifest.export["command"] == default_manifest.export["command"]  # the rest of export kept
    # this machine cannot run the plans, and the runtime says so before deserializing
    if bundle.compatibility["wm_decoder"] is not None:
        with pytest.raises(BundleError, match="cannot run here"):
            bundle.session("wm_decoder")
    with bundle.session("wm_message@fp32", threads=1) as session:
        bits = np.random.default_rng(0).random((2, 128), dtype=np.float32)
        assert session.run({"bits": bits})["tile"].shape == (2, 1024)


def test_rebuilding_a_built_bundle_replaces_the_plans(tmp_path, keys, stand_in, source_bundle):
    key, trusted = keys
    first, _ = build_bundle(source_bundle, tmp_path / "first", signing_key=key, trusted_keys=trusted,
                            models=["wm_decoder", "wm_message"])
    second, _ = build_bundle(first, tmp_path / "second", signing_key=key, trusted_keys=trusted, models=["wm_message"])
    manifest = open_bundle(second, trusted_keys=trusted).manifest
    names = set(manifest.models)
    assert {"wm_decoder", "wm_decoder@fp32", "wm_decoder@int8-qdq", "wm_message", "wm_message@fp32"} <= names
    assert not any(name.count("@") > 1 for name in names)
    # the untouched engine keeps its build record, the rebuilt one has a new one from its FP32 ONNX
    assert manifest.export["tensorrt"]["models"]["wm_decoder"]["source"] == "wm_decoder@int8-qdq"
    assert manifest.export["tensorrt"]["models"]["wm_message"]["source"] == "wm_message@fp32"


def test_existing_out_and_missing_key_are_refused(tmp_path, keys, stand_in, source_bundle):
    key, trusted = keys
    (tmp_path / "taken").mkdir()
    with pytest.raises(UsageError, match="already exists"):
        build_bundle(source_bundle, tmp_path / "taken", signing_key=key, trusted_keys=trusted)
    from medsec_edge.runtime.errors import KeyFileError

    with pytest.raises(KeyFileError):
        build_bundle(source_bundle, tmp_path / "out", signing_key=tmp_path / "absent.pem", trusted_keys=trusted)
    assert stand_in == []  # nothing was built


def test_a_modified_bundle_is_refused_before_any_build(tmp_path, keys, stand_in, source_bundle):
    key, trusted = keys
    data = bytearray((source_bundle / "wm_decoder.onnx").read_bytes())
    data[100] ^= 0x01
    (source_bundle / "wm_decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        build_bundle(source_bundle, tmp_path / "out", signing_key=key, trusted_keys=trusted)
    assert stand_in == [] and not (tmp_path / "out").exists()


# --- with TensorRT ------------------------------------------------------------------------------


# Not marked slow: CI's "not slow" run must report the probe's reason here, and where TensorRT
# exists the build of two small models is what this test is for.
@pytest.mark.tensorrt
def test_real_build_runs_and_matches_onnxruntime(tmp_path, keys):
    key, trusted = keys
    cache = tmp_path / "timing.cache"
    out, built = build_bundle(DEFAULT_BUNDLE, tmp_path / "built", signing_key=key, timing_cache=cache,
                              models=["wm_message", "wm_decoder"])
    bundle = open_bundle(out, trusted_keys=trusted)
    device = tensorrt_backend.probe_device()
    target = engine_target(device.tensorrt_version, device.compute_capability)
    assert bundle.manifest.models["wm_decoder"].target == target
    assert bundle.compatibility["wm_decoder"] is None
    assert cache.stat().st_size > 0
    for name in ("wm_message", "wm_decoder"):
        parity = built[name].parity
        assert parity["checked"] and parity["max_rel"] < 1e-2, parity
    rng = np.random.default_rng(1)
    image = rng.random((1, 1, 96, 64), dtype=np.float32)
    with bundle.session("wm_decoder") as engine, bundle.session("wm_decoder@fp32", threads=1) as reference:
        np.testing.assert_allclose(engine.run({"image": image})["signal"],
                                   reference.run({"image": image})["signal"], rtol=1e-2, atol=1e-3)
    bits = rng.random((8, 128), dtype=np.float32)  # the top of the batch profile
    with bundle.session("wm_message") as engine, bundle.session("wm_message@fp32", threads=1) as reference:
        np.testing.assert_allclose(engine.run({"bits": bits})["tile"], reference.run({"bits": bits})["tile"],
                                   rtol=1e-3, atol=1e-4)
    # a second build reads the saved timing cache
    again, _ = build_bundle(DEFAULT_BUNDLE, tmp_path / "again", signing_key=key, timing_cache=cache,
                            models=["wm_message"])
    assert json.loads((again / "manifest.json").read_text())["export"]["tensorrt"]["timing_cache"] == str(cache)
