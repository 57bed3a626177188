"""The image commands a device runs: run (the acquisition-time job), check, embed, extract.

Layer: runtime (cli). Each command parses, calls the job or a capability, prints.
Exit codes (DESIGN.md): 0 ok, 1 verification failed, 2 usage, 3 bundle or backend error,
4 bad input file.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from medsec_edge.runtime.cli.options import BundleOpt, KeyOpt, OperatingPointOpt, ThreadsOpt
from medsec_edge.runtime.cli.output import error as _error
from medsec_edge.runtime.cli.output import fail as _fail
from medsec_edge.runtime.cli.output import stderr as _stderr
from medsec_edge.runtime.cli.output import table as _table
from medsec_edge.runtime.errors import MedsecError, UsageError

log = logging.getLogger("medsec_edge")


def register(app: typer.Typer) -> None:
    """Add ``run``, ``check``, ``embed`` and ``extract`` to ``app``."""
    app.command()(embed)
    app.command()(extract)
    app.command()(run)
    app.command()(check)


def _key(path: Optional[Path], create: bool):
    from medsec_edge.runtime.crypto.watermark_key import default_key_path, load_or_create_key

    key_path = path or default_key_path()
    if not create and not key_path.exists():
        return None
    return load_or_create_key(key_path, create=create)


def embed(
    input: Path = typer.Argument(..., help="Image to watermark (DICOM, PNG, TIFF, JPEG, NPY)."),
    output: Path = typer.Argument(..., help="Where to write the watermarked image (same format)."),
    payload: Optional[str] = typer.Option(None, "--payload", help="16 hex digits instead of the identity MAC."),
    bundle: Optional[Path] = BundleOpt,
    key: Optional[Path] = KeyOpt,
    threads: Optional[int] = ThreadsOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    reversible: bool = typer.Option(False, "--reversible", help="Keep the exact original recoverable by --to's key holder ('restore'; DICOM only)."),
    to: Optional[Path] = typer.Option(None, "--to", help="Key set (or its public export) that may restore; with --reversible."),
) -> None:
    """Watermark one image; the output keeps its format and (for DICOM) every attribute."""
    from medsec_edge.runtime.watermark.payload import parse_payload_hex
    from medsec_edge.runtime.pipeline import load_watermarker, watermark_file

    try:
        recipient = None
        if reversible or to is not None:
            if not (reversible and to is not None):
                raise UsageError("--reversible and --to KEY_DIR go together: the key set that may restore")
            from medsec_edge.runtime.crypto.keyset import KeyRing

            recipient = KeyRing.load(to, private=False).recipient
        explicit = parse_payload_hex(payload) if payload is not None else None
        wm_key = None if explicit is not None else _key(key, create=True)
        watermarker, bndl = load_watermarker(bundle, threads=threads)
        output.parent.mkdir(parents=True, exist_ok=True)
        record = watermark_file(input, output, watermarker, bndl, wm_key, explicit, reversible_to=recipient)
    except MedsecError as exc:
        _fail(exc)
        return
    _print_records([record], as_json)
    if record.status == "bad_input":
        _error(record.reason)
        raise typer.Exit(4)
    if record.status != "ok":
        raise typer.Exit(1)


def extract(
    inputs: list[Path] = typer.Argument(..., help="Images to read the watermark from."),
    bundle: Optional[Path] = BundleOpt,
    key: Optional[Path] = KeyOpt,
    threads: Optional[int] = ThreadsOpt,
    as_json: bool = typer.Option(False, "--json", help="One JSON object per input line."),
) -> None:
    """Read the watermark: found, payload, confidence, and whether it matches the image's identity."""
    from medsec_edge.runtime.io.readers import read_image
    from medsec_edge.runtime.pipeline import load_watermarker
    from medsec_edge.runtime.watermark.identity import identity_match

    try:
        watermarker, _ = load_watermarker(bundle, threads=threads)
        wm_key = _key(key, create=False)
    except MedsecError as exc:
        _fail(exc)
        return
    rows, worst = [], 0
    for path in inputs:
        try:
            image = read_image(path)
        except MedsecError as exc:
            row = {"path": str(path), "found": False, "payload": None, "error": str(exc)}
            worst = max(worst, exc.exit_code)
        else:
            ex = watermarker.extract(image)
            row = {
                "path": str(path), "image_id": image.meta.image_id, "found": ex.found,
                "payload": ex.payload, "confidence": round(ex.confidence, 4),
                "bits_corrected": ex.bits_corrected, "identity_match": identity_match(image, ex, wm_key),
                "period_px": round(ex.period_px, 2), "angle_deg": round(ex.angle_deg, 2),
                "latency_ms": round(ex.timings_ms.get("total_ms", 0.0), 2),
            }
            if not ex.found or row["identity_match"] is False:
                worst = max(worst, 1)
        rows.append(row)
        if as_json:
            sys.stdout.write(json.dumps(row) + "\n")
            sys.stdout.flush()
    if not as_json:
        _table("extract", rows, ["path", "found", "payload", "confidence", "bits_corrected", "identity_match",
                                 "latency_ms"])
    if worst:
        raise typer.Exit(worst)


