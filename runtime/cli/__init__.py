"""The command line (typer): results on stdout, logs and progress on stderr.

Layer: runtime (cli), the top of the runtime: it may import every capability, and none of them
imports it. ``app`` is the composed `medsec-edge` command, ``main`` its entry point.
"""

from medsec_edge.runtime.cli.app import app, main

__all__ = ["app", "main"]
