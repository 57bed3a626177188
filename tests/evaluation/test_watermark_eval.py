"""The watermark evaluation harness: dedup rules, aggregation arithmetic, the report, and a run.

The end-to-end run uses the real ``Watermarker`` (embedding, tile folding, lattice search,
Reed-Solomon payload codec) driven by a small spread-spectrum model written here in numpy: the
trained bundle may not exist on a test machine, and training one takes minutes. When the default
bundle exists, a second smoke run uses it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy.ndimage import gaussian_filter

from medsec_edge.evaluation.attacks import ATTACKS, attack_image
from medsec_edge.evaluation.watermark_eval import (
    PEER_CLAIMS,
    DedupRule,
    aggregate_false_detections,
    aggregate_latency,
    aggregate_quality,
    aggregate_robustness,
    deduplicate,
    display_as_image,
    render_markdown,
    robustness_markdown,
    run_watermark_eval,
    summarise,
)
from medsec_edge.runtime.errors import UsageError
from medsec_edge.runtime.io.image import display_window
from medsec_edge.runtime.pipeline import default_bundle_path
from medsec_edge.runtime.watermark.watermarker import Watermarker
from medsec_edge.runtime.watermark.spec import CODE_BITS, TILE

PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PID-SECRET-4711"

# Every file name of pydicom-data 1.x's data folder.
PYDICOM_DATA_NAMES = """
693_J2KR.dcm 693_UNCI.dcm 693_UNCR.dcm JPEG-LL.dcm JPEG2000_UNC.dcm JPGLosslessP14SV1_1s_1f_8b.dcm
MR-SIEMENS-DICOM-WithOverlays.dcm MR2_J2KI.dcm MR2_J2KR.dcm MR2_UNCI.dcm MR2_UNCR.dcm OBXXXX1A.dcm
OBXXXX1A_2frame.dcm OBXXXX1A_expb.dcm OBXXXX1A_expb_2frame.dcm OBXXXX1A_rle.dcm OBXXXX1A_rle_2frame.dcm
OT-PAL-8-face.dcm RG1_J2KI.dcm RG1_J2KR.dcm RG1_UNCI.dcm RG1_UNCR.dcm RG3_J2KI.dcm RG3_J2KR.dcm
RG3_UNCI.dcm RG3_UNCR.dcm SC_rgb.dcm SC_rgb_16bit.dcm SC_rgb_16bit_2frame.dcm SC_rgb_2frame.dcm
SC_rgb_32bit.dcm SC_rgb_32bit_2frame.dcm SC_rgb_dcmtk_ebcr_dcmd.dcm SC_rgb_dcmtk_ebcyn1_dcmd.dcm
SC_rgb_dcmtk_ebcyn2_dcmd.dcm SC_rgb_dcmtk_ebcynp_dcmd.dcm SC_rgb_dcmtk_ebcys2_dcmd.dcm
SC_rgb_dcmtk_ebcys4_dcmd.dcm SC_rgb_expb.dcm SC_rgb_expb_16bit.dcm SC_rgb_expb_16bit_2frame.dcm
SC_rgb_expb_2frame.dcm SC_rgb_expb_32bit.dcm SC_rgb_expb_32bit_2frame.dcm SC_rgb_gdcm2k_uncompressed.dcm
SC_ybr_full_uncompressed.dcm US1_J2KI.dcm US1_J2KR.dcm US1_UNCI.dcm US1_UNCR.dcm bad_sequence.dcm
color-pl.dcm color-px.dcm color3d_jpeg_baseline.dcm eCT_Supplemental.dcm emri_small.dcm emri_small_RLE.dcm
emri_small_big_endian.dcm emri_small_jpeg_2k_lossless.dcm emri_small_jpeg_2k_lossless_too_short.dcm
emri_small_jpeg_ls_lossless.dcm explicit_VR-UN.dcm gdcm-US-ALOKA-16.dcm gdcm-US-ALOKA-16_big.dcm
liver.dcm liver_expb.dcm mlut_18.dcm vlut_04.dcm
""".split()


# --- deduplication --------------------------------------------------------------------------------


def test_dedup_keeps_one_copy_of_each_pydicom_data_image():
    folder = Path("/data")
    kept, dropped = deduplicate([folder / n for n in PYDICOM_DATA_NAMES])
    assert sorted(p.name for p in kept) == sorted([
        "693_UNCR.dcm", "JPEG2000_UNC.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm",
        "MR2_UNCR.dcm", "OBXXXX1A.dcm", "OT-PAL-8-face.dcm", "RG1_UNCR.dcm", "RG3_UNCR.dcm", "SC_rgb.dcm",
        "SC_rgb_16bit.dcm", "US1_UNCR.dcm", "bad_sequence.dcm", "color-px.dcm", "color3d_jpeg_baseline.dcm",
        "eCT_Supplemental.dcm", "emri_small.dcm", "explicit_VR-UN.dcm", "gdcm-US-ALOKA-16.dcm", "liver.dcm",
        "mlut_18.dcm", "vlut_04.dcm",
    ])
    assert len(kept) + len(dropped) == len(PYDICOM_DATA_NAMES)
    by_name = {d["name"]: d for d in dropped}
    assert by_name["MR2_J2KI.dcm"]["kept_instead"] == ["MR2_UNCR.dcm"]
    assert by_name["SC_rgb_expb_2frame.dcm"]["kept_instead"] == ["SC_rgb.dcm", "SC_rgb_16bit.dcm"]
    assert by_name["JPEG-LL.dcm"]["kept_instead"] == ["JPEG2000_UNC.dcm"]
    # input order is kept
    assert [p.name for p in kept] == [n for n in PYDICOM_DATA_NAMES if n in {p.name for p in kept}]


def test_dedup_falls_back_along_the_preference_and_never_drops_a_whole_family():
    kept, _ = deduplicate([Path("a/MR2_J2KI.dcm"), Path("a/MR2_J2KR.dcm"), Path("a/RG1_J2KI.dcm")])
    assert [p.name for p in kept] == ["MR2_J2KR.dcm", "RG1_J2KI.dcm"]
    rule = DedupRule(r"x_.*\.dcm", ("x_main.dcm",), "test")
    kept, dropped = deduplicate([Path("x_b.dcm"), Path("x_a.dcm")], [rule])
    assert [p.name for p in kept] == ["x_a.dcm"] and dropped[0]["name"] == "x_b.dcm"


def test_dedup_treats_folders_separately_and_leaves_other_names_alone():
    paths = [Path("one/MR2_UNCR.dcm"), Path("two/MR2_UNCI.dcm"), Path("two/scan.dcm"), Path("two/notes_UNCR.png")]
    kept, dropped = deduplicate(paths)
    assert kept == paths and dropped == []


# --- aggregation arithmetic -------------------------------------------------------------------------


def _rob(method, image, attack, exact, acc, refused=False, ms=10.0, size="512x512"):
    return {"method": method, "image": image, "trial": 0, "attack": attack, "size": size, "exact": exact,
            "bit_accuracy": acc, "found": exact if method == "ours" else None, "confidence": None,
            "extract_ms": ms, "refused": refused, "error": "x" if refused else ""}


def _records():
    robustness = [
        _rob("ours", "a", "none", True, 1.0, ms=10), _rob("ours", "b", "none", True, 0.98, ms=30),
        _rob("ours", "a", "jpeg50", True, 0.95, ms=20), _rob("ours", "b", "jpeg50", False, 0.75, ms=40),
        _rob("dwtDct", "a", "none", True, 1.0), _rob("dwtDct", "b", "none", False, 0.5),
        _rob("dwtDct", "a", "jpeg50", False, 0.6), _rob("dwtDct", "b", "jpeg50", False, None, refused=True),
    ]
    quality = [
        {"method": "ours", "image": "a", "trial": 0, "size": "512x512", "embed_ms": 5.0, "psnr_window": 40.0,
         "ssim_window": 0.98, "mse_window": 6.5, "psnr_full": 60.0, "mse_full": 1.0},
        {"method": "ours", "image": "a", "trial": 1, "size": "512x512", "embed_ms": 7.0, "psnr_window": 42.0,
         "ssim_window": 0.96, "mse_window": 4.1, "psnr_full": 62.0, "mse_full": 0.5},
        {"method": "ours", "image": "b", "trial": 0, "size": "512x512", "embed_ms": 9.0, "psnr_window": 45.0,
         "ssim_window": 0.99, "mse_window": 2.0, "psnr_full": math.inf, "mse_full": 0.0},
        {"method": "dwtDct", "image": "a", "trial": 0, "size": "512x512", "embed_ms": 50.0, "psnr_window": 38.0,
         "ssim_window": 0.9, "mse_window": 10.0, "psnr_full": None, "mse_full": None},
    ]
    false = [{"image": "a", "trial": 0, "attack": "none", "size": "512x512", "found": False, "confidence": 0.1,
              "extract_ms": 100.0, "error": ""},
             {"image": "b", "trial": 0, "attack": "none", "size": "512x512", "found": True, "confidence": 0.9,
              "extract_ms": 200.0, "error": ""},
             {"image": "a", "trial": 0, "attack": "jpeg50", "size": "512x512", "found": False, "confidence": 0.1,
              "extract_ms": 300.0, "error": ""}]
    return {"robustness": robustness, "quality": quality, "false_detection": false, "series": [],
            "not_applicable": [{"method": "dwtDct", "image": "c", "trial": 0, "reason": "too small"},
                               {"method": "dwtDct", "image": "c", "trial": 1, "reason": "too small"}]}


def test_robustness_counts_refusals_as_failures_and_averages_bits_over_reads():
    rob = aggregate_robustness(_records()["robustness"])
    assert list(rob) == ["ours", "dwtDct"]
    assert rob["ours"]["jpeg50"] == {"n": 2, "recovered": 1, "recovery_pct": 50.0,
                                     "bit_accuracy_mean": pytest.approx(0.85), "refused": 0}
    cell = rob["dwtDct"]["jpeg50"]
    assert (cell["n"], cell["recovered"], cell["refused"]) == (2, 0, 1)
    assert cell["bit_accuracy_mean"] == pytest.approx(0.6)
    assert list(rob["ours"]) == ["none", "jpeg50"]  # registry order, not insertion order


def test_false_detections_quality_and_latency_arithmetic():
    rec = _records()
    false = aggregate_false_detections(rec["false_detection"])
    assert false["per_attack"]["none"] == {"n": 2, "found": 1, "rate": 0.5}
    assert false["total"] == {"n": 3, "found": 1, "rate": pytest.approx(1 / 3)}

    quality = aggregate_quality(rec["quality"])
    per_image = {e["image"]: e for e in quality["ours"]["per_image"]}
    assert per_image["a"]["psnr_window"] == pytest.approx(41.0) and per_image["a"]["trials"] == 2
    assert quality["ours"]["mean"]["psnr_window"] == pytest.approx(43.0)
    assert quality["ours"]["worst"]["psnr_window"] == pytest.approx(41.0)  # lowest PSNR
    assert quality["ours"]["worst"]["mse_window"] == pytest.approx(5.3)  # highest MSE
    assert quality["ours"]["worst"]["psnr_full"] == pytest.approx(61.0)  # inf is the best, not the worst
    assert quality["ours"]["mean"]["psnr_full"] == math.inf
    assert quality["dwtDct"]["mean"]["psnr_full"] is None

    latency = aggregate_latency(rec["quality"], rec["robustness"], rec["false_detection"])
    ours = latency["ours"]["512x512"]
    assert ours["embed_ms"]["p50"] == pytest.approx(7.0) and ours["embed_ms"]["n"] == 3
    assert ours["extract_ms_clean"]["p50"] == pytest.approx(20.0) and ours["extract_ms_clean"]["n"] == 2
    assert ours["extract_ms_attacked"]["n"] == 2
    assert ours["extract_ms_unmarked"]["p50"] == pytest.approx(200.0)
    assert "extract_ms_unmarked" not in latency["dwtDct"]["512x512"]


def test_markdown_has_every_attack_method_and_the_peer_claims_labelled():
    rec = _records()
    summary = summarise(rec, meta={"trials": 2, "attacks": ["none", "jpeg50"]},
                        images=[{"name": "a", "size": "512x512"}, {"name": "b", "size": "512x512"}],
                        skipped=[{"name": "liver.dcm", "reason": "1-bit images are refused"}])
    assert summary["not_applicable"] == [{"method": "dwtDct", "image": "c", "reason": "too small"}]
    table = robustness_markdown(summary)
    lines = table.splitlines()
    assert lines[0].startswith("| attack | ours recovery | ours bit acc | dwtDct recovery")
    assert lines[2].startswith("| none | 100.0% (2/2) |")
    assert "0.0% (0/2, 1 refused)" in lines[3]
    text = render_markdown(summary)
    for name in ("none", "jpeg50", "dwtDct", "liver.dcm", "1/2", "inf (lossless)"):
        assert name in text
    assert PEER_CLAIMS["label"] == "claimed in notes, not measured here"
    assert "claimed in notes, not measured here" in text and "937 / 674" in text


def test_display_image_attacks_see_the_display_unchanged():
    display = np.tile(np.arange(256, dtype=np.uint8), (4, 1))
    image = display_as_image(display)
    window = display_window(image.meta, display)
    np.testing.assert_array_equal(window.to_display(display), display.astype(np.float32))
    exported = attack_image(image, "export8", np.random.default_rng(0))
    np.testing.assert_array_equal(exported.pixels, display)


def test_unknown_attack_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="unknown attack"):
        run_watermark_eval([tmp_path], tmp_path / "out", attacks=["jpeg_11"], watermarker=object(),
                           with_baselines=False, progress=False, echo=False)


# --- end to end ------------------------------------------------------------------------------------


class SpreadSpectrumModels:
    """A classical watermark behind the ``WatermarkModels`` protocol: 128 orthonormal random
    32x32 patterns, flat strength, a high-pass filter as the signal extractor."""

    readout_gain = 4.0

    def __init__(self, seed: int = 3) -> None:
        basis, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((TILE * TILE, CODE_BITS)))
        self._patterns = basis.T.reshape(CODE_BITS, TILE, TILE).astype(np.float32)

    @property
    def readout(self) -> np.ndarray:
        return self._patterns

    def strength(self, work: np.ndarray) -> np.ndarray:
        return np.ones(work.shape, np.float32)

    def signal(self, work: np.ndarray) -> np.ndarray:
        return (work - gaussian_filter(work, 1.5, mode="wrap")).astype(np.float32)

    def tile(self, bits_pm1: np.ndarray) -> np.ndarray:
        tile = np.tensordot(bits_pm1.astype(np.float32), self._patterns, axes=1)
        tile -= tile.mean()
        return (tile / (tile.std() + 1e-9)).astype(np.float32)


def _write_dicom(path: Path) -> Path:
    y, x = np.mgrid[0:256, 0:256]
    texture = gaussian_filter(np.random.default_rng(0).normal(0, 200, (256, 256)), 3)
    pixels = (1500 + 800 * np.sin(x / 30) * np.cos(y / 40) + texture).clip(0, 4095).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.Modality = "OT"
    ds.WindowCenter, ds.WindowWidth = "1500", "2000"
    ds.set_pixel_data(pixels, "MONOCHROME2", 12, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_run_writes_a_phi_free_report_with_real_measurements(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    _write_dicom(src / "phantom.dcm")
    # A lone member of a dedup family is kept, then refused on read and listed as skipped.
    (src / "notes_J2KI.dcm").write_bytes(b"not a dicom file")
    assert pydicom.dcmread(src / "phantom.dcm").PatientName == PATIENT_NAME
    out = tmp_path / "out"
    baselines = ["dwtDctSvd"]
    summary = run_watermark_eval([src], out, trials=2, baseline_trials=1, attacks=["none", "jpeg90", "crop50"],
                                 baselines=baselines, series_images=1,
                                 watermarker=Watermarker(SpreadSpectrumModels(), target_psnr_db=40.0),
                                 progress=False)

    files = [out / "watermark_eval.json", out / "watermark_eval.md", out / "watermark_eval.png"]
    assert all(f.stat().st_size > 0 for f in files)
    assert files[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = files[0].read_text() + files[1].read_text()
    assert PATIENT_NAME not in text and "Doe" not in text and PATIENT_ID not in text
    report = json.loads(files[0].read_text())
    assert [i["name"] for i in report["images"]] == ["phantom.dcm"]
    assert report["skipped"][0]["name"] == "notes_J2KI.dcm"

    ours = summary["robustness"]["ours"]
    assert ours["none"]["recovered"] == ours["none"]["n"] == 2
    assert ours["crop50"]["recovered"] == 2  # the harness hands the cropped image over as is
    # once per (image, attack), not per trial: the unmarked image does not change between trials
    assert summary["false_detections"]["total"] == {"n": 3, "found": 0, "rate": 0.0}
    assert summary["quality"]["ours"]["mean"]["psnr_window"] == pytest.approx(40.0, abs=0.5)
    if summary["meta"]["baselines"]:
        assert summary["robustness"]["dwtDctSvd"]["none"]["recovered"] == 1
    assert set(summary["series"]) == {"jpeg", "noise", "resize", "crop", "rotation"}
    assert len(report["records"]["robustness"]) == 3 * (2 + len(summary["meta"]["baselines"]))
    assert len(report["records"]["quality"]) == 2 + len(summary["meta"]["baselines"])
    assert "| none | 100.0% (2/2) |" in capsys.readouterr().out


@pytest.mark.skipif(not (default_bundle_path() / "manifest.json").exists(),
                    reason=f"no bundle at {default_bundle_path()} (train and export one, or set MEDSEC_EDGE_BUNDLE)")
def test_smoke_with_the_default_bundle(tmp_path):
    from pydicom.data import get_testdata_file

    path = get_testdata_file("emri_small.dcm", download=False)
    if path is None:
        pytest.skip("emri_small.dcm not installed (pip install pydicom-data)")
    summary = run_watermark_eval([Path(path)], tmp_path, trials=1, attacks=["none", "jpeg75"],
                                 with_baselines=False, series_images=0, progress=False, echo=False)
    assert summary["robustness"]["ours"]["none"]["n"] == 1
    assert summary["false_detections"]["total"]["found"] == 0
    assert set(ATTACKS) >= set(summary["robustness"]["ours"])
