"""`medsec-edge`: the command line (typer). Results on stdout, logs on stderr.

Layer: runtime. Workstation commands (train, export, eval) import their heavy dependencies
inside the command body, so the device commands never load torch. Exit codes (DESIGN.md):
0 ok, 1 verification failed, 2 usage, 3 bundle or backend error, 4 bad input file.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import MedsecError, UsageError

app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False, no_args_is_help=True,
                  help="Watermark, check and seal medical images where they are made.")
train_app = typer.Typer(no_args_is_help=True, help="Train models (needs the 'train' extra).")
export_app = typer.Typer(no_args_is_help=True, help="Export trained models to a signed bundle.")
eval_app = typer.Typer(no_args_is_help=True, help="Evaluate against attacks and baselines.")
app.add_typer(train_app, name="train")
app.add_typer(export_app, name="export")
app.add_typer(eval_app, name="eval")

log = logging.getLogger("medsec_edge")

BundleOpt = typer.Option(None, "--bundle", help="Model bundle (default: the repo's bundles/default).")
KeyOpt = typer.Option(None, "--key", help="Watermark key file (default: $MEDSEC_EDGE_KEY or ~/.config/medsec-edge/watermark.key).")
ThreadsOpt = typer.Option(None, "--threads", help="Inference threads (default: all cores).")


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    handler = RichHandler(console=_stderr(), show_path=False, show_time=False)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, handlers=[handler], force=True)
    # pydicom's own messages can quote element values (patient data): keep them out of logs.
    logging.getLogger("pydicom").setLevel(logging.ERROR)


def _stderr():
    from rich.console import Console

    return Console(stderr=True)


def _error(message: object) -> None:
    """One line on stderr; the message is shown as is (no rich markup inside it)."""
    from rich.markup import escape

    _stderr().print(f"[red]error:[/red] {escape(str(message))}", highlight=False, soft_wrap=True)


def _fail(exc: MedsecError) -> None:
    _error(exc)
    raise typer.Exit(exc.exit_code)


@app.callback()
def main_callback(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logs on stderr.")) -> None:
    _setup_logging(verbose)


def _key(path: Optional[Path], create: bool):
    from .keys import default_key_path, load_or_create_key

    key_path = path or default_key_path()
    if not create and not key_path.exists():
        return None
    return load_or_create_key(key_path, create=create)


@app.command()
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
    from .payload import parse_payload_hex
    from .pipeline import load_watermarker, watermark_file

    try:
        recipient = None
        if reversible or to is not None:
            if not (reversible and to is not None):
                raise UsageError("--reversible and --to KEY_DIR go together: the key set that may restore")
            from .crypto_keys import KeyRing

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


@app.command()
def extract(
    inputs: list[Path] = typer.Argument(..., help="Images to read the watermark from."),
    bundle: Optional[Path] = BundleOpt,
    key: Optional[Path] = KeyOpt,
    threads: Optional[int] = ThreadsOpt,
    as_json: bool = typer.Option(False, "--json", help="One JSON object per input line."),
) -> None:
    """Read the watermark: found, payload, confidence, and whether it matches the image's identity."""
    from .imageio import read_image
    from .pipeline import identity_match, load_watermarker

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


