"""What the command line prints: logging on stderr, one-line errors, tables on stdout.

Layer: runtime (cli). Every command module uses these; none of them imports another command
module.
"""

from __future__ import annotations


import typer

from medsec_edge.runtime.errors import MedsecError


def stderr():
    from rich.console import Console

    return Console(stderr=True)


def error(message: object) -> None:
    """One line on stderr; the message is shown as is (no rich markup inside it)."""
    from rich.markup import escape

    stderr().print(f"[red]error:[/red] {escape(str(message))}", highlight=False, soft_wrap=True)


def fail(exc: MedsecError) -> None:
    error(exc)
    raise typer.Exit(exc.exit_code)




def table(title: str, rows: list[dict], columns: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*["" if row.get(c) is None else str(row.get(c)) for c in columns])
    Console().print(table)
