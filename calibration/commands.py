"""`medsec-edge calibrate`: added to the CLI through the entry-point group ``medsec_edge.commands``.

Layer: calibration. Only typer at import; onnx, the quantization tools and the evaluation attacks
inside the command body, so a runtime-only install answers with the extra to install.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import List, Optional

import typer

from medsec_edge.runtime.cli.extras import missing_extra, require
from medsec_edge.runtime.cli.help import command
from medsec_edge.runtime.cli.output import error, json_line, progress, table
from medsec_edge.runtime.cli.output import fail as _fail
from medsec_edge.runtime.errors import MedsecError

NEEDS = ("onnx", "scipy")  # the quantization tools work on ONNX; the gate's attacks need scipy


def register(app: typer.Typer) -> None:
    command(app, calibrate,
            """
            medsec-edge calibrate bundles/default --images calib/ --precision int8 --out bundles/int8
            medsec-edge calibrate bundles/default --images calib/ --validation val/ --precision fp16 --out b16""",
            "calibrate")


def calibrate(
    bundle: Path = typer.Argument(..., help="The FP32 bundle to start from (verified first)."),
    images: List[Path] = typer.Option(..., "--images", help="Calibration images: files or folders (repeat the option)."),
    precision: str = typer.Option(..., "--precision", help="int8 (explicit QDQ) or fp16."),
    out: Path = typer.Option(..., "--out", help="Bundle directory to write (must not exist)."),
    validation: Optional[List[Path]] = typer.Option(None, "--validation", help="Validation images for the gate (default: half of --images' series)."),
    signing_key: Optional[Path] = typer.Option(None, "--signing-key", help="Ed25519 private key (PEM) that signs the new bundle."),
    trusted_keys: Optional[Path] = typer.Option(None, "--trusted-keys", help="Trusted public key(s) for BUNDLE (default: the trust store)."),
    trials: int = typer.Option(2, "--trials", min=1, help="Payloads per validation image."),
    per_model: int = typer.Option(64, "--per-model", min=1, help="Recorded inputs kept per model."),
    target_db: float = typer.Option(30.0, "--target-db", help="Output SQNR a variant must keep (dB)."),
    attacks: Optional[str] = typer.Option(None, "--attacks", help="Comma-separated gate attacks (default: all)."),
    as_json: bool = typer.Option(False, "--json", help="The whole result as one JSON object."),
) -> None:
    """Make an INT8 (QDQ) or FP16 variant of every model from real calibration images, check it
    against the FP32 bundle on validation images (payload recovery per attack may drop by 0.5
    point at most, tamper and fingerprint AUC by 0.005, no false detection) and write a signed
    bundle. A failed gate writes nothing and exits 1."""
    require("calibrate", "export,eval", *NEEDS)
    try:
        from medsec_edge.calibration.calibrate import GateFailed
        from medsec_edge.calibration.calibrate import calibrate as run_calibration
        from medsec_edge.export.watermark_export import DEFAULT_SIGNING_KEY
    except ImportError as exc:
        missing_extra("calibrate", "export,eval", exc.name or "a module")
    argv = ["medsec-edge", "calibrate", str(bundle), "--precision", precision, "--out", str(out)]
    for path in images:
        argv += ["--images", str(path)]
    for path in validation or []:
        argv += ["--validation", str(path)]
    if attacks:
        argv += ["--attacks", attacks]
    argv += ["--trials", str(trials), "--per-model", str(per_model), "--target-db", f"{target_db:g}"]

    def bar(total: int, what: str):
        _close(bars)  # one live bar at a time (rich allows one): the previous step is done
        context = progress(total, what)
        tick = context.__enter__()
        bars.append(context)
        return tick

    bars: list = []
    try:
        result = run_calibration(
            bundle, images, precision=precision, out=out, validation=validation,
            signing_key=signing_key or DEFAULT_SIGNING_KEY, trusted_keys=trusted_keys, per_model=per_model,
            trials=trials, target_db=target_db, command=shlex.join(argv), progress=bar,
            attacks=[a.strip() for a in attacks.split(",") if a.strip()] if attacks else None)
    except GateFailed as exc:
        _close(bars)
        show_gate(exc.report.to_dict(), as_json)
        error(exc)
        raise typer.Exit(1) from None
    except MedsecError as exc:
        _close(bars)
        _fail(exc)
    _close(bars)
    if as_json:
        json_line(result.to_dict())
        return
    show_gate(result.gate.to_dict(), False)
    low = result.manifest_precision
    rows = [{"model": name, "fp32_ms": row["fp32"], f"{precision}_ms": row.get(low),
             "cpu_uses": result.selection[name]["onnxruntime"]["use"],
             "trt_uses": result.selection[name]["tensorrt"]["use"]}
            for name, row in result.latency_ms.items()]
    table("latency on this CPU (median over the largest recorded inputs) and the choice per target",
          rows, ["model", "fp32_ms", f"{precision}_ms", "cpu_uses", "trt_uses"],
          details=[f"{n}: {s['onnxruntime']['why']}" for n, s in result.selection.items()])
    table(None, [{"wrote": str(result.out), "calibration": result.calibration_images,
                  "validation": result.validation_images, "seconds": round(result.seconds)}],
          ["wrote", "calibration", "validation", "seconds"])


def show_gate(gate: dict, as_json: bool) -> None:
    """The gate's figures: one row per attack, then the AUCs and false detections."""
    if as_json:
        json_line({"gate": gate})
        return
    rows = [{"attack": attack, "n": r["n"], "fp32": r["reference"], "variant": r["candidate"],
             "fp32_reads_var": r["cross_reference_reads_candidate"],
             "var_reads_fp32": r["cross_candidate_reads_reference"]}
            for attack, r in gate["recovery_pct"].items()]
    verdict = "PASSED" if gate["passed"] else "FAILED"
    details = [f"tamper AUC: {gate['tamper_auc']}", f"fingerprint AUC: {gate['fingerprint_auc']}",
               f"false detections: {gate['false_detections']}"] + [f"miss: {f}" for f in gate["failures"]]
    table(f"accuracy gate {verdict}: exact payload recovery % on {gate['images']} validation images x "
          f"{gate['trials']} payloads", rows, ["attack", "n", "fp32", "variant", "fp32_reads_var", "var_reads_fp32"],
          details=details)


def _close(bars: list) -> None:
    while bars:
        bars.pop().__exit__(None, None, None)
