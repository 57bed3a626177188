"""The tamper check on the command line: `check`, `run`'s check stage and `eval tamper`.

In-process through typer's CliRunner (the no-torch guarantee of the device commands is proved in
a subprocess by tests/runtime/test_cli.py). Decisions are forced only through signed bundles
whose manifest carries other thresholds (tests/tamper_fixtures.py), never by patching the code.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from medsec_edge.runtime.cli import app
from medsec_edge.runtime.tamper.report import mask_name
from tests.runtime.cli.helpers import run_report
from tests.tamper_fixtures import *  # noqa: F401,F403 - fixtures

SAMPLES = REPO / "samples"
BLIND_LABEL = "no recorded evidence for this image: the blind detector decided (a prior, not proof)"
ROW_KEYS = {"path", "image_id", "tampered", "evidence", "seal", "score", "operating_point", "watermark",
            "payload_kind", "watermark_deficit", "reasons", "regions", "latency_ms", "fingerprint"}


@pytest.fixture
def cli(base_env, restore_logging):
    def invoke(*args):
        return CliRunner().invoke(app, [str(a) for a in args])

    return invoke


@pytest.fixture
def inputs(tmp_path) -> Path:
    """CT_small (128x128) and MR_small (64x64) in a folder of their own."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        src = get_testdata_file(name, download=False)
        if src is None:
            pytest.skip(f"pydicom's {name} is not installed")
        shutil.copy(src, folder / name)
    return folder


def _rows(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.strip().splitlines()]


def _err(result) -> str:
    """stderr with rich's line wrapping undone."""
    return " ".join(result.stderr.split())


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _phi(folder: Path) -> list[str]:
    values = []
    for path in sorted(folder.glob("*.dcm")):
        ds = dcmread(path, stop_before_pixels=True)
        values += [str(v) for v in (ds.get("PatientName"), ds.get("PatientID")) if v]
    assert PATIENT_NAME in values
    return values


# --- check -------------------------------------------------------------------------------------


def test_check_prints_one_json_row_per_input_and_exits_0_when_nothing_is_flagged(cli, tamper_env, inputs, tmp_path):
    masks = tmp_path / "masks"
    res = cli("check", inputs / "CT_small.dcm", inputs / "MR_small.dcm", "--json", "--bundle", tamper_env.lenient,
              "--mask-dir", masks, "--threads", "1")
    assert res.exit_code == 0, res.output
    rows = _rows(res)
    assert [r["path"] for r in rows] == [str(inputs / "CT_small.dcm"), str(inputs / "MR_small.dcm")]
    for row in rows:
        assert set(row) == ROW_KEYS
        assert row["tampered"] is False and row["operating_point"] == "fpr0.1"
        assert row["watermark"] == "absent" and row["regions"] == []
        assert row["reasons"] == [BLIND_LABEL]  # nothing was recorded for these: the detector decided
        assert 0.0 <= row["score"] <= 1.0 and len(row["image_id"]) >= 8
    assert rows[0]["image_id"] != rows[1]["image_id"]
    assert not masks.exists(), "no mask is written for an image that is not flagged"


def test_check_on_the_calibrated_bundle_follows_its_frozen_threshold(cli, tamper_env, inputs):
    res = cli("check", inputs, "--json", "--bundle", tamper_env.calibrated, "--operating-point", "fpr0.1",
              "--threads", "1")
    rows = _rows(res)
    assert len(rows) == 2  # a folder is expanded to its image files
    threshold = manifest_of(tamper_env.calibrated)["calibration"]["tamper"]["operating_points"]["fpr0.1"]
    cut = 1 / (1 + math.exp(-threshold["blind_logit"]))
    for row in rows:
        assert row["operating_point"] == "fpr0.1"
        assert row["tampered"] == (row["score"] >= cut - 1e-6)
    assert res.exit_code == (1 if any(r["tampered"] for r in rows) else 0), res.output


def test_check_flags_exits_1_and_writes_a_phi_free_mask(cli, tamper_env, inputs, tmp_path):
    masks = tmp_path / "masks"
    res = cli("check", inputs / "CT_small.dcm", inputs / "MR_small.dcm", "--json", "--bundle", tamper_env.strict,
              "--mask-dir", masks, "--threads", "1")
    assert res.exit_code == 1, res.output
    rows = _rows(res)
    assert [r["tampered"] for r in rows] == [True, True]
    for row, side in zip(rows, (128, 64)):
        assert set(row) == ROW_KEYS | {"mask"}
        assert row["reasons"] == ["blind detector", BLIND_LABEL]
        assert row["regions"] == [{"x": 0, "y": 0, "width": side, "height": side, "frame": 0, "source": "blind"}]
        mask = Path(row["mask"])
        assert mask.parent == masks and mask.name == mask_name(row["image_id"], Path(row["path"]), 0)
        from PIL import Image

        with Image.open(mask) as png:
            assert png.mode == "L" and png.size == (side, side)
            assert (np.asarray(png) == 255).all()  # pixel_logit -1e9: every pixel is reported
    names = " ".join(p.name for p in masks.iterdir())
    assert len(list(masks.iterdir())) == 2
    for value in _phi(inputs):
        assert value not in names and value.split("^")[0] not in names
    assert PATIENT_NAME not in res.stdout


