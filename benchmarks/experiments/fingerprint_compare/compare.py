"""Issue 9: the learned content fingerprint beside the non-learned one, on the same frames and edits.

Run (validation, what any choice may use):
    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 .venv/bin/python \
        benchmarks/experiments/fingerprint_compare/compare.py --encoder bundles/default/fp_encoder.onnx \
        --split val --out runs/fp_compare_val
Held-out (pydicom-data; for the final report only, never to choose anything):
    ... compare.py --encoder ... --held-out --out runs/fp_compare_heldout

For every frame (VAL split of ``train.real_data`` at most 512 px a side; or every deduplicated
pydicom-data image at native size, at most 2 frames each) both fingerprints are recorded on the
display, then recomputed on:

- each benign step of :mod:`evaluation.fingerprint_edits` (JPEG q70-95 of the 8-bit display,
  J2K 5-20:1, lossless, resize 0.5-2x and back, noise 0.2-0.8% of the range, blur 0.5-1 px, crop
  40-90% put back at its place): every cell whose box grown by 16 px (both fingerprints' support)
  lies in the kept part is a negative; the image's max over those cells is a genuine image score;
- local edits (``local_edit``: copy-move, splice, injected blob, removal by inpainting, local
  contrast, cycling) of 16, 24, 32 and 48 px changing the displayed mean over the edit by (2,) 3, 5 and
  10% of the window (255 levels), sign random: the covered cells (``covered_cells``: overlap at
  least half a cell or a quarter of the edit) are positives; the max over all cells is the edited
  image's score. Edits whose realised mean change fell short of 90% of the request (clipping at
  0/255) are dropped and counted.
- the same edits laundered: followed by one benign step (JPEG, J2K, resize and back, noise or
  blur, drawn at random), scored against the same thresholds ("laundered" rows).

Deviation: non-learned = |Gaussian cell mean now - recorded (0.5-level quantised)| in display
levels at its 8 px cells (larger above 512 px); learned = L2 distance between the encoder's codes
now and the recorded int8 codes at its 16 px cells (twice the other's cell). Reported per
fingerprint: cell-level ROC AUC (all benign cells vs all covered cells), TPR at cell FPR 1e-3 and
1e-4 (thresholds from the benign cells), per edit size and change; image-level TPR at image FPR 1%
(max over cells); record bytes (signed) at 512 x 512 and 2048 x 2048; ms per frame (1 thread).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from medsec_edge.evaluation.fingerprint_edits import (
    BENIGN_STEPS,
    EDIT_KINDS,
    benign_display,
    covered_cells,
    local_edit,
    valid_cells,
)
from medsec_edge.runtime.io.image import (
    DisplayWindow,
    ImageMeta,
    MedicalImage,
    display_window,
    stored_range,
)
from medsec_edge.runtime.tamper import fingerprint as fpm
from medsec_edge.runtime.tamper import learned_fingerprint as lfm

SIZES = (16, 24, 32, 48)
CHANGES = (0.02, 0.03, 0.05, 0.10)  # 2%: below the 3%, to show the margin
SUPPORT_CLIP = 8  # px around a cell's box that its value depends on (both fingerprints, about)
SUPPORT_PX = 16  # beyond a cell's box: the Gaussian sees 8 px, the encoder up to 15 px (top/left)
META8 = ImageMeta(bits_stored=8, signed=False, source_format="jpeg")
LAUNDER = ("jpeg", "j2k", "resize", "noise", "blur")
IDENTITY = DisplayWindow(0.0, 255.0, 1.0, 0.0, False)


def _grey(frame, meta):
    if meta.is_colour:
        frame = np.rint(frame[..., :3].astype(np.float32) @ np.float32([0.299, 0.587, 0.114])).astype(np.uint8)
        return frame, META8
    return frame, meta


def val_frames(n: int, seed: int, exclude: tuple[str, ...] = ()) -> list[tuple[np.ndarray, ImageMeta, str]]:
    from medsec_edge.train.tamper_data import load_real

    sources, origin = load_real("val", 512)
    sources = [s for s in sources if str(s.group) not in exclude]
    print(f"val frames: {len(sources)} from {origin}", file=sys.stderr)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(sources))[:n]
    out = []
    for i in sorted(order):
        frame, meta = _grey(sources[i].frame, sources[i].meta)
        if min(frame.shape) >= 64:
            out.append((np.ascontiguousarray(frame), meta, f"{sources[i].group}#{i}"))
    return out


def held_out_frames(max_frames: int = 2) -> list[tuple[np.ndarray, ImageMeta, str]]:
    import data_store  # the pydicom-data package: the held-out set, read for reporting only
    from medsec_edge.evaluation.held_out import read_held_out

    folder = Path(data_store.__file__).parent / "data"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded, skipped, dropped = read_held_out([folder])
    print(f"held-out: {len(loaded)} images read, {len(skipped)} skipped, {len(dropped)} copies dropped",
          file=sys.stderr)
    out = []
    for path, image in loaded:
        frames = image.frames()
        picks = sorted({0, len(frames) // 2})[:max_frames]
        for k in picks:
            frame, meta = _grey(np.asarray(frames[k]), image.meta)
            if frame.ndim == 2 and min(frame.shape) >= 64 and frame.dtype.kind in "uif":
                out.append((np.ascontiguousarray(frame), meta, f"{path.name}#{k}"))
    return out


class Baseline:
    name = "non-learned"

    def record(self, display):
        cell = fpm.cell_size_for(display.shape)
        q = np.clip(np.rint(fpm._cell_means(display, cell) * fpm.QUANT_LEVELS), 0, fpm.MAX_CODE)
        return cell, (q / fpm.QUANT_LEVELS).astype(np.float32)

    def deviation(self, rec, display):
        cell, values = rec
        return np.abs(fpm._cell_means(np.asarray(display, np.float32), cell) - values)


class Learned:
    name = "learned"

    def __init__(self, encoder):
        self.encoder = encoder

    def record(self, display):
        cell = lfm.learned_cell_size_for(display.shape)
        return cell, lfm.quantise(self.encoder.codes(display, cell)).astype(np.float32)

    def deviation(self, rec, display):
        cell, codes = rec
        return np.sqrt(((self.encoder.codes(display, cell) - codes) ** 2).sum(axis=0))


def clip_edge_cells(display: np.ndarray, cell: int, grid_hw: tuple[int, int]) -> np.ndarray:
    """Cells whose box grown by 8 px holds both window-clipped (display 0 or 255) and unclipped
    pixels: there a benign step on stored values (blur, resize, noise) moves values across the
    window's bounds and the displayed mean changes by tens of levels (measured on the held-out CT)."""
    clipped = (display <= 0.5) | (display >= 254.5)
    if not clipped.any() or clipped.all():
        return np.zeros(grid_hw, bool)
    gh, gw = grid_hw
    h, w = display.shape
    from scipy import ndimage

    any_c = ndimage.maximum_filter(clipped.astype(np.uint8), size=2 * SUPPORT_CLIP + 1, mode="nearest") > 0
    any_u = ndimage.maximum_filter((~clipped).astype(np.uint8), size=2 * SUPPORT_CLIP + 1, mode="nearest") > 0
    both = np.zeros((gh * cell, gw * cell), bool)
    both[:h, :w] = any_c & any_u
    return both.reshape(gh, cell, gw, cell).any(axis=(1, 3))


