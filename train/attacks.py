"""Differentiable attacks on display images (B,1,H,W, values 0..1), for training.

Layer: train. The names are those of ``medsec_edge.evaluation.attacks.ATTACKS`` (a test checks
it): each evaluation attack has a torch counterpart here, so what the decoder learns to survive is
what we measure. Geometry (crop, rotation, resize without resizing back) is applied by the
training loop as an affine warp that the runtime later estimates and inverts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """Round forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def quantize8(x: torch.Tensor) -> torch.Tensor:
    return ste_round(x.clamp(0, 1) * 255.0) / 255.0


def gaussian_noise(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return x + torch.randn_like(x) * sigma


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))


def resize_back(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Down to `scale` and back up: the information a resized copy keeps, on the same grid."""
    h, w = x.shape[2:]
    small = F.interpolate(x, size=(max(8, round(h * scale)), max(8, round(w * scale))),
                          mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)


_JPEG_LUMA = torch.tensor([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
], dtype=torch.float32).view(8, 8)


def _dct_matrix() -> torch.Tensor:
    n = torch.arange(8, dtype=torch.float32)
    m = torch.cos((2 * n[None, :] + 1) * n[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    m[0] /= math.sqrt(2)
    return m


_DCT = _dct_matrix()


def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """8x8 DCT quantisation with the IJG luminance table (rounding passes gradients straight)."""
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    table = torch.clamp(torch.floor((_JPEG_LUMA * scale + 50) / 100), 1, 255).to(x.dtype)
    b, c, h, w = x.shape
    ph, pw = (-h) % 8, (-w) % 8
    y = F.pad(x * 255.0 - 128.0, (0, pw, 0, ph), mode="replicate")
    hh, ww = y.shape[2:]
    blocks = y.view(b, c, hh // 8, 8, ww // 8, 8).permute(0, 1, 2, 4, 3, 5)
    coef = _DCT @ blocks @ _DCT.t()
    coef = ste_round(coef / table) * table
    blocks = _DCT.t() @ coef @ _DCT
    y = blocks.permute(0, 1, 2, 4, 3, 5).reshape(b, c, hh, ww)[:, :, :h, :w]
    return ((y + 128.0) / 255.0).clamp(0, 1)


def contrast(x: torch.Tensor, gain: float, offset: float, gamma: float) -> torch.Tensor:
    """A different display window or a gamma curve (what an export or a viewer may apply)."""
    y = ((x - 0.5) * gain + 0.5 + offset).clamp(1e-4, 1)
    return y**gamma


def affine_matrices(angle_deg: torch.Tensor, scale: torch.Tensor, shift_px: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and inverse 2x3 pixel maps of "rotate by angle, scale, then shift".

    The attacked image at pixel u shows the original at forward @ [u, 1]; the original's pixel c
    is found in the attacked image at inverse @ [c, 1]. A scale > 1 magnifies (the period grows).
    """
    theta = angle_deg * math.pi / 180
    cos, sin = torch.cos(theta), torch.sin(theta)
    a = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2) * scale[:, None, None]
    inverse = torch.cat([a, shift_px[:, :, None]], dim=2)
    a_inv = torch.linalg.inv(a)
    forward = torch.cat([a_inv, -(a_inv @ shift_px[:, :, None])], dim=2)
    return forward, inverse


def pixel_grid(matrix: torch.Tensor, height: int, width: int, src_hw: tuple[int, int]) -> torch.Tensor:
    """grid_sample grid for an output of (height, width) sampling the source at matrix @ [x, y, 1]."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32),
                            torch.arange(width, dtype=torch.float32), indexing="ij")
    pts = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1).view(1, -1, 3)
    src = pts @ matrix.transpose(1, 2)
    sx = src[..., 0] / (src_hw[1] - 1) * 2 - 1
    sy = src[..., 1] / (src_hw[0] - 1) * 2 - 1
    return torch.stack([sx, sy], dim=-1).view(-1, height, width, 2)


def warp(x: torch.Tensor, grid: torch.Tensor, fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample with a grid; returns the image and the mask of pixels that came from inside."""
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
    inside = ((grid.abs() <= 1.0).all(dim=-1, keepdim=True)).permute(0, 3, 1, 2).to(x.dtype)
    return out * inside + fill * (1 - inside), inside


# The evaluation attacks by name, at their evaluation strength, for a test and for a last
# phase of training that sees exactly the evaluated settings. Geometry is handled by the loop.
ATTACKS = {
    "none": lambda x: x,
    "jpeg90": lambda x: jpeg(x, 90),
    "jpeg75": lambda x: jpeg(x, 75),
    "jpeg50": lambda x: jpeg(x, 50),
    "j2k10": lambda x: resize_back(x, 0.6),
    "j2k20": lambda x: resize_back(x, 0.45),
    "noise1": lambda x: gaussian_noise(x, 0.02),
    "noise2": lambda x: gaussian_noise(x, 0.04),
    "blur1": lambda x: gaussian_blur(x, 1.0),
    "resize0.75": lambda x: resize_back(x, 0.75),
    "resize0.5": lambda x: resize_back(x, 0.5),
    "crop50": lambda x: x,
    "crop25": lambda x: x,
    "rot2": lambda x: x,
    "rot5": lambda x: x,
    "export8": quantize8,
    "crop70_jpeg75": lambda x: jpeg(x, 75),
}