def test_check_unknown_operating_point_exits_2_before_any_work(cli, tamper_env, inputs):
    res = cli("check", inputs / "CT_small.dcm", "--json", "--bundle", tamper_env.calibrated,
              "--operating-point", "fpr5")
    assert res.exit_code == 2
    assert res.stdout == ""
    assert "unknown operating point 'fpr5'" in _err(res) and "fpr1" in _err(res)


def test_check_with_a_bundle_without_detector_exits_3(cli, tamper_env, inputs):
    res = cli("check", inputs / "CT_small.dcm", "--json", "--bundle", tamper_env.no_detector)
    assert res.exit_code == 3
    assert "no 'tamper_detector' model" in _err(res) and "export tamper" in _err(res)


def test_check_bad_input_gets_an_error_row_and_exit_4(cli, tamper_env, inputs):
    bad = inputs / "broken.dcm"
    bad.write_bytes(b"not a dicom file at all" * 10)
    res = cli("check", inputs / "CT_small.dcm", bad, "--json", "--bundle", tamper_env.lenient)
    assert res.exit_code == 4, res.output
    good, broken = _rows(res)
    assert good["tampered"] is False
    assert broken["path"] == str(bad) and broken["tampered"] is None and broken["error"]


# --- run ---------------------------------------------------------------------------------------


def test_run_checks_then_watermarks_and_reports(cli, tamper_env, tmp_path):
    before = _digest(SAMPLES)
    out = tmp_path / "run"
    res = cli("run", SAMPLES, "--out", out, "--json", "--bundle", tamper_env.lenient, "--threads", "1")
    assert res.exit_code == 0, res.output
    assert _digest(SAMPLES) == before, "inputs are never modified"
    report = json.loads((out / "report.json").read_text())
    assert run_report(res.stdout) == report
    assert report["tamper_check"] == "fpr0.1"
    assert report["images"] == 2 and report["ok"] == 2 and report["tampered"] == 0
    assert {"check", "embed", "verify", "total"} <= set(report["latency_ms"])
    for record in report["records"]:
        assert record["status"] == "ok"
        assert record["tamper"]["tampered"] is False and record["tamper"]["watermark"] == "absent"
        assert set(record["tamper"]) == {"tampered", "score", "watermark", "reasons", "regions"}
        assert "check" in record["latency_ms"]
    assert sorted(p.name for p in out.iterdir()) == ["CT_small.dcm", "MR_small.dcm", "report.json"]
    text = (out / "report.json").read_text()
    for value in _phi(SAMPLES):
        assert value not in text
    # what run wrote is sealed: the check's seal fast path says untouched without the detector
    res = cli("check", out / "CT_small.dcm", "--json", "--bundle", tamper_env.lenient)
    assert res.exit_code == 0, res.output
    row = _rows(res)[0]
    assert row["evidence"] == "seal" and row["tampered"] is False and row["seal"]["status"] == "valid"
    assert row["score"] is None and row["watermark"] is None  # nothing else ran
    # one changed pixel breaks the seal; the signed fingerprint run wrote under it decides: a
    # change of one stored unit is far inside what benign processing does, so not tampered
    ds = pydicom.dcmread(out / "CT_small.dcm")
    pixels = ds.pixel_array.copy()
    pixels[5, 5] += 1
    ds.PixelData = pixels.tobytes()
    ds.save_as(tmp_path / "edited.dcm")
    res = cli("check", tmp_path / "edited.dcm", "--json", "--bundle", tamper_env.lenient)
    row = _rows(res)[0]
    assert row["evidence"] == "fingerprint" and row["tampered"] is False
    assert row["seal"]["status"] == "invalid" and row["seal"]["changed"] == ["pixels"]
    assert any(r.startswith("seal broken (pixels") for r in row["reasons"])
    # a visible square (150 HU over 24 x 24 px, 9% of the display range) is found where it is
    pixels[50:74, 60:84] += 150
    ds.PixelData = pixels.tobytes()
    ds.save_as(tmp_path / "edited2.dcm")
    res = cli("check", tmp_path / "edited2.dcm", "--json", "--bundle", tamper_env.lenient)
    assert res.exit_code == 1, res.output
    row = _rows(res)[0]
    assert row["evidence"] == "fingerprint" and row["tampered"] is True
    box = row["regions"][0]
    assert box["x"] <= 60 < 84 <= box["x"] + box["width"] + 8 and box["y"] <= 50 < 74 <= box["y"] + box["height"] + 8