def run(
    inputs: list[Path] = typer.Argument(..., help="Files and folders of images."),
    out: Path = typer.Option(..., "--out", help="Output folder (created; inputs are never modified)."),
    payload: Optional[str] = typer.Option(None, "--payload", help="16 hex digits for every image instead of the identity MAC."),
    bundle: Optional[Path] = BundleOpt,
    key: Optional[Path] = KeyOpt,
    threads: Optional[int] = ThreadsOpt,
    operating_point: Optional[str] = typer.Option(None, "--operating-point",
                                                  help="Tamper-check threshold set: fpr0.1 (default) or fpr1."),
    keys: Optional[Path] = typer.Option(
        None, "--keys",
        help="Key set or ring that seals and signs every DICOM output (default: $MEDSEC_EDGE_KEYS or "
             "~/.config/medsec-edge/keys; created, as by 'keys new', on first use)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """The acquisition-time job: check, watermark, verify and seal each image, write it and a report.

    Every DICOM output is sealed (Ed25519 over pixels + identity) and signed (DICOM PS3.15 Creator
    RSA) where it was written; PNG, TIFF, JPEG and NPY outputs cannot carry a seal and are reported
    unsealed. Images the tamper check flags are not watermarked: they are copied to OUT/tampered/
    with a .reason.json beside each."""
    from rich.progress import Progress

    from medsec_edge.runtime.watermark.payload import parse_payload_hex
    from medsec_edge.runtime.io.inputs import collect_inputs
    from medsec_edge.runtime.pipeline import load_watermarker, run_batch
    from medsec_edge.runtime.crypto.device_keys import load_or_create_ring
    from medsec_edge.runtime.tamper.checker import MODEL_NAME, TamperChecker

    try:
        explicit = parse_payload_hex(payload) if payload is not None else None
        files = collect_inputs(inputs)
        if not files:
            raise UsageError("no image files found in the given inputs")
        wm_key = None if explicit is not None else _key(key, create=True)
        ring = load_or_create_ring(keys)
        watermarker, bndl = load_watermarker(bundle, threads=threads)
        checker, check_note = None, "skipped: the bundle has no tamper_detector model"
        if MODEL_NAME in bndl.manifest.models:
            checker = TamperChecker.from_bundle(bndl, watermarker=watermarker, key=wm_key, threads=threads)
            checker.operating_point(operating_point)
            check_note = checker.operating_point(operating_point).name
        else:
            log.warning("tamper check %s", check_note)
    except MedsecError as exc:
        _fail(exc)
        return
    with Progress(console=_stderr(), transient=True) as progress:
        task = progress.add_task("checking and watermarking", total=len(files))
        report, records = run_batch(files, [_relative_name(p, inputs) for p in files], out, watermarker, bndl,
                                    wm_key, explicit, checker=checker, operating_point=operating_point,
                                    check_note=check_note, ring=ring, on_done=lambda: progress.advance(task))
    if as_json:
        sys.stdout.write(json.dumps(report) + "\n")
    else:
        _print_records(records, False)
        _summary(report)
    if report["bad_input"]:
        raise typer.Exit(4)
    if report["verify_failed"] or report["tampered"] or report["seal_failed"]:
        raise typer.Exit(1)


def check(
    inputs: list[Path] = typer.Argument(..., help="Images (or folders) to check for tampering."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per input line."),
    mask_dir: Optional[Path] = typer.Option(None, "--mask-dir", help="Write a mask PNG per tampered image here."),
    operating_point: Optional[str] = OperatingPointOpt,
    bundle: Optional[Path] = BundleOpt,
    key: Optional[Path] = KeyOpt,
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """Was the image manipulated, where, and how sure: blind CNN + watermark-aware local map."""
    from medsec_edge.runtime.io.readers import read_image
    from medsec_edge.runtime.io.inputs import collect_inputs
    from medsec_edge.runtime.pipeline import load_checker
    from medsec_edge.runtime.tamper.report import check_row, write_mask_png

    try:
        files = collect_inputs(inputs)
        if not files:
            raise UsageError("no image files found in the given inputs")
        checker = load_checker(bundle, key=_key(key, create=False), threads=threads)
        checker.operating_point(operating_point)  # an unknown name fails before any work
    except MedsecError as exc:
        _fail(exc)
        return
    rows, worst = [], 0
    for path in files:
        try:
            image = read_image(path)
        except MedsecError as exc:
            row = {"path": str(path), "tampered": None, "error": str(exc)}
            worst = max(worst, exc.exit_code)
        else:
            verdict = checker.check(image, operating_point)
            row = check_row(path, image, verdict)
            if verdict.tampered:
                worst = max(worst, 1)
                if mask_dir is not None:
                    row["mask"] = str(write_mask_png(verdict, mask_dir, path, image.meta.image_id))
        rows.append(row)
        if as_json:
            sys.stdout.write(json.dumps(row) + "\n")
            sys.stdout.flush()
    if not as_json:
        _table("check", rows, ["path", "tampered", "score", "watermark", "operating_point", "regions", "latency_ms"])
    if worst:
        raise typer.Exit(worst)


def _relative_name(path: Path, inputs: list[Path]) -> Path:
    for root in inputs:
        if root.is_dir():
            try:
                return path.relative_to(root)
            except ValueError:
                continue
    return Path(path.name)


def _print_records(records, as_json: bool) -> None:
    if as_json:
        for r in records:
            sys.stdout.write(json.dumps(r.to_dict()) + "\n")
        return
    rows = [{"input": Path(r.input).name, "image": r.image_id, "status": r.status, "found": r.found,
             "conf": r.confidence, "check ms": r.latency_ms.get("check"), "embed ms": r.latency_ms.get("embed"),
             "verify ms": r.latency_ms.get("verify"), "sealed": r.sealed,
             "budget": "; ".join(r.budget_misses) or "ok"} for r in records]
    _table("images", rows, list(rows[0]) if rows else [])


def _summary(report: dict) -> None:
    rows = [{"stage": s, **v} for s, v in report["latency_ms"].items()]
    _table(f"{report['ok']}/{report['images']} watermarked and verified, {report['sealed']} sealed "
           f"({report['tampered']} refused as tampered, {report['verify_failed']} failed, "
           f"{report['seal_failed']} not sealable, {report['bad_input']} bad input) - latency ms", rows,
           ["stage", "p50", "p99", "n"])
