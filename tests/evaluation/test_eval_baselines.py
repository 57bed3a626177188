"""Classical baselines: a clean round trip on a real 512x512 display recovers the 64 bits."""

import multiprocessing

import numpy as np
import pytest
from PIL import Image

from medsec_edge.evaluation.baselines import BASELINES, PAYLOAD_BITS, BlindWatermark
from medsec_edge.runtime.errors import UsageError
from medsec_edge.runtime.io.image import ImageMeta, display_window


@pytest.fixture(scope="module")
def ct_display_512() -> np.ndarray:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    frame = ds.pixel_array
    meta = ImageMeta(
        bits_stored=int(ds.BitsStored),
        signed=bool(ds.PixelRepresentation),
        slope=float(ds.RescaleSlope),
        intercept=float(ds.RescaleIntercept),
    )
    display = np.rint(display_window(meta, frame).to_display(frame)).astype(np.uint8)
    return np.asarray(Image.fromarray(display).resize((512, 512), Image.Resampling.BICUBIC))


@pytest.mark.parametrize("name", list(BASELINES))
def test_clean_round_trip_recovers_the_bits(name, ct_display_512):
    cls = BASELINES[name]
    if not cls.is_available():
        pytest.skip(f"{cls.module} not installed: pip install 'medsec-edge[baselines]'")
    baseline = cls()
    bits = np.random.default_rng(11).integers(0, 2, PAYLOAD_BITS).astype(bool)
    marked = baseline.embed(ct_display_512, bits)
    assert marked.shape == ct_display_512.shape and marked.dtype == np.uint8
    assert not np.array_equal(marked, ct_display_512)
    psnr = 10 * np.log10(255**2 / np.mean((marked.astype(float) - ct_display_512) ** 2))
    assert psnr > 28
    read = baseline.extract(marked)
    assert read.shape == (PAYLOAD_BITS,) and read.dtype == bool
    assert (read == bits).mean() >= 0.9


@pytest.mark.parametrize("name", list(BASELINES))
def test_payload_must_be_64_bits_and_display_8_bit(name, ct_display_512):
    baseline = BASELINES[name]()
    with pytest.raises(UsageError):
        baseline.embed(ct_display_512, np.zeros(32, bool))
    with pytest.raises(UsageError):
        baseline.embed(ct_display_512.astype(np.uint16), np.zeros(64, bool))


def test_blind_watermark_import_leaves_the_start_method_alone(capsys):
    if not BlindWatermark.is_available():
        pytest.skip("blind_watermark not installed: pip install 'medsec-edge[baselines]'")
    before = multiprocessing.get_start_method(allow_none=True)
    display = np.full((128, 128), 128, np.uint8)
    BlindWatermark().extract(display)
    assert multiprocessing.get_start_method(allow_none=True) == before
    assert capsys.readouterr().out == ""  # its banner and notes are silenced


def test_blind_watermark_refuses_images_too_small_for_the_payload():
    if not BlindWatermark.is_available():
        pytest.skip("blind_watermark not installed: pip install 'medsec-edge[baselines]'")
    with pytest.raises(UsageError):
        BlindWatermark().extract(np.zeros((64, 64), np.uint8))