class LearnedMax(Learned):
    """The same codes, cell distance = the largest |difference| over the code's values (an edit
    that covers one 8 px sub-cell moves one value; L2 adds the other values' benign noise)."""

    name = "learned-max"

    def deviation(self, rec, display):
        cell, codes = rec
        return np.abs(self.encoder.codes(display, cell) - codes).max(axis=0)


def run(frames, methods, seed: int, exclude_clip_edges: bool = False) -> dict:
    neg = {m.name: {s: [] for s in BENIGN_STEPS} for m in methods}
    neg_img = {m.name: {s: [] for s in BENIGN_STEPS} for m in methods}
    pos = {m.name: {(s, c): [] for s in SIZES for c in CHANGES} for m in methods}
    pos_img = {m.name: {(s, c): [] for s in SIZES for c in CHANGES} for m in methods}
    lpos = {m.name: {(s, c): [] for s in SIZES for c in CHANGES} for m in methods}
    lpos_img = {m.name: {(s, c): [] for s in SIZES for c in CHANGES} for m in methods}
    dropped = kept = 0
    kept_cells = {m.name: 0 for m in methods}
    all_cells = {m.name: 0 for m in methods}
    t0 = time.time()
    for fi, (frame, meta, name) in enumerate(frames):
        rng = np.random.default_rng([seed, fi])
        window = display_window(meta, frame)
        vr = stored_range(meta, frame.dtype)
        vr = None if math.isinf(vr[0]) else vr
        span = float(frame.max()) - float(frame.min())
        display = window.to_display(frame)
        recs = {m.name: m.record(display) for m in methods}
        keep = {}
        for m in methods:
            cell = recs[m.name][0]
            grid = (-(-display.shape[0] // cell), -(-display.shape[1] // cell))
            keep[m.name] = ~clip_edge_cells(display, cell, grid) if exclude_clip_edges else np.ones(grid, bool)
            kept_cells[m.name] += int(keep[m.name].sum())
            all_cells[m.name] += int(keep[m.name].size)
        for step in BENIGN_STEPS:
            b, valid, _ = benign_display(frame, window, rng, step, value_range=vr, frame_span=span)
            for m in methods:
                cell = recs[m.name][0]
                dev = m.deviation(recs[m.name], b)
                ok = valid_cells(valid, cell, dev.shape, SUPPORT_PX) & keep[m.name]
                neg[m.name][step].append(dev[ok].astype(np.float32))
                neg_img[m.name][step].append(float(dev[ok].max()) if ok.any() else 0.0)
        donor = frames[(fi + 1) % len(frames)]
        donor_display = display_window(donor[1], donor[0]).to_display(donor[0])
        k = fi
        for size in SIZES:
            for change in CHANGES:
                if size + 4 > min(display.shape):
                    continue
                kind = EDIT_KINDS[k % len(EDIT_KINDS)]
                k += 1
                delta = change * 255.0 * (1 if rng.random() < 0.5 else -1)
                e = local_edit(display, rng, size=size, delta=delta, kind=kind, donor=donor_display)
                if abs(e.realised) < 0.9 * abs(delta):
                    dropped += 1
                    continue
                kept += 1
                lstep = LAUNDER[int(rng.integers(len(LAUNDER)))]
                laundered, _, _ = benign_display(e.display, IDENTITY, rng, lstep, value_range=(0.0, 255.0),
                                                 frame_span=span * abs(window.gain))
                for m in methods:
                    cell = recs[m.name][0]
                    for shown, p, pi in ((e.display, pos, pos_img), (laundered, lpos, lpos_img)):
                        dev = m.deviation(recs[m.name], shown)
                        cov = covered_cells(e.mask, cell, dev.shape) & keep[m.name]
                        p[m.name][(size, change)].append(dev[cov].astype(np.float32))
                        pi[m.name][(size, change)].append(float(dev[keep[m.name]].max()) if keep[m.name].any() else 0.0)
        if (fi + 1) % 20 == 0:
            print(f"{fi + 1}/{len(frames)} frames ({time.time() - t0:.0f} s)", file=sys.stderr)
    return {"neg": neg, "neg_img": neg_img, "pos": pos, "pos_img": pos_img, "lpos": lpos, "lpos_img": lpos_img,
            "edits_kept": kept, "cells_scored_share": {n: kept_cells[n] / max(1, all_cells[n]) for n in kept_cells},
            "edits_dropped": dropped}


def roc_auc(p: np.ndarray, n: np.ndarray) -> float:
    allv = np.concatenate([p, n]).astype(np.float64)
    order = np.argsort(allv, kind="mergesort")
    sorted_v = allv[order]
    _, first, counts = np.unique(sorted_v, return_index=True, return_counts=True)
    ranks = np.empty(len(allv))
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return float((ranks[: len(p)].sum() - len(p) * (len(p) + 1) / 2) / (len(p) * len(n)))


def threshold_at(neg: np.ndarray, fpr: float) -> float:
    """The smallest threshold with at most ``fpr`` of ``neg`` strictly above it."""
    s = np.sort(neg)
    k = math.floor(fpr * len(s))
    return float(s[-1] if k == 0 else s[len(s) - k - 1])


def _positives(n_all, thr3, thr4, img_neg, thr_img, pos_cells: dict, pos_img: dict) -> dict:
    p_by = {key: np.concatenate(v) if v else np.zeros(0, np.float32) for key, v in pos_cells.items()}
    p_all = np.concatenate(list(p_by.values()))
    img_pos = {key: np.asarray(v) for key, v in pos_img.items()}
    img_pos_all = np.concatenate(list(img_pos.values()))
    per = {}
    for (size, change), p in p_by.items():
        ip = img_pos[(size, change)]
        per[f"{size}px_{round(change * 100)}%"] = {
            "cells": len(p), "edits": len(ip),
            "cell_auc": roc_auc(p, n_all) if len(p) else None,
            "cell_tpr_fpr1e-3": float(np.mean(p > thr3)) if len(p) else None,
            "cell_tpr_fpr1e-4": float(np.mean(p > thr4)) if len(p) else None,
            "image_tpr_fpr1%": float(np.mean(ip > thr_img)) if len(ip) else None,
        }
    return {"positive_cells": len(p_all), "edited_images": len(img_pos_all),
            "cell_auc": roc_auc(p_all, n_all),
            "cell_tpr_fpr1e-3": float(np.mean(p_all > thr3)), "cell_tpr_fpr1e-4": float(np.mean(p_all > thr4)),
            "image_tpr_fpr1%": float(np.mean(img_pos_all > thr_img)),
            "image_auc": roc_auc(img_pos_all, img_neg), "by_edit": per}


def summarise(res: dict, methods) -> dict:
    out = {}
    for m in methods:
        n_all = np.concatenate([np.concatenate(v) for v in res["neg"][m.name].values()])
        thr3, thr4 = threshold_at(n_all, 1e-3), threshold_at(n_all, 1e-4)
        img_neg = np.concatenate([np.asarray(v) for v in res["neg_img"][m.name].values()])
        thr_img = threshold_at(img_neg, 0.01)
        out[m.name] = {
            "negative_cells": len(n_all), "genuine_images": len(img_neg),
            "cell_threshold_fpr1e-3": thr3, "cell_threshold_fpr1e-4": thr4, "image_threshold_fpr1%": thr_img,
            "benign_cell_p99.9_by_step": {s: float(np.percentile(np.concatenate(v), 99.9))
                                          for s, v in res["neg"][m.name].items()},
            "benign_image_fpr_at_threshold_by_step": {s: float(np.mean(np.asarray(v) > thr_img))
                                                      for s, v in res["neg_img"][m.name].items()},
            "edits": _positives(n_all, thr3, thr4, img_neg, thr_img, res["pos"][m.name], res["pos_img"][m.name]),
            "laundered": _positives(n_all, thr3, thr4, img_neg, thr_img, res["lpos"][m.name],
                                    res["lpos_img"][m.name]),
        }
    return out


def sizes_and_latency(methods, encoder, frames) -> dict:
    from medsec_edge.runtime.crypto.keyset import SealSigner
    from PIL import Image

    signer = SealSigner.generate()
    frame, meta, _ = max(frames, key=lambda f: min(f[0].shape))
    display = display_window(meta, frame).to_display(frame)
    out = {}
    for side in (512, 2048):
        img = Image.fromarray(display, mode="F").resize((side, side), Image.Resampling.BICUBIC)
        d = np.clip(np.asarray(img, np.float32), 0, 255)
        stored = np.rint(d).astype(np.uint8)
        image = MedicalImage(stored, META8)
        base_fp = fpm.compute_fingerprint(image)
        learned_fp = lfm.compute_learned_fingerprint(image, encoder)
        rec = {"non-learned_bytes_signed": len(fpm.sign_fingerprint(base_fp, signer)),
               "learned_bytes_signed": len(lfm.sign_learned_fingerprint(learned_fp, signer)),
               "non-learned_cells": int(np.prod(base_fp.grid_shape)), "learned_cells": int(np.prod(learned_fp.grid_shape))}
        for m in methods:
            m.record(d)
            times = []
            for _ in range(7 if side == 512 else 3):
                t = time.perf_counter()
                m.record(d)
                times.append(time.perf_counter() - t)
            rec[f"{m.name}_ms_median"] = 1000 * float(np.median(times))
        out[f"{side}x{side}"] = rec
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--encoder", type=Path, default=Path("bundles/default/fp_encoder.onnx"))
    parser.add_argument("--split", default="val", choices=("val",))
    parser.add_argument("--held-out", action="store_true", help="pydicom-data instead (report only)")
    parser.add_argument("--frames", type=int, default=141)
    parser.add_argument("--seed", type=int, default=20261205)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--exclude-group", action="append", default=[],
                        help="leave out this real_data group (repeatable): one the encoder may have trained on")
    parser.add_argument("--with-max", action="store_true", help="also the learned codes with a max-abs distance")
    parser.add_argument("--exclude-clip-edges", action="store_true",
                        help="score only cells whose support is all window-clipped or all unclipped")
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    for n in ("openjpeg", "medsec_edge.evaluation.attacks", "medsec_edge.train.real_data"):
        logging.getLogger(n).setLevel(logging.ERROR)
    encoder = lfm.FingerprintEncoder.from_path(args.encoder, threads=1)
    methods = [Baseline(), Learned(encoder)] + ([LearnedMax(encoder)] if args.with_max else [])
    frames = held_out_frames() if args.held_out else val_frames(args.frames, args.seed, tuple(args.exclude_group))
    print(f"{len(frames)} frames", file=sys.stderr)
    res = run(frames, methods, args.seed, args.exclude_clip_edges)
    summary = {"set": "pydicom-data (held-out)" if args.held_out else f"val split (real_data), {len(frames)} frames",
               "frames": len(frames), "edits_kept": res["edits_kept"],
               "exclude_clip_edges": args.exclude_clip_edges, "excluded_groups": args.exclude_group, "cells_scored_share": res["cells_scored_share"], "edits_dropped_clipped": res["edits_dropped"],
               "encoder": str(args.encoder), "encoder_sha256_8": encoder.id.hex(),
               "command": " ".join(["python", *sys.argv]),
               "metrics": summarise(res, methods), "sizes_latency": sizes_and_latency(methods, encoder, frames)}
    text = json.dumps(summary, indent=1)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "summary.json").write_text(text + "\n")
    print(text)
    print(markdown(summary))


