"""Flip fuzz against the real default bundle: N single-byte flips, each must be refused.

    python benchmarks/experiments/bundle_flip_fuzz.py [--flips 1000] [--seed 1] [--tar] [--bundle DIR]

Copies the bundle (default: bundles/default) to a temporary folder and, round-robin over its files
(manifest.json, manifest.sig, each model), XORs one byte at a random position with a random
non-zero mask, opens the copy as every command does (resolve_bundle_path + open_bundle with the
default trust store), and restores the byte. ``--tar`` does the same to a .tar of the bundle,
round-robin over its regions (each member's header, data and padding, and the trailing zero
blocks). Prints ``N flips, refused R, crashes C, accepted A`` per run; exit 1 unless every flip
was refused.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from medsec_edge.runtime.bundle import open_bundle, pack_tar
from medsec_edge.runtime.bundle_store import resolve_bundle_path
from medsec_edge.runtime.errors import BundleError

REPO = Path(__file__).resolve().parents[2]


def verdict(path: Path) -> str:
    try:
        open_bundle(resolve_bundle_path(path))
    except BundleError:
        return "refused"
    except Exception as exc:  # noqa: BLE001 - a crash is what this looks for
        return f"crash {type(exc).__name__}: {exc}"
    return "accepted"


def fuzz_directory(bundle: Path, flips: int, rng: np.random.Generator) -> collections.Counter:
    files = sorted(p.name for p in bundle.iterdir() if p.is_file())
    originals = {name: (bundle / name).read_bytes() for name in files}
    counts: collections.Counter = collections.Counter()
    for i in range(flips):
        name = files[i % len(files)]
        data = bytearray(originals[name])
        position = int(rng.integers(len(data)))
        data[position] ^= int(rng.integers(1, 256))
        (bundle / name).write_bytes(bytes(data))
        result = verdict(bundle)
        (bundle / name).write_bytes(originals[name])
        counts[result.split(" ")[0]] += 1
        if result != "refused":
            print(f"  {name} byte {position}: {result}", file=sys.stderr)
    return counts


def tar_regions(tar_path: Path) -> list[tuple[int, int]]:
    regions, end = [], 0
    with tarfile.open(tar_path) as archive:
        for member in archive.getmembers():
            data_end = member.offset_data + member.size
            padded = data_end + (-data_end % 512)
            regions += [(member.offset, member.offset_data), (member.offset_data, data_end), (data_end, padded)]
            end = padded
    regions.append((end, tar_path.stat().st_size))
    return [r for r in regions if r[1] > r[0]]


def fuzz_tar(tar_path: Path, flips: int, rng: np.random.Generator) -> collections.Counter:
    original = tar_path.read_bytes()
    regions = tar_regions(tar_path)
    counts: collections.Counter = collections.Counter()
    for i in range(flips):
        start, end = regions[i % len(regions)]
        position = int(rng.integers(start, end))
        data = bytearray(original)
        data[position] ^= int(rng.integers(1, 256))
        tar_path.write_bytes(bytes(data))
        result = verdict(tar_path)
        counts[result.split(" ")[0]] += 1
        if result != "refused":
            print(f"  tar byte {position}: {result}", file=sys.stderr)
    tar_path.write_bytes(original)
    return counts


def report(what: str, flips: int, counts: collections.Counter, seconds: float) -> None:
    print(f"{what}: {flips} flips, refused {counts['refused']}, crashes {counts['crash']}, "
          f"accepted {counts['accepted']} ({seconds:.1f} s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=REPO / "bundles" / "default")
    parser.add_argument("--flips", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tar", action="store_true", help="also fuzz a .tar of the bundle")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "bundle"
        shutil.copytree(args.bundle, copy)
        if verdict(copy) != "accepted":
            print(f"the unflipped copy of {args.bundle} does not open: {verdict(copy)}", file=sys.stderr)
            return 2
        started = time.perf_counter()
        counts = fuzz_directory(copy, args.flips, rng)
        report(f"{args.bundle.name} (directory)", args.flips, counts, time.perf_counter() - started)
        ok &= counts["refused"] == args.flips
        if args.tar:
            tar_path = pack_tar(copy, Path(tmp) / "bundle.tar")
            started = time.perf_counter()
            counts = fuzz_tar(tar_path, args.flips, rng)
            report(f"{args.bundle.name} (.tar)", args.flips, counts, time.perf_counter() - started)
            ok &= counts["refused"] == args.flips
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
