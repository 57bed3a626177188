"""TensorRT engines for a bundle, built on the device that will run them: ``medsec-edge build``.

Layer: export. An engine is tied to the TensorRT version and GPU it was built on, so it is built
there, from the bundle's best ONNX source for TensorRT: the INT8 QDQ variant if the bundle has one,
else FP16, else FP32 (DESIGN.md, Backends: quantization is explicit, the path TensorRT 10 prefers
and 11 requires). The network is created strongly typed, so the precision is the ONNX file's own
and no builder precision flag is set. Each dynamic input gets one optimization profile: images
from the readers' smallest side to the largest size the bundle budgets for (opt at the smallest
budgeted size), batch dims 1..8.

The built bundle names each engine by the plain model name (what the runtime loads), with target
``tensorrt-<major.minor>-sm_<NN>``; the ONNX files stay beside it as ``<model>@<precision>``
entries; ``export.tensorrt`` records the versions, the command, and per model its source, build
time, profile and parity against ONNX Runtime. The result is signed with ``write_bundle``.

``tensorrt`` and ``cuda-python`` are imported inside functions, through the runtime backend's
probe: without them this module imports and ``build_bundle`` raises ``BackendUnavailableError``
naming the extra.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from medsec_edge.runtime.bundle import (
    Manifest,
    ModelEntry,
    load_signing_key,
    open_bundle,
    split_variant,
    write_bundle,
)
from medsec_edge.runtime.errors import BackendUnavailableError, BundleError, UsageError
from medsec_edge.runtime.io.readers import MIN_SIDE

log = logging.getLogger(__name__)

__all__ = [
    "BATCH_RANGE",
    "PREFERENCE",
    "BuiltModel",
    "base_name",
    "build_bundle",
    "build_engine",
    "built_manifest",
    "engine_target",
    "profile_shapes",
    "profile_sides",
    "select_sources",
]

EXTRA = "tensorrt"
PREFERENCE = ("int8-qdq", "fp16", "fp32")  # the best TensorRT source first
BATCH_RANGE = (1, 1, 8)  # min, opt, max of a symbolic leading dim: the device runs one at a time
DEFAULT_SIDES = (MIN_SIDE, 512, 2048)  # where the manifest budgets no sizes
PLAN_SUFFIX = ".plan"

Shape = tuple[int, ...]
Profiles = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


def base_name(model: str) -> str:
    """``wm_decoder@int8-qdq`` -> ``wm_decoder``: the name the runtime loads."""
    return split_variant(model)[0]


def select_sources(manifest: Manifest, models: Iterable[str] | None = None) -> dict[str, ModelEntry]:
    """For each base model (all, or ``models``), the ONNX entry to build from, by ``PREFERENCE``.

    A variant ``<model>@<precision>`` must declare that precision; at equal precision the plain
    entry wins over its ``@`` twin. Where ``medsec-edge calibrate`` chose a precision for TensorRT
    (``calibration.<precision>.selection.<model>.tensorrt.use``), that choice wins: the
    fingerprint encoder, for one, stays FP32 so its codes keep one encoder id everywhere.
    """
    bases = sorted({base_name(name) for name in manifest.models})
    wanted = bases if models is None else list(dict.fromkeys(models))
    unknown = [m for m in wanted if m not in bases]
    if unknown:
        raise UsageError(f"bundle {manifest.name!r} has no model {', '.join(unknown)}: it has {', '.join(bases)}")
    sources: dict[str, ModelEntry] = {}
    for base in wanted:
        by_precision: dict[str, ModelEntry] = {}
        for name, entry in manifest.models.items():
            if base_name(name) != base or entry.is_tensorrt:
                continue
            suffix = split_variant(name)[1]
            if suffix and suffix != entry.precision:
                raise BundleError(f"model {name!r} is named for {suffix} but declares precision {entry.precision}")
            if entry.precision not in by_precision or name == base:
                by_precision[entry.precision] = entry
        chosen = _calibrated_choice(manifest, base)
        for precision in ([chosen] if chosen in by_precision else []) + list(PREFERENCE):
            if precision in by_precision:
                sources[base] = by_precision[precision]
                break
        else:
            raise BundleError(f"model {base!r} has no ONNX file to build an engine from (only TensorRT plans)")
    return sources


def _calibrated_choice(manifest: Manifest, base: str) -> str | None:
    for section in manifest.calibration.values():
        if isinstance(section, dict):
            use = section.get("selection", {}).get(base, {}).get("tensorrt", {}).get("use")
            if isinstance(use, str):
                return use
    return None


def profile_sides(manifest: Manifest) -> tuple[int, int, int]:
    """(min, opt, max) image side: from the readers' smallest image to the sizes the bundle budgets
    (``budgets_ms`` keys such as ``embed_512``, ``extract_2048``), opt at the smallest budgeted."""
    sizes = sorted({int(m.group(1)) for key in manifest.budgets_ms if (m := re.search(r"_(\d+)$", str(key)))})
    if not sizes:
        return DEFAULT_SIDES
    return (min(MIN_SIDE, sizes[0]), sizes[0], sizes[-1])


def profile_shapes(entry: ModelEntry, sides: tuple[int, int, int], batch: tuple[int, int, int] = BATCH_RANGE) -> Profiles:
    """min/opt/max shape of every input: fixed dims as declared, a symbolic leading dim over
    ``batch``, other symbolic dims (image sides) over ``sides``."""
    profiles: Profiles = {}
    for spec in entry.inputs:
        shapes: tuple[list[int], list[int], list[int]] = ([], [], [])
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int) and dim >= 0:
                values: tuple[int, ...] = (dim, dim, dim)
            else:
                values = batch if axis == 0 else sides
            for shape, value in zip(shapes, values):
                shape.append(int(value))
        profiles[spec.name] = (tuple(shapes[0]), tuple(shapes[1]), tuple(shapes[2]))
    return profiles


def engine_target(tensorrt_version: str, compute_capability: str) -> str:
    """The manifest target of an engine: ``tensorrt-10.8-sm_87`` (major.minor of TensorRT)."""
    return f"tensorrt-{'.'.join(tensorrt_version.split('.')[:2])}-{compute_capability}"


class _TimingCache:
    """One TensorRT timing cache shared by every build of a run, loaded from and saved to ``path``."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.cache: Any = None

    def attach(self, config: Any) -> None:
        if self.cache is None:
            data = self.path.read_bytes() if self.path is not None and self.path.is_file() else b""
            cache = config.create_timing_cache(data)
            if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
                # A cache from another GPU or TensorRT version is refused, not mixed in.
                log.warning("timing cache %s does not fit this TensorRT / GPU: starting an empty one", self.path)
                cache = config.create_timing_cache(b"")
                config.set_timing_cache(cache, ignore_mismatch=False)
            self.cache = cache
        elif not config.set_timing_cache(self.cache, ignore_mismatch=False):
            raise BundleError("TensorRT refused this run's own timing cache")

    def save(self) -> None:
        if self.path is None or self.cache is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_bytes(bytes(memoryview(self.cache.serialize())))
        partial.replace(self.path)


