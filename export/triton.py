"""A Triton Inference Server model repository from a bundle, for serving many modalities from one
data-centre GPU (DESIGN.md, Scale): ``medsec-edge export triton BUNDLE --out REPO``.

Layer: export. The bundle is verified (signature and hashes) before a byte is copied; each model
becomes ``REPO/<name>/config.pbtxt`` + ``REPO/<name>/1/model.onnx`` (ONNX Runtime backend) or
``model.plan`` (TensorRT backend), with names, data types and dims from the signed manifest.

Triton batches requests only along a leading batch dim (``max_batch_size > 0``). Our image
models are exported with a fixed batch of 1, so each one is rewritten with a symbolic batch dim
and kept only if ONNX Runtime then gives for a batch of 2 what it gives for the two images one by
one; a model that mixes samples (a Reshape that hard-codes the batch, say) keeps
``max_batch_size: 0`` and the reason is written in its config and in ``REPO/README.md``.

Only the standard library, numpy and our errors are imported at the top: ``onnx`` and
``onnxruntime`` inside the functions that use them, and the bundle module (which needs
``cryptography``) inside ``export_triton``, so ``benchmarks/gpu_check.py`` can use the batching
helpers on a GPU machine that has only onnx and onnxruntime.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
from medsec_edge.runtime.errors import BundleError, UsageError

if TYPE_CHECKING:
    from medsec_edge.runtime.bundle import ModelEntry

log = logging.getLogger(__name__)

__all__ = [
    "BATCH_DIM",
    "MAX_BATCH",
    "BatchCheck",
    "TritonExport",
    "TritonModel",
    "check_batching",
    "config_text",
    "export_triton",
    "sample_inputs",
    "triton_name",
    "with_batch_dim",
]

MAX_BATCH = 8
BATCH_DIM = "batch"
QUEUE_DELAY_US = 100  # how long the dynamic batcher may hold a request to fill a batch
ONNX_PLATFORM = "onnxruntime_onnx"
TENSORRT_PLATFORM = "tensorrt_plan"

# Batched against one-by-one, relative to the largest output value. FP32 differs only by summation
# order; FP16 and INT8 QDQ round harder, and one flipped INT8 rounding is ~1/127 of the range.
BATCH_TOLERANCE = {"fp32": 1e-5, "fp16": 2e-3, "int8-qdq": 2e-2}
# Sides given to symbolic dims when making sample inputs, one per distinct dim name: unequal, so a
# graph that confuses height and width fails, and multiples of 16 (the encoders' stride).
_SAMPLE_SIDES = (64, 96, 80, 112, 48, 128)

_TRITON_TYPES = {
    "bool": "TYPE_BOOL",
    "uint8": "TYPE_UINT8",
    "uint16": "TYPE_UINT16",
    "uint32": "TYPE_UINT32",
    "uint64": "TYPE_UINT64",
    "int8": "TYPE_INT8",
    "int16": "TYPE_INT16",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "float16": "TYPE_FP16",
    "float32": "TYPE_FP32",
    "float64": "TYPE_FP64",
}


@dataclass(frozen=True)
class BatchCheck:
    """Whether a model may be served with a batch dim, and the evidence: the largest relative
    difference between a batch of 2 and the two samples run one by one, or why it was refused."""

    batchable: bool
    reason: str
    max_rel_error: float | None = None


@dataclass(frozen=True)
class TritonModel:
    """One model of the repository and how it is served."""

    name: str  # the Triton model name (directory)
    bundle_model: str  # the model's name in the bundle ("wm_decoder@int8-qdq")
    platform: str
    file: str  # relative to the repository
    precision: str
    max_batch_size: int
    batch: BatchCheck


@dataclass(frozen=True)
class TritonExport:
    """What ``export_triton`` wrote."""

    repository: Path
    bundle: str
    key_id: str
    models: tuple[TritonModel, ...]


def triton_name(model: str) -> str:
    """A bundle model name as a Triton model name: letters, digits and ``_`` only
    (``wm_decoder@int8-qdq`` -> ``wm_decoder_int8_qdq``)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", model)


def _is_symbolic(dim: Any) -> bool:
    return dim is None or isinstance(dim, str)


def _shape(spec: Any) -> tuple:
    return tuple(spec.shape)


def _leading_dim_is_batch(specs: Iterable[Any]) -> bool:
    """A leading dim can carry a batch if it is 1 (a fixed batch of one) or symbolic."""
    for spec in specs:
        shape = _shape(spec)
        if not shape or not (shape[0] == 1 or _is_symbolic(shape[0])):
            return False
    return True


