"""`medsec-edge calibrate`: an FP32 bundle to a signed INT8 (QDQ) or FP16 bundle that passed the gate.

Layer: calibration. The steps, each in its own module:

1. the images are split by series (DICOM SeriesInstanceUID, else the folder): calibration and
   validation never share a volume (``--validation`` gives a separate set instead);
2. ``recording``: each model's inputs as the FP32 runtime feeds them on the calibration images;
3. ``variants``: each model's variant, layers that lose accuracy kept float (none for the two
   models that define the mark's tile and readout: ``MARK_DEFINING``);
4. ``gate``: the variant bundle against the FP32 one on the validation images; a failure writes
   nothing (exit 1);
5. latency of every model, FP32 beside its variant, on the recorded inputs (interleaved), and per
   target the variant to use: on ONNX Runtime (CPU) the faster of the two, because INT8 can be
   slower than FP32 on a CPU; for TensorRT the variant (the strongly typed build takes its
   precision from the ONNX);
6. the bundle: each plain model name is what ONNX Runtime should load, the other precision is
   kept as ``<model>@<precision>``; the manifest records the calibration set by file hashes (no
   patient data), the gate's figures, the choice and the command; signed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Sequence


from medsec_edge.calibration.gate import GateReport, run_gate
from medsec_edge.calibration.recording import file_digest, record_inputs
from medsec_edge.calibration.variants import DEFAULT_TARGET_DB, FP16, INT8, Variant, make_variant
from medsec_edge.runtime.bundle import (
    Bundle,
    default_requires,
    key_id,
    load_signing_key,
    open_bundle,
    write_bundle,
)
from medsec_edge.runtime.errors import MedsecError, UsageError

log = logging.getLogger(__name__)

PRECISIONS = {"int8": INT8, "fp16": FP16}
# A variant replaces FP32 on the CPU only when at least this much faster: the interleaved timing
# of the same two files differed by up to 6% between repeats here (the decoder, FP32 vs FP16).
FASTER_BY = 0.10
# Codes are compared across devices by the encoder's id (a SHA-256 of its bytes): a variant's
# records would be an encoder_mismatch against every FP32 one, so the encoder keeps its FP32 file
# on every target. Its variant is still made, gated and shipped as fp_encoder@<precision>.
KEEP_FP32 = {"fp_encoder": "fingerprints are compared across devices by encoder id (SHA-256 of the model "
                           "file); another file would make every record an encoder_mismatch"}
# The code-bits -> tile and readout models define the mark itself: every device must embed the tile
# every reader expects. They run once per image (or once per load) on 128 values, so lowering them
# saves nothing; lowered, they changed marks (INT8 wm_message on 24 validation images x 2 payloads:
# j2k20 lost 1 of 48 exact reads, crop70_jpeg75 gained 2). No variant is made.
MARK_DEFINING = {"wm_message": "defines the mark's tile; runs once per image on 128 values",
                 "wm_readout": "defines the readout patterns; runs once per bundle load"}
LATENCY_ROUNDS = 10


class GateFailed(MedsecError):
    """The variant missed a limit of the accuracy gate; nothing was written."""

    exit_code = 1

    def __init__(self, report: GateReport) -> None:
        self.report = report
        super().__init__("accuracy gate failed, no bundle written: " + "; ".join(report.failures))


@dataclass(frozen=True)
class CalibrationResult:
    out: Path
    precision: str
    gate: GateReport
    variants: dict[str, dict]
    latency_ms: dict[str, dict[str, float]]
    selection: dict[str, dict[str, dict[str, str]]]
    calibration_images: int
    validation_images: int
    seconds: float

    @property
    def manifest_precision(self) -> str:
        """The precision as the manifest spells it (``int8-qdq``, ``fp16``)."""
        return PRECISIONS[self.precision]

    def to_dict(self) -> dict:
        return {"out": str(self.out), "precision": self.precision, "gate": self.gate.to_dict(),
                "variants": self.variants, "latency_ms": self.latency_ms, "selection": self.selection,
                "calibration_images": self.calibration_images, "validation_images": self.validation_images,
                "seconds": round(self.seconds, 1)}


def image_files(paths: Iterable[Path]) -> list[Path]:
    """Every file under ``paths`` (files and folders, recursively, hidden ones skipped), sorted."""
    files: list[Path] = []
    for path in paths:
        path = Path(path)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += [p for p in sorted(path.rglob("*")) if p.is_file()
                      and not any(part.startswith(".") for part in p.relative_to(path).parts)]
        else:
            raise UsageError(f"{path} does not exist: --images takes image files and folders")
    return sorted(set(files))


def series_of(path: Path) -> str:
    """The split unit: a DICOM file's SeriesInstanceUID, else its folder."""
    try:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if uid:
            return "series:" + uid
    except Exception:  # not DICOM (or unreadable; read_image reports it later): group by folder
        pass
    return "folder:" + str(path.parent.resolve())


