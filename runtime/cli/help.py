"""Help screens: an example on every one, and flags shown as flags.

Layer: runtime (cli). Typer (0.29, which carries its own click as ``typer._click``) draws the
rich help panel from ``param.display_type_rich()`` for every option, and ``TyperOption`` answers
``<bool>`` for a flag too: the plain click formatter skips the type of a flag
(``get_help_record``: ``if not self.is_flag``), the rich panel does not. Giving a flag an empty
metavar makes the panel print nothing there, and changes nothing else (a metavar is display
only). ``Command`` and ``Group`` do that for every parameter, the help option included, so every
command is registered through ``command`` / ``group`` here.

Rich markup mode keeps the line breaks of every paragraph after the first, so prose paragraphs
are joined into one line (rich wraps them to the terminal) and the example keeps its lines.
"""

from __future__ import annotations

import inspect
from typing import Callable

import typer
from typer.core import TyperCommand, TyperGroup

__all__ = ["Command", "Group", "command", "compose_help", "group"]


def _flags_without_type(params):
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class Command(TyperCommand):
    """A command whose help shows flags without a type."""

    def get_params(self, ctx):
        return _flags_without_type(super().get_params(ctx))


class Group(TyperGroup):
    """A group whose help shows flags without a type."""

    def get_params(self, ctx):
        return _flags_without_type(super().get_params(ctx))


def compose_help(text: str, example: str) -> str:
    """``text`` with its prose paragraphs unwrapped, then ``Example:`` and the example's lines."""
    from rich.markup import escape

    paragraphs = [" ".join(p.split()) for p in inspect.cleandoc(text or "").split("\n\n") if p.strip()]
    lines = [f"  $ {line.strip()}" for line in inspect.cleandoc(example).splitlines() if line.strip()]
    return escape("\n\n".join([*paragraphs, "Example:\n" + "\n".join(lines)]))


def command(app: typer.Typer, fn: Callable, example: str, name: str | None = None, **kwargs) -> None:
    """Register ``fn`` on ``app`` with its docstring and ``example`` as help."""
    app.command(name, cls=Command, help=compose_help(fn.__doc__ or "", example), **kwargs)(fn)


def group(help: str, example: str, **kwargs) -> typer.Typer:
    """A sub-command group (``keys``, ``train``, ...) with ``example`` in its help."""
    kwargs.setdefault("no_args_is_help", True)
    return typer.Typer(cls=Group, help=compose_help(help, example), **kwargs)
