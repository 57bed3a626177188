"""One seed for every random source a training run uses (Python, numpy, torch).

Layer: train. The trainers call it first, so a run is a function of its seed and command.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
