"""`medsec-edge export ...` (models to a signed bundle, a bundle to a Triton repository) and
`medsec-edge build` (TensorRT engines), added to the CLI through the entry-point group
``medsec_edge.commands`` (pyproject.toml).

Layer: export. Only typer at import; torch, onnx and tensorrt inside the command bodies.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Optional

import typer

from medsec_edge.runtime.cli.extras import missing_extra, require
from medsec_edge.runtime.cli.help import command, group
from medsec_edge.runtime.cli.output import fail as _fail
from medsec_edge.runtime.cli.output import json_line, table
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
    command(export_app, export_triton,
            "medsec-edge export triton bundles/default --out triton-repo", "triton")
    app.add_typer(export_app, name="export")


def register_build(app: typer.Typer) -> None:
    """Add the top-level ``build`` command (TensorRT engines) to ``app``."""
    command(app, build,
            """
            medsec-edge build bundles/default --out bundles/default-trt
            medsec-edge build bundles/default --out bundles/trt --timing-cache trt.cache --models wm_decoder""",
            "build")


def build(
    bundle: Path = typer.Argument(..., help="Bundle to build engines for (verified first)."),
    out: Path = typer.Option(..., "--out", help="Bundle directory to write (must not exist)."),
    signing_key: Optional[Path] = typer.Option(None, "--signing-key", help="Ed25519 private key (PEM) that signs the new bundle."),
    timing_cache: Optional[Path] = typer.Option(None, "--timing-cache", help="TensorRT timing cache file: read if present, saved after the builds."),
    models: Optional[str] = typer.Option(None, "--models", help="Comma-separated model names (default: every model)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per built model."),
) -> None:
    """Build TensorRT engines on this GPU from the bundle's best ONNX source (INT8 QDQ, else FP16,
    else FP32) and write a signed bundle whose models are the engines, with the ONNX files kept as
    <model>@<precision>. Needs TensorRT and a CUDA GPU (the 'tensorrt' extra); exit 3 without."""
    try:
        from medsec_edge.export.tensorrt_build import build_bundle
        from medsec_edge.export.watermark_export import DEFAULT_SIGNING_KEY
    except ImportError as exc:
        missing_extra("build", "export", exc.name or "a module")
    argv = ["medsec-edge", "build", str(bundle), "--out", str(out)]
    if signing_key is not None:
        argv += ["--signing-key", str(signing_key)]
    if timing_cache is not None:
        argv += ["--timing-cache", str(timing_cache)]
    if models:
        argv += ["--models", models]
    names = [m.strip() for m in models.split(",") if m.strip()] if models else None
    try:
        path, built = build_bundle(bundle, out, signing_key=signing_key or DEFAULT_SIGNING_KEY,
                                   timing_cache=timing_cache, models=names, command=shlex.join(argv))
    except MedsecError as exc:
        _fail(exc)
    rows = [{"model": name, **{k: v for k, v in m.record().items() if k in ("source", "build_s", "plan_bytes")},
             "parity_rel": m.parity.get("max_rel")} for name, m in built.items()]
    if as_json:
        for row in rows:
            json_line({**row, "bundle": str(path)})
        return
    table(f"built {len(rows)} engines into {path}", rows, ["model", "source", "build_s", "plan_bytes", "parity_rel"])


def export_triton(
    bundle: Path = typer.Argument(..., help="Bundle to export (verified first)."),
    out: Path = typer.Option(..., "--out", help="Model repository directory to write."),
    trusted_keys: Optional[Path] = typer.Option(None, "--trusted-keys", help="Trusted public key(s): a .pub file or a directory (default: the trust store)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing repository."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per exported model."),
) -> None:
    """Write a Triton Inference Server model repository from a verified bundle: config.pbtxt and
    the model file per model, with dynamic batching where a model proves it batches (README.md in
    the repository says which and why)."""
    require("export triton", "export", "onnx")
    try:
        from medsec_edge.export.triton import export_triton as write_repository
    except ImportError as exc:
        missing_extra("export triton", "export", exc.name or "a module")
    try:
        result = write_repository(bundle, out, trusted_keys=trusted_keys, overwrite=overwrite)
    except MedsecError as exc:
        _fail(exc)
    rows = [{"model": m.name, "bundle_model": m.bundle_model, "platform": m.platform,
             "max_batch": m.max_batch_size, "batching": m.batch.reason} for m in result.models]
    if as_json:
        for row in rows:
            json_line({**row, "repository": str(result.repository)})
        return
    table(f"Triton repository {result.repository} (bundle {result.bundle!r})",
          [{k: v for k, v in row.items() if k != "batching"} for row in rows],
          ["model", "bundle_model", "platform", "max_batch"],
          details=[f"{row['model']}: {row['batching']}" for row in rows])


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
