"""The blind tamper detector: a small fully convolutional net, image score plus pixel mask.

Layer: train (torch). Any input size divisible by 8 (the runtime pads); the mask comes out at
1/4 of the input resolution and the score is the largest 2x2-averaged mask logit, so image-level
and pixel-level decisions come from one map and a larger image costs proportionally more.

Fixed forensic front end, computed in the graph (so the ONNX file carries it): manipulations
change the noise before they change anything else, and the net should not have to learn that.
Four high-pass residuals (the image minus its 3x3 mean, the 4-neighbour Laplacian, horizontal and
vertical second differences, as in SRM filter banks) are divided by the image's own residual
scale (a clipped, iterated RMS of the first residual over pixels away from the clip range, so
edges and saturated areas do not set it), so one image's noise level,
whatever its window, bit depth or scanner, reads as 1: what stands out is a region whose noise
differs from the rest of the same image. A fifth channel is the log local residual energy
(7x7) on that scale. The raw display values ride along for content.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

RESIDUAL_CLAMP = 8.0  # normalised residuals beyond this (edges) are clipped
SCALE_EPS = 1e-4  # in normalised display units (a 16-bit frame in a wide window is that quiet)
ENERGY_FLOOR = 1e-2
SCALE_CLIP, SCALE_ITERATIONS = 2.5, 4  # robust scale: clipped RMS, iterated (edges do not set it)
CLIP_LO, CLIP_HI = -0.49, 1.49  # just inside detector_input.CLIP: values there were clipped
FRONT_CHANNELS = 6


def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class _Residual(nn.Module):
    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.body = _conv(channels, channels, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _residual_kernels() -> torch.Tensor:
    mean3 = torch.full((3, 3), -1.0 / 9.0)
    mean3[1, 1] += 1.0
    lap = torch.tensor([[0.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 0.0]]) / 4.0
    d2x = torch.tensor([[0.0, 0.0, 0.0], [-1.0, 2.0, -1.0], [0.0, 0.0, 0.0]]) / 2.0
    d2y = d2x.t().contiguous()
    return torch.stack([mean3, lap, d2x, d2y])[:, None]  # (4, 1, 3, 3)


class ForensicFrontEnd(nn.Module):
    """(N, 1, H, W) normalised display values -> (N, 6, H, W): content, 4 residuals, log energy."""

    def __init__(self):
        super().__init__()
        self.register_buffer("kernels", _residual_kernels(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xp = F.pad(x, (1, 1, 1, 1), mode="replicate")
        res = F.conv2d(xp, self.kernels)
        # The image's own residual scale, over pixels whose 3x3 neighbourhood is inside the clip
        # range (clipped pixels are flat, their borders steps), robust to edges: the RMS of the
        # residual clamped at SCALE_CLIP times the previous estimate, a few times over.
        inside = ((x > CLIP_LO) & (x < CLIP_HI)).to(x.dtype)
        valid = 1.0 - F.max_pool2d(1.0 - inside, 3, stride=1, padding=1)
        r0 = res[:, :1]
        count = valid.sum(dim=(2, 3), keepdim=True) + 1.0
        scale = torch.sqrt((r0 * r0 * valid).sum(dim=(2, 3), keepdim=True) / count) + SCALE_EPS
        for _ in range(SCALE_ITERATIONS):
            clipped = torch.minimum(torch.abs(r0), SCALE_CLIP * scale)
            scale = torch.sqrt((clipped * clipped * valid).sum(dim=(2, 3), keepdim=True) / count) + SCALE_EPS
        norm = torch.clamp(res / scale, -RESIDUAL_CLAMP, RESIDUAL_CLAMP)
        energy = F.avg_pool2d(norm[:, :1] * norm[:, :1], 7, stride=1, padding=3, count_include_pad=False)
        log_energy = torch.log(energy + ENERGY_FLOOR)
        return torch.cat([x - 0.5, norm, log_energy * 0.5], dim=1)


class TamperNet(nn.Module):
    """(N, 1, H, W) normalised display values -> mask logits (N, 1, H/4, W/4), score logit (N, 1)."""

    def __init__(self, width: int = 16):
        super().__init__()
        c1, c2, c3 = width, width * 3 // 2, width * 3
        self.width = width
        self.front = ForensicFrontEnd()
        # Full-resolution layer on the residuals before any striding: noise statistics live at
        # the pixel scale and a stride-2 first layer would alias them away.
        self.pre = _conv(FRONT_CHANNELS, c1)
        self.stem = _conv(c1, c1, stride=2)
        self.down2 = _conv(c1, c2, stride=2)
        self.mid2 = _Residual(c2, 1)
        self.down3 = _conv(c2, c3, stride=2)
        self.context = nn.Sequential(_Residual(c3, 1), _Residual(c3, 2), _Residual(c3, 4))
        self.skip = nn.Conv2d(c2, c3, 1)
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(c3, 16, 1), nn.ReLU(), nn.Conv2d(16, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.pre(self.front(x))
        f2 = self.mid2(self.down2(self.stem(f)))
        f3 = self.context(self.down3(f2))
        up = F.interpolate(f3, size=f2.shape[-2:], mode="bilinear", align_corners=False) + self.skip(f2)
        logits = self.head(up)
        score = torch.amax(F.avg_pool2d(logits, 2, stride=1), dim=(2, 3))
        return logits, score
