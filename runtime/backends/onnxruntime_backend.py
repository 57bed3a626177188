"""ONNX Runtime backend: the default, runs everywhere (CPU), CUDA where ONNX Runtime has it.

Layer: runtime (backends). onnxruntime is imported inside functions only. ONNX Runtime silently
falls back to the CPU when a requested execution provider cannot be created, so after creating a
session we compare the providers it really got with the ones asked for and refuse a fallback
unless the caller allowed it.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medsec_edge.runtime.errors import BackendUnavailableError, BundleError, ConfigError, UsageError
from medsec_edge.runtime.backends.base import Backend, Session, TensorSpec

log = logging.getLogger(__name__)

THREADS_ENV = "MEDSEC_EDGE_THREADS"
CPU_PROVIDER = "CPUExecutionProvider"

# ONNX Runtime's type strings for the tensor element types we can hand over as numpy arrays.
_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(uint16)": "uint16",
    "tensor(int32)": "int32",
    "tensor(uint32)": "uint32",
    "tensor(int64)": "int64",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}


def default_threads() -> int:
    """Intra-op threads: ``MEDSEC_EDGE_THREADS`` if set, else every CPU this process sees."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if raw:
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{THREADS_ENV} must be a positive integer, found {raw!r}") from None
        if value < 1:
            raise ConfigError(f"{THREADS_ENV} must be a positive integer, found {raw!r}")
        return value
    return os.cpu_count() or 1


def _provider_name(provider: Any) -> str:
    # A provider is a name or a (name, options) pair, as InferenceSession accepts them.
    if isinstance(provider, str):
        return provider
    if isinstance(provider, (tuple, list)) and provider and isinstance(provider[0], str):
        return provider[0]
    raise UsageError(f"provider must be a name or (name, options), found {provider!r}")


def _spec(node: Any) -> TensorSpec:
    dtype = _ORT_DTYPES.get(node.type)
    if dtype is None:
        raise BundleError(f"tensor {node.name!r} has type {node.type}, which numpy cannot carry")
    shape = tuple(d if isinstance(d, int) else (d or None) for d in node.shape)
    return TensorSpec(node.name, dtype, shape)


class OnnxRuntimeSession(Session):
    """An ``onnxruntime.InferenceSession`` with checked inputs and the providers it really has."""

    backend_name = "onnxruntime"

    def __init__(self, session: Any, providers: list[str]) -> None:
        super().__init__(
            inputs=[_spec(node) for node in session.get_inputs()],
            outputs=[_spec(node) for node in session.get_outputs()],
        )
        self._session = session
        self.providers: list[str] = providers

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = self.output_names
        results = self._session.run(names, inputs)
        return dict(zip(names, results))

    def _close(self) -> None:
        self._session = None


class OnnxRuntimeBackend(Backend):
    """Loads ONNX models (fp32, fp16, int8 QDQ) into ONNX Runtime sessions."""

    name = "onnxruntime"
    extra = None  # onnxruntime is a core dependency

    @classmethod
    def probe(cls) -> str | None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            return f"onnxruntime cannot be imported ({exc}): pip install onnxruntime"
        if CPU_PROVIDER not in ort.get_available_providers():
            return f"onnxruntime {ort.__version__} has no {CPU_PROVIDER}"
        return None

    def load(
        self,
        artifact: Path | bytes,
        *,
        providers: Sequence[Any] | None = None,
        threads: int | None = None,
        allow_fallback: bool = False,
        **options: Any,
    ) -> OnnxRuntimeSession:
        """Create a session; refuse if a requested provider was dropped (unless ``allow_fallback``)."""
        if options:
            raise UsageError(f"onnxruntime backend does not take {sorted(options)}")
        import onnxruntime as ort

        requested = list(providers) if providers else [CPU_PROVIDER]
        requested_names = [_provider_name(p) for p in requested]
        if threads is None:
            threads = default_threads()
        if threads < 1:
            raise UsageError(f"threads must be at least 1, found {threads}")

        sess_options = ort.SessionOptions()
        sess_options.intra_op_num_threads = threads
        sess_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle worker threads would otherwise spin after each run and take the cores from the
        # numpy work between model calls (measured on 2 cores: embed 512x512 median 21 -> see
        # the benchmarks); set MEDSEC_EDGE_ORT_SPIN=1 to restore ONNX Runtime's default.
        if os.environ.get("MEDSEC_EDGE_ORT_SPIN", "") != "1":
            sess_options.add_session_config_entry("session.intra_op.allow_spinning", "0")

        source = str(artifact) if isinstance(artifact, (str, Path)) else bytes(artifact)
        try:
            with warnings.catch_warnings():
                # ORT warns about unavailable providers and goes on; we check that ourselves below.
                warnings.simplefilter("ignore", UserWarning)
                session = ort.InferenceSession(source, sess_options=sess_options, providers=requested)
        except Exception as exc:  # ORT raises its own pybind exception types
            what = f"file {artifact}" if isinstance(artifact, (str, Path)) else "model bytes"
            if isinstance(artifact, (str, Path)) and not Path(artifact).exists():
                raise UsageError(f"model file {artifact} does not exist") from exc
            raise BundleError(f"ONNX Runtime cannot load the {what}: {exc}") from exc

        got = list(session.get_providers())
        dropped = [name for name in requested_names if name not in got]
        if dropped:
            message = (
                f"requested execution providers {requested_names}, but ONNX Runtime "
                f"{ort.__version__} created the session with {got} (missing: {', '.join(dropped)}; "
                f"available here: {ort.get_available_providers()})"
            )
            if not allow_fallback:
                raise BackendUnavailableError(
                    message + ": install onnxruntime-gpu with a matching CUDA/cuDNN, "
                    "or pass allow_fallback=True to accept the fallback"
                )
            log.warning("%s; continuing because the fallback was allowed", message)
        log.debug("onnxruntime session with %s, %d intra-op threads", got, threads)
        return OnnxRuntimeSession(session, got)
