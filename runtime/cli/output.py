"""What the command line prints: JSON lines or an 80-column table on stdout, one-line errors,
deprecation notes and progress on stderr.

Layer: runtime (cli). Every command module uses these; none of them imports another command
module. Tables keep a few short columns so a row stays one line at 80 columns; what is long
(reasons, budget misses, regions) goes below the table as short lines, and in full in ``--json``.
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Iterable, Iterator

import typer

from medsec_edge.runtime.errors import MedsecError

FEW_FILES = 3  # more than this, on a terminal, gets a progress bar


def stderr():
    from rich.console import Console

    return Console(stderr=True)


def stdout():
    from rich.console import Console

    return Console()


def error(message: object) -> None:
    """One line on stderr; the message is shown as is (no rich markup inside it)."""
    from rich.markup import escape

    stderr().print(f"[red]error:[/red] {escape(str(message))}", highlight=False, soft_wrap=True)


def note(message: str) -> None:
    """One line on stderr, for the user, not a log record (a deprecated spelling, for example)."""
    from rich.markup import escape

    stderr().print(f"[yellow]note:[/yellow] {escape(message)}", highlight=False, soft_wrap=True)


def fail(exc: MedsecError) -> None:
    error(exc)
    raise typer.Exit(exc.exit_code)


def json_line(row: dict) -> None:
    sys.stdout.write(json.dumps(row) + "\n")
    sys.stdout.flush()  # a consumer reads each object as it comes


def fit_left(text: str, width: int) -> str:
    """``text`` cut from the left to ``width`` characters: a path's end names the file."""
    return text if len(text) <= width else "…" + text[-(width - 1):]


def table(title: str | None, rows: list[dict], columns: list[str], details: Iterable[str] = (),
          first_width: int | None = None) -> None:
    """A borderless table whose rows stay one line each, and ``details`` as lines below it.

    The first column (a path) is cut from the left to what the others leave of the terminal.
    """
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    console = stdout()
    cells = [["" if row.get(c) is None else _cell(row.get(c)) for c in columns] for row in rows]
    if cells and first_width is None:
        others = sum(max(len(c), *(len(r[i]) for r in cells)) + 2 for i, c in enumerate(columns) if i)
        first_width = max(12, min(48, console.width - others - 2))
    if title:
        console.print(escape(title), highlight=False, soft_wrap=True)
    out = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for i, col in enumerate(columns):
        out.add_column(col, no_wrap=True, overflow="ellipsis")
    for row in cells:
        if first_width is not None:
            row[0] = fit_left(row[0], first_width)
        out.add_row(*[escape(c) for c in row])
    console.print(out)
    for line in details:
        console.print(escape(_hanging(line, console.width)), highlight=False, soft_wrap=True)


def record(title: str, row: dict) -> None:
    """One result (a key set, a sealed file) as ``field  value`` lines: fits any width."""
    from rich.markup import escape
    from rich.table import Table

    console = stdout()
    console.print(escape(title), highlight=False, soft_wrap=True)
    out = Table(box=None, show_header=False, pad_edge=False)
    out.add_column("field", style="bold", no_wrap=True)
    out.add_column("value", overflow="fold")
    for key, value in row.items():
        out.add_row(key, escape("" if value is None else _cell(value)))
    console.print(out)


def _hanging(line: str, width: int) -> str:
    """``line`` wrapped to ``width``, continuation lines indented: short lines under a table."""
    import textwrap

    return "\n".join(textwrap.wrap(line, width=max(20, width - 1), subsequent_indent="  ",
                                    break_long_words=True, break_on_hyphens=False)) or line


def _cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


@contextlib.contextmanager
def progress(total: int, what: str) -> Iterator:
    """A callable that advances a progress bar on stderr, shown only on a terminal and only for
    more than a few files (JSON lines and tables on stdout never mix with it)."""
    console = stderr()
    if total <= FEW_FILES or not console.is_terminal:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    # No redirection: rich would route stdout (the results, JSON lines) through the stderr console.
    with Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True, redirect_stdout=False, redirect_stderr=False) as bar:
        task = bar.add_task(what, total=total)
        yield lambda: bar.advance(task)
