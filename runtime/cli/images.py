"""The image commands a device runs: run (the acquisition-time job), check, embed, extract.

Layer: runtime (cli). Each command parses, calls the job or a capability, prints: JSON lines
with ``--json`` (one object per input; ``run`` adds one summary object), else a table that
stays readable at 80 columns with the long details below it. Exit codes (DESIGN.md): 0 ok,
1 verification failed, 2 usage, 3 bundle or backend error, 4 bad input file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from medsec_edge.runtime.cli.help import command
from medsec_edge.runtime.cli.keys import watermark_key
from medsec_edge.runtime.cli.options import (
    BundleOpt,
    JsonOpt,
    LegacyWatermarkKeyOpt,
    NoRegistryOpt,
    OperatingPointOpt,
    ThreadsOpt,
    keys_option,
    registry_option,
)
from medsec_edge.runtime.cli.output import error as _error
from medsec_edge.runtime.cli.output import fail as _fail
from medsec_edge.runtime.cli.output import json_line, progress, table
from medsec_edge.runtime.errors import MedsecError, UsageError

log = logging.getLogger("medsec_edge")


def register(app: typer.Typer) -> None:
    """Add ``run``, ``check``, ``embed`` and ``extract`` to ``app``."""
    command(app, embed, """
        medsec-edge embed scan.dcm marked.dcm
        medsec-edge embed scan.dcm marked.dcm --reversible --to archive-public/""")
    command(app, extract, "medsec-edge extract out/run --json")
    command(app, run, """
        medsec-edge run incoming/ --out out/run
        medsec-edge run incoming/ --out out/run --keys /etc/medsec/keys --json""")
    command(app, check, "medsec-edge check export/ --mask-dir masks --json")


def _no_key_message(keys: Optional[Path]) -> str:
    where = keys if keys is not None else "the device key set"
    return (f"{where} has no watermark key (a public export?): pass the device's key set with "
            "--keys DIR, or --payload HEX")


def embed(
    input: Path = typer.Argument(..., help="Image to watermark (DICOM, PNG, TIFF, JPEG, NPY)."),
    output: Path = typer.Argument(..., help="Where to write the watermarked image (same format)."),
    payload: Optional[str] = typer.Option(None, "--payload", help="16 hex digits instead of the identity MAC."),
    keys: Optional[Path] = keys_option("created on first use; its watermark key makes the identity MAC"),
    reversible: bool = typer.Option(
        False, "--reversible", help="Keep the exact original recoverable by --to's key holder ('restore'; DICOM only)."),
    to: Optional[Path] = typer.Option(
        None, "--to", metavar="DIR", help="Public key set of who may restore; with --reversible."),
    bundle: Optional[Path] = BundleOpt,
    threads: Optional[int] = ThreadsOpt,
    as_json: bool = JsonOpt,
    key: Optional[Path] = LegacyWatermarkKeyOpt,
) -> None:
    """Watermark one image; the output keeps its format and (for DICOM) every attribute."""
    from medsec_edge.runtime.pipeline import load_watermarker, watermark_file
    from medsec_edge.runtime.watermark.payload import parse_payload_hex

    try:
        recipient = None
        if reversible or to is not None:
            if not (reversible and to is not None):
                raise UsageError("--reversible and --to DIR go together: the public key set that may restore")
            from medsec_edge.runtime.crypto.keyset import KeyRing

            recipient = KeyRing.load(to, private=False).recipient
        explicit = parse_payload_hex(payload) if payload is not None else None
        wm_key = None if explicit is not None else watermark_key(keys, key, create=True)
        if explicit is None and wm_key is None:
            raise UsageError(_no_key_message(keys))
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
    inputs: list[Path] = typer.Argument(..., help="Images and folders of images."),
    keys: Optional[Path] = keys_option("used only if it exists; without its watermark key identity_match is null"),
    bundle: Optional[Path] = BundleOpt,
    threads: Optional[int] = ThreadsOpt,
    as_json: bool = JsonOpt,
    key: Optional[Path] = LegacyWatermarkKeyOpt,
) -> None:
    """Read the watermark: found, payload and its kind (identity MAC or user-set), confidence,
    and whether it is this image's identity.

    Exit 1 if any image has no watermark or one that names another image."""
    from medsec_edge.runtime.io.readers import read_image
    from medsec_edge.runtime.pipeline import load_watermarker
    from medsec_edge.runtime.watermark.identity import identity_match
    from medsec_edge.runtime.watermark.spec import capacity

    try:
        files = _files(inputs)
        wm_key = watermark_key(keys, key, create=False)
        watermarker, _ = load_watermarker(bundle, threads=threads)
    except MedsecError as exc:
        _fail(exc)
        return
    rows, worst = [], 0
    with progress(len(files), "extract") as advance:
        for path in files:
            try:
                image = read_image(path)
            except MedsecError as exc:
                row = {"path": str(path), "found": False, "payload": None, "payload_kind": None,
                       "error": str(exc)}
                worst = max(worst, exc.exit_code)
            else:
                ex = watermarker.extract(image)
                row = {
                    "path": str(path), "image_id": image.meta.image_id, "found": ex.found,
                    "payload": ex.payload, "payload_kind": ex.payload_kind,
                    "confidence": round(ex.confidence, 4), "bits_corrected": ex.bits_corrected,
                    "identity_match": identity_match(image, ex, wm_key),
                    "key_id": wm_key.key_id if wm_key is not None else None,
                    "period_px": round(ex.period_px, 2), "angle_deg": round(ex.angle_deg, 2),
                    "latency_ms": round(ex.timings_ms.get("total_ms", 0.0), 2),
                    "capacity": capacity(*image.shape_hw),
                }
                if not ex.found or row["identity_match"] is False:
                    worst = max(worst, 1)
            rows.append(row)
            if as_json:
                json_line(row)
            advance()
    if not as_json:
        shown = [{**r, "identity": r.get("identity_match"), "kind": r.get("payload_kind"),
                  "conf": r.get("confidence")} for r in rows]
        table(None, shown, ["path", "found", "payload", "kind", "conf", "identity"],
              details=[f"{Path(r['path']).name}: {r['error']}" for r in rows if r.get("error")])
    if worst:
        raise typer.Exit(worst)


def run(
    inputs: list[Path] = typer.Argument(..., help="Images and folders of images."),
    out: Path = typer.Option(..., "--out", metavar="DIR", help="Output folder (created; inputs are never modified)."),
    keys: Optional[Path] = keys_option("created on first use; seals and signs every DICOM output"),
    payload: Optional[str] = typer.Option(
        None, "--payload", help="16 hex digits for every image instead of the identity MAC."),
    operating_point: Optional[str] = OperatingPointOpt,
    bundle: Optional[Path] = BundleOpt,
    threads: Optional[int] = ThreadsOpt,
    as_json: bool = JsonOpt,
    registry_path: Optional[Path] = registry_option("created on first use; every output is recorded"),
    no_registry: bool = NoRegistryOpt,
    key: Optional[Path] = LegacyWatermarkKeyOpt,
) -> None:
    """The acquisition-time job: check, watermark, verify and seal each image, write it and a
    report (OUT/report.json).

    Every DICOM output is sealed (Ed25519 over pixels + identity) and signed (DICOM PS3.15 Creator
    RSA) with the key set, and carries a signed content fingerprint under the seal; every output
    is recorded in the evidence registry (fingerprint, geometry, hashed identity, by watermark
    payload), so `check` can still compare an export that lost its header. PNG, TIFF, JPEG and
    NPY outputs cannot carry a seal and are reported unsealed. Images the tamper check flags are
    not watermarked: they are copied to OUT/tampered/ with a .reason.json beside each. With
    --json: one object per image, then one summary."""
    from medsec_edge.runtime.crypto.device_keys import load_or_create_ring
    from medsec_edge.runtime.io.inputs import collect_inputs
    from medsec_edge.runtime.pipeline import load_watermarker, run_batch
    from medsec_edge.runtime.tamper.checker import MODEL_NAME, TamperChecker
    from medsec_edge.runtime.tamper.registry import Registry
    from medsec_edge.runtime.watermark.payload import parse_payload_hex

    try:
        explicit = parse_payload_hex(payload) if payload is not None else None
        files = collect_inputs(inputs)
        if not files:
            raise UsageError("no image files found in the given inputs")
        ring = load_or_create_ring(keys)
        wm_key = None
        if explicit is None:
            wm_key = watermark_key(None, key, create=True) if key is not None else ring.watermark
            if wm_key is None:
                raise UsageError(_no_key_message(keys))
        watermarker, bndl = load_watermarker(bundle, threads=threads)
        checker, check_note = None, "skipped: the bundle has no tamper_detector model"
        if MODEL_NAME in bndl.manifest.models:
            checker = TamperChecker.from_bundle(bndl, watermarker=watermarker, key=wm_key, threads=threads)
            check_note = checker.operating_point(operating_point).name  # an unknown name fails here
        else:
            log.warning("tamper check %s", check_note)
        registry = None if no_registry else Registry.open(registry_path, create=True)
    except MedsecError as exc:
        _fail(exc)
        return
    try:
        with progress(len(files), "run") as advance:
            report, records = run_batch(files, [_relative_name(p, inputs) for p in files], out, watermarker,
                                        bndl, wm_key, explicit, checker=checker, operating_point=operating_point,
                                        check_note=check_note, ring=ring, on_done=advance, registry=registry)
    finally:
        if registry is not None:
            registry.close()
    if as_json:
        for r in records:
            json_line(r.to_dict())
        json_line({k: v for k, v in report.items() if k != "records"})
    else:
        _print_records(records, False)
        _summary(report, records)
    if report["bad_input"]:
        raise typer.Exit(4)
    if report["verify_failed"] or report["tampered"] or report["seal_failed"]:
        raise typer.Exit(1)


def check(
    inputs: list[Path] = typer.Argument(..., help="Images and folders of images."),
    keys: Optional[Path] = keys_option("used only if it exists; its watermark key tells a mark naming another image"),
    mask_dir: Optional[Path] = typer.Option(
        None, "--mask-dir", metavar="DIR", help="Write a mask PNG per tampered image here."),
    operating_point: Optional[str] = OperatingPointOpt,
    bundle: Optional[Path] = BundleOpt,
    threads: Optional[int] = ThreadsOpt,
    as_json: bool = JsonOpt,
    registry_path: Optional[Path] = registry_option("used only if it exists"),
    no_registry: bool = NoRegistryOpt,
    key: Optional[Path] = LegacyWatermarkKeyOpt,
) -> None:
    """Was the image manipulated, where, and how sure. The strongest evidence decides: a valid
    seal proves a DICOM image untouched at once; else the signed fingerprint in the file, else the
    registry entry found by SOP UID or watermark payload, is compared with the pixels (benign
    processing is not tampering, a local edit is); with no evidence the blind CNN decides, labelled
    so. Each row names its `evidence` (seal, fingerprint, registry or blind) and its `reasons`.

    Exit 1 if any image is flagged."""
    from medsec_edge.runtime.crypto.device_keys import load_device_ring
    from medsec_edge.runtime.pipeline import load_checker
    from medsec_edge.runtime.tamper.registry import Registry, default_registry_path

    try:
        files = _files(inputs)
        ring = load_device_ring(keys, create=False)  # its seal keys verify; None: no seal check
        wm_key = watermark_key(keys, key, create=False) if key is not None else getattr(ring, "watermark", None)
        checker = load_checker(bundle, key=wm_key, threads=threads)
        checker.operating_point(operating_point)  # an unknown name fails before any work
        registry = None
        if not no_registry and (registry_path is not None or default_registry_path().exists()):
            registry = Registry.open(registry_path, create=False)
    except MedsecError as exc:
        _fail(exc)
        return
    try:
        rows, worst = _check_all(files, checker, ring, operating_point, registry, mask_dir, as_json)
    finally:
        if registry is not None:
            registry.close()
    if not as_json:
        shown = [{**r, "regions": len(r.get("regions") or []) if "regions" in r else None} for r in rows]
        details = []
        for r in rows:
            name = Path(r["path"]).name
            if r.get("error"):
                details.append(f"{name}: {r['error']}")
            elif r.get("tampered"):
                boxes = "; ".join(f"{g['width']}x{g['height']} at {g['x']},{g['y']} frame {g['frame']}"
                                  for g in r.get("regions", [])[:3])
                details.append(f"{name}: {', '.join(r.get('reasons') or [])}" + (f" ({boxes})" if boxes else ""))
        table(None, shown, ["path", "tampered", "evidence", "score", "watermark", "regions"], details=details)
    if worst:
        raise typer.Exit(worst)


def _check_all(files, checker, ring, operating_point, registry, mask_dir, as_json) -> tuple[list[dict], int]:
    """Check each file (one error is one row), printing JSON lines as they come with ``as_json``."""
    from medsec_edge.runtime.io.readers import read_image
    from medsec_edge.runtime.tamper.evidence import check_image
    from medsec_edge.runtime.tamper.report import check_row, write_mask_png

    rows, worst = [], 0
    with progress(len(files), "check") as advance:
        for path in files:
            try:
                image = read_image(path)
                verdict = check_image(image, checker, ring, operating_point, registry=registry)
                row = check_row(path, image, verdict)
                if verdict.tampered:
                    worst = max(worst, 1)
                    if mask_dir is not None and verdict.mask is not None:
                        row["mask"] = str(write_mask_png(verdict, mask_dir, path, image.meta.image_id))
            except MedsecError as exc:
                row = {"path": str(path), "tampered": None, "error": str(exc)}
                worst = max(worst, exc.exit_code)
            rows.append(row)
            if as_json:
                json_line(row)
            advance()
    return rows, worst


def _files(inputs: list[Path]) -> list[Path]:
    from medsec_edge.runtime.io.inputs import collect_inputs

    files = collect_inputs(inputs)
    if not files:
        raise UsageError("no image files found in the given inputs")
    return files


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
            json_line(r.to_dict())
        return
    rows = [{"input": r.input, "status": r.status, "found": r.found if r.status != "bad_input" else None,
             "conf": r.confidence if r.found else None, "sealed": r.sealed,
             "ms": r.latency_ms.get("total")} for r in records]
    details = [f"{Path(r.input).name}: {r.reason}" for r in records if r.reason]
    table(None, rows, ["input", "status", "found", "conf", "sealed", "ms"], details=details)


def _summary(report: dict, records) -> None:
    from rich.markup import escape

    from medsec_edge.runtime.cli.output import stdout

    misses: dict[str, list[str]] = {}
    for r in records:
        for miss in r.budget_misses:  # "embed 31.0 ms > 25 ms"
            misses.setdefault(miss.split(" ", 1)[0], []).append(miss)
    lines = [f"budget: {stage} over {items[0].rsplit('> ', 1)[-1]} on {len(items)} of {report['images']} images"
             for stage, items in sorted(misses.items())]
    problems = ", ".join(f"{report[k]} {label}" for k, label in (
        ("tampered", "tampered"), ("verify_failed", "failed verification"), ("seal_failed", "not sealable"),
        ("bad_input", "bad input")) if report[k])
    stdout().print(escape(f"{report['ok']}/{report['images']} watermarked and verified, {report['sealed']} sealed"
                          + (f"; {problems}" if problems else "")), highlight=False)
    table("latency ms", [{"stage": s, **v} for s, v in report["latency_ms"].items()],
          ["stage", "p50", "p99", "n"], details=lines)
