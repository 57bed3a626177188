"""Plots of the evaluation reports, drawn from their summary dicts (never from raw images).

Layer: evaluation. matplotlib is imported inside each function and used through ``Figure``
directly (the Agg canvas, no pyplot), so plotting neither needs a display nor changes the
process-wide backend of a caller that uses pyplot itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# What a strength means in each ATTACK_SERIES family (evaluation.attacks).
SERIES_AXIS = {
    "jpeg": "JPEG quality",
    "noise": "noise sigma (fraction of range)",
    "resize": "resize scale",
    "crop": "kept area fraction",
    "rotation": "rotation (degrees)",
}

_OURS_COLOUR = "#d62728"
_OTHER_COLOURS = ("#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")


def _colours(methods: list[str]) -> dict[str, str]:
    colours, others = {}, iter(_OTHER_COLOURS * 4)
    for method in methods:
        colours[method] = _OURS_COLOUR if method == "ours" else next(others)
    return colours


def plot_watermark_eval(summary: dict[str, Any], path: Path) -> Path:
    """Recovery and bit accuracy vs attack strength per family, and exact recovery per attack.

    Top two rows: one panel per ``ATTACK_SERIES`` family that was measured (x runs from mild to
    strong: axes whose strength falls as the attack gets harsher are inverted). Bottom: grouped
    bars of exact payload recovery per registry attack, ours beside each baseline.
    """
    from matplotlib.figure import Figure

    series: dict[str, dict[str, list[dict[str, Any]]]] = summary.get("series") or {}
    robustness: dict[str, dict[str, dict[str, Any]]] = summary.get("robustness") or {}
    methods = list(dict.fromkeys(list(robustness) + [m for fam in series.values() for m in fam]))
    colours = _colours(methods)
    families = list(series)

    columns = max(1, len(families))
    fig = Figure(figsize=(max(12.0, 3.6 * columns), 11.0 if families else 4.5), layout="constrained")
    grid = fig.add_gridspec(3 if families else 1, columns, height_ratios=[1, 1, 1.15] if families else [1])

    for col, family in enumerate(families):
        top = fig.add_subplot(grid[0, col])
        bottom = fig.add_subplot(grid[1, col], sharex=top)
        for method, points in series[family].items():
            xs = [p["strength"] for p in points]
            style = {"color": colours[method], "marker": "o", "markersize": 3,
                     "linewidth": 2.2 if method == "ours" else 1.4, "label": method}
            top.plot(xs, [p["recovery_pct"] for p in points], **style)
            acc = [(x, p["bit_accuracy_mean"]) for x, p in zip(xs, points) if p["bit_accuracy_mean"] is not None]
            if acc:
                bottom.plot([a[0] for a in acc], [a[1] for a in acc], **style)
            if len(xs) > 1 and xs[0] > xs[-1] and not top.xaxis_inverted():
                top.invert_xaxis()
        top.set_title(family)
        top.set_ylim(-3, 103)
        bottom.set_ylim(-0.02, 1.02)
        bottom.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
        bottom.set_xlabel(SERIES_AXIS.get(family, "strength"))
        if col == 0:
            top.set_ylabel("exact recovery (%)")
            bottom.set_ylabel("bit accuracy")
            top.legend(fontsize=8, loc="lower left")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)

    bars = fig.add_subplot(grid[-1, :])
    attacks = list(dict.fromkeys(a for m in robustness.values() for a in m))
    if attacks and methods:
        width = 0.8 / max(1, len(robustness))
        for i, method in enumerate(robustness):
            xs = [j + (i - (len(robustness) - 1) / 2) * width for j in range(len(attacks))]
            heights = [robustness[method].get(a, {}).get("recovery_pct", 0.0) for a in attacks]
            bars.bar(xs, heights, width=width, color=colours[method], label=method)
        bars.set_xticks(range(len(attacks)))
        bars.set_xticklabels(attacks, rotation=35, ha="right", fontsize=8)
        bars.legend(fontsize=8, ncols=min(4, len(robustness)), loc="upper right")
    bars.set_ylim(0, 105)
    bars.set_ylabel("exact recovery (%)")
    bars.set_title("exact payload recovery per attack")
    bars.grid(axis="y", alpha=0.3)

    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def plot_evidence_eval(rows: list[dict[str, Any]], blind_rows: list[dict[str, Any]], examples: list[Any],
                       path: Path) -> Path:
    """The tamper check in its three settings: one ROC panel per setting (the check's score; the
    never-protected panel from tamper_eval's rows), then example edits with the true mask (green)
    and the check's mask (red) overlaid. ``examples`` carry ``setting``, ``title``, ``display``
    (0..255), ``truth`` and ``pred`` (2-D bool, the display's geometry)."""
    import numpy as np
    from matplotlib.figure import Figure
    from medsec_edge.evaluation import detection_metrics as dm

    def roc(ax, scores, labels, label, style):
        scores, labels = np.nan_to_num(np.asarray(scores, float), neginf=-1e300), np.asarray(labels, bool)
        if labels.any() and (~labels).any():
            fpr, tpr, _ = dm.roc_curve(scores, labels)
            auc = dm.roc_auc(scores, labels)
            ax.plot(np.maximum(fpr, 1e-4), tpr, style, label=f"{label} (AUC {auc:.3f})")

    shown = examples[:8]
    n_ex_rows = (len(shown) + 3) // 4
    fig = Figure(figsize=(15.0, 4.6 * (1 + n_ex_rows)), layout="constrained")
    grid = fig.add_gridspec(1 + n_ex_rows, 4)
    titles = {"header_kept": "header kept (PACS path)", "header_stripped": "header stripped (exports)"}
    for col, key in enumerate(("header_kept", "header_stripped")):
        ax = fig.add_subplot(grid[0, col])
        part = [r for r in rows if r.get("setting") == key]
        neg = [r for r in part if not r["label"]]
        pos = [r for r in part if r["label"]]
        target = [r for r in pos if r.get("step") is None and r.get("contrast_pct", 0) >= 3.0]
        for subset, label, style in ((pos, "all edits", "-"), (target, "edits >=3% contrast", "--")):
            roc(ax, [r["score"] for r in subset + neg], [True] * len(subset) + [False] * len(neg), f"ours, {label}", style)
        npos, nneg = [r for r in pos if "noise_score" in r], [r for r in neg if "noise_score" in r]
        roc(ax, [r["noise_score"] for r in npos + nneg], [True] * len(npos) + [False] * len(nneg), "noise residual", ":")
        ax.set_title(titles[key], fontsize=10)
    ax = fig.add_subplot(grid[0, 2])
    if blind_rows:
        neg = [r for r in blind_rows if not r["label"]]
        for fam_ok, label, style in ((lambda k: k != "splice", "trained families", "-"),
                                     (lambda k: k == "splice", "held-out family (splice)", "--")):
            pos = [r for r in blind_rows if r["label"] and fam_ok(r["kind"])]
            roc(ax, [r["blind"] for r in pos + neg], [True] * len(pos) + [False] * len(neg), f"blind, {label}", style)
    ax.set_title("never protected (blind)", fontsize=10)
    for ax in fig.axes:
        ax.set_xscale("log")
        ax.set_xlim(1e-4, 1)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("false-positive rate (0 drawn at 1e-4)")
        ax.set_ylabel("true-positive rate")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, loc="lower right")
    for i, ex in enumerate(shown):
        axi = fig.add_subplot(grid[1 + i // 4, i % 4])
        axi.imshow(np.asarray(ex.display), cmap="gray", vmin=0, vmax=255)
        if ex.truth.any():
            axi.contour(ex.truth, levels=[0.5], colors="lime", linewidths=0.8)
        if ex.pred is not None and ex.pred.any():
            axi.contour(ex.pred, levels=[0.5], colors="red", linewidths=0.8)
        axi.set_title(f"{ex.setting.replace('_', ' ')}: {ex.title}\n(green truth, red ours)", fontsize=8)
        axi.axis("off")
    path = Path(path)
    fig.savefig(path, dpi=90)
    return path


__all__ = ["SERIES_AXIS", "plot_evidence_eval", "plot_watermark_eval"]
