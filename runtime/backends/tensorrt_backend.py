"""TensorRT backend: runs serialized TensorRT 10 engines on an NVIDIA GPU.

Layer: runtime (backends). ``tensorrt`` and NVIDIA's ``cuda-python`` bindings are imported inside
functions only; on machines without them this module still imports, and ``probe()`` says why the
backend cannot run. Engines are tied to the TensorRT version and GPU compute capability they were
built for, so a manifest target (``tensorrt-10.8-sm_87``) is checked against this device before a
byte of the engine is deserialized. Tensors are bound by name (``set_tensor_address``) and run
with ``execute_async_v3`` on a stream this session owns, as in TensorRT 10's documented API.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medsec_edge.runtime.errors import BackendUnavailableError, BundleError, MedsecError, UsageError
from medsec_edge.runtime.backends.base import Backend, Session, TensorSpec

log = logging.getLogger(__name__)

EXTRA = "tensorrt"
REBUILD_HINT = "rebuild with 'medsec-edge build'"
_TARGET_RE = re.compile(
    r"^tensorrt(?:-(?P<version>\d+(?:\.\d+){0,3}))?(?:-(?P<sm>sm_?\d+))?$", re.IGNORECASE
)


@dataclass(frozen=True)
class EngineTarget:
    """What an engine was built for, as a manifest target names it: ``tensorrt-10.8-sm_87``.

    Either part may be absent (``tensorrt``, ``tensorrt-10.8``), in which case it is not checked.
    """

    tensorrt_version: str | None = None
    compute_capability: str | None = None  # "sm_87"

    @classmethod
    def parse(cls, target: str) -> "EngineTarget":
        match = _TARGET_RE.match(target.strip())
        if match is None:
            raise BundleError(
                f"TensorRT target {target!r} is malformed: expected 'tensorrt-<version>-sm_<NN>', "
                "e.g. 'tensorrt-10.8-sm_87'"
            )
        sm = match.group("sm")
        if sm is not None:
            sm = "sm_" + sm.lower().removeprefix("sm").lstrip("_")
        return cls(tensorrt_version=match.group("version"), compute_capability=sm)

    def __str__(self) -> str:
        parts = ["tensorrt", self.tensorrt_version, self.compute_capability]
        return "-".join(p for p in parts if p)


@dataclass(frozen=True)
class DeviceInfo:
    """The TensorRT version and compute capability of the GPU this process would run on."""

    tensorrt_version: str
    compute_capability: str  # "sm_90"
    device_name: str = ""


def is_tensorrt_target(target: str) -> bool:
    return target.strip().lower().startswith("tensorrt")


def _version_matches(wanted: str, have: str) -> bool:
    # Compare as many components as the target names: "10.8" accepts 10.8.x, "10.8.0" only 10.8.0.
    wanted_parts = wanted.split(".")
    have_parts = have.split(".")[: len(wanted_parts)]
    return wanted_parts == have_parts


def target_problem(target: EngineTarget, device: DeviceInfo) -> str | None:
    """None if an engine built for ``target`` can run on ``device``, else the precise reason."""
    version_ok = target.tensorrt_version is None or _version_matches(
        target.tensorrt_version, device.tensorrt_version
    )
    sm_ok = target.compute_capability is None or target.compute_capability == device.compute_capability
    if version_ok and sm_ok:
        return None
    built = f"{target.tensorrt_version or 'any'} / {target.compute_capability or 'any'}"
    have_version = ".".join(device.tensorrt_version.split(".")[:2])
    return (
        f"engine built for TensorRT {built}, this device has {have_version} / "
        f"{device.compute_capability}: {REBUILD_HINT}"
    )


def _import_cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python layout
    return cudart


def _cuda_check(result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(err, *values)`` tuple, raising on a CUDA error."""
    cudart = _import_cudart()
    if isinstance(result, tuple):
        err, values = result[0], result[1:]
    else:
        err, values = result, ()
    if err != cudart.cudaError_t.cudaSuccess:
        name = getattr(err, "name", str(err))
        raise MedsecError(f"CUDA call {what} failed: {name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


@functools.lru_cache(maxsize=1)
def _probe() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return f"tensorrt cannot be imported ({exc})"
    try:
        cudart = _import_cudart()
    except ImportError as exc:
        return f"cuda-python cannot be imported ({exc})"
    try:
        err, count = cudart.cudaGetDeviceCount()
    except Exception as exc:  # a broken driver install raises from inside the bindings
        return f"cudaGetDeviceCount failed: {exc}"
    if err != cudart.cudaError_t.cudaSuccess:
        return f"no usable CUDA device (cudaGetDeviceCount: {getattr(err, 'name', err)})"
    if count < 1:
        return "no CUDA device found"
    return None


def probe_device() -> DeviceInfo | None:
    """TensorRT version and compute capability here, or None where TensorRT cannot run."""
    if _probe() is not None:
        return None
    import tensorrt as trt

    cudart = _import_cudart()
    device = _cuda_check(cudart.cudaGetDevice(), "cudaGetDevice")
    props = _cuda_check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return DeviceInfo(
        tensorrt_version=trt.__version__,
        compute_capability=f"sm_{props.major}{props.minor}",
        device_name=name.rstrip("\x00"),
    )


def _make_logger(trt: Any) -> Any:
    """A TensorRT logger that forwards to ``logging`` and keeps the last errors for messages."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return _Logger()


def _np_dtype(trt: Any, dtype: Any) -> str:
    try:
        return str(np.dtype(trt.nptype(dtype)))
    except TypeError:
        raise BundleError(f"engine uses tensor type {dtype}, which numpy cannot carry") from None


class TensorRTSession(Session):
    """A deserialized engine, its execution context, a CUDA stream and the device buffers."""

    backend_name = "tensorrt"

    def __init__(self, runtime: Any, engine: Any, context: Any, logger: Any) -> None:
        import tensorrt as trt

        inputs: list[TensorSpec] = []
        outputs: list[TensorSpec] = []
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            shape = tuple(d if d >= 0 else None for d in engine.get_tensor_shape(name))
            spec = TensorSpec(name, _np_dtype(trt, engine.get_tensor_dtype(name)), shape)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                inputs.append(spec)
            else:
                outputs.append(spec)
        super().__init__(inputs, outputs)
        self._runtime = runtime
        self._engine = engine
        self._context = context
        self._logger = logger
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, capacity bytes)
        self._stream: Any = None
        cudart = _import_cudart()
        self._stream = _cuda_check(cudart.cudaStreamCreate(), "cudaStreamCreate")

    def _device_buffer(self, name: str, nbytes: int) -> int:
        cudart = _import_cudart()
        pointer, capacity = self._buffers.get(name, (0, 0))
        if capacity < nbytes or pointer == 0:
            if pointer:
                _cuda_check(cudart.cudaFree(pointer), "cudaFree")
                del self._buffers[name]
            capacity = max(nbytes, 1)
            pointer = int(_cuda_check(cudart.cudaMalloc(capacity), "cudaMalloc"))
            self._buffers[name] = (pointer, capacity)
        return pointer

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart = _import_cudart()
        context = self._context
        to_device = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        to_host = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        staged: list[np.ndarray] = []  # host arrays must outlive the async copies
        for spec in self.inputs:
            array = np.ascontiguousarray(inputs[spec.name])
            staged.append(array)
            if not context.set_input_shape(spec.name, tuple(array.shape)):
                raise UsageError(
                    f"input {spec.name!r}: shape {tuple(array.shape)} is outside the engine's "
                    f"optimization profile (declared {spec.shape})"
                )
            pointer = self._device_buffer(spec.name, array.nbytes)
            _cuda_check(
                cudart.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes, to_device, self._stream),
                "cudaMemcpyAsync",
            )
            context.set_tensor_address(spec.name, pointer)
        results: dict[str, np.ndarray] = {}
        for spec in self.outputs:
            shape = tuple(context.get_tensor_shape(spec.name))
            if any(d < 0 for d in shape):
                raise UsageError(
                    f"output {spec.name!r} has a data-dependent shape {shape}, which this backend "
                    "does not support"
                )
            host = np.empty(shape, dtype=spec.dtype)
            results[spec.name] = host
            context.set_tensor_address(spec.name, self._device_buffer(spec.name, host.nbytes))
        if not context.execute_async_v3(self._stream):
            errors = "; ".join(self._logger.errors[-3:]) or "no message from TensorRT"
            raise MedsecError(f"TensorRT execution failed: {errors}")
        for spec in self.outputs:
            host = results[spec.name]
            pointer, _ = self._buffers[spec.name]
            _cuda_check(
                cudart.cudaMemcpyAsync(host.ctypes.data, pointer, host.nbytes, to_host, self._stream),
                "cudaMemcpyAsync",
            )
        _cuda_check(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        del staged
        return results

    def _close(self) -> None:
        cudart = _import_cudart()
        try:
            if self._stream is not None:
                cudart.cudaStreamSynchronize(self._stream)
            for pointer, _ in self._buffers.values():
                cudart.cudaFree(pointer)
            self._buffers.clear()
            if self._stream is not None:
                cudart.cudaStreamDestroy(self._stream)
                self._stream = None
        finally:
            # Context before engine before runtime: each depends on the next.
            self._context = None
            self._engine = None
            self._runtime = None


class TensorRTBackend(Backend):
    """Deserializes TensorRT engines built by ``medsec-edge build`` on (or for) this device."""

    name = "tensorrt"
    extra = EXTRA

    @classmethod
    def probe(cls) -> str | None:
        return _probe()

    def load(
        self,
        artifact: Path | bytes,
        *,
        providers: Sequence[Any] | None = None,
        threads: int | None = None,
        target: str | None = None,
        **options: Any,
    ) -> TensorRTSession:
        """Deserialize an engine; ``target`` (manifest form) is checked against this device first.

        ``providers`` and ``threads`` are accepted for interface compatibility and ignored.
        """
        if options:
            raise UsageError(f"tensorrt backend does not take {sorted(options)}")
        reason = _probe()
        if reason is not None:
            raise BackendUnavailableError(
                f"backend 'tensorrt' cannot run here: {reason}: pip install 'medsec-edge[{EXTRA}]'"
            )
        if target is not None:
            device = probe_device()
            problem = (
                target_problem(EngineTarget.parse(target), device)
                if device is not None
                else "TensorRT device probe failed"
            )
            if problem is not None:
                raise BundleError(problem)

        import tensorrt as trt

        data = Path(artifact).read_bytes() if isinstance(artifact, (str, Path)) else bytes(artifact)
        logger = _make_logger(trt)
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(data)
        if engine is None:
            errors = "; ".join(logger.errors[-3:]) or "no message from TensorRT"
            raise BundleError(
                f"TensorRT {trt.__version__} cannot deserialize the engine ({errors}): "
                f"it was probably built for another TensorRT version or GPU: {REBUILD_HINT}"
            )
        context = engine.create_execution_context()
        if context is None:
            raise BackendUnavailableError(
                "TensorRT could not create an execution context (out of GPU memory?)"
            )
        return TensorRTSession(runtime, engine, context, logger)
