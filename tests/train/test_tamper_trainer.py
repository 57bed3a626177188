"""Tamper-detector training: resumable bit for bit, checkpoint contents, AUC and loss, CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="training needs torch: pip install 'medsec-edge[train]'")

from medsec_edge.train.tamper_trainer import (  # noqa: E402
    TamperConfig,
    _Batches,
    TamperTrainer,
    roc_auc,
    tamper_loss,
)

TINY = TamperConfig(steps=4, batch=2, crop=64, width=4, val_size=8, checkpoint_every=2, workers=0,
                    p_watermark=0.0, threads=1)


def _state(trainer: TamperTrainer) -> dict:
    return {k: v.detach().clone() for k, v in trainer.net.state_dict().items()}


def test_resume_gives_the_same_weights(tmp_path):
    straight = TamperTrainer(TINY, tmp_path / "straight", command="straight")
    initial = _state(straight)
    straight.run(progress=False)
    assert straight.step == 4

    first = TamperTrainer(TINY, tmp_path / "resumed", command="resumed")
    first.run(progress=False, until=2)
    assert first.step == 2 and first.checkpoint_path.exists()
    second = TamperTrainer(TINY, tmp_path / "resumed", command="resumed")  # a fresh process, in effect
    second.run(progress=False)
    assert second.step == 4

    a, b = _state(straight), _state(second)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # and training did move the weights (the comparison above is not between two untouched nets)
    assert any(not torch.equal(initial[k], a[k]) for k in a if a[k].is_floating_point())
    # the saved checkpoint is the final state too
    saved = torch.load(second.checkpoint_path, weights_only=False)
    assert saved["step"] == 4
    for name, value in saved["net"].items():
        assert torch.equal(value, a[name]), name


def test_checkpoint_records_command_and_config(tmp_path):
    cmd = "python -m medsec_edge.train --recipe tamper --out x --steps 4"
    trainer = TamperTrainer(TINY, tmp_path, command=cmd)
    trainer.run(progress=False, until=2)
    state = torch.load(trainer.checkpoint_path, weights_only=False)
    assert state["command"] == cmd
    assert state["config"] == asdict(TINY)
    assert TamperConfig(**state["config"]) == TINY
    assert state["step"] == 2
    assert {"net", "opt", "history", "torch_rng"} <= set(state)
    assert (tmp_path / "training_curves.png").stat().st_size > 0
    assert (tmp_path / "history.json").exists()


class _IndexSamples:
    """A stand-in for TamperSamples whose image is its own sample index (cheap, picklable)."""

    def sample(self, index):
        return np.full((8, 8), index, np.float32), np.zeros((8, 8), np.float32), 0.0, {}


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_batches_cover_each_step_once_in_order(workers):
    """Every step's batch exactly once, in step order, whatever the number of loader workers
    (an IterableDataset is copied into every worker, so each must take its own share)."""
    batch, start, stop = 2, 1, 6
    loader = torch.utils.data.DataLoader(_Batches(_IndexSamples(), batch, start, stop), batch_size=None,
                                         num_workers=workers)
    seen = [x[:, 0, 0, 0].long().tolist() for x, _, _ in loader]
    assert seen == [[step * batch + i for i in range(batch)] for step in range(start, stop)]


def _auc_bruteforce(scores, labels):
    pos, neg = scores[labels], scores[~labels]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(6))
def test_roc_auc_matches_pairwise_count(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    labels = rng.random(n) < 0.4
    labels[0], labels[1] = True, False  # both classes present
    scores = rng.integers(0, 6, n).astype(float)  # few distinct values: many ties
    scores[labels] += rng.integers(0, 2, labels.sum())  # a little signal
    assert roc_auc(scores, labels) == pytest.approx(_auc_bruteforce(scores, labels), abs=1e-12)


def test_roc_auc_edge_cases():
    assert roc_auc(np.array([1.0, 2.0, 3.0]), np.array([0, 1, 1])) == 1.0
    assert roc_auc(np.array([3.0, 2.0, 1.0]), np.array([0, 1, 1])) == 0.0
    assert roc_auc(np.array([2.0, 2.0, 2.0, 2.0]), np.array([0, 1, 0, 1])) == 0.5
    assert np.isnan(roc_auc(np.array([1.0, 2.0]), np.array([1, 1])))
    assert np.isnan(roc_auc(np.array([1.0, 2.0]), np.array([0, 0])))


def _batch():
    """Two tampered crops with 4x4-aligned masks (exact 0/1 targets) and one genuine crop."""
    mask = torch.zeros(3, 1, 32, 32)
    mask[0, 0, 8:16, 4:20] = 1
    mask[1, 0, 16:32, 16:28] = 1
    label = torch.tensor([1.0, 1.0, 0.0])
    return mask, label


def test_tamper_loss_prefers_the_right_answer():
    mask, label = _batch()
    target = torch.nn.functional.avg_pool2d(mask, 4)
    assert set(target.unique().tolist()) == {0.0, 1.0}
    perfect_logits = (target * 2 - 1) * 12.0
    perfect_score = (label[:, None] * 2 - 1) * 12.0
    wrong_logits, wrong_score = -perfect_logits, -perfect_score
    good, good_parts = tamper_loss(perfect_logits, perfect_score, mask, label, TINY)
    bad, bad_parts = tamper_loss(wrong_logits, wrong_score, mask, label, TINY)
    assert torch.isfinite(good) and torch.isfinite(bad)
    assert float(good) < 0.01 < 1.0 < float(bad)
    for part in ("pix", "dice", "img"):
        assert good_parts[part] < bad_parts[part], part
    unsure, _ = tamper_loss(torch.zeros_like(perfect_logits), torch.zeros_like(perfect_score), mask, label, TINY)
    assert float(good) < float(unsure) < float(bad)


def test_tamper_loss_all_genuine_batch():
    mask = torch.zeros(2, 1, 32, 32)
    label = torch.zeros(2)
    logits = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    score = torch.randn(2, 1, generator=torch.Generator().manual_seed(1), requires_grad=True)
    loss, parts = tamper_loss(logits, score, mask, label, TINY)
    assert torch.isfinite(loss) and parts["dice"] == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_cli_trains_and_writes_outputs(tmp_path):
    out = tmp_path / "run"
    args = ["--recipe", "tamper", "--out", str(out), "--steps", "2", "--batch", "2", "--crop", "64",
            "--width", "4", "--val-size", "8", "--workers", "0", "--checkpoint-every", "2",
            "--p-watermark", "0.0", "--threads", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "medsec_edge.train", *args], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "checkpoint.pt").stat().st_size > 0
    assert (out / "training_curves.png").stat().st_size > 0
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["step"] == 2
    assert state["config"]["width"] == 4 and state["config"]["steps"] == 2
    assert "--recipe tamper" in state["command"]


def test_init_starts_a_new_run_from_another_checkpoint(tmp_path):
    """Fine-tuning: --init loads the weights, then trains (a zero learning rate leaves them as
    they were); the new run records its own step count and command."""
    import dataclasses

    import torch

    source = TamperTrainer(TINY, tmp_path / "a", command="a")
    source.run(progress=False)
    cfg = dataclasses.replace(TINY, steps=1, lr=0.0, init=str(tmp_path / "a" / "checkpoint.pt"))
    tuned = TamperTrainer(cfg, tmp_path / "b", command="b")
    tuned.run(progress=False)
    assert tuned.step == 1 and tuned.commands == ["b"]
    convs = [n for n, p in source.net.named_parameters() if p.dim() == 4]
    src, got = dict(source.net.named_parameters()), dict(tuned.net.named_parameters())
    assert convs and all(torch.equal(src[n], got[n]) for n in convs)
