"""The command line (typer): results on stdout, logs and progress on stderr.

Layer: runtime (cli), the top of the runtime: it may import every capability, and none of them
imports it. ``app`` is the composed `medsec-edge` command, ``main`` its entry point (both made
in ``root.py``).

Both are loaded on first use (PEP 562), not when the package is imported: the workstation
packages import ``cli.options`` and ``cli.output`` to build their commands, and composing the app
imports those packages' commands through the entry points, which would otherwise be a cycle.
"""

__all__ = ["app", "main"]


def __getattr__(name: str):
    if name in __all__:
        from medsec_edge.runtime.cli import root

        return getattr(root, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
