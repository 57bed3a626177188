"""The watermark networks: a message encoder, a content-adaptive strength encoder and a decoder.

Layer: train (torch). Design, from the prototypes in shared/notes: the 128 code bits map through a
learned linear layer to one 32x32 tile that repeats over the image (so crops and shifts only move
the tile cyclically); a small CNN decides where the image can hide energy (texture, not flat or
saturated areas); a small fully convolutional decoder turns any image into a watermark-signal map
that is folded over the tile period and read by a learned linear readout. Every piece is exported
to ONNX except the fold and readout, which are cheap numpy on the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medsec_edge.runtime.watermark.spec import CODE_BITS, TILE


class MessageEncoder(nn.Module):
    """Code bits (+-1) -> zero-mean, unit-RMS 32x32 tile."""

    def __init__(self, bits: int = CODE_BITS, tile: int = TILE, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        basis = torch.randn(bits, tile * tile, generator=gen) / bits**0.5
        self.basis = nn.Parameter(basis)
        self.tile = tile

    def forward(self, bits_pm1: torch.Tensor) -> torch.Tensor:
        tile = (bits_pm1 @ self.basis).view(-1, 1, self.tile, self.tile)
        tile = tile - tile.mean(dim=(2, 3), keepdim=True)
        return tile / (tile.pow(2).mean(dim=(2, 3), keepdim=True) + 1e-12).sqrt()


def _highpass(x: torch.Tensor) -> torch.Tensor:
    """Image minus its 5x5 local mean, normalised by the image's own RMS: the decoder then sees
    the same thing whatever window, gain or offset the image went through."""
    hp = x - F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
    # eps inside the root: sqrt'(0) is infinite, and a flat crop would turn gradients into NaN
    rms = (hp.pow(2).mean(dim=(2, 3), keepdim=True) + 1e-6).sqrt()
    return hp / rms


SSIM_C2 = (0.03 * 255) ** 2  # SSIM's contrast constant in 8-bit display levels squared


def masking_prior(image: torch.Tensor, power: torch.Tensor) -> torch.Tensor:
    """Contrast masking in the display window, ((2 var + C2) / C2) ** power, var the 7x7 local
    variance in 8-bit display levels: the SSIM that a residual of amplitude a costs at a pixel is
    about a^2 / (2 var + C2), so power 0.5 spreads that cost evenly and larger powers move energy
    from flat tissue (where a radiologist reads noise texture) to edges and texture."""
    padded = F.pad(image * 255.0, (3, 3, 3, 3), mode="replicate")
    mean = F.avg_pool2d(padded, 7, stride=1)
    var = (F.avg_pool2d(padded * padded, 7, stride=1) - mean * mean).clamp_min(0.0)
    return torch.exp(power * torch.log1p(2.0 * var / SSIM_C2))


class StrengthEncoder(nn.Module):
    """Display image (0..1) -> positive strength map (same size): where energy hides best.

    ``jnd_power`` > 0 multiplies the learned map by :func:`masking_prior` with a learned exponent
    started there (0: no prior, the first release's model); the exponent is used clamped to
    [0, 2], so a start above 2 acts as 2."""

    def __init__(self, width: int = 16, jnd_power: float = 0.0):
        super().__init__()
        self.jnd_power = nn.Parameter(torch.tensor(float(jnd_power))) if jnd_power > 0 else None
        self.body = nn.Sequential(
            nn.Conv2d(2, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=2, dilation=2),
            nn.ReLU(),
            nn.Conv2d(width, 1, 3, padding=1),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        local_mean = F.avg_pool2d(F.pad(image, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
        local_dev = (image - local_mean).abs()
        local_dev = F.avg_pool2d(F.pad(local_dev, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
        feats = torch.cat([image, local_dev * 8.0], dim=1)
        strength = F.softplus(self.body(feats))
        # Saturated display pixels cannot carry a signal (it is clipped away) and show none.
        unsaturated = ((image > 1.0 / 255) & (image < 254.0 / 255)).to(image.dtype)
        if self.jnd_power is not None:
            strength = strength * masking_prior(image, self.jnd_power.clamp(0.0, 2.0))
        return strength * unsaturated


class SignalDecoder(nn.Module):
    """Any display image -> watermark-signal map at the same resolution."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=2, dilation=2),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 1, 3, padding=1),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        hp = _highpass(image)
        return self.body(hp)


class Readout(nn.Module):
    """Folded 32x32 signal tile -> one logit per code bit (a learned linear correlator)."""

    def __init__(self, basis: torch.Tensor):
        super().__init__()
        self.patterns = nn.Parameter(basis.detach().clone().view(basis.shape[0], TILE, TILE))
        self.gain = nn.Parameter(torch.tensor(4.0))

    def forward(self, folded: torch.Tensor) -> torch.Tensor:
        folded = folded.view(folded.shape[0], TILE * TILE)
        folded = folded - folded.mean(dim=1, keepdim=True)
        folded = folded / (folded.pow(2).mean(dim=1, keepdim=True) + 1e-12).sqrt()
        pats = self.patterns.view(self.patterns.shape[0], -1)
        pats = pats / (pats.norm(dim=1, keepdim=True) + 1e-6)
        return self.gain * (folded @ pats.t()) * (TILE * TILE / CODE_BITS) ** 0.5


def tile_over(tile: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Repeat a (B,1,T,T) tile to cover (height, width), origin at the top-left pixel."""
    reps_h = -(-height // TILE)
    reps_w = -(-width // TILE)
    return tile.repeat(1, 1, reps_h, reps_w)[:, :, :height, :width]


def fold(signal: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Average a (B,1,H,W) map over every tile position (H, W multiples of TILE)."""
    b, _, h, w = signal.shape
    if valid is None:
        valid = torch.ones_like(signal)
    tiles = (signal * valid).view(b, h // TILE, TILE, w // TILE, TILE).sum(dim=(1, 3))
    counts = valid.view(b, h // TILE, TILE, w // TILE, TILE).sum(dim=(1, 3))
    return tiles / counts.clamp_min(1e-3)


class WatermarkNet(nn.Module):
    """The trainable whole; `embed` and `decode` mirror what the runtime does with the exports."""

    def __init__(self, seed: int = 0, width: int = 16, jnd_power: float = 0.0):
        super().__init__()
        self.message = MessageEncoder(seed=seed)
        self.strength = StrengthEncoder(width, jnd_power)
        self.decoder = SignalDecoder(width)
        self.readout = Readout(self.message.basis)

    def residual(self, image: torch.Tensor, bits_pm1: torch.Tensor, rms: torch.Tensor) -> torch.Tensor:
        """Display-domain residual (0..1 units) with the given RMS per image."""
        tile = self.message(bits_pm1)
        pattern = tile_over(tile, image.shape[2], image.shape[3])
        res = self.strength(image) * pattern
        norm = (res.pow(2).mean(dim=(1, 2, 3), keepdim=True) + 1e-16).sqrt()
        return res * (rms.view(-1, 1, 1, 1) / norm)
