"""Plot a pytest-benchmark JSON (``--benchmark-json=FILE``): median latency per group, ours vs peer.

Usage: python benchmarks/plot_results.py FILE.json OUT.png
Prints a markdown table with the ratio to the peer measured in the same run.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def main(src: str, dst: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(src).read_text())
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        groups[bench["group"]][bench["name"]] = bench["stats"]["median"] * 1e3
    names = sorted({n for g in groups.values() for n in g})
    print("| group | " + " | ".join(f"{n} median ms" for n in names) + " | ours / peer |")
    print("|---" * (len(names) + 2) + "|")
    for group, rows in sorted(groups.items()):
        peer = next((v for k, v in rows.items() if k != "medsec-edge"), None)
        ours = rows.get("medsec-edge")
        ratio = f"{ours / peer:.2f}" if ours and peer else "n/a"
        print(f"| {group} | " + " | ".join(f"{rows.get(n, float('nan')):.1f}" for n in names) + f" | {ratio} |")
    fig, ax = plt.subplots(figsize=(9, 3.8))
    labels = sorted(groups)
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        ax.bar([x + i * width for x in range(len(labels))], [groups[g].get(name, 0) for g in labels],
               width=width, label=name)
    ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(labels))], labels, rotation=10)
    ax.set_ylabel("median latency (ms)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(dst, dpi=100)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
