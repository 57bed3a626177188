"""`medsec-edge calibrate` end to end on the real default bundle and real DICOM files: an FP16
bundle that passes the gate is written, signed and opens; a variant that fails the gate writes
nothing and exits 1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from medsec_edge.calibration.calibrate import GateFailed, calibrate, split_by_series
from medsec_edge.runtime.bundle import generate_signing_key, open_bundle
from medsec_edge.runtime.cli.root import app
from medsec_edge.runtime.pipeline import default_bundle_path

REPO = Path(__file__).resolve().parents[2]
ATTACKS = ["none", "jpeg75"]


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    """Calibration: the two samples' series; validation: two other pydicom test files (neither is
    in pydicom-data nor shares a study with it)."""
    root = tmp_path_factory.mktemp("images")
    calib, val = root / "calib", root / "val"
    calib.mkdir()
    val.mkdir()
    shutil.copy(REPO / "samples" / "CT_small.dcm", calib)
    shutil.copy(get_testdata_file("emri_small.dcm", download=False), calib)
    shutil.copy(REPO / "samples" / "MR_small.dcm", val)
    shutil.copy(get_testdata_file("JPEG2000_UNC.dcm", download=False), val)
    return calib, val


@pytest.fixture(scope="module")
def signing(tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys")
    generate_signing_key(keys / "sign.pem", keys / "sign.pub")
    return keys / "sign.pem", keys / "sign.pub"


def test_fp16_bundle_passes_the_gate_and_is_signed(image_sets, signing, tmp_path):
    calib, val = image_sets
    out = tmp_path / "fp16"
    result = runner_invoke(["calibrate", str(default_bundle_path()), "--images", str(calib),
                            "--validation", str(val), "--precision", "fp16", "--out", str(out),
                            "--signing-key", str(signing[0]), "--attacks", ",".join(ATTACKS),
                            "--trials", "1", "--per-model", "8", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["gate"]["passed"] is True
    assert set(report["gate"]["recovery_pct"]) == set(ATTACKS)
    assert report["gate"]["false_detections"]["candidate"] == 0
    bundle = open_bundle(out, public_key=signing[1])
    models = bundle.manifest.models
    record = bundle.manifest.calibration["fp16"]
    # every base model has its FP16 variant, either as the plain name or as name@fp16
    for name in ("wm_decoder", "tamper_detector", "wm_strength"):
        assert models[name].precision == "fp16" or models[f"{name}@fp16"].precision == "fp16"
        used = record["selection"][name]["onnxruntime"]["use"]
        assert models[name].precision == used
    assert record["selection"]["fp_encoder"]["onnxruntime"]["use"] == "fp32"
    assert len(record["images"]["calibration"]) == 2 and len(record["images"]["validation"]) == 2
    assert all(len(h) == 16 for h in record["images"]["calibration"])
    assert record["command"].startswith("medsec-edge calibrate ")
    assert record["gate"]["passed"] is True
    assert bundle.manifest.requires.get("runtime")
    assert bundle.manifest.name.endswith("-fp16")
    text = (out / "manifest.json").read_text()
    assert "CT_small" not in text and "emri" not in text  # images named by hash only


@pytest.fixture
def damaged_decoder_variant(monkeypatch):
    """The real INT8 variant of each model, except that the decoder's variant has its last
    convolution's weights shuffled: a variant that lost accuracy, as a bad calibration would."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from medsec_edge.calibration import calibrate as module

    real = module.make_variant

    def make(src, dst, precision, feeds, **kwargs):
        variant = real(src, dst, precision, feeds, **kwargs)
        if variant is not None and src.name == "wm_decoder.onnx":
            model = onnx.load(str(variant.path))
            for init in model.graph.initializer:
                if init.name.endswith("weight_quantized") or init.name.endswith(".weight"):
                    last = init
            arr = numpy_helper.to_array(last)
            shuffled = np.random.default_rng(0).permutation(arr.reshape(-1)).reshape(arr.shape)
            last.CopyFrom(numpy_helper.from_array(shuffled, last.name))
            onnx.save(model, str(variant.path))
        return variant

    monkeypatch.setattr(module, "make_variant", make)


