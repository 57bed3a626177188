"""Training loop for the watermark networks: seeded, checkpointed, resumable, with curves.

Layer: train. The recipe follows what made the CPU prototypes train at all (shared/notes): a
zero-mean residual, a high-pass normalised decoder input, a direct message path, and a strength
that starts high (~30 dB) and anneals to the target while attacks ramp in.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medsec_edge.runtime.watermark.spec import CODE_BITS, TILE
from medsec_edge.train import attacks as A
from medsec_edge.train.data import ImagePool
from medsec_edge.train.models import WatermarkNet, fold
from medsec_edge.train.seeding import seed_everything

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 3600
    batch: int = 8
    crop: int = 128  # training canvas at working resolution, a multiple of TILE
    lr: float = 2e-3
    seed: int = 1234
    width: int = 12
    psnr_start_db: float = 30.0
    psnr_target_db: float = 42.5
    psnr_jitter_db: float = 2.0
    anneal_fraction: float = 0.5
    ssim_weight: float = 4.0
    checkpoint_every: int = 250
    pool_size: int = 1500  # synthetic images kept in memory, refreshed as training goes
    threads: int = 2
    jnd_power: float = 0.0  # > 0: the strength map carries the contrast-masking prior (models.py)
    real_share: float = 0.25  # share of each batch from real images
    jnd_fixed: int = 0  # 1: the masking exponent stays at jnd_power (0: learned from there)
    real_frames: int = 0  # 1: the real frames of train.real_data join pydicom's three files


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean SSIM on 0..1 images per image, with a 7x7 box window (a cheap stand-in for the
    Gaussian window of the reported SSIM: the gradients point the same way at a fraction of the
    cost on 2 CPU cores)."""
    c1, c2 = 0.01**2, 0.03**2

    def blur(z: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(z, 7, stride=1)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))


def _photometric(y: torch.Tensor, rng: np.random.Generator, ramp: float) -> tuple[torch.Tensor, str]:
    """One random non-geometric attack whose strength grows with `ramp` (0..1)."""
    choice = rng.choice(["none", "jpeg", "noise", "blur", "resize", "contrast", "lowpass"],
                        p=[0.12, 0.26, 0.2, 0.1, 0.14, 0.1, 0.08])
    if choice == "jpeg":
        y = A.jpeg(y, int(rng.integers(round(95 - 55 * ramp), 96)))
    elif choice == "noise":
        y = A.gaussian_noise(y, float(rng.uniform(0.0, 0.001 + 0.08 * ramp)))
    elif choice == "blur":
        y = A.gaussian_blur(y, float(rng.uniform(0.4, 0.5 + 1.0 * ramp)))
    elif choice == "resize":
        y = A.resize_back(y, float(rng.uniform(1 - 0.6 * ramp, 1.0)))
    elif choice == "lowpass":
        y = A.resize_back(y, float(rng.uniform(1 - 0.55 * ramp, 1.0)))
        y = A.gaussian_noise(y, float(rng.uniform(0.0, 0.01 * ramp)))
    elif choice == "contrast":
        y = A.contrast(y, float(rng.uniform(0.7, 1.4)), float(rng.uniform(-0.1, 0.1)),
                       float(np.exp(rng.uniform(-0.25, 0.25))))
    if rng.random() < 0.5:
        y = A.quantize8(y)
    return y, str(choice)


