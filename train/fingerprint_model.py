"""The learned content fingerprint's encoder (issue 9): one grey display frame -> a small code per
16 px cell.

Layer: train (torch). Fully convolutional, stride 16: input (B, 1, H, W) display values / 255 with
H and W multiples of 16 (the runtime pads by edge replication), output (B, DIMS, H/16, W/16) in
code units: the runtime rounds them to int8 (one unit = one quantisation step), so the training
adds uniform noise of one step to the recorded side.

Two branches are summed:

- a fixed linear prior: four Gaussian-weighted means of the display (sigma 4 px, 24 x 24 taps,
  normalised at the borders like the non-learned fingerprint) centred on the cell's four 8 px
  sub-cells, pixel-unshuffled to 4 channels and mapped by a learned 1 x 1 convolution initialised
  to 240 * (mean - 0.5), i.e. 0.94 code units per display level; at initialisation the code IS the
  non-learned fingerprint's four 8 px cells, at int8 precision;
- a four-layer strided CNN (3 x 3 kernels, stride 2, padding 1 each) whose 1 x 1 head starts near
  zero and learns what to add. Its receptive field is 31 px centred on the cell's top-left pixel:
  the cell and 15 px above and left of it (not centred; a later encoder could pad asymmetrically),
  which is why a comparison leaves out cells within 16 px of a crop border.

About 15k parameters; ~45 M multiply-adds at 512 x 512.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CELL = 16
DIMS = 4
PRIOR_GAIN = 240.0
SIGMA = 4.0
TAPS = 24


class FingerprintNet(nn.Module):
    cell = CELL

    def __init__(self, dims: int = DIMS, width: int = 32):
        super().__init__()
        self.dims, self.width = int(dims), int(width)
        self.c1 = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(16, width, 3, stride=2, padding=1)
        self.c4 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.head = nn.Conv2d(width, self.dims, 1)
        self.prior = nn.Conv2d(4, self.dims, 1)
        t = torch.arange(TAPS, dtype=torch.float32) - (TAPS - 1) / 2.0
        g = torch.exp(-0.5 * (t / SIGMA) ** 2)
        k = torch.outer(g, g)
        self.register_buffer("gauss", (k / k.sum())[None, None], persistent=False)
        with torch.no_grad():
            self.head.weight.mul_(0.05)
            self.head.bias.zero_()
            w = torch.zeros(self.dims, 4, 1, 1)
            for i in range(min(4, self.dims)):
                w[i, i] = PRIOR_GAIN
            self.prior.weight.copy_(w)
            self.prior.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # window [8i - 8, 8i + 16) of each output: centred on 8i + 3.5, the 8 px sub-cell's centre
        num = F.conv2d(x, self.gauss, stride=8, padding=8)
        den = F.conv2d(torch.ones_like(x), self.gauss, stride=8, padding=8)
        sub = F.pixel_unshuffle(num / den, 2) - 0.5  # (B, 4, H/16, W/16)
        h = F.relu(self.c1(x))
        h = F.relu(self.c2(h))
        h = F.relu(self.c3(h))
        h = F.relu(self.c4(h))
        return self.prior(sub) + self.head(h)


def n_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