def with_batch_dim(model_bytes: bytes, inputs: Sequence[Any], outputs: Sequence[Any]) -> bytes | None:
    """A copy of an ONNX model whose graph inputs and outputs lead with the symbolic dim ``batch``.

    ``inputs`` / ``outputs`` are the manifest's tensor specs (``name``, ``shape``); the other dims
    are written as the manifest declares them (ints fixed, names symbolic), so the ONNX file and a
    Triton config made from the same manifest agree. None where a leading dim cannot be a batch
    (a fixed size other than 1, or a scalar). Intermediate shape hints (``value_info``) are dropped:
    they were inferred for a batch of one. Whether the graph really batches is ``check_batching``'s
    question, not this function's.
    """
    import onnx

    if not (_leading_dim_is_batch(inputs) and _leading_dim_is_batch(outputs)):
        return None
    model = onnx.load_model_from_string(model_bytes)
    graph = model.graph
    declared = {spec.name: _shape(spec) for spec in (*inputs, *outputs)}
    initializers = {init.name for init in graph.initializer}
    for value in (*[v for v in graph.input if v.name not in initializers], *graph.output):
        shape = declared.get(value.name)
        if shape is None or not value.type.HasField("tensor_type"):
            return None
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(shape):
            return None
        for axis, (dim, want) in enumerate(zip(dims, shape)):
            dim.Clear()
            if axis == 0:
                dim.dim_param = BATCH_DIM
            elif isinstance(want, int):
                dim.dim_value = want
            elif want is not None:
                dim.dim_param = str(want)
    del graph.value_info[:]
    return model.SerializeToString()


def sample_inputs(inputs: Sequence[Any], batch: int, seed: int) -> dict[str, np.ndarray] | str:
    """Random inputs of the declared shapes with ``batch`` in front, or why none can be made."""
    rng = np.random.default_rng(seed)
    sides: dict[str, int] = {}
    arrays = {}
    for spec in inputs:
        dtype = np.dtype(spec.dtype)
        if dtype.kind != "f":
            return f"input {spec.name!r} is {dtype}, for which no sample inputs are made"
        shape = [batch]
        for dim in _shape(spec)[1:]:
            if isinstance(dim, int):
                shape.append(dim)
            else:
                key = str(dim)
                sides.setdefault(key, _SAMPLE_SIDES[len(sides) % len(_SAMPLE_SIDES)])
                shape.append(sides[key])
        arrays[spec.name] = rng.random(shape, dtype=np.float32).astype(dtype)
    return arrays


