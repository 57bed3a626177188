"""``medsec-edge bench``: a bundle's latency here, and its budget gate.

Layer: runtime (cli), over ``runtime.bench.run_bench``: parses, runs, prints a table (or one
JSON object with ``--json``) on stdout, progress on stderr. Exit codes: 0 every stage within its
budget (and the margin), 1 a budget missed beyond the margin (each named on stderr), 2 usage,
3 bundle or backend error (a model that fails to load or run).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer

from medsec_edge.runtime.bench import DEFAULT_MARGIN, DEFAULT_REPEATS, DEFAULT_WARMUP
from medsec_edge.runtime.cli.help import command
from medsec_edge.runtime.cli.options import BundleOpt, ThreadsOpt
from medsec_edge.runtime.cli.output import error as _error
from medsec_edge.runtime.cli.output import fail as _fail
from medsec_edge.runtime.cli.output import json_line, stderr, table
from medsec_edge.runtime.errors import MedsecError, UsageError

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    """Add ``bench`` to ``app``."""
    command(app, bench, """
        medsec-edge bench
        medsec-edge bench --bundle model.tar --sizes 512 --json > bench.json""")


def bench(
    bundle: Optional[Path] = BundleOpt,
    as_json: bool = typer.Option(False, "--json", help="One JSON object on stdout."),
    repeats: int = typer.Option(DEFAULT_REPEATS, "--repeats", min=1, metavar="N",
                                help="Timed rounds per size, after a warm-up."),
    sizes: Optional[str] = typer.Option(
        None, "--sizes", metavar="LIST",
        help="Image sides, comma-separated (default: the sizes of the bundle's budgets)."),
    margin: float = typer.Option(
        DEFAULT_MARGIN, "--margin", min=0.0, metavar="F",
        help="Noise margin: a stage fails when p50 > budget x (1 + F)."),
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """Time every model of a bundle (variants too, each with its backend) and each stage of the
    acquisition job (check, embed, extract) on synthetic 16-bit images, p50/p99 beside a fixed
    reference workload timed in the same run, and compare each stage's p50 with the bundle's
    budget.

    Exit 0 when every budget is met within the margin, 1 when one is missed beyond it (named
    on stderr), 3 when the bundle or a backend fails."""
    from medsec_edge.runtime.bench import run_bench

    try:
        wanted = _parse_sizes(sizes)
        with _progress() as advance:
            report = run_bench(bundle, repeats=repeats, warmup=DEFAULT_WARMUP, sizes=wanted, margin=margin,
                               threads=threads, progress=advance)
    except MedsecError as exc:
        _fail(exc)
        return
    if as_json:
        json_line(report.to_dict())
    else:
        _print(report)
    for line in report.errors:
        _error(f"model failed: {line}")
    if report.errors:
        raise typer.Exit(3)
    for line in report.misses:
        _error(f"budget missed: {line}")
    if report.misses:
        raise typer.Exit(1)


def _parse_sizes(text: Optional[str]) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--sizes takes image sides separated by commas, such as 512,2048; found {text!r}") from None
    if not sizes:
        raise UsageError("--sizes names no size: give sides such as 512,2048")
    return sizes


@contextmanager
def _progress() -> Iterator:
    """A bar on a terminal; elsewhere one line on stderr as each size is done."""
    console = stderr()
    if not console.is_terminal:
        current = [None]

        def line(what: str, done: int, total: int) -> None:
            if current[0] not in (None, what):
                console.print(f"bench: {current[0]} done", highlight=False, markup=False)
            current[0] = what
            if done == total:
                console.print(f"bench: {what} done", highlight=False, markup=False)

        yield line
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("bench {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=console, transient=True, redirect_stdout=False,
                  redirect_stderr=False) as bar:
        task = bar.add_task("loading", total=None)

        def advance(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total)

        yield advance


def _ms(value: float) -> str:
    return f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def _print(report) -> None:
    stage_rows = [{
        "stage": f"{s.stage} {s.size}", "p50 ms": _ms(s.latency.p50), "p99 ms": _ms(s.latency.p99),
        "budget": "-" if s.budget_ms is None else f"{s.budget_ms:g}", "status": s.status,
        "x ref": f"{s.vs_reference:.1f}",
    } for s in report.stages]
    table(f"{report.version_id}: {report.threads} threads, {report.repeats} rounds + {report.warmup} warm-up",
          stage_rows, ["stage", "p50 ms", "p99 ms", "budget", "status", "x ref"], first_width=14)
    model_rows = [{
        "model": m.model, "size": m.size or "-", "backend": m.backend, "prec": m.precision,
        "p50 ms": _ms(m.latency.p50) if m.latency else m.status,
        "p99 ms": _ms(m.latency.p99) if m.latency else "",
    } for m in report.models]
    ref = report.reference
    details = [
        f"reference {report.reference_name}: p50 {ref.p50:.2f} ms, p99 {ref.p99:.2f} ms "
        f"({report.reference_description})",
        f"gate: p50 <= budget x (1 + {report.margin:g}); 'x ref' is p50 / the reference's p50",
        f"machine: {report.machine.get('cpus')} cpus, load {report.machine.get('load_avg_1min_start')} -> "
        f"{report.machine.get('load_avg_1min_end')}, onnxruntime {report.machine.get('onnxruntime')}; "
        f"{report.wall_s:.1f} s",
    ]
    details += [f"skipped {m.model}: {m.reason}" for m in report.models if m.status == "skipped"]
    details += [f"error {m.model} at {m.size}: {m.reason}" for m in report.models if m.status == "error"]
    details += [f"not measured: {', '.join(report.budgets_not_measured)}"] if report.budgets_not_measured else []
    details += [f"MISSED {line}" for line in report.misses]
    table(None, model_rows, ["model", "size", "backend", "prec", "p50 ms", "p99 ms"], details)
    sys.stdout.flush()
