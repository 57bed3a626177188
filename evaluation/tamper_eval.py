"""The tamper evaluation (``medsec-edge eval tamper``): our check beside a hash and a forensic baseline.

Layer: evaluation. On held-out images (pydicom-data; never trained on, never used for
thresholds) it generates, per image and seeded: the genuine frame, benign steps
(:mod:`.benign`, several draws each), and every manipulation family (:mod:`.manipulations`,
``trials`` each, a share laundered by one benign step). The blind detector runs through the
runtime's own path with the thresholds frozen in the bundle; the same frames go to the two
baselines of :mod:`.forensic_baselines`. Then each frame is watermarked and the watermark-aware
check is scored on the moderate tier (negatives) and on manipulations of the watermarked frame.

Two kinds of numbers, never mixed: "at the frozen thresholds" (what the device does: the
manifest's operating points) and "ROC" (threshold-free: AUC, and the best TPR at a given FPR
measured on this very set, which a device could not know in advance). Outputs:
``tamper_eval.json``, ``tamper_eval.md`` and ``tamper_eval.png`` (ROC curves, masks overlaid).
Images are named by file name and PHI-free image id only.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medsec_edge.evaluation import detection_metrics as dm
from medsec_edge.evaluation.attacks import ATTACKS, attacked_image
from medsec_edge.evaluation.benign import BENIGN, benign
from medsec_edge.evaluation.forensic_baselines import HashBaseline, NoiseResidualBaseline
from medsec_edge.evaluation.held_out import read_held_out
from medsec_edge.evaluation.manipulations import MANIPULATIONS, manipulate, size_bin_of
from medsec_edge.runtime.errors import InputError, UsageError
from medsec_edge.runtime.io.image import ImageMeta, MedicalImage, display_window, luminance, stored_range
from medsec_edge.runtime.tamper.checker import TamperChecker, upsample_mask

log = logging.getLogger(__name__)

JSON_NAME, MARKDOWN_NAME, PLOT_NAME = "tamper_eval.json", "tamper_eval.md", "tamper_eval.png"
HELD_OUT_FAMILY = "splice"  # train/tamper_data.HELD_OUT_FAMILY (not imported: evaluation needs no torch)
MODERATE_TIER = ("none", "jpeg90", "jpeg75", "j2k10", "noise1", "blur1", "export8", "resize0.75", "crop50")
LAUNDER_SHARE = 0.3
STUDY_FRAMES = 300
SEED_CLAIMS = {"accuracy": 0.985, "fpr": 0.02, "fnr": 0.01, "seconds_per_image": 0.3}
META8 = ImageMeta(bits_stored=8, signed=False, source_format="png")


@dataclass
class Sample:
    image: str
    kind: str  # genuine | benign | a manipulation family
    step: str | None  # benign step, or the laundering step of a manipulation
    pixels: np.ndarray
    meta: ImageMeta
    mask: np.ndarray | None
    size_px: int = 0
    scores: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> bool:
        return self.mask is not None and bool(self.mask.any())


def _rng(seed: int, name: str, *parts: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode()), *parts])


def grey_frame(image: MedicalImage) -> tuple[np.ndarray, ImageMeta]:
    """The middle frame as one grey frame at native depth (colour -> 8-bit luma)."""
    frames = image.frames()
    frame = frames[len(frames) // 2]
    if image.meta.is_colour:
        return np.clip(np.rint(luminance(frame)), 0, 255).astype(np.uint8), META8
    return np.ascontiguousarray(frame), image.meta


def make_samples(name: str, frame: np.ndarray, meta: ImageMeta, donor: np.ndarray, *, seed: int,
                 trials: int, benign_trials: int) -> list[Sample]:
    """Genuine, benign and manipulated (some laundered) versions of one frame, seeded per image."""
    value_range = stored_range(meta, frame.dtype)
    window = display_window(meta, frame)
    out = [Sample(name, "genuine", None, frame, meta, None)]
    for s_index, step in enumerate(BENIGN):
        for t in range(benign_trials):
            rng = _rng(seed, name, 1, s_index, t)
            b = benign(frame, window, rng, value_range=value_range, name=step)
            out.append(Sample(name, "benign", step, b.pixels, META8 if b.kind == "display8" else meta, None,
                              extra={"params": b.params}))
    for f_index, family in enumerate(MANIPULATIONS):
        for t in range(trials):
            rng = _rng(seed, name, 2, f_index, t)
            try:
                m = manipulate(frame, family, rng, value_range=value_range, donor=donor)
            except UsageError as exc:
                log.info("%s: %s skipped (%s)", name, family, exc)
                continue
            pixels, mask, step, m_meta = m.pixels, m.mask, None, meta
            if rng.random() < LAUNDER_SHARE:
                b = benign(pixels, display_window(meta, pixels), rng, value_range=value_range, mask=mask)
                pixels, mask, step = b.pixels, b.mask, b.name
                m_meta = META8 if b.kind == "display8" else meta
            if mask is None or not mask.any():
                continue  # laundering cropped the manipulated region away
            out.append(Sample(name, family, step, pixels, m_meta, mask, m.size_px))
    return out


def _score_blind(checker: TamperChecker, sample: Sample, pixel_logit: float) -> None:
    t0 = time.perf_counter()
    blind = checker.blind(sample.pixels, sample.meta)
    sample.scores["blind_ms"] = (time.perf_counter() - t0) * 1e3
    sample.scores["blind"] = blind.logit
    if sample.label:
        pred = upsample_mask(blind.mask_logits >= pixel_logit, blind.stride, sample.mask.shape)
        sample.scores["pixel_f1"], sample.scores["pixel_iou"] = dm.pixel_scores(pred, sample.mask)
        sample.extra["pred_mask"] = pred


def _score_baselines(sample: Sample, reference_hex: str, noise: NoiseResidualBaseline) -> None:
    x = sample.pixels.astype(np.float64)
    t0 = time.perf_counter()
    sample.scores["noise_residual"] = float(noise.score(x))
    sample.scores["noise_ms"] = (time.perf_counter() - t0) * 1e3
    t1 = time.perf_counter()
    sample.scores["sha256"] = float(HashBaseline.verdict(reference_hex, sample.pixels))
    sample.scores["sha256_ms"] = (time.perf_counter() - t1) * 1e3
    if sample.label and sample.pixels.shape[:2] == sample.mask.shape:
        pred = noise.mask(x)
        sample.scores["noise_pixel_f1"], sample.scores["noise_pixel_iou"] = dm.pixel_scores(pred, sample.mask)


def watermark_samples(checker: TamperChecker, name: str, frame: np.ndarray, meta: ImageMeta, donor: np.ndarray,
                      *, seed: int, trials: int) -> list[dict]:
    """Rows of the watermark-aware check: the marked frame under the moderate tier (negatives)
    and manipulations of the marked frame (positives), each checked at both operating points."""
    rng = _rng(seed, name, 3)
    marked = checker.watermarker.embed(MedicalImage(frame, meta), rng.integers(0, 256, 8, np.uint8).tobytes()).pixels
    value_range = stored_range(meta, marked.dtype)
    rows = []
    cases: list[tuple[str, str | None, MedicalImage, int]] = []
    for a_index, attack in enumerate(MODERATE_TIER):
        out = ATTACKS[attack](marked, display_window(meta, marked), _rng(seed, name, 4, a_index),
                              value_range=value_range)
        cases.append(("genuine", attack, attacked_image([out], meta), 0))
    for f_index, family in enumerate(MANIPULATIONS):
        for t in range(trials):
            try:
                m = manipulate(marked, family, _rng(seed, name, 5, f_index, t), value_range=value_range, donor=donor)
            except UsageError:
                continue
            cases.append((family, None, MedicalImage(m.pixels, meta), m.size_px))
    for kind, attack, image, size_px in cases:
        row = {"image": name, "kind": kind, "attack": attack, "size_px": size_px, "label": kind != "genuine"}
        t0 = time.perf_counter()
        verdicts = {op: checker.check(image, op) for op in checker.operating_points}
        row["check_ms"] = (time.perf_counter() - t0) * 1e3 / max(1, len(verdicts))
        first = next(iter(verdicts.values()))
        row["watermark"] = first.watermark
        row["wm_deficit"] = first.watermark_deficit
        row["blind"] = first.blind_logit
        for op, v in verdicts.items():
            row[f"tampered_{op}"] = v.tampered
        rows.append(row)
    return rows


# --- aggregation -------------------------------------------------------------------------


def _rate(k: int, n: int) -> dict:
    lo, hi = dm.wilson_interval(k, n)
    return {"k": int(k), "n": int(n), "rate": (k / n) if n else None, "ci95": [lo, hi]}


def _roc_block(scores: np.ndarray, labels: np.ndarray) -> dict:
    finite = np.isfinite(scores)
    scores, labels = scores[finite], labels[finite]
    out = {"auc": dm.roc_auc(scores, labels), "n_pos": int(labels.sum()), "n_neg": int((~labels).sum())}
    for name, fpr in (("fpr1", 0.01), ("fpr0.1", 0.001)):
        tpr, thr = dm.tpr_at_fpr(scores, labels, fpr)
        out[f"roc_tpr_at_{name}"] = tpr
    return out


def aggregate(samples: list[Sample], wm_rows: list[dict], checker: TamperChecker) -> dict:
    labels = np.asarray([s.label for s in samples])
    kinds = np.asarray([s.kind for s in samples])
    blind = np.asarray([s.scores["blind"] for s in samples])
    noise = np.asarray([s.scores["noise_residual"] for s in samples])
    negatives = ~labels
    trained = labels & (kinds != HELD_OUT_FAMILY)
    held = labels & (kinds == HELD_OUT_FAMILY)
    summary: dict[str, Any] = {"counts": {"negatives": int(negatives.sum()), "genuine": int((kinds == "genuine").sum()),
                                          "benign": int((kinds == "benign").sum()), "tampered": int(labels.sum())}}
    blind_block: dict[str, Any] = {
        "roc_trained": _roc_block(blind[negatives | trained], labels[negatives | trained]),
        "roc_held_out": _roc_block(blind[negatives | held], labels[negatives | held]),
        "operating_points": {},
    }
    for name, op in checker.operating_points.items():
        pred = blind >= op.blind_logit
        conf = dm.confusion(pred, labels)
        row = {"threshold_logit": op.blind_logit, "target_fpr": op.target_fpr,
               "confusion": {"tp": conf.tp, "fp": conf.fp, "tn": conf.tn, "fn": conf.fn},
               "rates": {k: {"value": v[0], "ci95": [v[1], v[2]]} for k, v in conf.rates_with_ci().items()},
               "f1": conf.f1,
               "tpr_trained": _rate(int((pred & trained).sum()), int(trained.sum())),
               "tpr_held_out": _rate(int((pred & held).sum()), int(held.sum())),
               "fpr_genuine": _rate(int((pred & (kinds == "genuine")).sum()), int((kinds == "genuine").sum())),
               "fpr_benign": _rate(int((pred & (kinds == "benign")).sum()), int((kinds == "benign").sum())),
               "study_fpr_300": dm.study_fpr(float(np.mean(pred[negatives])) if negatives.any() else 0.0,
                                             STUDY_FRAMES)}
        row["per_benign_step"] = {
            step: _rate(int(sum(p for p, s in zip(pred, samples) if s.kind == "benign" and s.step == step)),
                        int(sum(1 for s in samples if s.kind == "benign" and s.step == step)))
            for step in BENIGN}
        row["per_family"] = {f: _rate(int((pred & (kinds == f)).sum()), int((kinds == f).sum())) for f in MANIPULATIONS}
        bins = np.asarray([size_bin_of(s.size_px) if s.label else "" for s in samples])
        row["per_size_bin"] = {b: _rate(int((pred & labels & (bins == b)).sum()), int((labels & (bins == b)).sum()))
                               for b in ("<16", "16-32", "32-64", ">=64")}
        laundered = np.asarray([s.label and s.step is not None for s in samples])
        row["tpr_laundered"] = _rate(int((pred & laundered).sum()), int(laundered.sum()))
        blind_block["operating_points"][name] = row
    ious = [s.scores["pixel_iou"] for s in samples if s.label and "pixel_iou" in s.scores]
    big = [s.scores["pixel_iou"] for s in samples if s.label and "pixel_iou" in s.scores and s.size_px >= 32]
    f1s = [s.scores["pixel_f1"] for s in samples if s.label and "pixel_f1" in s.scores]
    blind_block["pixel"] = {"iou_mean": _mean(ious), "f1_mean": _mean(f1s), "iou_mean_ge32": _mean(big),
                            "n": len(ious), "n_ge32": len(big)}
    blind_block["latency_ms"] = _latency(samples, "blind_ms")
    summary["blind"] = blind_block

    n_ious = [s.scores["noise_pixel_iou"] for s in samples if "noise_pixel_iou" in s.scores]
    n_big = [s.scores["noise_pixel_iou"] for s in samples if "noise_pixel_iou" in s.scores and s.size_px >= 32]
    sha = np.asarray([s.scores["sha256"] for s in samples]) > 0.5
    summary["baselines"] = {
        "noise_residual": {"roc_trained": _roc_block(noise[negatives | trained], labels[negatives | trained]),
                           "roc_held_out": _roc_block(noise[negatives | held], labels[negatives | held]),
                           "pixel": {"iou_mean": _mean(n_ious), "iou_mean_ge32": _mean(n_big)},
                           "latency_ms": _latency(samples, "noise_ms")},
        "sha256": {"tpr": _rate(int((sha & labels).sum()), int(labels.sum())),
                   "fpr_genuine": _rate(int((sha & (kinds == "genuine")).sum()), int((kinds == "genuine").sum())),
                   "fpr_benign": _rate(int((sha & (kinds == "benign")).sum()), int((kinds == "benign").sum())),
                   "per_benign_step": {step: _rate(int(sum(v for v, s in zip(sha, samples)
                                                           if s.kind == "benign" and s.step == step)),
                                                   int(sum(1 for s in samples if s.kind == "benign" and s.step == step)))
                                       for step in BENIGN},
                   "localizes": False, "latency_ms": _latency(samples, "sha256_ms")},
    }
    summary["watermark_aware"] = _aggregate_wm(wm_rows, list(checker.operating_points))
    summary["seed_claims"] = dict(SEED_CLAIMS)
    return summary


def _aggregate_wm(rows: list[dict], ops: list[str]) -> dict:
    if not rows:
        return {}
    labels = np.asarray([r["label"] for r in rows])
    sizes = np.asarray([r["size_px"] for r in rows])
    read = np.asarray([r["watermark"] != "absent" for r in rows])
    deficit = np.asarray([np.nan if r["wm_deficit"] is None else r["wm_deficit"] for r in rows], dtype=float)
    out: dict[str, Any] = {"n": len(rows), "read_share": float(read.mean()),
                           "wm_deficit_roc_ge16": _roc_block(deficit[(~labels) | (sizes >= 16)], labels[(~labels) | (sizes >= 16)])}
    for op in ops:
        pred = np.asarray([r[f"tampered_{op}"] for r in rows])
        neg = ~labels
        out[op] = {
            "tpr_ge16": _rate(int((pred & labels & (sizes >= 16)).sum()), int((labels & (sizes >= 16)).sum())),
            "tpr_all": _rate(int((pred & labels).sum()), int(labels.sum())),
            "fpr_moderate_tier": _rate(int((pred & neg).sum()), int(neg.sum())),
            "per_family": {f: _rate(int(sum(p for p, r in zip(pred, rows) if r["kind"] == f)),
                                    int(sum(1 for r in rows if r["kind"] == f))) for f in MANIPULATIONS},
            "per_attack_fpr": {a: _rate(int(sum(p for p, r in zip(pred, rows) if r["attack"] == a)),
                                        int(sum(1 for r in rows if r["attack"] == a))) for a in MODERATE_TIER},
        }
    out["latency_ms"] = {"check_p50": float(np.percentile([r["check_ms"] for r in rows], 50)),
                         "check_p99": float(np.percentile([r["check_ms"] for r in rows], 99))}
    return out


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _latency(samples: list[Sample], key: str) -> dict:
    by_size: dict[str, list[float]] = {}
    for s in samples:
        if key in s.scores:
            h, w = s.pixels.shape[:2]
            by_size.setdefault("<=512" if max(h, w) <= 640 else ">512", []).append(s.scores[key])
    return {k: {"p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99)), "n": len(v)}
            for k, v in sorted(by_size.items())}


# --- report ------------------------------------------------------------------------------


def _pct(r: dict | float | None) -> str:
    if r is None:
        return "n/a"
    if isinstance(r, dict):
        if not r.get("n"):
            return "n/a"
        lo, hi = r["ci95"]
        return f"{100 * r['rate']:.1f}% ({r['k']}/{r['n']}; {100 * lo:.1f}-{100 * hi:.1f})"
    return "n/a" if r != r else f"{100 * r:.1f}%"


def render_markdown(summary: dict) -> str:
    b, base, wm = summary["blind"], summary["baselines"], summary["watermark_aware"]
    lines = [f"# Tamper check evaluation ({summary['meta']['created']})", "",
             f"Command: `{summary['meta']['command']}`  ", f"Bundle: {summary['meta']['bundle']}  ",
             f"Images: {len(summary['images'])} held-out (pydicom-data, deduplicated); samples: "
             f"{summary['counts']['genuine']} genuine, {summary['counts']['benign']} benign, "
             f"{summary['counts']['tampered']} manipulated ({int(LAUNDER_SHARE * 100)}% laundered); "
             f"held-out family: `{HELD_OUT_FAMILY}`. Rates with Wilson 95% intervals.", "",
             "## Threshold-free (ROC on this set)", "",
             "| method | AUC trained families | AUC held-out family | best TPR @FPR 1% | best TPR @FPR 0.1% |",
             "|---|---|---|---|---|"]
    for label, block in (("ours (blind CNN)", b), ("noise residual (classical)", base["noise_residual"])):
        rt, rh = block["roc_trained"], block["roc_held_out"]
        lines.append(f"| {label} | {rt['auc']:.4f} | {rh['auc']:.4f} | {_pct(rt['roc_tpr_at_fpr1'])} | "
                     f"{_pct(rt['roc_tpr_at_fpr0.1'])} |")
    lines += ["", "## At the frozen thresholds (manifest operating points: what the device does)", "",
              "| operating point | TPR trained | TPR held-out | FPR genuine | FPR benign | accuracy | precision | "
              "F1 | study FPR (300 frames) |", "|---|---|---|---|---|---|---|---|---|"]
    for op, row in b["operating_points"].items():
        r = row["rates"]
        lines.append(f"| {op} | {_pct(row['tpr_trained'])} | {_pct(row['tpr_held_out'])} | {_pct(row['fpr_genuine'])} | "
                     f"{_pct(row['fpr_benign'])} | {_pct(r['accuracy']['value'])} | {_pct(r['precision']['value'])} | "
                     f"{_pct(row['f1'])} | {_pct(row['study_fpr_300'])} |")
    sha = base["sha256"]
    lines += ["", "| hash/signature (SHA-256) | TPR | FPR genuine | FPR benign | localizes |", "|---|---|---|---|---|",
              f"| | {_pct(sha['tpr'])} | {_pct(sha['fpr_genuine'])} | {_pct(sha['fpr_benign'])} | no |", ""]
    op1 = b["operating_points"].get("fpr1")
    if op1:
        lines += ["### Per family and size (blind, fpr1)", "", "| family | TPR |", "|---|---|"]
        lines += [f"| {f}{' (held out)' if f == HELD_OUT_FAMILY else ''} | {_pct(v)} |" for f, v in op1["per_family"].items()]
        lines += ["", "| size bin (equivalent diameter, px) | TPR |", "|---|---|"]
        lines += [f"| {k} | {_pct(v)} |" for k, v in op1["per_size_bin"].items()]
        lines += ["", f"Laundered manipulations: TPR {_pct(op1['tpr_laundered'])}", "",
                  "| benign step | FPR ours (fpr1) | FPR SHA-256 |", "|---|---|---|"]
        lines += [f"| {k} | {_pct(v)} | {_pct(sha['per_benign_step'][k])} |" for k, v in op1["per_benign_step"].items()]
    px = b["pixel"]
    lines += ["", "## Localization", "",
              f"Ours: pixel IoU {_fmt(px['iou_mean'])} (F1 {_fmt(px['f1_mean'])}) over {px['n']} manipulated frames; "
              f"IoU {_fmt(px['iou_mean_ge32'])} on the {px['n_ge32']} of >= 32 px. Noise residual: IoU "
              f"{_fmt(base['noise_residual']['pixel']['iou_mean'])}, >= 32 px {_fmt(base['noise_residual']['pixel']['iou_mean_ge32'])}.",
              ""]
    if wm:
        lines += ["## Watermark-aware check (our watermarked frames)", "",
                  f"Watermark read on {100 * wm['read_share']:.1f}% of {wm['n']} checked frames; AUC of the "
                  f"watermark-deficit score alone (>= 16 px): {wm['wm_deficit_roc_ge16']['auc']:.4f}.", "",
                  "| operating point | TPR >= 16 px | TPR all sizes | FPR moderate tier |", "|---|---|---|---|"]
        for op in b["operating_points"]:
            if op in wm:
                lines.append(f"| {op} | {_pct(wm[op]['tpr_ge16'])} | {_pct(wm[op]['tpr_all'])} | "
                             f"{_pct(wm[op]['fpr_moderate_tier'])} |")
        lines.append("")
    lat = b["latency_ms"]
    lines += ["## Latency (ms per frame, this run)", "", "| method | size | p50 | p99 | n |", "|---|---|---|---|---|"]
    for label, block in (("ours blind", lat), ("noise residual", base["noise_residual"]["latency_ms"]),
                         ("SHA-256", sha["latency_ms"])):
        for size, v in block.items():
            lines.append(f"| {label} | {size} | {v['p50']:.1f} | {v['p99']:.1f} | {v['n']} |")
    if wm:
        lines.append(f"| ours full check (blind + watermark) | all | {wm['latency_ms']['check_p50']:.1f} | "
                     f"{wm['latency_ms']['check_p99']:.1f} | {wm['n']} |")
    c = summary["seed_claims"]
    lines += ["", "## The seed's claims (not measured by us; per-slice, threshold unknown)", "",
              f"accuracy {100 * c['accuracy']:.1f}%, FPR {100 * c['fpr']:.0f}%, FNR {100 * c['fnr']:.0f}%, "
              f"{c['seconds_per_image']} s per image; at 2% per-slice FPR a 300-frame study is flagged with "
              f"probability {100 * dm.study_fpr(c['fpr'], STUDY_FRAMES):.1f}%.", ""]
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def plot(summary_samples: list[Sample], wm_rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = np.asarray([s.label for s in summary_samples])
    kinds = np.asarray([s.kind for s in summary_samples])
    fig = plt.figure(figsize=(15, 8))
    ax = fig.add_subplot(2, 3, 1)
    for key, name, style in (("blind", "ours (blind CNN)", "-"), ("noise_residual", "noise residual", "--")):
        scores = np.asarray([s.scores[key] for s in summary_samples])
        for subset, tag in ((kinds != HELD_OUT_FAMILY, "trained"), (~labels | (kinds == HELD_OUT_FAMILY), "held-out")):
            fpr, tpr, _ = dm.roc_curve(scores[subset], labels[subset])
            ax.plot(fpr, tpr, style, label=f"{name}, {tag}")
    if wm_rows:
        deficit = np.asarray([np.nan if r["wm_deficit"] is None else r["wm_deficit"] for r in wm_rows], float)
        lab = np.asarray([r["label"] for r in wm_rows])
        ok = np.isfinite(deficit)
        if ok.any() and lab[ok].any() and (~lab[ok]).any():
            fpr, tpr, _ = dm.roc_curve(deficit[ok], lab[ok])
            ax.plot(fpr, tpr, ":", label="watermark deficit (marked frames)")
    ax.set_xscale("log")
    ax.set_xlim(1e-3, 1)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title("ROC (held-out images)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    examples = [s for s in summary_samples if s.label and "pred_mask" in s.extra and s.step is None][:5]
    for i, s in enumerate(examples):
        axi = fig.add_subplot(2, 3, i + 2)
        disp = s.pixels.astype(np.float64)
        lo, hi = np.percentile(disp, [1, 99])
        axi.imshow(np.clip((disp - lo) / max(hi - lo, 1e-9), 0, 1), cmap="gray")
        axi.contour(s.mask, levels=[0.5], colors="lime", linewidths=0.8)
        axi.contour(s.extra["pred_mask"], levels=[0.5], colors="red", linewidths=0.8)
        axi.set_title(f"{s.kind}, {s.size_px} px (green truth, red ours)", fontsize=8)
        axi.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def run_tamper_eval(images: list[Path], out: Path, *, bundle_path: Path | None = None, threads: int | None = None,
                    seed: int = 0, trials: int = 3, benign_trials: int = 3, watermark: bool = True,
                    dedup: bool = True, progress: bool = True, command: str = "") -> dict:
    """Evaluate the tamper check on ``images`` and write JSON, markdown and PNG into ``out``."""
    from rich.progress import Progress

    from medsec_edge.runtime.pipeline import load_checker

    if trials < 1 or benign_trials < 1:
        raise UsageError("--trials and --benign-trials must be at least 1")
    checker = load_checker(bundle_path, threads=threads)
    pixel_logit = next(iter(checker.operating_points.values())).pixel_logit
    images_read, skipped, dropped = read_held_out(images, dedup=dedup)
    if not images_read:
        raise UsageError(f"no readable image among the {len(skipped)} file(s) given: nothing to evaluate")
    loaded = []
    for path, image in images_read:
        frame, meta = grey_frame(image)
        if min(frame.shape) < 64:
            skipped.append({"name": path.name, "reason": f"{frame.shape[0]}x{frame.shape[1]} is below 64 px"})
            continue
        loaded.append((path.name, image.meta.image_id, frame, meta))
    if not loaded:
        raise UsageError(f"no usable image (>= 64 px) among {len(images_read)} readable file(s): nothing to evaluate")
    noise = NoiseResidualBaseline()
    samples: list[Sample] = []
    wm_rows: list[dict] = []
    started = time.perf_counter()
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("tamper eval", total=len(loaded))
        for i, (name, image_id, frame, meta) in enumerate(loaded):
            donor = loaded[(i + 1) % len(loaded)][2].astype(np.float64)
            checker.blind(frame, meta)  # untimed: ONNX Runtime plans each new shape on first use
            reference = HashBaseline.reference(frame)
            for s in make_samples(name, frame, meta, donor, seed=seed, trials=trials, benign_trials=benign_trials):
                _score_blind(checker, s, pixel_logit)
                _score_baselines(s, reference, noise)
                samples.append(s)
            if watermark and checker.watermarker is not None:
                try:
                    wm_rows += watermark_samples(checker, name, frame, meta, donor, seed=seed, trials=trials)
                except InputError as exc:
                    log.info("%s: not watermarked (%s)", name, exc)
            bar.advance(task)
    summary = aggregate(samples, wm_rows, checker)
    summary["meta"] = {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                       "command": command, "seed": seed, "trials": trials, "benign_trials": benign_trials,
                       "bundle": str(bundle_path or "default"), "seconds": round(time.perf_counter() - started, 1),
                       "operating_points": {k: vars(v) for k, v in checker.operating_points.items()}}
    summary["images"] = [{"name": n, "image_id": iid, "shape": list(f.shape), "bits": m.bits_stored}
                         for n, iid, f, m in loaded]
    summary["skipped"], summary["dropped"] = skipped, dropped
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"image": s.image, "kind": s.kind, "step": s.step, "label": s.label, "size_px": s.size_px,
             **{k: v for k, v in s.scores.items()}} for s in samples]
    (out / JSON_NAME).write_text(json.dumps({**summary, "rows": rows, "watermark_rows": wm_rows}, indent=1,
                                            default=_json_default))
    (out / MARKDOWN_NAME).write_text(render_markdown(summary))
    plot(samples, wm_rows, out / PLOT_NAME)
    return summary


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
