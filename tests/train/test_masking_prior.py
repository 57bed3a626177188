"""The contrast-masking prior of the strength model (issue 11): flat tissue gets little energy."""

import pytest

torch = pytest.importorskip("torch", reason="training needs torch: pip install 'medsec-edge[train]'")

from medsec_edge.train.models import SSIM_C2, StrengthEncoder, masking_prior  # noqa: E402


def test_prior_is_one_on_flat_areas_and_grows_with_local_contrast():
    flat = torch.full((1, 1, 32, 32), 0.4)
    assert torch.allclose(masking_prior(flat, torch.tensor(2.5)), torch.ones_like(flat))
    edge = flat.clone()
    edge[..., 16:] = 0.6  # a step of 51 display levels
    prior = masking_prior(edge, torch.tensor(2.5))
    assert prior[0, 0, 16, 16] > 100 * prior[0, 0, 16, 2]
    # at power 0.5, a^2 = (2 var + C2) / C2: SSIM's cost a^2 / (2 var + C2) is the same everywhere;
    # a 7x7 window centred beside the step sees 3 of 7 columns bright: var = 51^2 * 3/7 * 4/7
    var = 51.0**2 * 12 / 49
    half = masking_prior(edge, torch.tensor(0.5))[0, 0, 16, 16]
    assert half**2 == pytest.approx(1 + 2 * var / SSIM_C2, rel=1e-3)


def test_strength_with_prior_keeps_saturated_pixels_dark_and_is_positive():
    torch.manual_seed(0)
    model = StrengthEncoder(width=4, jnd_power=2.5)
    image = 0.1 + 0.8 * torch.rand(1, 1, 48, 48)
    image[..., :8, :] = 0.0  # saturated black
    out = model(image)
    assert (out[..., :8, :] == 0).all() and (out[..., 10:, :] > 0).all()
    assert model.jnd_power.item() == pytest.approx(2.5)
    assert StrengthEncoder(width=4).jnd_power is None, "the first release's model has no prior"
