"""Tables from a watermark evaluation: per-image recovery, the manifest summary, before vs after.

    python benchmarks/experiments/watermark_tables.py EVAL_JSON [--per-image OUT.md]
        [--summary OUT.json] [--before OLD_SUMMARY.json] [--command "medsec-edge eval ..."]

``EVAL_JSON`` is ``watermark_eval.json`` from ``medsec-edge eval watermark``. ``--summary``
writes what ``medsec-edge export watermark --evaluation`` puts in the bundle manifest;
``--before`` prints a markdown table of an older such summary beside this one (issue 11's
before/after, same command, same images).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SIZE_CLASSES = (("both sides >= 128 px", 128, 10**9), ("64-127 px", 64, 127))
HARSH = ("jpeg50", "j2k20", "noise2", "resize0.5", "crop25", "rot5", "crop70_jpeg75")


def _rows(data: dict) -> list[dict]:
    return [r for r in data["records"]["robustness"] if r["method"] == "ours"]


def per_image_markdown(data: dict, command: str) -> str:
    rows = _rows(data)
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    images = list(dict.fromkeys(r["image"] for r in rows))
    size = {r["image"]: r["size"] for r in rows}
    lines = ["# Exact payload recovery per held-out image and attack (ours)", "",
             f"From `{command}`.", "",
             "| image | size | " + " | ".join(attacks) + " |", "|" + "---|" * (len(attacks) + 2)]
    for image in images:
        cells = []
        for attack in attacks:
            cell = [r for r in rows if r["image"] == image and r["attack"] == attack]
            cells.append(f"{sum(r['exact'] for r in cell)}/{len(cell)}")
        lines.append(f"| {image} | {size[image]} | " + " | ".join(cells) + " |")
    for label, lo, hi in SIZE_CLASSES:
        chosen = [i for i in images if lo <= _min_side(size[i]) <= hi]
        lines += ["", f"Recovery on the {len(chosen)} images with {label}:", "",
                  "| " + " | ".join(attacks) + " |", "|" + "---|" * len(attacks)]
        pct = []
        for attack in attacks:
            cell = [r for r in rows if r["image"] in chosen and r["attack"] == attack]
            pct.append(f"{100 * sum(r['exact'] for r in cell) / max(len(cell), 1):.0f}%")
        lines.append("| " + " | ".join(pct) + " |")
    return "\n".join(lines) + "\n"


def _min_side(size: str) -> int:
    height, width = size.split()[0].split("x")[:2]
    return min(int(height), int(width))


def manifest_summary(data: dict, command: str) -> dict:
    quality = data["quality"]["ours"]
    keys = ("psnr_window", "ssim_window", "mse_window", "psnr_full", "mse_full")
    false = data["false_detections"]["total"]
    return {
        "command": command,
        "images": len(data["images"]),
        "held_out": "pydicom-data (deduplicated), never trained on",
        "quality": {"mean": {k: quality["mean"][k] for k in keys}, "worst": {k: quality["worst"][k] for k in keys}},
        "recovery": data["robustness"]["ours"],
        "false_detections": {"found": false["found"], "n": false["n"]},
    }


def before_after_markdown(before: dict, after: dict) -> str:
    lines = ["| measure | before | after |", "|---|---|---|"]
    for stat in ("mean", "worst"):
        for key, digits in (("psnr_window", 2), ("ssim_window", 4)):
            lines.append(f"| {key} {stat} | {before['quality'][stat][key]:.{digits}f} | "
                         f"{after['quality'][stat][key]:.{digits}f} |")
    for attack, cell in after["recovery"].items():
        old = before["recovery"].get(attack)
        old_text = f"{old['recovery_pct']:.1f}% ({old['recovered']}/{old['n']})" if old else "n/a"
        lines.append(f"| {attack}{' (harsh)' if attack in HARSH else ''} | {old_text} | "
                     f"{cell['recovery_pct']:.1f}% ({cell['recovered']}/{cell['n']}) |")
    lines.append(f"| false detections | {before['false_detections']} | {after['false_detections']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("eval_json", type=Path)
    parser.add_argument("--per-image", type=Path)
    parser.add_argument("--summary", type=Path)
    parser.add_argument("--before", type=Path)
    parser.add_argument("--command", default="medsec-edge eval watermark --pydicom-data --trials 2 --baseline-trials 1",
                        help="the evaluation's command, as the tables should quote it")
    args = parser.parse_args()
    data = json.loads(args.eval_json.read_text())
    command = args.command
    summary = manifest_summary(data, command)
    if args.per_image:
        args.per_image.write_text(per_image_markdown(data, command))
    if args.summary:
        args.summary.write_text(json.dumps(summary, indent=1) + "\n")
    if args.before:
        print(before_after_markdown(json.loads(args.before.read_text()), summary))


if __name__ == "__main__":
    main()
