"""The blind tamper detector: a small fully convolutional net, image score plus pixel mask.

Layer: train (torch). Any input size divisible by 8 (the runtime pads); the mask comes out at
1/4 of the input resolution and the score is the largest 2x2-averaged mask logit, so image-level
and pixel-level decisions come from one map and a larger image costs proportionally more.
A fixed high-pass channel (the image minus its 3x3 mean) is computed in the graph: manipulations
change the noise before they change anything else, and the net should not have to learn that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HIGHPASS_GAIN = 8.0


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


class TamperNet(nn.Module):
    """(N, 1, H, W) normalised display values -> mask logits (N, 1, H/4, W/4), score logit (N, 1)."""

    def __init__(self, width: int = 16):
        super().__init__()
        c1, c2, c3 = width, width * 3 // 2, width * 3
        self.width = width
        self.stem = _conv(2, c1, stride=2)
        self.down2 = _conv(c1, c2, stride=2)
        self.mid2 = _Residual(c2, 1)
        self.down3 = _conv(c2, c3, stride=2)
        self.context = nn.Sequential(_Residual(c3, 1), _Residual(c3, 2), _Residual(c3, 4))
        self.skip = nn.Conv2d(c2, c3, 1)
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(c3, 16, 1), nn.ReLU(), nn.Conv2d(16, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        high = x - F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        f = torch.cat([x - 0.5, high * HIGHPASS_GAIN], dim=1)
        f2 = self.mid2(self.down2(self.stem(f)))
        f3 = self.context(self.down3(f2))
        up = F.interpolate(f3, size=f2.shape[-2:], mode="bilinear", align_corners=False) + self.skip(f2)
        logits = self.head(up)
        score = torch.amax(F.avg_pool2d(logits, 2, stride=1), dim=(2, 3))
        return logits, score
