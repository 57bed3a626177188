"""`medsec-edge export ...`: models to a signed bundle, added to the CLI through the entry-point
group ``medsec_edge.commands`` (pyproject.toml).

Layer: export. Only typer at import; torch and onnx inside the command bodies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from medsec_edge.runtime.cli.output import fail as _fail
from medsec_edge.runtime.errors import MedsecError


def register(app: typer.Typer) -> None:
    """Add the ``export`` group (watermark, tamper) to ``app``."""
    export_app = typer.Typer(no_args_is_help=True, help="Export trained models to a signed bundle.")
    export_app.command("watermark")(export_watermark)
    export_app.command("tamper")(export_tamper)
    app.add_typer(export_app, name="export")


def export_tamper(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Tamper training checkpoint (checkpoint.pt)."),
    bundle: Path = typer.Option(Path("bundles/default"), "--bundle", help="Bundle to add the detector to."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the new bundle here (default: --bundle in place)."),
    signing_key: Optional[Path] = typer.Option(None, "--signing-key", help="Ed25519 private key (PEM); created if missing."),
    trusted_dir: Path = typer.Option(Path("bundles/trusted_keys"), "--trusted-dir", help="Where to put the public key."),
) -> None:
    """Export the detector (checker + parity), freeze its thresholds on validation images, re-sign."""
    try:
        from medsec_edge.export.tamper_export import add_to_bundle
        from medsec_edge.export.watermark_export import DEFAULT_SIGNING_KEY
    except ImportError as exc:
        _fail(MedsecError(f"export needs torch and onnx: pip install 'medsec-edge[export]' ({exc.name} missing)"))
        return
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
    try:
        from medsec_edge.export.watermark_export import DEFAULT_SIGNING_KEY, build_bundle
    except ImportError as exc:
        _fail(MedsecError(f"export needs torch and onnx: pip install 'medsec-edge[export]' ({exc.name} missing)"))
        return
    summary = json.loads(evaluation.read_text()) if evaluation else None
    build_bundle(checkpoint, out, signing_key=signing_key or DEFAULT_SIGNING_KEY, trusted_dir=trusted_dir,
                 evaluation=summary)
