"""Seal, PS3.15 signature and AES-256-GCM latency at 512x512 and 2048x2048 16-bit, beside SHA-256.

Run: python -m pytest benchmarks/test_crypto_bench.py -q --benchmark-group-by=group \
         --benchmark-json=runs/bench-crypto.json
Targets (issue 4): seal + verify <= 2 ms at 512x512; AES-256-GCM >= 1 GB/s on this machine.

Every benchmark checks its result (a seal or signature verifies, a decryption gives back the
input). The reference, timed in the same run on the same bytes, is SHA-256 of the pixel bytes:
the least any integrity check over the pixels costs. Each benchmark's ``extra_info`` holds that
reference's time, the ratio to it, and for encryption the throughput in GB/s (pixel bytes over
the median time); they are in the JSON that ``--benchmark-json`` writes.

Seal, signature and verification are timed on a dataset freshly parsed from the file's bytes in
every round (``pedantic`` with a setup), so nothing pydicom caches (the decoded pixel array,
converted elements) is reused across rounds: what a real verify of a received file pays, minus
the disk read. Encryption is ``encrypt_frames``/``decrypt_frames`` (our blob format), with
cryptography's bare ``AESGCM.encrypt`` on the same bytes beside it as the peer.
"""

from __future__ import annotations

import hashlib
import io
import time

import numpy as np
import pytest
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from medsec_edge.runtime.crypto.keyset import KeyRing, new_key_dir
from medsec_edge.runtime.crypto.dicom_signature import sign_dataset, verify_signatures
from medsec_edge.runtime.crypto.encryption import Binding, DataKey, decrypt_frames, encrypt_frames
from medsec_edge.runtime.crypto.seal import seal_dataset, verify_dataset

ROUNDS = {"512": 30, "2048": 8}  # pedantic rounds: a few seconds per benchmark at most


def _pick(image_512, image_2048, size):
    return image_512 if size == "512" else image_2048


def _file_bytes(image) -> bytes:
    """A small but complete DICOM file of the fixture image (UIDs, patient, geometry, pixels)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Bench^Mark"
    ds.PatientID = "BENCH-1"
    ds.Modality = "MR"
    ds.AcquisitionDate = "20240102"
    ds.AcquisitionTime = "101500"
    ds.PixelSpacing = [0.5, 0.5]
    ds.set_pixel_data(np.ascontiguousarray(image.pixels), "MONOCHROME2", image.meta.bits_stored)
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _fresh(raw: bytes) -> Dataset:
    return dcmread(io.BytesIO(raw))


def _written(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _sha256_s(data: bytes, repeat: int = 5) -> float:
    """Best of ``repeat`` SHA-256 runs over ``data``, in seconds (the in-run reference)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        hashlib.sha256(data).digest()
        best = min(best, time.perf_counter() - t0)
    return best


def _annotate(benchmark, pixel_bytes: bytes, *, throughput: bool = False) -> None:
    """Reference time, ratio and (encryption) GB/s into ``extra_info``; nothing when disabled."""
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: the function ran once, untimed
        return
    median = stats.stats.median
    sha = _sha256_s(pixel_bytes)
    benchmark.extra_info["pixel_bytes"] = len(pixel_bytes)
    benchmark.extra_info["sha256_pixels_ms"] = round(sha * 1e3, 4)
    benchmark.extra_info["x_sha256"] = round(median / sha, 2)
    if throughput:
        benchmark.extra_info["GB_per_s"] = round(len(pixel_bytes) / median / 1e9, 3)
        benchmark.extra_info["sha256_GB_per_s"] = round(len(pixel_bytes) / sha / 1e9, 3)


@pytest.fixture(scope="module")
def ring(tmp_path_factory) -> KeyRing:
    """One key set for the module (RSA key generation is the slow part)."""
    return KeyRing((new_key_dir(tmp_path_factory.mktemp("bench-keys") / "set"),))


@pytest.fixture(scope="module")
def files(image_512, image_2048, ring):
    """Per size: the plain file, the sealed one, the sealed and signed one, and the pixel bytes."""
    out = {}
    for size, image in (("512", image_512), ("2048", image_2048)):
        raw = _file_bytes(image)
        ds = seal_dataset(_fresh(raw), ring.signer)
        sealed = _written(ds)
        sign_dataset(ds, ring.dicom_signer)
        out[size] = {"plain": raw, "sealed": sealed, "signed": _written(ds),
                     "pixels": np.ascontiguousarray(image.pixels).tobytes()}
    return out


def _on_fresh(benchmark, size, fn, *raws):
    """Time ``fn`` on datasets parsed afresh from ``raws`` in every round (parsing not timed)."""
    return benchmark.pedantic(fn, setup=lambda: (tuple(_fresh(r) for r in raws), {}),
                              rounds=ROUNDS[size], warmup_rounds=1)


# --- seal (ours: Ed25519 over the decoded pixels and identity) ----------------------------------


@pytest.mark.parametrize("size", ["512", "2048"])
def test_seal(benchmark, ring, files, size):
    benchmark.group = f"seal {size}x{size} 16-bit"
    benchmark.name = "seal"
    ds = _on_fresh(benchmark, size, lambda d: seal_dataset(d, ring.signer), files[size]["plain"])
    assert verify_dataset(_fresh(_written(ds)), ring).valid
    _annotate(benchmark, files[size]["pixels"])