def split_by_series(files: Sequence[Path], validation_share: float = 0.5) -> tuple[list[Path], list[Path]]:
    """(calibration, validation): whole series to one side, by a hash of the series id."""
    groups: dict[str, list[Path]] = {}
    for f in files:
        groups.setdefault(series_of(f), []).append(f)
    if len(groups) < 2:
        raise UsageError(f"the images form {len(groups)} series: calibration and validation need different "
                         "series (volumes); give more, or a separate set with --validation")
    order = sorted(groups, key=lambda g: hashlib.sha256(g.encode()).hexdigest())
    n_val = min(len(order) - 1, max(1, round(validation_share * len(order))))
    validation = [f for g in order[:n_val] for f in groups[g]]
    calibration = [f for g in order[n_val:] for f in groups[g]]
    return sorted(calibration), sorted(validation)


def _time_models(paths: dict[str, Path], feeds: Sequence[dict], rounds: int = LATENCY_ROUNDS,
                 threads: int | None = None) -> dict[str, float]:
    """Median ms per call of each model file on ``feeds``, interleaved: every round runs each
    file once on each input in turn, so a busy moment of the machine costs every variant alike,
    and the order flips every round (the second run on an input finds it in cache: measured, a
    fixed order made the second file up to 13% faster on the decoder's largest inputs)."""
    from medsec_edge.runtime.backends import get_backend

    backend = get_backend("onnxruntime")
    sessions = {key: backend.load(path.read_bytes(), threads=threads) for key, path in paths.items()}
    times: dict[str, list[float]] = {key: [] for key in paths}
    try:
        for feed in feeds:  # warm-up: the first run of a session plans and allocates
            for session in sessions.values():
                session.run(feed)
        order = list(sessions.items())
        for round_ in range(rounds):
            for feed in feeds:
                for key, session in (order if round_ % 2 == 0 else order[::-1]):
                    t0 = time.perf_counter()
                    session.run(feed)
                    times[key].append((time.perf_counter() - t0) * 1000.0)
        return {key: statistics.median(values) for key, values in times.items()}
    finally:
        for session in sessions.values():
            session.close()


def _latency_feeds(feeds: Sequence[dict], n: int = 6) -> list[dict]:
    """The ``n`` largest recorded inputs: the sizes that decide a budget."""
    return sorted(feeds, key=lambda f: -sum(v.size for v in f.values()))[:n]


def _select(name: str, variant: Variant | None, latency: dict[str, float], precision: str) -> dict:
    if name in MARK_DEFINING:
        why = f"no variant: {MARK_DEFINING[name]}"
        return {"onnxruntime": {"use": "fp32", "why": why}, "tensorrt": {"use": "fp32", "why": why}}
    if variant is None:
        why = "no variant: every candidate layer lost accuracy, or the model has no layer to lower"
        return {"onnxruntime": {"use": "fp32", "why": why}, "tensorrt": {"use": "fp32", "why": why}}
    if name in KEEP_FP32:
        return {"onnxruntime": {"use": "fp32", "why": KEEP_FP32[name]},
                "tensorrt": {"use": "fp32", "why": KEEP_FP32[name]}}
    fp32, low = latency["fp32"], latency[precision]
    if low <= fp32 * (1.0 - FASTER_BY):
        cpu = {"use": precision, "why": f"{low:.2f} ms vs FP32 {fp32:.2f} ms on this CPU"}
    else:
        cpu = {"use": "fp32", "why": f"{precision} {low:.2f} ms is not faster than FP32 {fp32:.2f} ms on this CPU "
                                      f"(needs {FASTER_BY:.0%} faster)"}
    trt = {"use": precision, "why": "TensorRT builds from the explicit-precision ONNX (strongly typed)"}
    return {"onnxruntime": cpu, "tensorrt": trt}


