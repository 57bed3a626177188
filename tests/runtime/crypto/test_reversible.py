"""Bit-exact restore (reversible.py): real embeds with the default bundle, every pixel format we
write, the original SOP UID back, and refusal of wrong keys, changed bits and moved records."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medsec_edge.runtime.crypto.keyset import DecryptionKey, KeyRing
from medsec_edge.runtime.io.dicom_writer import PRIVATE_CREATOR, PRIVATE_GROUP, REVERSIBLE_ELEMENT
from medsec_edge.runtime.crypto.dicom_signature import sign_dataset, verify_signatures
from medsec_edge.runtime.crypto.encryption import StudyKeys
from medsec_edge.runtime.errors import DecryptionError, InputError, UsageError
from medsec_edge.runtime.io.readers import read_image
from medsec_edge.runtime.pipeline import load_watermarker
from medsec_edge.runtime.crypto.reversible import (
    embed_reversible,
    has_record,
    record_for_image,
    restore_dataset,
    restore_file,
    restore_original,
    write_reversible,
)
from medsec_edge.runtime.crypto.seal import seal_dataset, verify_dataset

PAYLOAD = bytes.fromhex("0123456789abcdef")


@pytest.fixture(scope="module")
def watermarker():
    return load_watermarker(threads=1)[0]


@pytest.fixture(scope="module")
def holder():
    return DecryptionKey.generate()


def _testdata(name: str) -> Path:
    return Path(get_testdata_file(name, download=False))


def _smooth(shape, low: int, high: int, seed: int) -> np.ndarray:
    """Anatomy-like content: smooth ramps plus noise, with both ends of the stored range hit."""
    rng = np.random.default_rng(seed)
    *lead, rows, cols = shape
    y, x = np.mgrid[0:rows, 0:cols]
    base = 0.5 + 0.3 * np.sin(x / 9.0) * np.cos(y / 13.0)
    frames = base[None] + 0.05 * rng.standard_normal((int(np.prod(lead or [1])), rows, cols))
    values = low + frames * (high - low)
    values[:, :4, :4] = high + 50  # clipped at the top of BitsStored
    values[:, -4:, -4:] = low - 50  # and at the bottom
    return np.clip(np.rint(values), low, high).reshape(shape)


def _synthetic(tmp_path: Path, ct_factory, name: str, *, signed: bool, frames: int | None) -> Path:
    ds = ct_factory(96, 112, bits_stored=12, signed=signed, frames=frames, seed=3)
    low, high = (-2048, 2047) if signed else (0, 4095)
    shape = (96, 112) if frames is None else (frames, 96, 112)
    pixels = _smooth(shape, low, high, seed=5).astype(np.int16 if signed else np.uint16)
    ds.set_pixel_data(pixels, "MONOCHROME2", 12, generate_instance_uid=False)
    ds.RescaleIntercept = 0 if signed else -1024
    ds.WindowCenter, ds.WindowWidth = (0, 3000) if signed else (1024, 3000)
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def inputs(tmp_path, ct_factory):
    return {
        "CT_small": _testdata("CT_small.dcm"),
        "MR_small": _testdata("MR_small.dcm"),
        "multiframe_u16_12bit": _synthetic(
            tmp_path, ct_factory, "mf.dcm", signed=False, frames=3
        ),
        "signed_i16_12bit": _synthetic(tmp_path, ct_factory, "s.dcm", signed=True, frames=None),
        "rgb_u8": _testdata("SC_rgb.dcm"),
        "rle_compressed_source": _testdata("MR_small_RLE.dcm"),
    }


def _marked_file(tmp_path, path: Path, watermarker, recipient, *, name: str = "", **kwargs):
    image = read_image(path)
    marked, record = embed_reversible(image, watermarker, PAYLOAD, recipient, **kwargs)
    out = write_reversible(
        image, marked, tmp_path / (name or f"marked-{path.name}"), record,
        watermark_record={"kind": "test"}, description="test",
    )
    return image, marked, record, out


@pytest.mark.parametrize(
    "case",
    [
        "CT_small",
        "MR_small",
        "multiframe_u16_12bit",
        "signed_i16_12bit",
        "rgb_u8",
        "rle_compressed_source",
    ],
)
def test_restore_is_bit_exact_and_gives_back_the_original_uid(
    case, inputs, tmp_path, watermarker, holder
):
    image, marked, record, out = _marked_file(tmp_path, inputs[case], watermarker, holder.recipient)
    assert not np.array_equal(marked, image.pixels), "the watermark changed pixels"
    ds = pydicom.dcmread(out)
    assert has_record(ds)
    assert ds.SOPInstanceUID == record.binding.marked_sop_uid != image.dataset.SOPInstanceUID
    assert np.array_equal(ds.pixel_array.reshape(marked.shape), marked)

    original, original_uid = restore_dataset(ds, holder)
    assert original.dtype == image.pixels.dtype and original.shape == image.pixels.shape
    assert np.array_equal(original, image.pixels)
    assert original_uid == image.dataset.SOPInstanceUID
    assert original_uid == ds.SourceImageSequence[0].ReferencedSOPInstanceUID

    result = restore_file(out, tmp_path / "restored.dcm", holder)
    back = pydicom.dcmread(result.path)
    assert back.SOPInstanceUID == image.dataset.SOPInstanceUID
    assert back.file_meta.MediaStorageSOPInstanceUID == image.dataset.SOPInstanceUID
    assert np.array_equal(back.pixel_array.reshape(image.pixels.shape), image.pixels)
    assert back.BitsStored == image.dataset.BitsStored
    assert back.PixelRepresentation == image.dataset.PixelRepresentation
    assert "ImageType" not in back or back.ImageType == image.dataset.get("ImageType")
    assert "SourceImageSequence" not in back
    assert not has_record(back)


def test_restored_header_is_the_original_and_its_seal_and_signature_verify_again(
    tmp_path, ct_factory, crypto_keyset, watermarker, holder
):
    src = _synthetic(tmp_path, ct_factory, "orig.dcm", signed=False, frames=None)
    ds = pydicom.dcmread(src)
    seal_dataset(ds, crypto_keyset.seal_signer)
    sign_dataset(ds, crypto_keyset.dicom_signer)
    signed = tmp_path / "signed.dcm"
    ds.save_as(signed, enforce_file_format=True)

    _, _, _, out = _marked_file(tmp_path, signed, watermarker, holder.recipient)
    marked = pydicom.dcmread(out)
    assert verify_dataset(marked, crypto_keyset.seal).status == "unsigned"  # the source's seal is not copied

    restored = restore_original(marked, holder)
    original = pydicom.dcmread(signed)
    for elem in original:
        if elem.tag.element != 0:  # group lengths are not written back
            assert restored[elem.tag].value == elem.value, elem.tag
    assert set(restored.keys()) == {t for t in original.keys() if t.element != 0}
    assert verify_dataset(restored, crypto_keyset.seal).valid
    assert verify_signatures(restored, trusted=[crypto_keyset.certificate]).valid


def test_wrong_key_is_refused(tmp_path, inputs, watermarker, holder):
    _, _, _, out = _marked_file(tmp_path, inputs["CT_small"], watermarker, holder.recipient)
    ds = pydicom.dcmread(out)
    with pytest.raises(DecryptionError, match="wrapped for key"):
        restore_dataset(ds, DecryptionKey.generate())
    # a key that claims the right id but is not the key
    impostor = DecryptionKey(holder.key_id, DecryptionKey.generate().private_key)
    with pytest.raises(DecryptionError):
        restore_dataset(ds, impostor)
    with pytest.raises(DecryptionError):
        restore_file(out, tmp_path / "nope.dcm", DecryptionKey.generate())
    assert not (tmp_path / "nope.dcm").exists()


def _with_value(ds, value: bytes):
    ds = copy.deepcopy(ds)
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    block[REVERSIBLE_ELEMENT].value = value
    return ds


def test_every_flipped_bit_in_the_stored_record_is_refused(tmp_path, inputs, watermarker, holder):
    _, _, record, out = _marked_file(tmp_path, inputs["MR_small"], watermarker, holder.recipient)
    ds = pydicom.dcmread(out)
    value = bytes(ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)[REVERSIBLE_ELEMENT].value)
    assert value == record.value
    rng = np.random.default_rng(0)
    positions = sorted(
        {*range(12), *range(len(value) - 24, len(value)), *rng.integers(0, len(value), 80).tolist()}
    )
    for pos in positions:
        for bit in (0, 7):
            flipped = bytearray(value)
            flipped[pos] ^= 1 << bit
            with pytest.raises(DecryptionError):
                restore_dataset(_with_value(ds, bytes(flipped)), holder)
    for cut in (0, 5, 10, len(value) // 2, len(value) - 1):
        with pytest.raises(DecryptionError):
            restore_dataset(_with_value(ds, value[:cut]), holder)


def test_record_moved_to_another_image_or_uid_changed_is_refused(
    tmp_path, inputs, watermarker, holder
):
    ct = inputs["CT_small"]
    _, _, _, out_a = _marked_file(tmp_path, ct, watermarker, holder.recipient, name="a.dcm")
    _, _, _, out_b = _marked_file(tmp_path, ct, watermarker, holder.recipient, name="b.dcm")
    a, b = pydicom.dcmread(out_a), pydicom.dcmread(out_b)
    restore_dataset(a, holder)  # sound as written
    value_b = bytes(b.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)[REVERSIBLE_ELEMENT].value)
    with pytest.raises(DecryptionError):
        restore_dataset(_with_value(a, value_b), holder)  # same pixels source, other instance
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        moved = copy.deepcopy(a)
        setattr(moved, keyword, pydicom.uid.generate_uid())
        with pytest.raises(DecryptionError):
            restore_dataset(moved, holder)


def test_changed_marked_pixels_are_refused_not_restored_wrongly(
    tmp_path, inputs, watermarker, holder
):
    _, marked, _, out = _marked_file(tmp_path, inputs["CT_small"], watermarker, holder.recipient)
    ds = pydicom.dcmread(out)
    pixels = ds.pixel_array.copy()
    pixels[10, 10] ^= 1
    ds.PixelData = pixels.tobytes()
    with pytest.raises(DecryptionError, match="pixels changed"):
        restore_dataset(ds, holder)


def test_no_record_and_non_dicom_inputs(tmp_path, holder, watermarker):
    with pytest.raises(InputError, match="no reversible record"):
        restore_dataset(pydicom.dcmread(_testdata("CT_small.dcm")), holder)
    npy = tmp_path / "img.npy"
    np.save(npy, (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16))
    with pytest.raises(UsageError, match="DICOM"):
        embed_reversible(read_image(npy), watermarker, PAYLOAD, holder.recipient)


def test_study_keys_zlib_and_a_rotated_ring(tmp_path, inputs, watermarker):
    ring_dir = tmp_path / "ring"
    KeyRing.rotate(ring_dir)
    old = KeyRing.load(ring_dir)
    study = StudyKeys(old.recipient)
    image, _, record, out = _marked_file(
        tmp_path, inputs["MR_small"], watermarker, study, codec="zlib"
    )
    assert record.codec == "zlib"
    KeyRing.rotate(ring_dir)
    ring = KeyRing.load(ring_dir)
    assert ring.recipient.key_id != old.recipient.key_id
    original, _ = restore_dataset(pydicom.dcmread(out), ring)  # old keys still decrypt
    assert np.array_equal(original, image.pixels)


def test_record_size_per_512x512_image_is_measured(watermarker, holder, capsys):
    """Sizes of the record (residual + original header, encrypted) on real 512x512 images."""
    lines = []
    for name in ("693_UNCI.dcm", "vlut_04.dcm"):  # CT 14-bit signed, 8-bit unsigned
        image = read_image(_testdata(name))
        marked = watermarker.embed(image, PAYLOAD).pixels
        sizes = {}
        for codec in ("lzma", "zlib"):
            t0 = time.perf_counter()
            record = record_for_image(image, marked, holder.recipient, codec=codec)
            ms = (time.perf_counter() - t0) * 1e3
            sizes[codec] = record
            lines.append(
                f"{name} {image.pixels.shape} {image.pixels.dtype}: {codec} record "
                f"{record.size_bytes} B (residual {record.residual_compressed_bytes} B of "
                f"{record.residual_bytes}, header {record.header_compressed_bytes} B), {ms:.0f} ms"
            )
        assert sizes["lzma"].size_bytes < sizes["zlib"].size_bytes
        assert sizes["lzma"].size_bytes < 0.2 * image.pixels.nbytes
        assert sizes["lzma"].residual_dtype == "int8"
    with capsys.disabled():
        print("\nreversible record sizes:\n  " + "\n  ".join(lines))
