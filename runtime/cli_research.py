"""`medsec-edge eval crypto` and `medsec-edge train cipher`: the CNN cipher research transform
measured beside AES-256-GCM.

Layer: runtime (the CLI), like `eval watermark` in cli.py: typer only at import; torch, scipy and
the evaluation are imported inside the command bodies, so registering these commands loads
nothing heavy and the device CLI keeps working without the extras. ``register_eval_crypto`` adds
``crypto`` to the ``eval`` sub-app and ``register_train_cipher`` adds ``cipher`` to the ``train``
sub-app of ``runtime/cli.py`` (or to any typer app, for tests). The CLI's helpers (``_fail``) are
imported from ``runtime.cli`` inside the bodies: ``cli`` calls these functions while it loads.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

__all__ = ["register_eval_crypto", "register_train_cipher", "eval_crypto", "train_cipher"]


def _fail(exc) -> None:
    from medsec_edge.runtime.cli import _fail as cli_fail

    cli_fail(exc)


def eval_crypto(
    images: list[Path] = typer.Option([], "--images", help="Folders or files of held-out images."),
    pydicom_data: bool = typer.Option(False, "--pydicom-data", help="Add the held-out images of the pydicom-data package."),
    cipher: Path = typer.Option(Path("runs/cipher/cipher.pt"), "--cipher",
                                help="Trained CNN cipher (cipher.pt from 'train cipher', or its run folder)."),
    out: Path = typer.Option(Path("runs/eval-crypto"), "--out", help="Where to write JSON, markdown and the plot."),
    trials: int = typer.Option(100, "--trials", help="One-pixel-change NPCR/UACI trials, in total over the images."),
    pairs: str = typer.Option("1,10,100,1000", "--pairs", help="Known-plaintext attack: numbers of pairs, comma-separated."),
    surrogate_steps: int = typer.Option(500, "--surrogate-steps", help="Training steps of each surrogate decoder."),
    max_side: int = typer.Option(512, "--max-side", help="Centre-crop frames to at most this many pixels a side."),
    panels: bool = typer.Option(True, "--panels/--no-panels", help="Image panels in the PNG (shows image content)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: torch's)."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """The seed's CNN cipher (a research transform, never used on real data) vs AES-256-GCM:
    decode quality, wrong key, key sensitivity, entropy, chi-square, correlation, NPCR/UACI,
    a known-plaintext attack, tamper detection and time."""
    from medsec_edge.runtime.errors import MedsecError, UsageError

    try:
        from medsec_edge.evaluation.crypto_eval import MARKDOWN_NAME, run_crypto_eval
    except ImportError as exc:
        _fail(MedsecError(f"evaluation needs its extra: pip install 'medsec-edge[eval]' ({exc.name} missing)"))
        return
    try:
        pair_counts = tuple(int(p) for p in pairs.split(",") if p.strip())
    except ValueError:
        _fail(UsageError(f"--pairs takes comma-separated whole numbers such as 1,10,100, got {pairs!r}"))
        return
    from medsec_edge.runtime.cli import held_out_images

    command = shlex.join(["medsec-edge", *sys.argv[1:]])
    try:
        run_crypto_eval(held_out_images(images, pydicom_data), out, cipher_checkpoint=cipher, seed=seed, trials=trials, pairs=pair_counts,
                        surrogate_steps=surrogate_steps, max_side=max_side, panels=panels, threads=threads,
                        command=command)
    except MedsecError as exc:
        _fail(exc)
        return
    sys.stdout.write((out / MARKDOWN_NAME).read_text() + "\n")


def train_cipher(
    out: Path = typer.Option(Path("runs/cipher"), "--out", help="Run folder: checkpoint, cipher.pt, history."),
    steps: int = typer.Option(2500, "--steps"),
    until: Optional[int] = typer.Option(None, "--until", help="Stop at this step (the schedule still spans --steps)."),
    seed: int = typer.Option(2718, "--seed"),
    threads: int = typer.Option(2, "--threads"),
) -> None:
    """Train the CNN cipher research transform (not encryption; resumes from the run folder)."""
    from medsec_edge.runtime.errors import MedsecError

    try:
        from medsec_edge.train.cnn_cipher import main as cipher_main
    except ImportError as exc:
        _fail(MedsecError(f"training needs torch: pip install 'medsec-edge[train]' ({exc.name} missing)"))
        return
    argv = ["--out", str(out), "--steps", str(steps), "--seed", str(seed), "--threads", str(threads)]
    cipher_main(argv + (["--until", str(until)] if until is not None else []))


def register_eval_crypto(eval_app: typer.Typer) -> None:
    """Add ``crypto`` to the ``eval`` sub-app."""
    eval_app.command("crypto")(eval_crypto)


def register_train_cipher(train_app: typer.Typer) -> None:
    """Add ``cipher`` to the ``train`` sub-app."""
    train_app.command("cipher")(train_cipher)
