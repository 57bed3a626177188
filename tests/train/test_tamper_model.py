"""The blind tamper detector: output shapes, score = max of the pooled mask, ONNX parity."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="training needs torch: pip install 'medsec-edge[train]'")

from medsec_edge.train.tamper_model import TamperNet  # noqa: E402

SIZES = [(64, 64), (72, 96)]


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = TamperNet(width=8)
    # Non-trivial BatchNorm statistics, so eval mode differs from train mode and from identity.
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def _input(n, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, h, w, generator=g) * 2.0 - 0.5  # the -0.5..1.5 range of normalise


def _score_from_logits(logits: np.ndarray) -> np.ndarray:
    """Independent reference: the largest mean of any 2x2 block of mask logits, per image."""
    lg = logits[:, 0].astype(np.float64)
    pooled = (lg[:, :-1, :-1] + lg[:, 1:, :-1] + lg[:, :-1, 1:] + lg[:, 1:, 1:]) / 4.0
    return pooled.reshape(len(lg), -1).max(axis=1)


@pytest.mark.parametrize("h,w", SIZES)
def test_output_shapes(net, h, w):
    with torch.no_grad():
        logits, score = net(_input(3, h, w))
    assert logits.shape == (3, 1, h // 4, w // 4)
    assert score.shape == (3, 1)
    assert torch.isfinite(logits).all() and torch.isfinite(score).all()


@pytest.mark.parametrize("h,w", SIZES)
def test_score_is_the_max_of_the_pooled_mask(net, h, w):
    with torch.no_grad():
        logits, score = net(_input(4, h, w, seed=3))
    ref = _score_from_logits(logits.numpy())
    np.testing.assert_allclose(score[:, 0].numpy(), ref, rtol=0, atol=1e-5)
    # and it is not simply the single largest logit (the 2x2 mean is what smooths it)
    assert not np.allclose(score[:, 0].numpy(), logits.numpy().reshape(4, -1).max(axis=1))


def test_images_in_a_batch_are_independent(net):
    x = _input(3, 64, 64, seed=5)
    with torch.no_grad():
        logits, score = net(x)
        one_logits, one_score = net(x[1:2])
    torch.testing.assert_close(one_logits, logits[1:2], rtol=0, atol=1e-5)
    torch.testing.assert_close(one_score, score[1:2], rtol=0, atol=1e-5)


def test_highpass_input_matters(net):
    """Adding noise of the same mean changes the output: the net sees the high-pass channel."""
    x = torch.full((1, 1, 64, 64), 0.5)
    noisy = x + 0.02 * torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = net(x)[0], net(noisy)[0]
    assert (a - b).abs().max() > 1e-3


def test_width_sets_the_capacity():
    small, big = TamperNet(width=4), TamperNet(width=8)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert small.width == 4 and count(small) < count(big)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter, used on purpose
def test_onnx_export_parity_on_other_sizes(net, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "tamper.onnx"
    # as export/tamper_export.py does: exported at 64x64 with dynamic height and width
    torch.onnx.export(
        net, torch.zeros(1, 1, 64, 64), str(path), input_names=["image"], output_names=["mask_logits", "score"],
        dynamic_axes={"image": {2: "height", 3: "width"}, "mask_logits": {2: "height_4", 3: "width_4"}},
        opset_version=17, dynamo=False,
    )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for h, w in [(72, 96), (128, 80)]:
        x = _input(1, h, w, seed=h)
        with torch.no_grad():
            ref = [t.numpy() for t in net(x)]
        got = sess.run(None, {"image": x.numpy()})
        assert got[0].shape == (1, 1, h // 4, w // 4) and got[1].shape == (1, 1)
        for r, g in zip(ref, got):
            assert float(np.max(np.abs(r - g))) < 1e-4


# --- the forensic front end ----------------------------------------------------------------

from medsec_edge.train.tamper_model import FRONT_CHANNELS, ForensicFrontEnd  # noqa: E402


def _textured(seed: int = 0, size: int = 96, noise: float = 0.01) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    smooth = 0.3 + 0.3 * torch.sin(6 * xx) * torch.cos(4 * yy)
    return (smooth + noise * torch.randn(size, size, generator=g))[None, None]


def test_front_end_channels():
    out = ForensicFrontEnd()(_textured())
    assert out.shape == (1, FRONT_CHANNELS, 96, 96)
    assert torch.isfinite(out).all()


def test_residuals_read_on_the_image_own_noise_scale():
    """A window change (contrast gain and offset) leaves the residual channels as they were: the
    detector sees noise relative to the same image, whatever its window or bit depth."""
    front = ForensicFrontEnd()
    x = _textured(noise=0.01)
    a, b = front(x), front(x * 1.8 - 0.2)
    torch.testing.assert_close(a[:, 1:], b[:, 1:], rtol=0.02, atol=0.05)  # up to SCALE_EPS
    rms = torch.sqrt((a[:, 1] ** 2).mean())
    assert 0.8 < float(rms) < 1.2  # the first residual's RMS is the scale: about 1


def test_local_noise_change_stands_out_in_the_energy_channel():
    """A smoothed patch (local blur, growth, inpainting) has less residual energy than the rest."""
    front = ForensicFrontEnd()
    x = _textured(noise=0.02)
    blurred = x.clone()
    patch = blurred[:, :, 32:64, 32:64]
    blurred[:, :, 32:64, 32:64] = torch.nn.functional.avg_pool2d(patch, 3, stride=1, padding=1,
                                                                 count_include_pad=False)
    energy = front(blurred)[0, 5]
    inside, outside = energy[38:58, 38:58].mean(), energy[:, :24].mean()
    assert float(inside) < float(outside) - 0.5


def test_clipped_and_padded_pixels_do_not_set_the_scale():
    """Saturated (clipped) areas are flat: they must not shrink the scale and inflate the noise."""
    front = ForensicFrontEnd()
    x = _textured(noise=0.01)
    half = x.clone()
    half[:, :, :, :48] = 1.5  # clipped at the top of the range (normalise's CLIP)
    a, b = front(x), front(half)
    torch.testing.assert_close(a[:, 1, :, 60:90], b[:, 1, :, 60:90], rtol=0.1, atol=0.1)
