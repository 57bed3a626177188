"""The command line (typer): results on stdout, logs and progress on stderr.

Layer: runtime (cli), the top of the runtime: it may import every capability, and none of them
imports it. ``app`` is the composed `medsec-edge` command, ``main`` its entry point (both made
in ``root.py``).

Both are loaded on first use (PEP 562), not when the package is imported: the workstation
packages import ``cli.options`` and ``cli.output`` to build their commands, and composing the app
imports those packages' commands through the entry points, which would otherwise be a cycle.
"""

import os

# Our own numpy work per image is a few small matrix products (fingerprint, scoring). OpenBLAS
# threads competing with ONNX Runtime's and with other processes on a 2-core device made creating
# a fingerprint at 512x512 take 130 ms instead of 1.1 ms (measured under load): one BLAS thread
# unless the user asks for more. Set before numpy is first imported, which the CLI does later.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's BLAS; not OMP (torch and ORT read that)

__all__ = ["app", "main"]


def __getattr__(name: str):
    if name in __all__:
        from medsec_edge.runtime.cli import root

        return getattr(root, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
