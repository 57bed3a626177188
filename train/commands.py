"""`medsec-edge train ...`: the training recipes, added to the CLI through the entry-point group
``medsec_edge.commands`` (pyproject.toml).

Layer: train. Only typer at import; torch is imported inside the command bodies, so listing the
commands costs nothing and a missing torch is answered with the extra to install.
"""

from __future__ import annotations


from pathlib import Path
from typing import Optional

import typer

from medsec_edge.runtime.cli.extras import missing_extra, require
from medsec_edge.runtime.cli.help import command, group

NEEDS = ("torch",)  # the 'train' extra; checked before any work, so a missing one is one line


def register(app: typer.Typer) -> None:
    """Add the ``train`` group (watermark, tamper, fingerprint, cipher) to ``app``."""
    train_app = group("Train models (needs the 'train' extra).",
                      "medsec-edge train watermark --out runs/watermark --steps 3600")
    command(train_app, train_watermark, "medsec-edge train watermark --out runs/watermark --until 100",
            "watermark")
    command(train_app, train_tamper, "medsec-edge train tamper --out runs/tamper", "tamper")
    command(train_app, train_fingerprint, "medsec-edge train fingerprint --out runs/fingerprint",
            "fingerprint")
    command(train_app, train_cipher, "medsec-edge train cipher --out runs/cipher --steps 2500", "cipher")
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
    require("train", "train", *NEEDS)
    try:
        from medsec_edge.train.cli_entry import main as train_main
    except ImportError as exc:
        missing_extra("train", "train", exc.name or "a module")
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


def train_fingerprint(
    out: Path = typer.Option(Path("runs/fingerprint"), "--out", help="Run folder: caches, checkpoints, history."),
    steps: int = typer.Option(16000, "--steps"),
    until: Optional[int] = typer.Option(None, "--until", help="Stop at this step (the schedule still spans --steps)."),
    seed: int = typer.Option(9091, "--seed"),
    batch: int = typer.Option(32, "--batch"),
    width: int = typer.Option(32, "--width"),
    dims: int = typer.Option(4, "--dims", help="Code dimensions per 16 px cell."),
) -> None:
    """Train the learned content fingerprint's encoder (resumes from the run folder's checkpoint)."""
    _train(["--recipe", "fingerprint", "--out", str(out), "--steps", str(steps), "--seed", str(seed),
            "--batch", str(batch), "--width", str(width), "--dims", str(dims)], until)


def train_cipher(
    out: Path = typer.Option(Path("runs/cipher"), "--out", help="Run folder: checkpoint, cipher.pt, history."),
    steps: int = typer.Option(2500, "--steps"),
    until: Optional[int] = typer.Option(None, "--until", help="Stop at this step (the schedule still spans --steps)."),
    seed: int = typer.Option(2718, "--seed"),
    threads: int = typer.Option(2, "--threads"),
) -> None:
    """Train the CNN cipher research transform (not encryption; resumes from the run folder)."""
    require("train cipher", "train", *NEEDS)
    try:
        from medsec_edge.train.cnn_cipher import main as cipher_main
    except ImportError as exc:
        missing_extra("train cipher", "train", exc.name or "a module")
    argv = ["--out", str(out), "--steps", str(steps), "--seed", str(seed), "--threads", str(threads)]
    cipher_main(argv + (["--until", str(until)] if until is not None else []))
