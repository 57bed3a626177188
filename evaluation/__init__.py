"""Robustness and quality evaluation: the measures every report uses, the numpy attacks, baselines.

Layer: evaluation (workstation side, like ``benchmarks/``). May import runtime, numpy, scipy,
pillow, pylibjpeg-openjpeg; the classical baselines (invisible-watermark, blind-watermark, OpenCV)
only inside ``baselines.py`` and lazily, each behind ``is_available()``. Never torch: the torch
attacks live in ``train/`` under the same names (CONVENTIONS.md, Names).
"""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())
