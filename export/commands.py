"""`medsec-edge export ...`: models to a signed bundle, added to the CLI through the entry-point
group ``medsec_edge.commands`` (pyproject.toml).

Layer: export. Only typer at import; torch and onnx inside the command bodies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from medsec_edge.runtime.cli.extras import missing_extra, require
from medsec_edge.runtime.cli.help import command, group
from medsec_edge.runtime.cli.output import fail as _fail
from medsec_edge.runtime.errors import MedsecError

NEEDS = ("torch", "onnx")  # the 'export' extra, checked before any work


def register(app: typer.Typer) -> None:
    """Add the ``export`` group (watermark, tamper) to ``app``."""
    export_app = group("Export trained models to a signed bundle (needs the 'export' extra).",
                       "medsec-edge export watermark --checkpoint runs/watermark/checkpoint.pt")
    command(export_app, export_watermark,
            "medsec-edge export watermark --checkpoint runs/watermark/checkpoint.pt --out bundles/new",
            "watermark")
    command(export_app, export_tamper,
            "medsec-edge export tamper --checkpoint runs/tamper/checkpoint.pt --bundle bundles/new",
            "tamper")
    app.add_typer(export_app, name="export")


def export_tamper(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Tamper training checkpoint (checkpoint.pt)."),
    bundle: Path = typer.Option(Path("bundles/default"), "--bundle", help="Bundle to add the detector to."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the new bundle here (default: --bundle in place)."),
    signing_key: Optional[Path] = typer.Option(None, "--signing-key", help="Ed25519 private key (PEM); created if missing."),
    trusted_dir: Path = typer.Option(Path("bundles/trusted_keys"), "--trusted-dir", help="Where to put the public key."),
) -> None:
    """Export the detector (checker + parity), freeze its thresholds on validation images, re-sign."""
    require("export tamper", "export", *NEEDS)
    try:
        from medsec_edge.export.tamper_export import add_to_bundle
        from medsec_edge.export.watermark_export import DEFAULT_SIGNING_KEY
    except ImportError as exc:
        missing_extra("export tamper", "export", exc.name or "a module")
    try:
        add_to_bundle(checkpoint, bundle, out_dir=out, signing_key=signing_key or DEFAULT_SIGNING_KEY,
                      trusted_dir=trusted_dir)
    except MedsecError as exc:
        _fail(exc)


def export_watermark(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Training checkpoint (checkpoint.pt)."),
    out: Path = typer.Option(Path("bundles/default"), "--out", help="Bundle directory to write."),
    signing_key: Optional[Path] = typer.Option(None, "--signing-key", help="Ed25519 private key (PEM); created if missing."),
    trusted_dir: Path = typer.Option(Path("bundles/trusted_keys"), "--trusted-dir", help="Where to put the public key."),
    evaluation: Optional[Path] = typer.Option(None, "--evaluation", help="Evaluation JSON summary to include."),
) -> None:
    """Export to ONNX (checker + parity against torch) and write the signed bundle."""
    require("export watermark", "export", *NEEDS)
    try:
        from medsec_edge.export.watermark_export import DEFAULT_SIGNING_KEY, build_bundle
    except ImportError as exc:
        missing_extra("export watermark", "export", exc.name or "a module")
    summary = json.loads(evaluation.read_text()) if evaluation else None
    build_bundle(checkpoint, out, signing_key=signing_key or DEFAULT_SIGNING_KEY, trusted_dir=trusted_dir,
                 evaluation=summary)
