"""Write real, non-held-out frames as DICOM files: the calibration and validation sets of `calibrate`.

Layer: calibration (the real-image loader of ``train/real_data.py``, pydicom). ``medsec-edge
calibrate`` takes image files, as an integrator's workstation has them; this module makes such a
folder from the real sample data other packages ship (``shared/notes/real-data.md``), never from
pydicom-data or the files that share studies with it (``real_data.check_allowed`` refuses them).
Each frame becomes a Secondary Capture with its stored values, rescale and window, and nothing
else from its source header (no patient data); frames of one volume share a SeriesInstanceUID
derived from their group, so ``calibrate`` can split by volume as training did.

    python -m medsec_edge.calibration.real_set --out runs/calib-set

writes ``OUT/train`` (split "train" of ``real_data``) and ``OUT/val`` (split "val").
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from medsec_edge.runtime.io.atomic import write_bytes_atomic

# A UID root under 2.25 (UUID-derived, ISO/IEC 9834-8), from a hash: stable across runs.
_UID_ROOT = "2.25."


def _uid(text: str) -> str:
    return _UID_ROOT + str(int.from_bytes(hashlib.sha256(text.encode()).digest()[:15], "big"))


def frame_dataset(pixels: np.ndarray, meta, *, group: str, name: str) -> Dataset:
    """A minimal Secondary Capture holding ``pixels`` (HxW grey or HxWx3 uint8 RGB)."""
    colour = pixels.ndim == 3
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = _uid("sop|" + group + "|" + name)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = _uid("study|" + group)
    ds.SeriesInstanceUID = _uid("series|" + group)
    ds.Modality = "OT" if not meta.modality or len(meta.modality) > 2 else meta.modality
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    if colour:
        arr = np.ascontiguousarray(pixels.astype(np.uint8))
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    else:
        signed = bool(np.issubdtype(pixels.dtype, np.signedinteger))
        wide = pixels.dtype.itemsize > 1
        arr = np.ascontiguousarray(pixels.astype((np.int16 if signed else np.uint16) if wide else np.uint8))
        bits = 16 if wide else 8
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = meta.photometric if meta.photometric.startswith("MONOCHROME") else "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, min(bits, int(meta.bits_stored)), min(bits, int(meta.bits_stored)) - 1
        ds.PixelRepresentation = int(signed)
        if meta.slope != 1.0 or meta.intercept != 0.0:
            ds.RescaleSlope, ds.RescaleIntercept = float(meta.slope), float(meta.intercept)
        if meta.window is not None:
            ds.WindowCenter, ds.WindowWidth = float(meta.window[0]), max(1.0, float(meta.window[1]))
    ds.PixelData = arr.tobytes()
    return ds


def write_split(split: str, out: Path, *, per_group: int, max_side: int) -> int:
    from medsec_edge.train.real_data import real_frames

    out.mkdir(parents=True, exist_ok=True)
    count = 0
    for frame in real_frames(split, max_side=max_side, per_group=per_group):
        pixels = frame.image.pixels
        if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] != 3):
            continue
        if not np.issubdtype(pixels.dtype, np.integer):
            continue  # float volumes (few): a Secondary Capture holds integers
        ds = frame_dataset(pixels, frame.image.meta, group=f"{frame.source}|{frame.group}", name=frame.name)
        digest = hashlib.sha256(f"{frame.source}|{frame.group}|{frame.name}".encode()).hexdigest()[:16]
        from io import BytesIO

        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        write_bytes_atomic(out / f"{frame.modality}-{digest}.dcm", buffer.getvalue())
        count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--per-group", type=int, default=4, help="frames per volume/series (default 4)")
    parser.add_argument("--max-side", type=int, default=1024)
    args = parser.parse_args(argv)
    for split in ("train", "val"):
        n = write_split(split, args.out / split, per_group=args.per_group, max_side=args.max_side)
        print(f"{split}: {n} frames -> {args.out / split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