def markdown(summary: dict) -> str:
    m = summary["metrics"]
    names = list(m)
    lines = [f"### {summary['set']}{' (clip-edge cells excluded)' if summary.get('exclude_clip_edges') else ''} "
             f"({summary['edits_kept']} edits, {summary['edits_dropped_clipped']} dropped "
             f"for clipping; {m[names[0]]['genuine_images']} genuine images, "
             + ", ".join(f"{m[n]['negative_cells']} benign cells ({n})" for n in names) + ")",
             "", "| measure | " + " | ".join(f"{n} {g}" for g in ("edits", "laundered") for n in names) + " |",
             "|---|" + "---|" * (2 * len(names))]
    for key in ("cell_auc", "cell_tpr_fpr1e-3", "cell_tpr_fpr1e-4", "image_auc", "image_tpr_fpr1%", "positive_cells"):
        lines.append(f"| {key} | " + " | ".join(_fmt(m[n][g][key]) for g in ("edits", "laundered") for n in names) + " |")
    lines += ["", "| edit (size, mean change) | " + " | ".join(
        f"{n} {g} cell TPR@1e-3 / img TPR@1%" for g in ("edits", "laundered") for n in names) + " |",
              "|---|" + "---|" * (2 * len(names))]
    for e in m[names[0]]["edits"]["by_edit"]:
        lines.append(f"| {e} | " + " | ".join(
            f"{_fmt(m[n][g]['by_edit'][e]['cell_tpr_fpr1e-3'])} / {_fmt(m[n][g]['by_edit'][e]['image_tpr_fpr1%'])}"
            for g in ("edits", "laundered") for n in names) + " |")
    lines += ["", "| benign step | " + " | ".join(f"{n} cell p99.9 / img FPR" for n in names) + " |",
              "|---|" + "---|" * len(names)]
    for s in m[names[0]]["benign_cell_p99.9_by_step"]:
        lines.append(f"| {s} | " + " | ".join(
            f"{_fmt(m[n]['benign_cell_p99.9_by_step'][s])} / {_fmt(m[n]['benign_image_fpr_at_threshold_by_step'][s])}"
            for n in names) + " |")
    lines.append("| thresholds (cell 1e-3, cell 1e-4, image 1%) | " + " | ".join(
        f"{_fmt(m[n]['cell_threshold_fpr1e-3'])}, {_fmt(m[n]['cell_threshold_fpr1e-4'])}, "
        f"{_fmt(m[n]['image_threshold_fpr1%'])}" for n in names) + " |")
    lines += ["", "| size | " + " | ".join(summary["sizes_latency"]["512x512"]) + " |",
              "|---|" + "---|" * len(summary["sizes_latency"]["512x512"])]
    for side, rec in summary["sizes_latency"].items():
        lines.append(f"| {side} | " + " | ".join(_fmt(v) for v in rec.values()) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


if __name__ == "__main__":
    main()