def _signed_candidate(reference: Bundle, variants: dict[str, Variant], directory: Path, key) -> Bundle:
    """The reference with every variant in place of its model: what the gate measures."""
    data = json.loads(reference.manifest_bytes)
    files = {}
    for name, entry in reference.manifest.models.items():
        variant = variants.get(name)
        if variant is not None:
            data["models"][name]["file"] = f"{name}.{variant.precision}.onnx"
            data["models"][name]["precision"] = variant.precision
            files[name] = variant.path
        else:
            files[name] = directory.parent / "fp32" / entry.file
    write_bundle(directory, data, files, key)
    return open_bundle(directory, public_key=key.public_key())


def calibrate(bundle_path: Path, images: Sequence[Path], *, precision: str, out: Path, signing_key: Path,
              validation: Sequence[Path] | None = None, trusted_keys: Path | None = None,
              per_model: int = 64, trials: int = 2, seed: int = 12, target_db: float = DEFAULT_TARGET_DB,
              command: str = "", overwrite: bool = False, attacks: Sequence[str] | None = None,
              progress: Callable[[int, str], Callable[[], None]] | None = None) -> CalibrationResult:
    """Make, gate, time and write the ``precision`` ("int8" or "fp16") bundle of ``bundle_path``."""
    started = time.perf_counter()
    if precision not in PRECISIONS:
        raise UsageError(f"precision {precision!r}: choose int8 or fp16")
    wanted = PRECISIONS[precision]
    if out.exists() and not overwrite:
        raise UsageError(f"{out} exists: choose a new --out (a bundle is never overwritten in place)")
    key = load_signing_key(signing_key)
    reference = open_bundle(bundle_path, trusted_keys=trusted_keys)
    base = [n for n in reference.manifest.models if "@" not in n]
    for name in base:
        if reference.model(name).precision != "fp32" or reference.model(name).target != "onnxruntime":
            raise UsageError(f"model {name!r} is {reference.model(name).precision} for "
                             f"{reference.model(name).target}: calibrate starts from an FP32 ONNX bundle")
    files = image_files(images)
    if validation:
        calib_files, val_files = files, image_files(validation)
        overlap = {file_digest(p) for p in calib_files} & {file_digest(p) for p in val_files}
        if overlap:
            raise UsageError(f"{len(overlap)} file(s) are in both --images and --validation")
    else:
        calib_files, val_files = split_by_series(files)
    if not calib_files or not val_files:
        raise UsageError(f"calibration needs images on both sides: {len(calib_files)} for calibration, "
                         f"{len(val_files)} for validation")
    log.info("calibration: %d images, validation: %d images", len(calib_files), len(val_files))

    tick = progress(len(calib_files), "recording inputs") if progress else (lambda: None)
    store = record_inputs(reference, calib_files, per_model=per_model, seed=seed,
                          progress=lambda items: _ticking(items, tick))
    unfed = [n for n in base if not store.inputs.get(n)]
    if unfed:
        raise UsageError(f"no calibration image reached {', '.join(unfed)}: none of the {len(calib_files)} "
                         "files could be read as an image (see the warnings above)")

    with tempfile.TemporaryDirectory(prefix="medsec-calibrate-", dir=out.parent if out.parent.exists() else None) as tmp:
        work = Path(tmp)
        (work / "fp32").mkdir()
        for name in base:
            (work / "fp32" / reference.model(name).file).write_bytes(reference.model_bytes(name))
        variants: dict[str, Variant] = {}
        tick = progress(len(base), f"making {wanted} variants") if progress else (lambda: None)
        for name in base:
            if name in MARK_DEFINING:
                tick()
                continue
            v = make_variant(work / "fp32" / reference.model(name).file, work / "variants" / f"{name}.{wanted}.onnx",
                             wanted, store.inputs.get(name, []), target_db=target_db)
            if v is not None:
                variants[name] = v
            tick()
        if not variants:
            raise UsageError(f"no model of {reference.name!r} has a {wanted} variant that keeps its accuracy")
        candidate = _signed_candidate(reference, variants, work / "candidate", key)
        gate = run_gate(reference, candidate, val_files, trials=trials, seed=seed, attacks=attacks,
                        progress=progress)
        if not gate.passed:
            raise GateFailed(gate)

        latency: dict[str, dict[str, float]] = {}
        selection: dict[str, dict[str, dict[str, str]]] = {}
        for name in base:
            feeds = _latency_feeds(store.inputs.get(name, []))
            model_paths = {"fp32": work / "fp32" / reference.model(name).file}
            if name in variants:
                model_paths[wanted] = variants[name].path
            row = {k: round(v, 3) for k, v in _time_models(model_paths, feeds).items()}
            row["inputs"] = [list(next(iter(f.values())).shape) for f in feeds[:1]]
            latency[name] = row
            selection[name] = _select(name, variants.get(name), row, wanted)

        manifest, model_files = _final_manifest(reference, variants, selection, work, wanted)
        manifest["calibration"][precision] = {
            "command": command,
            "images": {"calibration": sorted(file_digest(p) for p in calib_files),
                       "validation": sorted(file_digest(p) for p in val_files),
                       "identified_by": "first 16 hex digits of each file's SHA-256",
                       "split": "--validation" if validation else "by series (SeriesInstanceUID, else folder), 50/50 by hash"},
            "recorded_inputs": {n: {"kept": len(v), "seen": store.seen.get(n, 0)} for n, v in store.inputs.items()},
            "method": ("onnxruntime.quantization.quantize_static, QDQ, int8 symmetric activations (moving-average "
                       "min/max), per-channel symmetric int8 weights, float biases" if wanted == INT8 else
                       "onnxruntime.transformers.float16.convert_float_to_float16, float inputs/outputs kept"),
            "target_output_sqnr_db": target_db,
            "variants": {n: v.to_dict() for n, v in variants.items()},
            "gate": gate.to_dict(),
            "latency_ms_cpu": latency,
            "selection": selection,
            "reference_bundle": reference.version_id,
        }
        manifest["name"] = f"{reference.name}-{precision}"
        manifest["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        manifest["requires"] = manifest.get("requires") or default_requires(int(reference.manifest.export.get("opset", 17)))
        write_bundle(out, manifest, model_files, key, overwrite=overwrite)
    log.info("wrote %s bundle %s signed by %s", precision, out, key_id(key))
    return CalibrationResult(out, precision, gate, {n: v.to_dict() for n, v in variants.items()}, latency,
                             selection, len(calib_files), len(val_files), time.perf_counter() - started)


def _final_manifest(reference: Bundle, variants: dict[str, Variant], selection, work: Path, wanted: str):
    data = json.loads(reference.manifest_bytes)
    models = {}
    files: dict[str, Path] = {}
    for name, entry in reference.manifest.models.items():
        fp32_entry = dict(data["models"][name])
        fp32_path = work / "fp32" / entry.file
        variant = variants.get(name)
        if variant is None:
            models[name], files[name] = fp32_entry, fp32_path
            continue
        low_entry = dict(fp32_entry, file=f"{name}.{wanted}.onnx", precision=wanted)
        if selection[name]["onnxruntime"]["use"] == wanted:
            models[name], files[name] = low_entry, variant.path
            models[f"{name}@fp32"], files[f"{name}@fp32"] = fp32_entry, fp32_path
        else:
            models[name], files[name] = fp32_entry, fp32_path
            models[f"{name}@{wanted}"], files[f"{name}@{wanted}"] = low_entry, variant.path
    data["models"] = models
    data.setdefault("calibration", {})
    for stale in ("key_id", "version"):
        data.pop(stale, None)
    return data, files


def _ticking(items, tick):
    for item in items:
        yield item
        tick()