@app.command()
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

    from .payload import parse_payload_hex
    from .pipeline import collect_inputs, load_watermarker, percentiles, watermark_file
    from .seal_stage import load_or_create_ring
    from .tamper import MODEL_NAME, TamperChecker

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
    out.mkdir(parents=True, exist_ok=True)
    records = []
    with Progress(console=_stderr(), transient=True) as progress:
        task = progress.add_task("checking and watermarking", total=len(files))
        for path in files:
            name = _relative_name(path, inputs)
            target = out / name
            target.parent.mkdir(parents=True, exist_ok=True)
            records.append(watermark_file(path, target, watermarker, bndl, wm_key, explicit, checker=checker,
                                          operating_point=operating_point, aside_path=out / "tampered" / name,
                                          keyring=ring))
            progress.advance(task)
    stages = sorted({k for r in records for k in r.latency_ms})
    report = {
        "bundle": bndl.manifest.name, "bundle_key_id": bndl.key_id,
        "images": len(records),
        "tamper_check": check_note,
        "seal_key_id": ring.signer.key_id, "dicom_key_id": ring.dicom_signer.key_id,
        "ok": sum(r.status == "ok" for r in records),
        "sealed": sum(r.sealed for r in records),
        "tampered": sum(r.status == "tampered" for r in records),
        "verify_failed": sum(r.status == "verify_failed" for r in records),
        "seal_failed": sum(r.status == "seal_failed" for r in records),
        "bad_input": sum(r.status == "bad_input" for r in records),
        "budget_misses": sum(bool(r.budget_misses) for r in records),
        "latency_ms": {s: percentiles([r.latency_ms[s] for r in records if s in r.latency_ms]) for s in stages},
        "records": [r.to_dict() for r in records],
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    if as_json:
        sys.stdout.write(json.dumps(report) + "\n")
    else:
        _print_records(records, False)
        _summary(report)
    if report["bad_input"]:
        raise typer.Exit(4)
    if report["verify_failed"] or report["tampered"] or report["seal_failed"]:
        raise typer.Exit(1)


OperatingPointOpt = typer.Option(None, "--operating-point",
                                  help="Threshold set from the bundle: fpr0.1 (default) or fpr1.")


@app.command()
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
    from .imageio import read_image
    from .pipeline import collect_inputs, load_checker
    from .tamper_report import check_row, write_mask_png

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


def _table(title: str, rows: list[dict], columns: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*["" if row.get(c) is None else str(row.get(c)) for c in columns])
    Console().print(table)


@train_app.command("watermark")
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


@train_app.command("tamper")
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


@export_app.command("tamper")
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


@export_app.command("watermark")
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


@eval_app.command("watermark")
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
    try:
        from medsec_edge.evaluation.watermark_eval import run_watermark_eval
    except ImportError as exc:
        _fail(MedsecError(f"evaluation needs its extra: pip install 'medsec-edge[eval]' ({exc.name} missing)"))
        return
    try:
        run_watermark_eval(held_out_images(images, pydicom_data), out, trials=trials, with_baselines=baselines,
                           bundle_path=bundle, threads=threads, seed=seed, baseline_trials=baseline_trials)
    except MedsecError as exc:
        _fail(exc)


@eval_app.command("tamper")
def eval_tamper(
    images: list[Path] = typer.Option([], "--images", help="Folders or files of held-out images."),
    pydicom_data: bool = typer.Option(False, "--pydicom-data", help="Add the held-out images of the pydicom-data package."),
    out: Path = typer.Option(Path("runs/eval-tamper"), "--out", help="Where to write JSON, markdown and the plot."),
    trials: int = typer.Option(3, "--trials", help="Draws per manipulation family and image."),
    benign_trials: int = typer.Option(3, "--benign-trials", help="Draws per benign step and image."),
    watermark: bool = typer.Option(True, "--watermark/--no-watermark", help="Also score the watermark-aware check."),
    bundle: Optional[Path] = BundleOpt,
    threads: Optional[int] = ThreadsOpt,
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Detection (AUC, TPR at FPR 1%/0.1%, per family and size), localization, benign FPR, study FPR,
    latency; a hash and a noise-residual baseline beside; the watermark-aware check on marked frames."""
    try:
        from medsec_edge.evaluation.tamper_eval import MARKDOWN_NAME, run_tamper_eval
    except ImportError as exc:
        _fail(MedsecError(f"evaluation needs its extra: pip install 'medsec-edge[eval]' ({exc.name} missing)"))
        return
    import shlex

    command = shlex.join(["medsec-edge", *sys.argv[1:]])
    try:
        run_tamper_eval(held_out_images(images, pydicom_data), out, bundle_path=bundle, threads=threads, seed=seed, trials=trials,
                        benign_trials=benign_trials, watermark=watermark, command=command)
    except MedsecError as exc:
        _fail(exc)
        return
    sys.stdout.write((out / MARKDOWN_NAME).read_text() + "\n")


def main() -> None:
    try:
        app()
    except MedsecError as exc:  # errors raised outside a command body
        _error(exc)
        sys.exit(exc.exit_code)


from .cli_crypto import register as _register_crypto  # noqa: E402 - after app and helpers exist

_register_crypto(app)

from .cli_research import register_eval_crypto, register_train_cipher  # noqa: E402

register_eval_crypto(eval_app)
register_train_cipher(train_app)


if __name__ == "__main__":
    main()
