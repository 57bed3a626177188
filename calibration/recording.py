"""The calibration set: every model's inputs as the runtime really feeds them, on real images.

Layer: calibration (runtime; the attack suite of ``evaluation``). Quantization ranges are only as
good as the tensors they are measured on, so they are not synthesised: the FP32 bundle is opened
as a device opens it and its sessions are wrapped by ``RecordingSession``, which keeps a copy of
what the runtime passes to each model while it does its real work on each calibration image:
embed, verify, read the mark back after a few of the evaluation attacks (the decoder must keep its
range on attacked inputs too), read the unmarked image (the lattice search), the blind tamper
check, and the fingerprint encoder on the display. At most ``per_model`` inputs are kept per model
(reservoir sampling, seeded), so memory stays bounded whatever the set's size.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from medsec_edge.evaluation.attacks import attack_image
from medsec_edge.runtime.backends.base import Session
from medsec_edge.runtime.errors import MedsecError
from medsec_edge.runtime.io.image import MedicalImage
from medsec_edge.runtime.io.readers import read_image
from medsec_edge.runtime.tamper.checker import TamperChecker
from medsec_edge.runtime.tamper.fingerprint import display_frames
from medsec_edge.runtime.tamper.learned_fingerprint import FingerprintEncoder, learned_cell_size_for
from medsec_edge.runtime.watermark.models import BundleWatermarkModels
from medsec_edge.runtime.watermark.payload import PayloadCodec
from medsec_edge.runtime.watermark.watermarker import Watermarker

log = logging.getLogger(__name__)

# The attacks whose outputs the decoder sees during calibration (a spread of scales and noise).
CALIBRATION_ATTACKS = ("jpeg75", "noise2", "resize0.5", "rot5", "crop50")


@dataclass
class InputStore:
    """Up to ``capacity`` recorded input dicts per model (reservoir sampling)."""

    capacity: int
    seed: int = 0
    inputs: dict[str, list[dict[str, np.ndarray]]] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)

    def add(self, model: str, feed: Mapping[str, np.ndarray]) -> None:
        kept = self.inputs.setdefault(model, [])
        n = self.seen.get(model, 0)
        self.seen[model] = n + 1
        copy = {k: np.array(v, copy=True) for k, v in feed.items()}
        if len(kept) < self.capacity:
            kept.append(copy)
            return
        slot = int(self._rng.integers(0, n + 1))
        if slot < self.capacity:
            kept[slot] = copy


class RecordingSession(Session):
    """Passes every call to ``inner`` and records its inputs in ``store`` under ``model``."""

    def __init__(self, inner: Session, model: str, store: InputStore) -> None:
        super().__init__(inner.inputs, inner.outputs)
        self._inner, self._model, self._store = inner, model, store

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._store.add(self._model, inputs)
        return self._inner.run(inputs)

    def _close(self) -> None:
        self._inner.close()


def file_digest(path: Path) -> str:
    """The first 16 hex digits of a file's SHA-256: how the manifest names a calibration image."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def record_inputs(bundle, images: Sequence[Path], *, per_model: int = 64, seed: int = 0,
                  progress: Callable[[Iterable], Iterable] | None = None) -> InputStore:
    """Run the FP32 ``bundle``'s runtime on ``images`` and keep each model's inputs."""
    store = InputStore(per_model, seed)
    rng = np.random.default_rng(seed)
    models = BundleWatermarkModels(bundle)
    # the readout is read once when the models load: record that call as the runtime makes it
    store.add("wm_readout", {"bits": np.eye(models.readout.shape[0], dtype=np.float32)})
    for name, session in list(models._sessions.items()):
        models._sessions[name] = RecordingSession(session, name, store)
    target = float(bundle.manifest.payload.get("target_psnr_db", 42.5))
    watermarker = Watermarker(models, PayloadCodec(), target_psnr_db=target)
    checker = None
    if "tamper_detector" in bundle.manifest.models:
        checker = TamperChecker.from_bundle(bundle, watermarker=watermarker)
        checker.session = RecordingSession(checker.session, "tamper_detector", store)
    encoder = None
    if "fp_encoder" in bundle.manifest.models:
        encoder = FingerprintEncoder.from_bundle(bundle)
        encoder.session = RecordingSession(encoder.session, "fp_encoder", store)

    for path in (progress(images) if progress else images):
        try:
            image = read_image(path)
        except MedsecError as exc:
            log.warning("calibration image %s skipped: %s", file_digest(path), exc)
            continue
        _exercise(image, watermarker, checker, encoder, rng)
    return store


def _exercise(image: MedicalImage, watermarker, checker, encoder, rng) -> None:
    try:
        embedded = watermarker.embed(image, rng.bytes(8))
    except MedsecError as exc:  # too small to carry a mark: the other models still see it
        log.info("calibration image not marked: %s", exc)
        embedded = None
    if embedded is not None:
        marked = replace(image, pixels=embedded.pixels)
        watermarker.extract(marked)
        attack = CALIBRATION_ATTACKS[int(rng.integers(len(CALIBRATION_ATTACKS)))]
        watermarker.extract(attack_image(marked, attack, rng))
    watermarker.extract(image)
    if checker is not None:
        for frame in image.frames()[:2]:
            checker.blind(frame, image.meta)
    if encoder is not None:
        displays, _ = display_frames(image)
        for display in displays[:2]:
            encoder.codes(display, learned_cell_size_for(image.shape_hw))