def build_engine(onnx_bytes: bytes, profiles: Profiles, *, timing_cache: Any = None,
                 workspace_bytes: int | None = None) -> bytes:
    """A serialized TensorRT engine (plan) from ONNX bytes, strongly typed, with one profile.

    ``timing_cache`` is a ``_TimingCache`` (or None for TensorRT's own per-build cache).
    Raises ``BundleError`` with the parser's or builder's messages when TensorRT cannot build.
    """
    import tensorrt as trt
    from medsec_edge.runtime.backends.tensorrt_backend import _make_logger

    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BundleError(f"TensorRT {trt.__version__} cannot parse the ONNX model: {errors or 'no message'}")
    config = builder.create_builder_config()
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    profile = builder.create_optimization_profile()
    for index in range(network.num_inputs):
        name = network.get_input(index).name
        if name not in profiles:
            raise BundleError(f"the ONNX model has input {name!r}, which the manifest does not declare")
        low, opt, high = profiles[name]
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    if timing_cache is not None:
        timing_cache.attach(config)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        errors = "; ".join(logger.errors[-3:]) or "no message from TensorRT"
        raise BundleError(f"TensorRT {trt.__version__} could not build the engine: {errors}")
    return bytes(memoryview(plan))


@dataclass(frozen=True)
class BuiltModel:
    """One engine built by ``build_bundle`` and what is recorded about it."""

    name: str  # base model name: the plan's entry
    source: ModelEntry  # the ONNX entry it was built from
    plan: Path
    sha256: str
    build_s: float
    profiles: Profiles
    parity: dict

    def record(self) -> dict[str, Any]:
        return {
            "source": self.source.name,
            "precision": self.source.precision,
            "build_s": round(self.build_s, 2),
            "plan_bytes": self.plan.stat().st_size,
            "profiles": {name: {"min": list(lo), "opt": list(opt), "max": list(hi)}
                         for name, (lo, opt, hi) in self.profiles.items()},
            "parity": self.parity,
        }


