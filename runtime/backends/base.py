"""The loader / runner split every inference backend follows.

Layer: runtime (backends). A ``Backend`` knows whether it can run here (by a real probe) and loads
an artifact; a ``Session`` owns the loaded thing, is a context manager, and has one public
``run(inputs) -> outputs`` that checks the inputs against the model's declared tensors before the
backend-specific ``_run`` does the work. Only numpy is imported here: the heavy libraries are
imported by the concrete backends, inside the functions that need them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from medsec_edge.runtime.errors import UsageError


Dim = int | str | None


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor: numpy dtype name (``float32``) and shape (strings or None: dynamic dims)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))
        object.__setattr__(self, "dtype", str(np.dtype(self.dtype)))

    @property
    def rank(self) -> int:
        return len(self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TensorSpec":
        return cls(name=str(data["name"]), dtype=str(data["dtype"]), shape=tuple(data["shape"]))


def _shape_text(shape: Sequence[Dim]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def check_inputs(declared: Sequence[TensorSpec], inputs: Mapping[str, Any]) -> None:
    """Raise ``UsageError`` naming the first input whose name, dtype, rank or fixed dim is wrong."""
    expected = {spec.name: spec for spec in declared}
    missing = [name for name in expected if name not in inputs]
    unknown = [name for name in inputs if name not in expected]
    if missing or unknown:
        raise UsageError(
            f"model inputs are {sorted(expected)}, got {sorted(inputs)}"
            + (f": missing {missing}" if missing else "")
            + (f": unexpected {unknown}" if unknown else "")
        )
    for name, spec in expected.items():
        value = inputs[name]
        if not isinstance(value, np.ndarray):
            raise UsageError(
                f"input {name!r}: expected a numpy array of {spec.dtype}, found {type(value).__name__}"
            )
        if value.dtype != np.dtype(spec.dtype):
            raise UsageError(f"input {name!r}: expected dtype {spec.dtype}, found {value.dtype}")
        if value.ndim != spec.rank:
            raise UsageError(
                f"input {name!r}: expected rank {spec.rank} {_shape_text(spec.shape)}, "
                f"found rank {value.ndim} {_shape_text(value.shape)}"
            )
        for axis, (want, got) in enumerate(zip(spec.shape, value.shape)):
            if isinstance(want, int) and want >= 0 and want != got:
                raise UsageError(
                    f"input {name!r}: expected shape {_shape_text(spec.shape)}, found "
                    f"{_shape_text(value.shape)} (axis {axis} must be {want})"
                )


class Session(ABC):
    """A loaded model ready to run; close it (or use ``with``) to release its resources."""

    backend_name: str = ""

    def __init__(self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
        self.inputs: tuple[TensorSpec, ...] = tuple(inputs)
        self.outputs: tuple[TensorSpec, ...] = tuple(outputs)
        self._closed = False

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]

    @property
    def closed(self) -> bool:
        return self._closed

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check ``inputs`` against the declared tensors, run the model, return outputs by name."""
        if self._closed:
            raise UsageError(f"{self.backend_name or 'backend'} session is closed")
        check_inputs(self.inputs, inputs)
        return self._run(dict(inputs))

    @abstractmethod
    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the checked inputs; subclasses do the work here."""

    def close(self) -> None:
        """Release the session's resources; idempotent."""
        if not self._closed:
            self._closed = True
            self._close()

    def _close(self) -> None:  # noqa: B027 - optional hook
        """Subclasses free what they own here."""

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass


class Backend(ABC):
    """An inference engine: can it run here, and load an artifact into a ``Session``."""

    name: str = ""
    extra: str | None = None  # the pip extra that brings this backend's dependencies

    @classmethod
    @abstractmethod
    def probe(cls) -> str | None:
        """None if this backend can run here, else why not (found by a real probe)."""

    @classmethod
    def is_available(cls) -> bool:
        return cls.probe() is None

    @abstractmethod
    def load(
        self,
        artifact: Path | bytes,
        *,
        providers: Sequence[Any] | None = None,
        threads: int | None = None,
        **options: Any,
    ) -> Session:
        """Load a model artifact (file path or bytes already verified by the caller)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
