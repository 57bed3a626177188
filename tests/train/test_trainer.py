"""Training recipe: seeded, resumable, and its attacks are the evaluated ones."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="training needs torch: pip install 'medsec-edge[train]'")

from medsec_edge.evaluation.attacks import ATTACKS as NUMPY_ATTACKS  # noqa: E402
from medsec_edge.train import attacks as A  # noqa: E402
from medsec_edge.train.models import WatermarkNet, fold, tile_over  # noqa: E402
from medsec_edge.train.watermark_trainer import TrainConfig, WatermarkTrainer  # noqa: E402

SMALL = dict(steps=6, batch=2, crop=64, width=4, checkpoint_every=100, pool_size=16)


def test_torch_attacks_have_the_evaluation_names():
    assert set(A.ATTACKS) == set(NUMPY_ATTACKS)


def test_torch_jpeg_and_blur_agree_with_the_numpy_attacks():
    """Same name, same effect: compared on a smooth 8-bit image, in display units."""
    from medsec_edge.evaluation.attacks import attack_image
    from medsec_edge.runtime.io.image import ImageMeta, MedicalImage

    yy, xx = np.mgrid[0:64, 0:64]
    img = (128 + 60 * np.sin(xx / 5.0) * np.cos(yy / 7.0)).astype(np.uint8)
    image = MedicalImage(img, ImageMeta(bits_stored=8, signed=False, window=(127.5, 256.0), source_format="png"))
    x = torch.from_numpy(img.astype(np.float32) / 255)[None, None]
    rng = np.random.default_rng(0)
    for name in ("jpeg75", "blur1"):
        ref = attack_image(image, name, rng).pixels.astype(np.float32)
        got = A.ATTACKS[name](x)[0, 0].numpy() * 255
        inner = (slice(4, -4), slice(4, -4))
        assert np.abs(ref[inner] - got[inner]).mean() < 1.5, name


def test_affine_maps_are_inverse_of_each_other():
    fwd, inv = A.affine_matrices(torch.tensor([3.0]), torch.tensor([1.2]), torch.tensor([[5.0, -2.0]]))
    pt = torch.tensor([10.0, 20.0, 1.0])
    there = inv[0] @ pt
    back = fwd[0] @ torch.cat([there, torch.ones(1)])
    assert torch.allclose(back, pt[:2], atol=1e-4)


def test_fold_recovers_the_tile():
    tile = torch.randn(1, 1, 32, 32)
    assert torch.allclose(fold(tile_over(tile, 96, 64)), tile[:, 0], atol=1e-5)


def test_residual_has_the_requested_rms():
    net = WatermarkNet(width=4)
    x = torch.rand(2, 1, 64, 64)
    bits = torch.sign(torch.randn(2, 128))
    res = net.residual(x, bits, torch.tensor([0.01, 0.02]))
    rms = res.pow(2).mean(dim=(1, 2, 3)).sqrt()
    assert torch.allclose(rms, torch.tensor([0.01, 0.02]), rtol=1e-3)


def test_resume_continues_exactly(tmp_path):
    """Training 6 steps straight equals 3 steps, a restart from the checkpoint, and 3 more."""
    straight = WatermarkTrainer(TrainConfig(**SMALL), tmp_path / "a")
    straight.run(progress=False)
    first = WatermarkTrainer(TrainConfig(**SMALL), tmp_path / "b")
    first.run(progress=False, until=3)
    assert first.step == 3
    resumed = WatermarkTrainer(TrainConfig(**SMALL), tmp_path / "b")
    resumed.run(progress=False)
    assert resumed.step == 6
    for (name, p1), (_, p2) in zip(straight.net.state_dict().items(), resumed.net.state_dict().items()):
        assert torch.allclose(p1, p2, atol=1e-6), name
    assert (tmp_path / "a" / "training_curves.png").stat().st_size > 1000


def test_flat_saturated_crop_keeps_gradients_finite():
    """A crop with nothing to hide energy in (all black) once turned every weight into NaN."""
    net = WatermarkNet(width=4)
    x = torch.zeros(2, 1, 64, 64)
    res = net.residual(x, torch.sign(torch.randn(2, 128)), torch.tensor([0.01, 0.01]))
    (res.sum() + net.decoder(x).sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