def built_manifest(manifest: Manifest, built: Mapping[str, BuiltModel], target: str,
                   record: Mapping[str, Any]) -> Manifest:
    """The manifest of the built bundle: each built model's plain name becomes its plan (same tensors
    and normalisation), its former plain ONNX entry becomes ``<model>@<precision>`` (unless that
    variant is already there), an earlier plan of it is dropped, everything else is kept;
    ``export.tensorrt`` is ``record`` with the build records of untouched earlier plans kept."""
    models: dict[str, ModelEntry] = {}
    for name, entry in manifest.models.items():
        if name in built:
            if not entry.is_tensorrt:
                variant = f"{name}@{entry.precision}"
                if variant not in manifest.models:
                    models[variant] = replace(entry, name=variant)
            continue
        models[name] = entry
    for name, model in built.items():
        plain = manifest.models.get(name, model.source)
        models[name] = ModelEntry(
            name=name, file=model.plan.name, sha256=model.sha256, precision=model.source.precision,
            target=target, inputs=plain.inputs, outputs=plain.outputs, normalisation=dict(plain.normalisation),
        )
    earlier = manifest.export.get("tensorrt", {}).get("models", {})
    kept = {name: rec for name, rec in earlier.items()
            if name not in built and name in models and models[name].is_tensorrt}
    tensorrt = {**record, "models": {**kept, **{name: m.record() for name, m in built.items()}}}
    return replace(
        manifest,
        models=dict(sorted(models.items())),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        export={**manifest.export, "tensorrt": tensorrt},
    )


def _reference(manifest: Manifest, base: str) -> ModelEntry | None:
    """The FP32 ONNX entry of a base model, what parity is measured against."""
    for name in (base, f"{base}@fp32"):
        entry = manifest.models.get(name)
        if entry is not None and not entry.is_tensorrt and entry.precision == "fp32":
            return entry
    return None


def _finite(value: float) -> float | str:
    return float(value) if np.isfinite(value) else str(value)


def _parity(plan: bytes, target: str, reference: bytes | None, reference_name: str | None,
            entry: ModelEntry) -> dict[str, Any]:
    """Run the engine through the runtime's TensorRT backend and the FP32 ONNX through ONNX Runtime
    (CPU) on the same random inputs; the largest absolute and relative differences."""
    import onnxruntime as ort
    from medsec_edge.export.triton import sample_inputs
    from medsec_edge.runtime.backends.tensorrt_backend import TensorRTBackend

    samples = sample_inputs(entry.inputs, batch=1, seed=0)
    if isinstance(samples, str) or reference is None:
        return {"checked": False, "reason": samples if isinstance(samples, str) else "no FP32 ONNX to compare with"}
    with TensorRTBackend().load(plan, target=target) as session:
        got = session.run(samples)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(reference, options, providers=["CPUExecutionProvider"])
    want = dict(zip([o.name for o in session.get_outputs()], session.run(None, samples)))
    worst_abs = worst_rel = 0.0
    for name, value in want.items():
        diff = float(np.max(np.abs(got[name].astype(np.float64) - value.astype(np.float64))))
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / max(float(np.max(np.abs(value))), 1e-12))
    shape = {name: list(array.shape) for name, array in samples.items()}
    return {"checked": True, "reference": reference_name, "inputs": shape,
            "max_abs": _finite(worst_abs), "max_rel": _finite(worst_rel)}


