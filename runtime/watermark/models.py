"""The watermark networks of a bundle, run through a backend session.

Layer: runtime. A bundle holds four ONNX models: ``wm_strength`` and ``wm_decoder`` (fully
convolutional, any size), ``wm_message`` (code bits -> raw tile) and ``wm_readout`` (the readout
patterns, read out once by feeding it the identity matrix). Keeping every learned tensor inside
a signed, hashed ONNX file means the device trusts exactly one kind of artifact.
"""

from __future__ import annotations

import numpy as np

from medsec_edge.runtime.bundle import Bundle
from medsec_edge.runtime.watermark.spec import CODE_BITS, TILE

MODEL_NAMES = ("wm_strength", "wm_decoder", "wm_message", "wm_readout")


class BundleWatermarkModels:
    """Implements ``watermark.WatermarkModels`` with sessions from a verified bundle."""

    def __init__(self, bundle: Bundle, backend: str | None = None, threads: int | None = None):
        self._sessions = {name: bundle.session(name, backend=backend, threads=threads) for name in MODEL_NAMES}
        norm = bundle.model("wm_readout").normalisation
        self.readout_gain = float(norm.get("gain", 1.0))
        # Calibrated with the models (export/presence_calibration.py); absent: always search.
        presence = bundle.manifest.calibration.get("watermark", {}).get("presence", {})
        self.presence_threshold = float(presence["threshold"]) if "threshold" in presence else None
        eye = np.eye(CODE_BITS, dtype=np.float32)
        self._readout = self._sessions["wm_readout"].run({"bits": eye})["tile"].reshape(CODE_BITS, TILE, TILE)
        # The first run of a session allocates and plans; do it here, not inside a timed stage.
        warm = np.zeros((64, 64), np.float32)
        self.strength(warm)
        self.signal(warm)

    @property
    def readout(self) -> np.ndarray:
        return self._readout

    def strength(self, work: np.ndarray) -> np.ndarray:
        out = self._sessions["wm_strength"].run({"image": work[None, None].astype(np.float32)})
        return out["strength"][0, 0]

    def signal(self, work: np.ndarray) -> np.ndarray:
        out = self._sessions["wm_decoder"].run({"image": work[None, None].astype(np.float32)})
        return out["signal"][0, 0]

    def tile(self, bits_pm1: np.ndarray) -> np.ndarray:
        raw = self._sessions["wm_message"].run({"bits": bits_pm1.reshape(1, CODE_BITS).astype(np.float32)})
        tile = raw["tile"].reshape(TILE, TILE).astype(np.float64)
        tile -= tile.mean()
        return (tile / (np.sqrt(np.mean(tile * tile)) + 1e-6)).astype(np.float32)

    def close(self) -> None:
        for session in self._sessions.values():
            session.close()
