"""A workstation command on an install without its extra: one line naming the extra, exit 2.

Layer: runtime (cli). The runtime never names torch or the workstation packages: the plugin
commands pass the module names they need, and ``app.register_plugins`` passes the command whose
package did not load. No traceback: a missing extra is a usage problem, not a crash.
"""

from __future__ import annotations

import importlib
from typing import NoReturn

import typer

from medsec_edge.runtime.cli.output import error

__all__ = ["missing_extra", "require"]


def missing_extra(command: str, extra: str, missing: str) -> NoReturn:
    error(f"'{command}' needs the '{extra}' extra, which is not installed here ({missing} missing): "
          f"pip install 'medsec-edge[{extra}]'")
    raise typer.Exit(2)


def require(command: str, extra: str, *modules: str) -> None:
    """Import ``modules`` now, so a missing one is answered before any work starts."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            missing_extra(command, extra, exc.name or name)