def test_run_with_the_calibrated_bundle_reports_every_verdict(cli, tamper_env, tmp_path):
    out = tmp_path / "run"
    res = cli("run", SAMPLES, "--out", out, "--json", "--bundle", tamper_env.calibrated, "--threads", "1")
    report = json.loads((out / "report.json").read_text())
    assert report["tamper_check"] == "fpr0.1"
    assert len(report["records"]) == 2
    for record in report["records"]:
        assert isinstance(record["tamper"], dict) and isinstance(record["tamper"]["tampered"], bool)
        assert record["status"] == ("tampered" if record["tamper"]["tampered"] else "ok")
    assert report["tampered"] + report["ok"] == 2
    assert res.exit_code == (1 if report["tampered"] else 0), res.output


def test_run_refuses_every_image_when_the_check_flags_it(cli, tamper_env, tmp_path):
    out = tmp_path / "run"
    res = cli("run", SAMPLES, "--out", out, "--json", "--bundle", tamper_env.strict, "--threads", "1")
    assert res.exit_code == 1, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] == 0 and report["tampered"] == 2 and report["images"] == 2
    assert "embed" not in report["latency_ms"] and "check" in report["latency_ms"]
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["report.json", "tampered/CT_small.dcm", "tampered/CT_small.dcm.reason.json",
                       "tampered/MR_small.dcm", "tampered/MR_small.dcm.reason.json"]
    phi = _phi(SAMPLES)
    for record in report["records"]:
        name = Path(record["input"]).name
        assert record["status"] == "tampered" and record["output"] == str(out / "tampered" / name)
        assert record["tamper"]["reasons"] == ["blind detector"]
        assert (out / "tampered" / name).read_bytes() == (SAMPLES / name).read_bytes()
        reason_text = (out / "tampered" / f"{name}.reason.json").read_text()
        reason = json.loads(reason_text)
        assert reason["image_id"] == record["image_id"] and reason["tampered"] is True
        assert reason["reasons"] == ["blind detector"]
        for value in phi:
            assert value not in reason_text
    for value in phi:
        assert value not in (out / "report.json").read_text()


def test_run_unknown_operating_point_exits_2_and_writes_nothing(cli, tamper_env, tmp_path):
    out = tmp_path / "run"
    res = cli("run", SAMPLES, "--out", out, "--bundle", tamper_env.strict, "--operating-point", "nope")
    assert res.exit_code == 2
    assert "unknown operating point 'nope'" in _err(res)
    assert not out.exists()


def test_run_without_a_detector_skips_the_check(cli, tamper_env, tmp_path):
    out = tmp_path / "run"
    res = cli("run", SAMPLES / "CT_small.dcm", "--out", out, "--json", "--bundle", tamper_env.no_detector,
              "--threads", "1")
    assert res.exit_code == 0, res.output
    report = run_report(res.stdout)
    assert report["tamper_check"].startswith("skipped")
    assert report["records"][0]["tamper"] is None and "check" not in report["latency_ms"]


# --- eval tamper -------------------------------------------------------------------------------


def test_eval_tamper_writes_json_markdown_and_plot(cli, tamper_env, inputs, tmp_path):
    out = tmp_path / "eval"
    res = cli("eval", "tamper", "--images", inputs, "--bundle", tamper_env.calibrated, "--trials", "1",
              "--benign-trials", "1", "--out", out, "--threads", "1", "--quick")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["evidence_eval.json", "evidence_eval.md", "evidence_eval.png",
                                                     "tamper_eval.json", "tamper_eval.md", "tamper_eval.png"]
    summary = json.loads((out / "tamper_eval.json").read_text())
    auc = summary["blind"]["roc_trained"]["auc"]
    assert auc is not None and 0.0 <= auc <= 1.0
    assert sorted(i["name"] for i in summary["images"]) == ["CT_small.dcm", "MR_small.dcm"]
    assert summary["counts"]["genuine"] == 2 and summary["counts"]["tampered"] > 0
    frozen = manifest_of(tamper_env.calibrated)["calibration"]["tamper"]["operating_points"]
    used = summary["meta"]["operating_points"]
    assert set(used) == set(frozen) == set(summary["blind"]["operating_points"])
    for name, point in frozen.items():
        assert used[name]["blind_logit"] == pytest.approx(point["blind_logit"])
        assert summary["blind"]["operating_points"][name]["threshold_logit"] == pytest.approx(point["blind_logit"])
    assert (out / "tamper_eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "evidence_eval.md").read_text().strip() in res.stdout  # the three settings are printed
    for value in _phi(inputs):
        assert value not in (out / "tamper_eval.json").read_text()