@pytest.mark.parametrize("size", ["512", "2048"])
def test_seal_verify(benchmark, ring, files, size):
    benchmark.group = f"seal {size}x{size} 16-bit"
    benchmark.name = "verify seal"
    verdict = _on_fresh(benchmark, size, lambda d: verify_dataset(d, ring), files[size]["sealed"])
    assert verdict.valid, verdict.reason
    _annotate(benchmark, files[size]["pixels"])


@pytest.mark.parametrize("size", ["512", "2048"])
def test_seal_then_verify(benchmark, ring, files, size):
    """Both sides of the target 'seal + verify': each on its own freshly parsed file."""
    benchmark.group = f"seal {size}x{size} 16-bit"
    benchmark.name = "seal + verify"

    def seal_and_verify(plain, sealed):
        seal_dataset(plain, ring.signer)
        return verify_dataset(sealed, ring)

    verdict = _on_fresh(benchmark, size, seal_and_verify, files[size]["plain"], files[size]["sealed"])
    assert verdict.valid, verdict.reason
    _annotate(benchmark, files[size]["pixels"])


# --- DICOM PS3.15 Creator RSA signature (RSA-2048, SHA-256 MAC over every signable element) -----


@pytest.mark.parametrize("size", ["512", "2048"])
def test_dicom_sign(benchmark, ring, files, size):
    benchmark.group = f"PS3.15 signature {size}x{size} 16-bit"
    benchmark.name = "sign (Creator RSA)"

    def sign(ds):
        sign_dataset(ds, ring.dicom_signer)
        return ds

    ds = _on_fresh(benchmark, size, sign, files[size]["sealed"])
    report = verify_signatures(_fresh(_written(ds)), trusted=ring.certificates, profile="creator")
    assert report.valid and len(report.signatures) == 1, report.reason
    _annotate(benchmark, files[size]["pixels"])


@pytest.mark.parametrize("size", ["512", "2048"])
def test_dicom_verify(benchmark, ring, files, size):
    benchmark.group = f"PS3.15 signature {size}x{size} 16-bit"
    benchmark.name = "verify (trusted certificate)"
    trusted = ring.certificates
    report = _on_fresh(benchmark, size, lambda d: verify_signatures(d, trusted=trusted, profile="creator"),
                       files[size]["signed"])
    assert report.valid, report.reason
    _annotate(benchmark, files[size]["pixels"])


# --- AES-256-GCM of the pixel bytes (one frame, random 96-bit nonce, UIDs + header bound) -------


@pytest.fixture(scope="module")
def aes(files):
    key = DataKey.generate()
    return {size: (key, Binding.from_dataset(_fresh(f["plain"]))) for size, f in files.items()}


@pytest.mark.parametrize("size", ["512", "2048"])
def test_encrypt(benchmark, aes, image_512, image_2048, files, size):
    frames = np.ascontiguousarray(_pick(image_512, image_2048, size).pixels)[None]
    key, binding = aes[size]
    benchmark.group = f"AES-256-GCM {size}x{size} 16-bit"
    benchmark.name = "encrypt"
    blobs = benchmark(encrypt_frames, key, frames, binding)
    assert len(blobs) == 1 and frames.tobytes() not in blobs[0]
    assert np.array_equal(decrypt_frames(key, blobs, binding), frames)
    _annotate(benchmark, files[size]["pixels"], throughput=True)


@pytest.mark.parametrize("size", ["512", "2048"])
def test_decrypt(benchmark, aes, image_512, image_2048, files, size):
    frames = np.ascontiguousarray(_pick(image_512, image_2048, size).pixels)[None]
    key, binding = aes[size]
    blobs = encrypt_frames(key, frames, binding)
    benchmark.group = f"AES-256-GCM {size}x{size} 16-bit"
    benchmark.name = "decrypt"
    restored = benchmark(decrypt_frames, key, blobs, binding)
    assert restored.dtype == frames.dtype and np.array_equal(restored, frames)
    _annotate(benchmark, files[size]["pixels"], throughput=True)


@pytest.mark.parametrize("size", ["512", "2048"])
def test_aesgcm_raw(benchmark, files, size):
    """The peer: cryptography's AESGCM alone on the same bytes (no framing, no copies of ours)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    data = files[size]["pixels"]
    cipher, nonce = AESGCM(AESGCM.generate_key(bit_length=256)), bytes(12)
    benchmark.group = f"AES-256-GCM {size}x{size} 16-bit"
    benchmark.name = "AESGCM.encrypt alone (cryptography)"
    sealed = benchmark(cipher.encrypt, nonce, data, b"")
    assert cipher.decrypt(nonce, sealed, b"") == data
    _annotate(benchmark, data, throughput=True)


# --- the reference, in every group ----------------------------------------------------------------


@pytest.mark.parametrize("group", ["seal", "PS3.15 signature", "AES-256-GCM"])
@pytest.mark.parametrize("size", ["512", "2048"])
def test_sha256_reference(benchmark, files, group, size):
    data = files[size]["pixels"]
    expected = hashlib.sha256(data).digest()
    benchmark.group = f"{group} {size}x{size} 16-bit"
    benchmark.name = "SHA-256 of the pixel bytes (reference)"
    assert benchmark(lambda: hashlib.sha256(data).digest()) == expected
    _annotate(benchmark, data, throughput=True)
