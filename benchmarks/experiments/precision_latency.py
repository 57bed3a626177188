"""FP32 / FP16 / INT8 latency of every model and every stage of `run`, in one run on this machine.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/experiments/precision_latency.py \
        bundles/default bundles/default-fp16 bundles/default-int8 --rounds 3 --out runs/precision_latency.json

A calibrated bundle loads, under each plain model name, the variant chosen for the CPU; its other
precision is kept as ``<model>@<precision>``. To time the stages at each precision, this script
writes (in a temporary folder, signed with a throwaway key) one bundle per calibrated bundle with
every variant promoted to its model's name, then runs ``medsec-edge bench``'s library call on the
FP32 bundle and on each promoted one in turn, ``--rounds`` times, and reports the median of the
per-round p50s. Prints two markdown tables (per model, per stage).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from medsec_edge.runtime.bench import run_bench
from medsec_edge.runtime.bundle import generate_signing_key, open_bundle, write_bundle


def promoted(bundle_dir: Path, out: Path, key: Path) -> tuple[Path, str]:
    """A copy of ``bundle_dir`` whose plain names load the lower-precision variant."""
    bundle = open_bundle(bundle_dir)
    data = json.loads(bundle.manifest_bytes)
    models, files = {}, {}
    low = None
    for name, entry in bundle.manifest.models.items():
        base, _, suffix = name.partition("@")
        if suffix and suffix != "fp32":
            low = suffix
    tmp = out.parent / (out.name + "-files")
    tmp.mkdir(parents=True, exist_ok=True)
    for name, entry in bundle.manifest.models.items():
        base, _, suffix = name.partition("@")
        (tmp / entry.file).write_bytes(bundle.model_bytes(name))
        if suffix == "fp32":
            continue
        if suffix:  # name@low replaces the plain FP32 entry
            models[base] = dict(data["models"][name])
            files[base] = tmp / entry.file
        elif base not in models:
            models[base] = dict(data["models"][name])
            files[base] = tmp / entry.file
    for stale in ("key_id", "version"):
        data.pop(stale, None)
    data["models"] = models
    data["name"] = f"{bundle.manifest.name}-all-{low}"
    write_bundle(out, data, files, key)
    return out, low or "fp32"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", type=Path)
    parser.add_argument("calibrated", type=Path, nargs="+")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate_signing_key(tmp / "k.pem", tmp / "k.pub")
        trusted = [str(tmp / "k.pub")] + [str(p) for p in sorted(Path("bundles/trusted_keys").glob("*.pub"))]
        os.environ["MEDSEC_EDGE_TRUSTED_KEYS"] = os.pathsep.join(trusted)
        bundles = {"fp32": args.reference}
        for path in args.calibrated:
            out, low = promoted(path, tmp / path.name, tmp / "k.pem")
            bundles[low] = out
        models: dict[tuple[str, int, str], list[float]] = {}
        stages: dict[tuple[str, int, str], list[float]] = {}
        refs: list[float] = []
        for _ in range(args.rounds):
            for precision, path in bundles.items():
                report = run_bench(path, repeats=args.repeats).to_dict()
                refs.append(report["reference"]["latency_ms"]["p50"])
                for m in report["models"]:
                    if m["status"] == "ok" and "@" not in m["model"]:
                        key = (m["model"], m["size"], m["precision"])
                        models.setdefault(key, []).append(m["latency_ms"]["p50"])
                for s in report["stages"]:
                    stages.setdefault((s["stage"], s["size"], precision), []).append(s["latency_ms"]["p50"])
                print(f"round done: {precision}", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in models.items()}
    smed = {k: statistics.median(v) for k, v in stages.items()}
    precisions = list(bundles)
    print(f"reference workload p50 (median of {len(refs)} runs): {statistics.median(refs):.2f} ms\n")
    print("| model | size | " + " | ".join(f"{p} ms" for p in ("fp32", "fp16", "int8-qdq")) + " |")
    print("|---|---|---|---|---|")
    for model, size in sorted({(m, s) for m, s, _ in med}):
        cells = [med.get((model, size, p)) for p in ("fp32", "fp16", "int8-qdq")]
        print(f"| {model} | {size} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in cells) + " |")
    print("\n| stage | size | " + " | ".join(f"{p} ms" for p in precisions) + " |")
    print("|---|---|" + "---|" * len(precisions))
    for stage, size in sorted({(s, z) for s, z, _ in smed}, key=lambda t: (t[1], t[0])):
        cells = [smed.get((stage, size, p)) for p in precisions]
        print(f"| {stage} | {size} | " + " | ".join("-" if c is None else f"{c:.1f}" for c in cells) + " |")
    if args.out:
        args.out.write_text(json.dumps({"models": [[*k, v] for k, v in med.items()],
                                        "stages": [[*k, v] for k, v in smed.items()],
                                        "reference_p50_ms": statistics.median(refs)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