def _device_record() -> dict[str, Any]:
    """TensorRT, CUDA runtime and driver versions and the GPU, for ``export.tensorrt``."""
    import tensorrt as trt
    from medsec_edge.runtime.backends.tensorrt_backend import (
        _cuda_check,
        _import_cudart,
        probe_device,
    )

    device = probe_device()
    if device is None:
        raise BackendUnavailableError("the TensorRT device probe failed after TensorRT was found")
    cudart = _import_cudart()

    def version(number: int) -> str:
        return f"{number // 1000}.{(number % 1000) // 10}"

    return {
        "tensorrt": trt.__version__,
        "cuda_runtime": version(int(_cuda_check(cudart.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion"))),
        "cuda_driver": version(int(_cuda_check(cudart.cudaDriverGetVersion(), "cudaDriverGetVersion"))),
        "device": device.device_name,
        "compute_capability": device.compute_capability,
        "target": engine_target(device.tensorrt_version, device.compute_capability),
    }


def require_tensorrt() -> None:
    """Raise ``BackendUnavailableError`` (exit 3) naming the extra where TensorRT cannot build here."""
    from medsec_edge.runtime.backends.tensorrt_backend import TensorRTBackend

    reason = TensorRTBackend.probe()
    if reason is not None:
        raise BackendUnavailableError(
            f"'medsec-edge build' needs TensorRT and a CUDA GPU, and cannot build here: {reason}: "
            f"pip install 'medsec-edge[{EXTRA}]' on the device that will run the engines"
        )


def build_bundle(
    bundle: Path | str,
    out: Path | str,
    *,
    signing_key: Path | str,
    timing_cache: Path | str | None = None,
    models: Iterable[str] | None = None,
    trusted_keys: Any = None,
    command: str | None = None,
    overwrite: bool = False,
) -> tuple[Path, dict[str, BuiltModel]]:
    """Build TensorRT engines for ``bundle``'s models (all, or the base names in ``models``) on this
    GPU and write the signed bundle ``out``. Returns its path and what was built.

    Checked in this order, before any build: TensorRT and a GPU are here, the signing key loads,
    the source bundle verifies (signature and hashes), every model has an ONNX source.
    """
    require_tensorrt()
    out = Path(out)
    if out.exists() and not overwrite:
        raise UsageError(f"{out} already exists: choose another --out")
    key = load_signing_key(signing_key)
    source = open_bundle(bundle, trusted_keys=trusted_keys, check_compatibility=False)
    manifest = source.manifest
    sources = select_sources(manifest, models)
    sides = profile_sides(manifest)
    device = _device_record()
    target = device["target"]
    cache = _TimingCache(Path(timing_cache).expanduser() if timing_cache is not None else None)
    log.info("building %d engines for %s on %s", len(sources), target, device["device"])

    with tempfile.TemporaryDirectory(prefix="medsec-build-") as tmp:
        work = Path(tmp)
        built: dict[str, BuiltModel] = {}
        for base, entry in sources.items():
            profiles = profile_shapes(manifest.models.get(base, entry), sides)
            started = time.perf_counter()
            plan = build_engine(source.model_bytes(entry.name), profiles, timing_cache=cache)
            seconds = time.perf_counter() - started
            path = work / "plans" / f"{base}{PLAN_SUFFIX}"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(plan)
            reference = _reference(manifest, base)
            parity = _parity(plan, target, source.model_bytes(reference.name) if reference else None,
                             reference.name if reference else None, manifest.models.get(base, entry))
            built[base] = BuiltModel(base, entry, path, hashlib.sha256(plan).hexdigest(), seconds, profiles, parity)
            log.info("built %s from %s in %.1f s (parity %s)", base, entry.name, seconds, parity)
        cache.save()

        record = {
            **device,
            "command": command or f"build_bundle({str(bundle)!r}, {str(out)!r})",
            "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "timing_cache": str(cache.path) if cache.path is not None else None,
            "profile_sides": list(sides),
            "batch_range": list(BATCH_RANGE),
        }
        new_manifest = built_manifest(manifest, built, target, record)
        files: dict[str, Path] = {}
        for name, entry in new_manifest.models.items():
            if name in built:
                files[name] = built[name].plan
                continue
            original = name if name in manifest.models else base_name(name)
            path = work / "models" / entry.file
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(source.model_bytes(original))
            files[name] = path
        written = write_bundle(out, new_manifest, files, key, overwrite=overwrite)
    return written, built
