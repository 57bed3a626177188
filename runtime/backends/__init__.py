"""Inference backends, resolved by name when first used.

Layer: runtime (backends). The registry maps a name to ``module:Class``; nothing heavy is
imported until ``get_backend`` is called, and the backend modules themselves import their
libraries (onnxruntime, tensorrt, cuda-python) only inside functions. A backend that cannot run
here raises ``BackendUnavailableError`` naming the extra that brings it.
"""

from __future__ import annotations

import importlib

from medsec_edge.runtime.errors import BackendUnavailableError, UsageError
from medsec_edge.runtime.backends.base import Backend, Session, TensorSpec, check_inputs

__all__ = [
    "Backend",
    "Session",
    "TensorSpec",
    "available_backends",
    "check_inputs",
    "get_backend",
    "register_backend",
]

DEFAULT_BACKEND = "onnxruntime"

_REGISTRY: dict[str, str] = {
    "onnxruntime": "medsec_edge.runtime.backends.onnxruntime_backend:OnnxRuntimeBackend",
    "tensorrt": "medsec_edge.runtime.backends.tensorrt_backend:TensorRTBackend",
}


def register_backend(name: str, target: str) -> None:
    """Register a backend plugin as ``"package.module:ClassName"`` (imported when first used)."""
    if ":" not in target:
        raise UsageError(f"backend target must be 'module:Class', got {target!r}")
    _REGISTRY[name] = target


def backend_class(name: str) -> type[Backend]:
    """The backend class registered under ``name``, imported now."""
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise UsageError(
            f"unknown backend {name!r}: choose one of {', '.join(sorted(_REGISTRY))}"
        ) from None
    module_name, _, class_name = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, class_name)


def get_backend(name: str = DEFAULT_BACKEND, *, check: bool = True) -> Backend:
    """The backend called ``name``; with ``check`` it must be able to run here.

    Raises ``BackendUnavailableError`` with the probe's reason and the extra to install.
    """
    cls = backend_class(name)
    if check:
        reason = cls.probe()
        if reason is not None:
            fix = f": pip install 'medsec-edge[{cls.extra}]'" if cls.extra else ""
            raise BackendUnavailableError(f"backend {name!r} cannot run here: {reason}{fix}")
    return cls()


def available_backends() -> list[str]:
    """Names of the registered backends whose probe passes on this machine."""
    return [name for name in sorted(_REGISTRY) if backend_class(name).is_available()]
