"""`medsec-edge train ...`: the training recipes, added to the CLI through the entry-point group
``medsec_edge.commands`` (pyproject.toml).

Layer: train. Only typer at import; torch is imported inside the command bodies, so listing the
commands costs nothing and a missing torch is answered with the extra to install.
"""

from __future__ import annotations


from pathlib import Path
from typing import Optional

import typer

from medsec_edge.runtime.cli.output import fail as _fail
from medsec_edge.runtime.errors import MedsecError


def register(app: typer.Typer) -> None:
    """Add the ``train`` group (watermark, tamper, cipher) to ``app``."""
    train_app = typer.Typer(no_args_is_help=True, help="Train models (needs the 'train' extra).")
    train_app.command("watermark")(train_watermark)
    train_app.command("tamper")(train_tamper)
    train_app.command("cipher")(train_cipher)
    app.add_typer(train_app, name="train")


def train_watermark(
    out: Path = typer.Option(Path("runs/watermark"), "--out", help="Run folder: checkpoints, curves."),
    steps: int = typer.Option(3600, "--steps"),
    until: Optional[int] = typer.Option(None, "--until", help="Stop at this step (the schedule still spans --steps)."),
    seed: int = typer.Option(1234, "--seed"),
    batch: int = typer.Option(8, "--batch"),
    width: int = typer.Option(12, "--width"),
) -> None:
    """Train the watermark networks (resumes from the run folder's checkpoint)."""
    _train(["--out", str(out), "--steps", str(steps), "--seed", str(seed), "--batch", str(batch),
            "--width", str(width)], until)


def _train(argv: list[str], until: Optional[int]) -> None:
    """Run a training recipe (train/cli_entry.py), which records this exact command."""
    try:
        from medsec_edge.train.cli_entry import main as train_main
    except ImportError as exc:
        _fail(MedsecError(f"training needs torch: pip install 'medsec-edge[train]' ({exc.name} missing)"))
        return
    train_main(argv + (["--until", str(until)] if until is not None else []))


def train_tamper(
    out: Path = typer.Option(Path("runs/tamper"), "--out", help="Run folder: checkpoints, curves."),
    steps: int = typer.Option(12000, "--steps"),
    until: Optional[int] = typer.Option(None, "--until", help="Stop at this step (the schedule still spans --steps)."),
    seed: int = typer.Option(4321, "--seed"),
    batch: int = typer.Option(16, "--batch"),
    width: int = typer.Option(20, "--width"),
) -> None:
    """Train the blind tamper detector (resumes from the run folder's checkpoint)."""
    _train(["--recipe", "tamper", "--out", str(out), "--steps", str(steps), "--seed", str(seed),
            "--batch", str(batch), "--width", str(width)], until)


def train_cipher(
    out: Path = typer.Option(Path("runs/cipher"), "--out", help="Run folder: checkpoint, cipher.pt, history."),
    steps: int = typer.Option(2500, "--steps"),
    until: Optional[int] = typer.Option(None, "--until", help="Stop at this step (the schedule still spans --steps)."),
    seed: int = typer.Option(2718, "--seed"),
    threads: int = typer.Option(2, "--threads"),
) -> None:
    """Train the CNN cipher research transform (not encryption; resumes from the run folder)."""
    try:
        from medsec_edge.train.cnn_cipher import main as cipher_main
    except ImportError as exc:
        _fail(MedsecError(f"training needs torch: pip install 'medsec-edge[train]' ({exc.name} missing)"))
        return
    argv = ["--out", str(out), "--steps", str(steps), "--seed", str(seed), "--threads", str(threads)]
    cipher_main(argv + (["--until", str(until)] if until is not None else []))
