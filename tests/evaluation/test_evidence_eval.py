"""`medsec-edge eval tamper --quick`: the three settings on pydicom's CT_small and MR_small, through
the real runtime (run_batch protects, check_image checks; nothing mocked)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from medsec_edge.evaluation.evidence_eval import (
    JSON_NAME,
    MARKDOWN_NAME,
    PLOT_NAME,
    SETTINGS,
)
from medsec_edge.runtime.cli import app
from pydicom import dcmread
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from tests.tamper_fixtures import base_env  # noqa: F401 - fixture

NAMES = ("CT_small.dcm", "MR_small.dcm")


@pytest.fixture
def inputs(tmp_path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in NAMES:
        src = get_testdata_file(name, download=False)
        if src is None:
            pytest.skip(f"pydicom's {name} is not installed")
        shutil.copy(src, folder / name)
    return folder


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One quick run shared by the tests of this module (the CLI, in process)."""
    tmp = tmp_path_factory.mktemp("evidence")
    folder = tmp / "in"
    folder.mkdir()
    for name in NAMES:
        src = get_testdata_file(name, download=False)
        if src is None:
            pytest.skip(f"pydicom's {name} is not installed")
        shutil.copy(src, folder / name)
    mp = pytest.MonkeyPatch()
    mp.setenv("MEDSEC_EDGE_THREADS", "1")
    mp.setenv("MEDSEC_EDGE_KEY", str(tmp / "keys" / "watermark.key"))
    mp.setenv("MEDSEC_EDGE_KEYS", str(tmp / "keys" / "ring"))
    mp.delenv("MEDSEC_EDGE_BUNDLE", raising=False)
    import logging

    root, pyd = logging.getLogger(), logging.getLogger("pydicom")
    saved = (root.handlers[:], root.level, pyd.level)
    out = tmp / "eval"
    t0 = time.perf_counter()
    try:
        res = CliRunner().invoke(app, ["eval", "tamper", "--images", str(folder), "--quick", "--out", str(out),
                                       "--threads", "1"])
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        pyd.setLevel(saved[2])
        mp.undo()
    seconds = time.perf_counter() - t0
    assert res.exit_code == 0, res.output
    return res, out, json.loads((out / JSON_NAME).read_text()), seconds, folder


def test_quick_run_writes_three_settings_within_a_minute(quick_run):
    res, out, summary, seconds, _ = quick_run
    assert seconds < 60
    assert set(summary["settings"]) == set(SETTINGS)
    assert {p.name for p in out.iterdir()} >= {JSON_NAME, MARKDOWN_NAME, PLOT_NAME, "tamper_eval.json"}
    assert (out / PLOT_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / MARKDOWN_NAME).read_text() in res.stdout
    assert sorted(i["name"] for i in summary["images"]) == sorted(NAMES)
    assert summary["errors"] == []  # the runtime answered every case
    ops = summary["meta"]["operating_points"]
    assert ops
    for key in ("header_kept", "header_stripped"):
        s = summary["settings"][key]
        assert s["counts"]["positives"] > 0 and s["counts"]["negatives"] > 0
        assert 0.0 <= s["roc"]["all"]["auc"] <= 1.0
        assert {"tpr_at_fpr1", "tpr_at_fpr0.1"} <= set(s["roc"]["all"])
        for op in ops:
            o = s["operating_points"][op]
            for field in ("tpr_all", "tpr_target", "fpr", "per_family", "per_size_bin", "per_contrast_bin",
                          "per_benign_step", "study"):
                assert field in o
            assert o["fpr"]["n"] == s["counts"]["negatives"] and len(o["fpr"]["ci95"]) == 2
        assert set(s["latency_ms"]) == {"check", "sha256", "seal_alone", "noise_residual"}
        assert s["latency_ms"]["check"]["all"]["n"] == s["counts"]["positives"] + s["counts"]["negatives"]
        assert {"sha256", "seal_alone", "noise_residual"} <= set(s["baselines"])
        assert "ge32" in s["pixel_iou"] and "watermark_found" in s
    kept = summary["settings"]["header_kept"]["operating_points"][ops[0]]["per_benign_step"]
    assert {"lossless", "jpeg", "j2k", "resize", "crop", "noise", "blur", "export8"} <= set(kept)
    blind = summary["settings"]["never_protected"]
    assert blind["auc_trained"] is not None and blind["held_out_family"] == "splice"


def test_untouched_files_are_vouched_for_by_the_seal_and_every_edit_breaks_it(quick_run):
    _, _, summary, _, _ = quick_run
    rows = [r for r in summary["rows"] if r["setting"] == "header_kept"]
    untouched = [r for r in rows if r["kind"] == "untouched"]
    assert len(untouched) == 2
    for r in untouched + [r for r in rows if r.get("step") == "lossless"]:
        assert r["evidence"] == "seal" and r["seal_status"] == "valid" and not r["sha256_flag"]
        assert not any(r[k] for k in r if k.startswith("tampered_"))
    edits = [r for r in rows if r["label"]]
    assert edits
    for r in edits:  # the seal alone flags every edit; the check never vouches for one
        assert r["seal_status"] == "invalid" and r["seal_flag"] and r["sha256_flag"]
        assert r["evidence"] != "seal"
        assert 0.0 <= r["pixel_iou"] <= 1.0 and r["contrast_bin"] in ("<3%", "3-5%", "5-10%", ">=10%")
    stripped = [r for r in summary["rows"] if r["setting"] == "header_stripped"]
    assert stripped and all(r["seal_status"] == "unsigned" and r["evidence"] != "seal" for r in stripped)


def test_report_names_images_by_file_name_and_id_only(quick_run):
    _, out, summary, _, folder = quick_run
    text = (out / JSON_NAME).read_text() + (out / MARKDOWN_NAME).read_text()
    for path in sorted(folder.glob("*.dcm")):
        ds = dcmread(path, stop_before_pixels=True)
        for value in (ds.get("PatientName"), ds.get("PatientID"), ds.get("SOPInstanceUID")):
            if value and len(str(value)) > 3:
                assert str(value) not in text
    assert {r["image"] for r in summary["rows"]} == set(NAMES)


@pytest.mark.usefixtures("base_env")
def test_display8_export_put_back_into_dicom_shows_as_it_is(tmp_path):
    from medsec_edge.evaluation.evidence_eval import with_pixels
    from medsec_edge.runtime.io.image import display_window
    from medsec_edge.runtime.io.readers import read_image

    src = get_testdata_file("CT_small.dcm", download=False)
    if src is None:
        pytest.skip("pydicom's CT_small.dcm is not installed")
    image = read_image(Path(src))
    display = np.tile(np.arange(128, dtype=np.uint8)[None] * 2, (128, 1))
    back = with_pixels(image, display, display8=True, path=tmp_path / "d8.dcm")
    assert back.pixels.dtype == np.uint8 and np.array_equal(back.pixels, display)
    shown = display_window(back.meta, back.pixels).to_display(back.pixels)
    assert np.allclose(shown, display)
