"""`medsec-edge eval ...`: the evaluation reports (watermark, tamper, crypto), added to the CLI
through the entry-point group ``medsec_edge.commands`` (pyproject.toml).

Layer: evaluation. Only typer at import; the evaluations (scipy, matplotlib, torch for the
research cipher) are imported inside the command bodies.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from medsec_edge.runtime.cli.extras import missing_extra, require
from medsec_edge.runtime.cli.help import command, group
from medsec_edge.runtime.cli.options import BundleOpt, ThreadsOpt
from medsec_edge.runtime.cli.output import fail as _fail
from medsec_edge.runtime.errors import MedsecError, UsageError

NEEDS = ("scipy", "matplotlib")  # the 'eval' extra, checked before any work


def register(app: typer.Typer) -> None:
    """Add the ``eval`` group (watermark, tamper, crypto) to ``app``."""
    eval_app = group("Evaluate against attacks and baselines (needs the 'eval' extra).",
                     "medsec-edge eval watermark --pydicom-data --trials 2")
    command(eval_app, eval_watermark, "medsec-edge eval watermark --images held-out/ --trials 2",
            "watermark")
    command(eval_app, eval_tamper, "medsec-edge eval tamper --pydicom-data --out runs/eval-tamper", "tamper")
    command(eval_app, eval_crypto,
            "medsec-edge eval crypto --pydicom-data --cipher docs/crypto/cnn_cipher.pt", "crypto")
    app.add_typer(eval_app, name="eval")


def held_out_images(images: list[Path], pydicom_data: bool) -> list[Path]:
    """``--images`` plus, with ``--pydicom-data``, that package's folder (the evaluation set)."""
    if pydicom_data:
        try:
            import data_store  # the pydicom-data package
        except ImportError:
            raise UsageError("--pydicom-data needs the package: pip install 'medsec-edge[eval]'") from None
        images = [*images, Path(data_store.__file__).parent / "data"]
    if not images:
        raise UsageError("give --images DIR (repeatable) or --pydicom-data")
    return images


def eval_watermark(
    images: list[Path] = typer.Option([], "--images", help="Folders or files of held-out images."),
    pydicom_data: bool = typer.Option(False, "--pydicom-data", help="Add the held-out images of the pydicom-data package."),
    out: Path = typer.Option(Path("runs/eval-watermark"), "--out", help="Where to write JSON, markdown and the plot."),
    trials: int = typer.Option(3, "--trials", help="Random trials (payloads, crop offsets, noise) per image and attack."),
    baselines: bool = typer.Option(True, "--baselines/--no-baselines", help="Also measure the classical baselines."),
    baseline_trials: Optional[int] = typer.Option(None, "--baseline-trials", help="Trials for the (slow) baselines; default: --trials."),
    bundle: Optional[Path] = BundleOpt,
    threads: Optional[int] = ThreadsOpt,
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Quality, robustness per attack, false detections and latency, with baselines beside."""
    require("eval watermark", "eval", *NEEDS)
    try:
        from medsec_edge.evaluation.watermark_eval import run_watermark_eval
    except ImportError as exc:
        missing_extra("eval watermark", "eval", exc.name or "a module")
    try:
        run_watermark_eval(held_out_images(images, pydicom_data), out, trials=trials, with_baselines=baselines,
                           bundle_path=bundle, threads=threads, seed=seed, baseline_trials=baseline_trials)
    except MedsecError as exc:
        _fail(exc)


def eval_tamper(
    images: list[Path] = typer.Option([], "--images", help="Folders or files of held-out images."),
    pydicom_data: bool = typer.Option(False, "--pydicom-data", help="Add the held-out images of the pydicom-data package."),
    out: Path = typer.Option(Path("runs/eval-tamper"), "--out", help="Where to write JSON, markdown and the plots."),
    settings: str = typer.Option(
        "header_kept,header_stripped,never_protected", "--settings",
        help="Comma-separated: header_kept (PACS path), header_stripped (display exports), never_protected (blind)."),
    quick: bool = typer.Option(False, "--quick", help="A small run (CI): fewer sizes, draws and exports."),
    trials: Optional[int] = typer.Option(None, "--trials", help="Never protected: draws per manipulation family and image (default 3, quick 1)."),
    benign_trials: Optional[int] = typer.Option(None, "--benign-trials", help="Never protected: draws per benign step and image (default 3, quick 1)."),
    watermark: bool = typer.Option(
        False, "--watermark/--no-watermark",
        help="Never protected: also tamper_eval's older watermark-aware check on marked frames (header_stripped supersedes it)."),
    bundle: Optional[Path] = BundleOpt,
    threads: Optional[int] = ThreadsOpt,
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """The tamper check in three settings, each reported on its own: header kept (protected by
    'run', then edited or benignly processed with the DICOM header kept), header stripped (display
    exports) and never protected (the blind detector). Per family, size and contrast bin: ROC,
    TPR at FPR 1%/0.1%, pixel IoU, FPR per benign step, study FPR, latency; SHA-256, the seal alone
    and a noise-residual baseline beside."""
    require("eval tamper", "eval", *NEEDS)
    try:
        from medsec_edge.evaluation.evidence_eval import MARKDOWN_NAME, run_evidence_eval
    except ImportError as exc:
        missing_extra("eval tamper", "eval", exc.name or "a module")
    command = shlex.join(["medsec-edge", *sys.argv[1:]])
    chosen = tuple(dict.fromkeys(s.strip() for s in settings.split(",") if s.strip()))
    try:
        if (trials is not None and trials < 1) or (benign_trials is not None and benign_trials < 1):
            raise UsageError("--trials and --benign-trials must be at least 1")
        run_evidence_eval(held_out_images(images, pydicom_data), out, bundle_path=bundle, threads=threads, seed=seed,
                          size="quick" if quick else "default", settings=chosen, trials=trials,
                          benign_trials=benign_trials, watermark=watermark, command=command)
    except MedsecError as exc:
        _fail(exc)
        return
    sys.stdout.write((out / MARKDOWN_NAME).read_text() + "\n")


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
    require("eval crypto", "eval", *NEEDS)
    require("eval crypto", "train", "torch")  # the research cipher is a torch model
    try:
        from medsec_edge.evaluation.crypto_eval import MARKDOWN_NAME, run_crypto_eval
    except ImportError as exc:
        missing_extra("eval crypto", "eval", exc.name or "a module")
    try:
        pair_counts = tuple(int(p) for p in pairs.split(",") if p.strip())
    except ValueError:
        _fail(UsageError(f"--pairs takes comma-separated whole numbers such as 1,10,100, got {pairs!r}"))
        return
    command = shlex.join(["medsec-edge", *sys.argv[1:]])
    try:
        run_crypto_eval(held_out_images(images, pydicom_data), out, cipher_checkpoint=cipher, seed=seed, trials=trials, pairs=pair_counts,
                        surrogate_steps=surrogate_steps, max_side=max_side, panels=panels, threads=threads,
                        command=command)
    except MedsecError as exc:
        _fail(exc)
        return
    sys.stdout.write((out / MARKDOWN_NAME).read_text() + "\n")
