"""Issue 4 on the held-out images: bit-exact restore and what the seal catches.

Run: .venv/bin/python benchmarks/experiments/crypto_heldout.py [--flips 200]

For every deduplicated pydicom-data DICOM our reader takes (multi-frame included): watermark with
``--reversible`` through the same ``watermark_file`` the CLI uses, restore with ``restore_file``,
and compare the restored pixels and SOP Instance UID with the input's. Then seal the watermarked
output and count how many of ``--flips`` random 1-bit pixel flips, attribute changes and pixel
swaps with another image ``verify_dataset`` catches. Prints one line per image and a summary.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom

from medsec_edge.evaluation.watermark_eval import deduplicate
from medsec_edge.runtime.crypto.keyset import KeyRing, new_key_dir
from medsec_edge.runtime.errors import InputError
from medsec_edge.runtime.io.inputs import collect_inputs
from medsec_edge.runtime.pipeline import load_watermarker, watermark_file
from medsec_edge.runtime.crypto.reversible import restore_file
from medsec_edge.runtime.crypto.seal import seal_dataset, verify_dataset

ATTRIBUTES = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "RescaleSlope",
              "RescaleIntercept", "PixelSpacing", "AcquisitionDate")


def _flip_bit(ds, rng) -> None:
    """Flip one bit a decoder keeps (below BitsStored; below the sign bit for signed data)."""
    arr = ds.pixel_array.copy()
    usable = int(ds.BitsStored) - (1 if int(ds.get("PixelRepresentation", 0)) else 0)
    flat = arr.reshape(-1).view(np.dtype(f"u{arr.dtype.itemsize}"))
    i = int(rng.integers(flat.size))
    flat[i] ^= flat.dtype.type(1 << int(rng.integers(max(1, min(usable, arr.dtype.itemsize * 8)))))
    ds.PixelData = arr.tobytes()


def _change_attribute(ds, rng) -> str:
    name = ATTRIBUTES[int(rng.integers(len(ATTRIBUTES)))]
    if name in ("RescaleSlope",):
        ds.RescaleSlope = float(ds.get("RescaleSlope", 1.0)) + 0.5
    elif name == "RescaleIntercept":
        ds.RescaleIntercept = float(ds.get("RescaleIntercept", 0.0)) + 1.0
    elif name == "PixelSpacing":
        ds.PixelSpacing = [1.234, 1.234]
    elif name == "AcquisitionDate":
        ds.AcquisitionDate = "19990101"
    elif name.endswith("UID"):
        setattr(ds, name, pydicom.uid.generate_uid())
    else:
        setattr(ds, name, "SOMEONE-ELSE")
    return name


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--flips", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    import data_store

    paths, _ = deduplicate(collect_inputs([Path(data_store.__file__).parent / "data"]))
    rng = np.random.default_rng(args.seed)
    watermarker, bundle = load_watermarker(threads=2)
    tmp = Path(tempfile.mkdtemp(prefix="crypto-heldout-"))
    new_key_dir(tmp / "keys")
    ring = KeyRing.load(tmp / "keys")
    restored_ok = restored_n = 0
    caught = {"bit_flip": [0, 0], "attribute": [0, 0], "pixel_swap": [0, 0]}
    sealed: list[pydicom.Dataset] = []
    for path in paths:
        out = tmp / f"{path.stem}.marked.dcm"
        record = watermark_file(path, out, watermarker, bundle, None, b"\x01" * 8, reversible_to=ring.recipient)
        if record.status == "bad_input" or record.output is None:
            print(f"{path.name}: skipped ({record.status}: {record.reason[:80]})")
            continue
        restored_n += 1
        t0 = time.perf_counter()
        try:
            restore_file(out, tmp / f"{path.stem}.restored.dcm", ring.decryption_keys)
        except InputError as exc:
            print(f"{path.name}: restore refused ({exc})")
            continue
        ms = (time.perf_counter() - t0) * 1e3
        original, back = pydicom.dcmread(path), pydicom.dcmread(tmp / f"{path.stem}.restored.dcm")
        exact = np.array_equal(original.pixel_array, back.pixel_array) and original.SOPInstanceUID == back.SOPInstanceUID
        restored_ok += exact
        ds = pydicom.dcmread(out)
        block = ds.private_block(0x0011, "MEDSEC_EDGE 1")
        size = len(block[0x30].value) if 0x30 in block else 0
        print(f"{path.name}: {tuple(original.pixel_array.shape)} {original.pixel_array.dtype} restore "
              f"{'bit-exact' if exact else 'DIFFERS'} in {ms:.1f} ms, record {size} B")
        seal_dataset(ds, ring.signer)
        sealed.append(ds)
    for i, ds in enumerate(sealed):
        for _ in range(args.flips // max(1, len(sealed))):
            for kind in caught:
                trial = pydicom.dcmread(pydicom.filebase.DicomBytesIO(_bytes(ds)))
                if kind == "bit_flip":
                    _flip_bit(trial, rng)
                elif kind == "attribute":
                    _change_attribute(trial, rng)
                else:
                    other = sealed[(i + 1 + int(rng.integers(max(1, len(sealed) - 1)))) % len(sealed)]
                    if other is ds or other.pixel_array.shape != trial.pixel_array.shape:
                        arr = trial.pixel_array.copy()
                        arr = np.roll(arr, 1, axis=-1)  # no same-shape partner: swap in a shifted copy
                    else:
                        arr = other.pixel_array.copy()
                    if np.array_equal(arr, trial.pixel_array):
                        continue
                    trial.PixelData = arr.astype(trial.pixel_array.dtype).tobytes()
                verdict = verify_dataset(trial, ring)
                caught[kind][0] += not verdict.valid
                caught[kind][1] += 1
    print(f"restore bit-exact: {restored_ok}/{restored_n} images")
    for kind, (k, n) in caught.items():
        print(f"seal catches {kind}: {k}/{n}")


def _bytes(ds) -> bytes:
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


if __name__ == "__main__":
    main()