def test_a_failed_gate_writes_nothing_and_exits_1(image_sets, signing, tmp_path, damaged_decoder_variant):
    calib, val = image_sets
    out = tmp_path / "int8"
    with pytest.raises(GateFailed) as caught:
        calibrate(default_bundle_path(), [calib], validation=[val], precision="int8", out=out,
                  signing_key=signing[0], trials=1, per_model=8, attacks=["none"])
    report = caught.value.report
    assert not report.passed and caught.value.exit_code == 1
    assert any(f.startswith("none: exact recovery") for f in report.failures), report.failures
    assert report.recovery["none"]["reference"] == 100.0
    assert not out.exists()
    assert not list(tmp_path.glob(".*"))  # no temporary folder left beside it


def test_cli_exit_1_on_a_failed_gate(image_sets, signing, tmp_path, damaged_decoder_variant):
    calib, val = image_sets
    out = tmp_path / "int8"
    result = runner_invoke(["calibrate", str(default_bundle_path()), "--images", str(calib),
                            "--validation", str(val), "--precision", "int8", "--out", str(out),
                            "--signing-key", str(signing[0]), "--attacks", "none", "--trials", "1",
                            "--per-model", "4"])
    assert result.exit_code == 1, result.output
    assert "accuracy gate FAILED" in result.output and "accuracy gate failed" in result.output
    assert not out.exists()


def test_usage_errors(image_sets, signing, tmp_path):
    calib, _ = image_sets
    result = runner_invoke(["calibrate", str(default_bundle_path()), "--images", str(calib),
                            "--precision", "int4", "--out", str(tmp_path / "x"), "--signing-key", str(signing[0])])
    assert result.exit_code == 2 and "int8 or fp16" in result.output
    result = runner_invoke(["calibrate", str(default_bundle_path()), "--images", str(tmp_path / "missing"),
                            "--precision", "int8", "--out", str(tmp_path / "x"), "--signing-key", str(signing[0])])
    assert result.exit_code == 2 and "does not exist" in result.output
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.dcm").write_bytes(b"not an image")
    result = runner_invoke(["calibrate", str(default_bundle_path()), "--images", str(junk), "--validation",
                            str(calib), "--precision", "int8", "--out", str(tmp_path / "x"),
                            "--signing-key", str(signing[0])])
    assert result.exit_code == 2 and "no calibration image reached" in result.output
    assert not (tmp_path / "x").exists()


def _series(tmp_path, groups):
    import numpy as np

    from medsec_edge.calibration.real_set import frame_dataset
    from medsec_edge.runtime.io.image import ImageMeta

    meta = ImageMeta(bits_stored=12, signed=False, modality="MR")
    files = {}
    for group, n in groups.items():
        for i in range(n):
            path = tmp_path / f"{group}-{i}.dcm"
            frame_dataset(np.full((16, 16), i, np.uint16), meta, group=group, name=str(i)).save_as(
                path, enforce_file_format=True)
            files[path] = group
    return files


def test_split_keeps_each_series_on_one_side(tmp_path):
    from medsec_edge.runtime.errors import UsageError

    files = _series(tmp_path, {"a": 3, "b": 2, "c": 4, "d": 1})
    calib, val = split_by_series(sorted(files))
    assert calib and val and not set(calib) & set(val)
    assert {files[p] for p in calib}.isdisjoint({files[p] for p in val})
    assert len(calib) + len(val) == len(files)
    one = _series(tmp_path / "one" if (tmp_path / "one").mkdir() is None else tmp_path, {"z": 3})
    with pytest.raises(UsageError, match="different series"):
        split_by_series(sorted(one))


def runner_invoke(args):
    return CliRunner().invoke(app, args)
