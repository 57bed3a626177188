"""`medsec-edge`: the one command line, composed from the layers.

Layer: runtime (cli). The device commands (image and crypto) are registered here; workstation
commands (train, export, eval, calibrate) come from the entry-point group ``medsec_edge.commands``
that their packages declare, so the runtime never names their modules. A command whose package
cannot load (a runtime-only install) still answers, naming the extra that brings it.
"""

from __future__ import annotations

import logging
import sys
from importlib.metadata import entry_points

import typer

from medsec_edge.runtime.cli import bench, bundles, crypto, images, node
from medsec_edge.runtime.cli.extras import missing_extra
from medsec_edge.runtime.cli.help import Command, Group, compose_help
from medsec_edge.runtime.cli.logs import setup_logging
from medsec_edge.runtime.cli.output import error
from medsec_edge.runtime.errors import MedsecError

COMMAND_GROUP = "medsec_edge.commands"

# Which extra brings a workstation command, for the message when it is missing.
EXTRA_OF = {"train": "train", "export": "export", "eval": "eval", "calibrate": "export,eval", "build": "export"}

log = logging.getLogger("medsec_edge")

app = typer.Typer(
    cls=Group, add_completion=False, pretty_exceptions_show_locals=False, no_args_is_help=True,
    help=compose_help(
        "Watermark, check and seal medical images where they are made. Results on stdout (a table, "
        "or JSON lines with --json), logs and progress on stderr. A key set is always --keys DIR, "
        "a recipient's public key set --to DIR. Exit codes: 0 ok, 1 verification failed, 2 usage, "
        "3 bundle or backend, 4 bad input file.",
        """
        medsec-edge run samples --out out/run
        medsec-edge check out/run --json"""))


@app.callback()
def main_callback(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logs on stderr.")) -> None:
    setup_logging(verbose)


def _missing(name: str, reason: str):
    extra = EXTRA_OF.get(name, name)

    def command(ctx: typer.Context) -> None:
        missing_extra(name, extra, reason)

    # help= rather than a docstring: the text goes through compose_help's markup escaping, or
    # rich would read "[train]" as a style tag and drop it
    command.help_text = compose_help(f"(not installed) needs: pip install 'medsec-edge[{extra}]'",
                                     f"pip install 'medsec-edge[{extra}]'")
    return command


def register_plugins(target: typer.Typer) -> None:
    """Add the workstation commands declared in the entry-point group; a plugin that cannot load
    becomes a command that says which extra to install."""
    found = set()
    for ep in entry_points(group=COMMAND_GROUP):
        found.add(ep.name)
        try:
            register = ep.load()
        except ImportError as exc:
            stub = _missing(ep.name, exc.name or "a module")
            target.command(ep.name, cls=Command, add_help_option=False, help=stub.help_text,
                           context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
                           )(stub)
            continue
        register(target)
    for name in EXTRA_OF.keys() - found:
        stub = _missing(name, "its package")
        target.command(name, cls=Command, add_help_option=False, hidden=True, help=stub.help_text,
                       context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
                       )(stub)


images.register(app)
crypto.register(app)
node.register(app)
bundles.register(app)
bench.register(app)
register_plugins(app)


def main() -> None:
    try:
        app()
    except MedsecError as exc:  # errors raised outside a command body
        error(exc)
        sys.exit(exc.exit_code)
