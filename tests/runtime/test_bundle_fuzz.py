"""Flip fuzz: 1,000 single-byte changes to a signed bundle, each refused with ``BundleError``.

A small real bundle (two tiny ONNX graphs, a model and its int8 variant) keeps it fast. Every
flip changes one byte by a random non-zero XOR mask, spread round-robin over the bundle's files
(directory) or over the regions of its ``.tar`` (each member's header, data and padding, and the
zero blocks after the last member). A crash is any exception other than ``BundleError``; an
accepted flip is one ``open_bundle`` let through. ``benchmarks/experiments/bundle_flip_fuzz.py``
runs the same against the repository's real default bundle.
"""

from __future__ import annotations

import collections
import tarfile
from pathlib import Path

import numpy as np
import pytest

from medsec_edge.runtime.bundle import open_bundle, pack_tar
from medsec_edge.runtime.errors import BundleError
from tests.runtime.test_bundle_store import make_bundle, make_keys

FLIPS = 1_000


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    keys = make_keys(root / "keys")
    bundle = make_bundle(root / "bundle", keys["private"], requires={"runtime": ">=0.1.0", "onnx_opset": 17})
    open_bundle(bundle, trusted_keys=keys["trusted_dir"])  # the unflipped bundle opens
    return bundle, keys


def _verdict(path: Path, trusted: Path) -> str:
    try:
        open_bundle(path, trusted_keys=trusted)
    except BundleError:
        return "refused"
    except Exception as exc:  # noqa: BLE001 - what the fuzz is looking for
        return f"crash {type(exc).__name__}: {exc}"
    return "accepted"


def test_every_flipped_byte_of_a_bundle_directory_is_refused(signed, tmp_path):
    bundle, keys = signed
    rng = np.random.default_rng(20260512)
    files = sorted(p.name for p in bundle.iterdir())
    assert files == ["conv.onnx", "conv_int8-qdq.onnx", "manifest.json", "manifest.sig"]
    copy = tmp_path / "copy"
    copy.mkdir()
    originals = {name: (bundle / name).read_bytes() for name in files}
    for name, data in originals.items():
        (copy / name).write_bytes(data)
    verdicts: collections.Counter = collections.Counter()
    per_file: collections.Counter = collections.Counter()
    crashes = []
    for i in range(FLIPS):
        name = files[i % len(files)]
        data = bytearray(originals[name])
        position = int(rng.integers(len(data)))
        data[position] ^= int(rng.integers(1, 256))
        (copy / name).write_bytes(bytes(data))
        verdict = _verdict(copy, keys["trusted_dir"])
        (copy / name).write_bytes(originals[name])
        verdicts[verdict.split(" ")[0]] += 1
        per_file[name] += 1
        if verdict.startswith("crash"):
            crashes.append((name, position, verdict))
    assert crashes == []
    assert verdicts == {"refused": FLIPS}
    assert per_file == {name: FLIPS // len(files) for name in files}  # every file was hit
    assert _verdict(copy, keys["trusted_dir"]) == "accepted"  # restored: the flips were the cause


def _tar_regions(tar_path: Path) -> list[tuple[int, int]]:
    """(start, end) byte ranges: each member's header(s), data and padding; the trailer."""
    size = tar_path.stat().st_size
    regions, end = [], 0
    with tarfile.open(tar_path) as archive:
        for member in archive.getmembers():
            data_end = member.offset_data + member.size
            padded = data_end + (-data_end % 512)
            regions += [(member.offset, member.offset_data), (member.offset_data, data_end)]
            if padded > data_end:
                regions.append((data_end, padded))
            end = padded
    regions.append((end, size))
    return [r for r in regions if r[1] > r[0]]


def test_every_flipped_byte_of_a_bundle_tar_is_refused(signed, tmp_path):
    bundle, keys = signed
    tar_path = pack_tar(bundle, tmp_path / "bundle.tar")
    original = tar_path.read_bytes()
    regions = _tar_regions(tar_path)
    assert len(regions) >= 4 * 2 + 1  # headers and data of four members, padding, trailer
    rng = np.random.default_rng(7)
    verdicts: collections.Counter = collections.Counter()
    crashes, accepted = [], []
    for i in range(FLIPS):
        start, end = regions[i % len(regions)]
        position = int(rng.integers(start, end))
        data = bytearray(original)
        data[position] ^= int(rng.integers(1, 256))
        tar_path.write_bytes(bytes(data))
        verdict = _verdict(tar_path, keys["trusted_dir"])
        verdicts[verdict.split(" ")[0]] += 1
        if verdict.startswith("crash"):
            crashes.append((position, verdict))
        elif verdict == "accepted":
            accepted.append(position)
    tar_path.write_bytes(original)
    assert crashes == [] and accepted == []
    assert verdicts == {"refused": FLIPS}
    assert _verdict(tar_path, keys["trusted_dir"]) == "accepted"
