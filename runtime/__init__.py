"""medsec-edge device runtime: everything a scanner-side device runs.

Layer: runtime. May import numpy, pydicom, typer, rich, cryptography; ONNX Runtime and TensorRT
only inside ``backends/`` and lazily. Never torch, onnx, or another medsec_edge package.
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
