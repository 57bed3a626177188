"""Learned fingerprint training: the encoder's size and prior, the test edits, and a resumable run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from medsec_edge.evaluation.fingerprint_edits import (
    BENIGN_STEPS,
    EDIT_KINDS,
    benign_display,
    covered_cells,
    local_edit,
    valid_cells,
)
from medsec_edge.runtime.io.image import DisplayWindow
from medsec_edge.runtime.tamper import fingerprint as fpm
from medsec_edge.train.fingerprint_model import FingerprintNet, n_parameters
from medsec_edge.train.fingerprint_trainer import (
    FingerprintConfig,
    fingerprint_loss,
    roc_auc,
    tpr_at_fpr,
)


def _display(shape=(128, 160), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return np.clip(120 + 60 * np.sin(yy / 9.0) * np.cos(xx / 13.0) + rng.normal(0, 4, shape), 0, 255).astype(np.float32)


def test_encoder_is_small_fully_convolutional_with_stride_16():
    net = FingerprintNet()
    assert n_parameters(net) < 50_000
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 64, 96)).shape == (1, 4, 4, 6)
        assert net(torch.zeros(2, 1, 160, 160)).shape == (2, 4, 10, 10)


def test_at_initialisation_the_code_is_the_non_learned_fingerprint_of_the_four_sub_cells():
    net = FingerprintNet()
    net.head.weight.data.zero_()
    x = _display()
    with torch.no_grad():
        codes = net(torch.from_numpy(x / 255.0)[None, None].float()).numpy()[0]
    means = fpm._cell_means(x, 8)
    sub = np.stack([means[i::2, j::2] for i in (0, 1) for j in (0, 1)])
    np.testing.assert_allclose(codes, 240.0 * (sub / 255.0 - 0.5), atol=1e-3)


@pytest.mark.parametrize("kind", EDIT_KINDS)
@pytest.mark.parametrize("size,change", [(16, 0.03), (48, 0.10)])
def test_local_edits_change_the_displayed_mean_as_asked_and_only_inside_their_mask(kind, size, change):
    d = _display()
    rng = np.random.default_rng(3)
    delta = -change * 255.0
    e = local_edit(d, rng, size=size, delta=delta, kind=kind, donor=_display(seed=5))
    assert abs(e.realised - delta) < 0.05 * abs(delta)
    assert np.array_equal(e.display[~e.mask], d[~e.mask])
    area = float(e.mask.sum())
    assert 0.8 * np.pi * size**2 / 4 <= area <= 1.6 * np.pi * size**2 / 4
    assert covered_cells(e.mask, 16, (8, 10)).any()


@pytest.mark.parametrize("step", BENIGN_STEPS)
def test_benign_steps_keep_the_original_grid(step):
    frame = np.rint(_display() * 16).astype(np.uint16)
    window = DisplayWindow(0.0, 4080.0, 1.0, 0.0, False)
    out, valid, _ = benign_display(frame, window, np.random.default_rng(1), step, value_range=(0, 4095))
    assert out.shape == frame.shape and out.dtype == np.float32
    assert valid.shape == frame.shape and valid.any()
    cells = valid_cells(valid, 16, (8, 10), 16)
    assert cells.all() if step != "crop" else (cells.any() or valid.mean() < 0.9)


def test_metrics_and_loss():
    assert roc_auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert roc_auc(np.array([1.0]), np.array([1.0])) == 0.5
    tpr, thr = tpr_at_fpr(np.array([5.0, 0.5]), np.arange(1000) / 1000.0, 1e-3)
    assert thr == pytest.approx(0.998) and tpr == 0.5
    loss, parts = fingerprint_loss(torch.tensor([0.5, 3.0]), torch.tensor([10.0, 2.0]), torch.zeros(4),
                                   FingerprintConfig())
    assert loss.item() > 0 and parts["pos"] == pytest.approx(36.0 / 2)


def test_a_tiny_run_trains_checkpoints_and_resumes(tmp_path):
    from medsec_edge.train.cli_entry import main

    out = tmp_path / "run"
    args = ["--recipe", "fingerprint", "--out", str(out), "--steps", "3", "--batch", "2", "--cache-size", "6",
            "--val-size", "4", "--val-every", "2", "--checkpoint-every", "2"]
    main(args)
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["step"] == 3 and "--recipe fingerprint" in state["command"]
    assert (out / "best.pt").exists() and state["history"][0]["step"] == 0
    main([*args[:5], "4", *args[6:]])
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["step"] == 4 and state["commands"][-1].endswith("(resumed at 3)")