def _session(model_bytes: bytes, providers: Sequence[Any], threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # the rewritten graphs' shape notes are expected, not news
    return ort.InferenceSession(model_bytes, options, providers=list(providers))


def _relative_difference(got: np.ndarray, want: np.ndarray) -> float:
    got64, want64 = got.astype(np.float64), want.astype(np.float64)
    scale = max(float(np.max(np.abs(want64))) if want64.size else 0.0, 1e-12)
    return float(np.max(np.abs(got64 - want64))) / scale if want64.size else 0.0


def check_batching(
    model_bytes: bytes,
    batched_bytes: bytes,
    inputs: Sequence[Any],
    precision: str = "fp32",
    *,
    providers: Sequence[Any] = ("CPUExecutionProvider",),
    threads: int = 1,
    batch: int = 2,
    seed: int = 0,
) -> BatchCheck:
    """Run ``batched_bytes`` (from ``with_batch_dim``) on a batch of ``batch`` random samples and on
    each sample alone, and the original model on the first sample: batchable if every output
    agrees within ``BATCH_TOLERANCE[precision]`` of its largest value."""
    tolerance = BATCH_TOLERANCE.get(precision, BATCH_TOLERANCE["fp32"])
    samples = sample_inputs(inputs, batch, seed)
    if isinstance(samples, str):
        return BatchCheck(False, samples)
    try:
        batched = _session(batched_bytes, providers, threads)
        original = _session(model_bytes, providers, threads)
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own types; any is a refusal
        return BatchCheck(False, f"ONNX Runtime cannot load the batched graph: {_short(exc)}")
    names = [o.name for o in batched.get_outputs()]
    try:
        together = batched.run(names, samples)
        alone = [batched.run(names, {k: v[i : i + 1] for k, v in samples.items()}) for i in range(batch)]
        first = original.run(names, {k: v[:1] for k, v in samples.items()})
    except Exception as exc:  # noqa: BLE001
        return BatchCheck(False, f"a batch of {batch} fails in ONNX Runtime: {_short(exc)}")
    worst = 0.0
    for k, name in enumerate(names):
        stacked = np.concatenate([result[k] for result in alone])
        if together[k].shape != stacked.shape:
            return BatchCheck(
                False,
                f"output {name!r} of a batch of {batch} has shape {together[k].shape}, the samples "
                f"one by one give {stacked.shape}",
            )
        if first[k].shape != alone[0][k].shape:
            return BatchCheck(False, f"output {name!r}: the rewritten graph changed the shape of one sample")
        worst = max(worst, _relative_difference(together[k], stacked),
                    _relative_difference(alone[0][k], first[k]))
    if not np.isfinite(worst) or worst > tolerance:
        return BatchCheck(
            False,
            f"a batch of {batch} differs from the samples one by one by {worst:.2e} of the largest "
            f"output (tolerance {tolerance:.0e} for {precision}): the graph mixes samples",
            worst,
        )
    return BatchCheck(
        True, f"a batch of {batch} matches the samples one by one within {worst:.1e} (relative)", worst
    )


def _short(exc: BaseException, limit: int = 240) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _dims(shape: Sequence[Any]) -> str:
    return "[ " + ", ".join(str(d) if isinstance(d, int) else "-1" for d in shape) + " ]"


def _triton_type(dtype: str, where: str) -> str:
    try:
        return _TRITON_TYPES[str(np.dtype(dtype))]
    except (KeyError, TypeError):
        raise BundleError(f"{where} has dtype {dtype!r}, which Triton cannot carry") from None


def _pb_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_text(model: TritonModel, entry: "ModelEntry", header: Sequence[str] = ()) -> str:
    """The model's ``config.pbtxt`` (protobuf text format of Triton's ``ModelConfig``)."""
    batched = model.max_batch_size > 0
    lines = [f"# {line}" for line in header]
    lines.append(f"# batching: {model.batch.reason}")
    lines += [f"name: {_pb_string(model.name)}", f"platform: {_pb_string(model.platform)}",
              f"max_batch_size: {model.max_batch_size}"]
    for kind, specs in (("input", entry.inputs), ("output", entry.outputs)):
        lines.append(f"{kind} [")
        for i, spec in enumerate(specs):
            shape = _shape(spec)[1:] if batched else _shape(spec)
            lines += [
                "  {",
                f"    name: {_pb_string(spec.name)}",
                f"    data_type: {_triton_type(spec.dtype, f'model {entry.name!r} {kind} {spec.name!r}')}",
                f"    dims: {_dims(shape)}",
                "  }" + ("," if i < len(specs) - 1 else ""),
            ]
        lines.append("]")
    if batched:
        lines += ["dynamic_batching {", f"  max_queue_delay_microseconds: {QUEUE_DELAY_US}", "}"]
    return "\n".join(lines) + "\n"


def _plan_max_batch(manifest_export: Mapping[str, Any], entry: "ModelEntry", limit: int) -> tuple[int, BatchCheck]:
    """A TensorRT plan cannot be rewritten: it batches if the build gave every input a batch range."""
    specs = (*entry.inputs, *entry.outputs)
    if not all(_shape(s) and _is_symbolic(_shape(s)[0]) for s in specs):
        return 0, BatchCheck(False, "the engine was built with a fixed leading dim (no batch dim)")
    record = manifest_export.get("tensorrt", {}).get("models", {}).get(entry.name, {})
    profiles = record.get("profiles", {}) if isinstance(record, Mapping) else {}
    try:
        most = min(int(profiles[spec.name]["max"][0]) for spec in entry.inputs)
    except (KeyError, TypeError, ValueError, IndexError):
        return 0, BatchCheck(False, "the manifest does not record the engine's batch range (export.tensorrt)")
    size = min(limit, most)
    return size, BatchCheck(size > 0, f"the engine's optimization profile takes a batch of up to {most}")


def export_triton(
    bundle: Path | str,
    repository: Path | str,
    *,
    trusted_keys: Any = None,
    overwrite: bool = False,
    max_batch: int = MAX_BATCH,
    threads: int = 1,
) -> TritonExport:
    """Verify ``bundle`` and write a Triton model repository of all its models to ``repository``.

    The repository appears whole or not at all; an existing one is replaced only with
    ``overwrite``. Raises ``BundleError`` for a bundle that fails verification.
    """
    import onnx  # noqa: F401 - the 'export' extra; asked for here so a missing one fails before any work
    from medsec_edge.runtime.bundle import open_bundle

    if max_batch < 1:
        raise UsageError(f"max_batch must be at least 1, got {max_batch}")
    repository = Path(repository)
    if repository.exists() and not overwrite and (not repository.is_dir() or any(repository.iterdir())):
        raise UsageError(f"{repository} already exists and is not empty: choose another --out, or --overwrite")
    # Triton runs elsewhere: the signature and the hashes matter, this machine's GPU does not.
    opened = open_bundle(bundle, trusted_keys=trusted_keys, check_compatibility=False)
    manifest = opened.manifest
    names: dict[str, str] = {}
    for model_name in manifest.models:
        t_name = triton_name(model_name)
        if t_name in names:
            raise BundleError(
                f"models {names[t_name]!r} and {model_name!r} both become Triton model {t_name!r}: rename one"
            )
        names[t_name] = model_name

    repository.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{repository.name}.", dir=repository.parent))
    exported: list[TritonModel] = []
    try:
        for t_name, model_name in names.items():
            entry = manifest.models[model_name]
            data = opened.model_bytes(model_name)
            header = [
                f"medsec-edge export triton: bundle {manifest.name!r} (signed by {opened.key_id}), "
                f"model {model_name!r}",
                f"precision {entry.precision}, target {entry.target}, sha256 {entry.sha256[:16]}...",
            ]
            if entry.is_tensorrt:
                size, check = _plan_max_batch(manifest.export, entry, max_batch)
                model = TritonModel(t_name, model_name, TENSORRT_PLATFORM, f"{t_name}/1/model.plan",
                                    entry.precision, size, check)
                header.append(f"runs only where Triton's TensorRT and GPU match {entry.target}")
            else:
                batched = with_batch_dim(data, entry.inputs, entry.outputs)
                if batched is None:
                    check = BatchCheck(False, "a leading dim is fixed to a size other than 1: no batch dim")
                else:
                    check = check_batching(data, batched, entry.inputs, entry.precision, threads=threads)
                if check.batchable:
                    data = batched
                model = TritonModel(t_name, model_name, ONNX_PLATFORM, f"{t_name}/1/model.onnx",
                                    entry.precision, max_batch if check.batchable else 0, check)
            target = staging / model.file
            target.parent.mkdir(parents=True)
            target.write_bytes(data)
            (staging / t_name / "config.pbtxt").write_text(config_text(model, entry, header))
            log.info("triton model %s: max_batch_size %d (%s)", t_name, model.max_batch_size, check.reason)
            exported.append(model)
        result = TritonExport(repository, manifest.name, opened.key_id, tuple(exported))
        (staging / "README.md").write_text(_readme(result, Path(bundle)))
        staging.chmod(0o755)
        if repository.is_dir():
            shutil.rmtree(repository)
        elif repository.exists():
            repository.unlink()
        staging.rename(repository)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result


def _readme(result: TritonExport, bundle: Path) -> str:
    rows = [
        "| Triton model | bundle model | platform | precision | max_batch_size | batching |",
        "|---|---|---|---|---|---|",
    ]
    for m in result.models:
        rows.append(f"| `{m.name}` | `{m.bundle_model}` | {m.platform} | {m.precision} | "
                    f"{m.max_batch_size} | {m.batch.reason} |")
    batched = [m.name for m in result.models if m.max_batch_size > 0]
    unbatched = [m.name for m in result.models if m.max_batch_size == 0]
    return "\n".join([
        f"# Triton model repository of bundle `{result.bundle}`",
        "",
        f"Written by `medsec-edge export triton {bundle} --out {result.repository}` from the bundle "
        f"signed by key `{result.key_id}` (signature and every file's sha256 verified first). Serve "
        f"it with `tritonserver --model-repository {result.repository}`. Names, data types and dims "
        "come from the signed manifest; `-1` is a dim the model takes at any size. A model named "
        "`<model>_<precision>` is the bundle's `<model>@<precision>` variant.",
        "",
        *rows,
        "",
        "## Batching",
        "",
        "Our image models are exported with a fixed batch of 1. Each ONNX model here was rewritten "
        "with a symbolic leading `batch` dim and kept batched only where ONNX Runtime gave, for a "
        "batch of 2 random samples, what it gives for the samples one by one (the error above, "
        "relative to the largest output). Those models have a `max_batch_size` above 0 and "
        f"dynamic batching ({', '.join(batched) or 'none'}); the others take one "
        f"request at a time with their full shape ({', '.join(unbatched) or 'none'}), for the "
        "reason given. Triton batches only requests of the same shape: images of different sizes "
        "are run one by one even for a batched model.",
        "",
        "TensorRT plans (`tensorrt_plan`) run only where Triton's TensorRT version and the GPU "
        "match the plan's target; rebuild them there with `medsec-edge build` and export again.",
        "",
    ])