class WatermarkTrainer:
    def __init__(self, config: TrainConfig, out_dir: Path, command: str = ""):
        self.cfg = config
        self.command = command
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(config.threads)
        seed_everything(config.seed)
        self.net = WatermarkNet(seed=config.seed, width=config.width, jnd_power=config.jnd_power)
        if config.jnd_fixed and self.net.strength.jnd_power is not None:
            self.net.strength.jnd_power.requires_grad_(False)
        self.opt = torch.optim.Adam([p for p in self.net.parameters() if p.requires_grad], lr=config.lr)
        self.step = 0
        self.history: list[dict] = []
        self.rng = np.random.default_rng(config.seed)
        self.pool = ImagePool(seed=config.seed, n_synthetic=config.pool_size, real_share=config.real_share,
                              real_frames=bool(config.real_frames))

    # -- checkpoints -------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def save(self) -> None:
        if not all(torch.isfinite(p).all() for p in self.net.parameters()):
            raise RuntimeError(f"non-finite weights at step {self.step}: not overwriting the checkpoint")
        state = {
            "config": asdict(self.cfg), "command": self.command, "step": self.step, "net": self.net.state_dict(),
            "opt": self.opt.state_dict(), "history": self.history,
            "rng": self.rng.bit_generator.state, "pool_rng": self.pool.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
        }
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.checkpoint_path)

    def resume(self) -> bool:
        if not self.checkpoint_path.exists():
            return False
        state = torch.load(self.checkpoint_path, weights_only=False)
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.step = state["step"]
        self.history = state["history"]
        self.rng.bit_generator.state = state["rng"]
        self.pool.rng.bit_generator.state = state["pool_rng"]
        torch.set_rng_state(state["torch_rng"])
        return True

    # -- one step ----------------------------------------------------------------------------
    def schedule(self) -> tuple[float, float]:
        """(target PSNR in dB, attack ramp 0..1) at the current step."""
        progress = min(1.0, self.step / max(1, self.cfg.steps * self.cfg.anneal_fraction))
        smooth = 0.5 - 0.5 * math.cos(math.pi * progress)
        psnr = self.cfg.psnr_start_db + (self.cfg.psnr_target_db - self.cfg.psnr_start_db) * smooth
        return psnr, min(1.0, 0.15 + progress)

    def forward(self, x: torch.Tensor, bits: torch.Tensor, psnr_db: torch.Tensor, ramp: float):
        b, _, h, w = x.shape
        rms = 10 ** (-psnr_db / 20)
        residual = self.net.residual(x, bits, rms)
        marked = (x + residual).clamp(0, 1)
        # Geometry: the runtime estimates rotation and scale from the tile lattice and undoes
        # them on the signal map, leaving a small error; the decoder must also see the tile at
        # 0.7x-1.45x its nominal period, and any crop offset.
        angle = torch.from_numpy(self.rng.uniform(-1.5, 1.5, b).astype(np.float32)) * ramp
        scale = torch.from_numpy(np.exp(self.rng.uniform(np.log(0.7), np.log(1.45), b)).astype(np.float32))
        scale = 1 + (scale - 1) * ramp
        shift = torch.from_numpy(self.rng.uniform(0, TILE, (b, 2)).astype(np.float32))
        fwd, inv = A.affine_matrices(angle, scale, shift)
        attacked, inside = A.warp(marked, A.pixel_grid(fwd, h, w, (h, w)))
        attacked, kind = _photometric(attacked, self.rng, ramp)
        signal = self.net.decoder(attacked)
        canon, canon_inside = A.warp(signal * inside, A.pixel_grid(inv, h, w, (h, w)))
        valid, _ = A.warp(inside, A.pixel_grid(inv, h, w, (h, w)))
        valid = (valid > 0.99).to(x.dtype) * canon_inside
        logits = self.net.readout(fold(canon, valid))
        return marked, logits, kind

    def train_step(self) -> dict:
        cfg = self.cfg
        target, ramp = self.schedule()
        x = torch.from_numpy(self.pool.batch(cfg.batch, cfg.crop))
        bits01 = torch.from_numpy(self.rng.integers(0, 2, (cfg.batch, CODE_BITS)).astype(np.float32))
        psnr = torch.from_numpy((target + self.rng.uniform(-cfg.psnr_jitter_db, cfg.psnr_jitter_db, cfg.batch))
                                .astype(np.float32))
        marked, logits, kind = self.forward(x, bits01 * 2 - 1, psnr, ramp)
        bce = F.binary_cross_entropy_with_logits(logits, bits01)
        ssim_loss = (1 - ssim(x, marked)).mean()
        loss = bce + cfg.ssim_weight * ssim_loss * min(1.0, self.step / 1000)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), 5.0)
        # A batch that produced a non-finite loss or gradient is skipped, never applied: one
        # such step turns every weight into NaN (and the next checkpoint with them).
        skipped = not (torch.isfinite(loss) and torch.isfinite(grad_norm))
        if not skipped:
            self.opt.step()
        with torch.no_grad():
            acc = ((logits > 0).float() == bits01).float().mean().item()
            mse = (marked - x).pow(2).mean(dim=(1, 2, 3))
            psnr_real = (10 * torch.log10(1 / mse.clamp_min(1e-12))).mean().item()
        return {"step": self.step, "loss": loss.item(), "bce": bce.item(), "bit_acc": acc,
                "psnr": psnr_real, "ssim": 1 - ssim_loss.item(), "target_psnr": target, "ramp": ramp,
                "attack": kind, "skipped": float(skipped)}

    def set_lr(self) -> None:
        progress = self.step / self.cfg.steps
        lr = self.cfg.lr * (0.1 if progress > 0.85 else 0.3 if progress > 0.65 else 1.0)
        for g in self.opt.param_groups:
            g["lr"] = lr

    def run(self, progress: bool = True, until: int | None = None) -> None:
        """Train to ``cfg.steps`` (or stop at step ``until``, as an interruption would)."""
        from tqdm import tqdm

        resumed = self.resume()
        if resumed:
            log.info("resumed at step %d", self.step)
        bar = tqdm(total=self.cfg.steps, initial=self.step, disable=not progress, mininterval=5)
        recent: list[dict] = []
        started = time.time()
        last = self.cfg.steps if until is None else min(until, self.cfg.steps)
        while self.step < last:
            self.set_lr()
            rec = self.train_step()
            self.step += 1
            recent.append(rec)
            if self.step % 50 == 0:
                summary = {k: float(np.nanmean([r[k] for r in recent])) for k in
                           ("loss", "bce", "bit_acc", "psnr", "ssim", "target_psnr", "ramp")}
                summary["skipped"] = float(sum(r["skipped"] for r in recent))
                summary["step"] = self.step
                summary["elapsed_s"] = time.time() - started
                self.history.append(summary)
                bar.set_postfix(acc=f"{summary['bit_acc']:.3f}", psnr=f"{summary['psnr']:.1f}",
                                ssim=f"{summary['ssim']:.4f}")
                recent = []
            if self.step % 200 == 0:
                self.pool.refresh(0.05)
            if self.step % self.cfg.checkpoint_every == 0 or self.step == last:
                self.save()
                (self.out / "history.json").write_text(json.dumps(self.history, indent=1))
            bar.update(1)
        bar.close()
        if self.step == self.cfg.steps:
            self.plot_curves()

    def plot_curves(self) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [h["step"] for h in self.history]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        axes[0].plot(steps, [h["bit_acc"] for h in self.history])
        axes[0].set_title("raw bit accuracy (attacked, training batches)")
        axes[1].plot(steps, [h["psnr"] for h in self.history], label="measured")
        axes[1].plot(steps, [h["target_psnr"] for h in self.history], label="target")
        axes[1].set_title("PSNR (dB, display)")
        axes[1].legend()
        axes[2].plot(steps, [h["ssim"] for h in self.history])
        axes[2].set_title("SSIM (display)")
        for ax in axes:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = self.out / "training_curves.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return path
