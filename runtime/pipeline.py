"""The acquisition-time job and its building blocks: open the default bundle, check, watermark, verify, seal.

Layer: runtime. ``run`` reads each image, checks it for tampering (refusing tampered ones),
watermarks it with a payload bound to its DICOM
identity, re-extracts from the in-memory result to verify before anything is written, writes
atomically, and (given a key ring) seals and signs the written DICOM file (``seal_stage``);
every stage is timed and compared with the bundle's latency budgets (the seal has none).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from medsec_edge.runtime.bundle import Bundle, open_bundle
from medsec_edge.runtime.errors import BundleError, InputError, MedsecError
from medsec_edge.runtime.io.image import MedicalImage
from medsec_edge.runtime.io.formats import FORMAT_BY_SUFFIX
from medsec_edge.runtime.io.readers import read_image
from medsec_edge.runtime.io.writers import write_image
from medsec_edge.runtime.crypto.sealing import seal_file
from medsec_edge.runtime.crypto.watermark_key import WatermarkKey
from medsec_edge.runtime.tamper.checker import TamperChecker
from medsec_edge.runtime.watermark.identity import payload_for
from medsec_edge.runtime.watermark.payload import PayloadCodec
from medsec_edge.runtime.watermark.watermarker import Watermarker
from medsec_edge.runtime.watermark.models import BundleWatermarkModels

log = logging.getLogger(__name__)

BUNDLE_ENV = "MEDSEC_EDGE_BUNDLE"


def default_bundle_path() -> Path:
    """``$MEDSEC_EDGE_BUNDLE``, else the default bundle shipped in the repository."""
    env = os.environ.get(BUNDLE_ENV, "").strip()
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "bundles" / "default"


def load_watermarker(bundle_path: Path | None = None, *, threads: int | None = None,
                     backend: str | None = None) -> tuple[Watermarker, Bundle]:
    path = bundle_path or default_bundle_path()
    if not path.exists():
        raise BundleError(f"bundle {path} does not exist: pass --bundle or set {BUNDLE_ENV}")
    bundle = open_bundle(path)
    models = BundleWatermarkModels(bundle, backend=backend, threads=threads)
    target = float(bundle.manifest.payload.get("target_psnr_db", 42.5))
    return Watermarker(models, PayloadCodec(), target_psnr_db=target), bundle


def load_checker(bundle_path: Path | None = None, *, key: WatermarkKey | None = None,
                 threads: int | None = None, backend: str | None = None):
    """The tamper check of a verified bundle, watermark-aware (identity too when ``key`` is given)."""
    watermarker, bundle = load_watermarker(bundle_path, threads=threads, backend=backend)
    return TamperChecker.from_bundle(bundle, watermarker=watermarker, key=key, backend=backend, threads=threads)


@dataclass(frozen=True)
class RunRecord:
    """One image of a run: no patient data, the image is named by its hash."""

    image_id: str
    input: str
    output: str | None
    status: str  # ok | verify_failed | seal_failed | tampered | bad_input
    reason: str = ""
    shape: tuple[int, ...] = ()
    payload_mode: str = ""
    found: bool = False
    confidence: float = 0.0
    bits_corrected: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)
    budget_misses: list[str] = field(default_factory=list)
    tamper: dict | None = None  # the check stage's verdict (None when the bundle has no detector)
    sealed: bool = False  # the written file carries our seal and a PS3.15 signature
    seal_key_id: str | None = None
    seal_reason: str = ""  # why it is not sealed (non-DICOM output, no key ring, failure)

    def to_dict(self) -> dict:
        return asdict(self)


def size_class(shape_hw: tuple[int, int]) -> str:
    """Budget key suffix: images up to ~1 Mpx count as 512, larger ones as 2048."""
    return "512" if shape_hw[0] * shape_hw[1] <= 1024 * 1024 else "2048"


def _keep_aside(path: Path, aside_path: Path, image: MedicalImage, verdict) -> Path:
    """Copy a refused input next to a JSON of why (named by hash: no patient data), atomically."""
    import json
    import shutil

    aside_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = aside_path.with_name(aside_path.name + ".tmp")
    shutil.copyfile(path, tmp)
    tmp.replace(aside_path)
    reason = {"image_id": image.meta.image_id, **verdict.to_dict()}
    aside_path.with_name(aside_path.name + ".reason.json").write_text(json.dumps(reason, indent=1))
    return aside_path


def watermark_file(path: Path, out_path: Path, watermarker: Watermarker, bundle: Bundle,
                   key: WatermarkKey | None, explicit: bytes | None, *, checker=None,
                   operating_point: str | None = None, aside_path: Path | None = None,
                   reversible_to=None, keyring=None) -> RunRecord:
    """Read, check, embed, verify in memory, write atomically, seal; every stage timed.

    With ``checker`` an image found tampered is not watermarked: it is reported and, with
    ``aside_path``, copied there with a ``.reason.json`` beside it. With ``keyring`` (a
    ``crypto_keys.KeyRing`` that can sign) a DICOM output is sealed and signed where it was
    written; if that fails the unsealed file is removed (status ``seal_failed``). PNG, TIFF, JPEG
    and NPY outputs have nowhere to keep a seal: they are written unsealed, with the reason.
    """
    lat: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        image = read_image(path)
    except InputError as exc:
        return RunRecord(image_id="", input=str(path), output=None, status="bad_input", reason=str(exc))
    lat["read"] = (time.perf_counter() - t0) * 1e3
    dicom_out = FORMAT_BY_SUFFIX.get(out_path.suffix.lower(), "dicom") == "dicom"
    if reversible_to is not None and (image.dataset is None or not dicom_out):
        return RunRecord(image_id=image.meta.image_id, input=str(path), output=None, status="bad_input",
                         reason="--reversible needs a DICOM input and a DICOM output "
                                "(the record lives in its private block)")
    tamper = None
    if checker is not None:
        tc = time.perf_counter()
        verdict = checker.check(image, operating_point)
        lat["check"] = (time.perf_counter() - tc) * 1e3
        tamper = {"tampered": verdict.tampered, "score": round(verdict.score, 6), "watermark": verdict.watermark,
                  "reasons": list(verdict.reasons), "regions": [r.to_dict() for r in verdict.regions]}
        if verdict.tampered:
            kept = _keep_aside(path, aside_path, image, verdict) if aside_path is not None else None
            lat["total"] = (time.perf_counter() - t0) * 1e3
            return RunRecord(
                image_id=image.meta.image_id, input=str(path), output=str(kept) if kept else None,
                status="tampered", reason="tamper check: " + "; ".join(verdict.reasons) + "; not watermarked",
                shape=tuple(int(s) for s in image.pixels.shape),
                latency_ms={k: round(v, 2) for k, v in lat.items()}, tamper=tamper,
            )
    payload, mode = payload_for(image, key, explicit)
    t1 = time.perf_counter()
    embedded = watermarker.embed(image, payload)
    lat["embed"] = (time.perf_counter() - t1) * 1e3
    t2 = time.perf_counter()
    check = watermarker.extract(replace(image, pixels=embedded.pixels))
    lat["verify"] = (time.perf_counter() - t2) * 1e3
    ok = check.found and check.payload == payload.hex()
    record = {
        "kind": "medsec-edge watermark", "version": 1, "payload_mode": mode,
        "key_id": key.key_id if (key is not None and mode == "identity-hmac") else None,
        "bundle": bundle.manifest.name, "bundle_key_id": bundle.key_id,
        "target_psnr_db": embedded.target_psnr_db, "verified": bool(ok),
    }
    written = None
    if ok:
        t3 = time.perf_counter()
        if reversible_to is None:
            written = write_image(image, embedded.pixels, out_path, record=record,
                                  description="Invisible watermark embedded by medsec-edge")
        else:
            from medsec_edge.runtime.crypto.reversible import record_for_image, write_reversible

            reversible = record_for_image(image, embedded.pixels, reversible_to)
            record["reversible"] = reversible.to_dict()  # sizes and key ids only
            written = write_reversible(image, embedded.pixels, out_path, reversible, watermark_record=record,
                                       description="Invisible watermark embedded by medsec-edge (reversible)")
        lat["write"] = (time.perf_counter() - t3) * 1e3
    seal, seal_failed = _seal_output(written, image, keyring, lat)
    if seal_failed:
        written = None
    lat["total"] = (time.perf_counter() - t0) * 1e3
    budgets = bundle.manifest.budgets_ms
    cls = size_class(image.shape_hw)
    misses = []
    for budget_stage, stage in (("check", "check"), ("embed", "embed"), ("extract", "verify")):
        limit = budgets.get(f"{budget_stage}_{cls}")
        if limit is not None and stage in lat and lat[stage] > limit:
            misses.append(f"{budget_stage} {lat[stage]:.1f} ms > {limit} ms")
    if seal_failed:
        status, reason = "seal_failed", "sealing the written file failed, so it was removed: " + seal["seal_reason"]
    elif ok:
        status, reason = "ok", ""
    else:
        status, reason = "verify_failed", "the watermark did not verify after embedding; nothing written"
    return RunRecord(
        image_id=image.meta.image_id, input=str(path), output=str(written) if written else None,
        status=status, reason=reason,
        shape=tuple(int(s) for s in image.pixels.shape), payload_mode=mode, found=check.found,
        confidence=round(check.confidence, 4), bits_corrected=check.bits_corrected,
        latency_ms={k: round(v, 2) for k, v in lat.items()}, budget_misses=misses, tamper=tamper, **seal,
    )


def _seal_output(written: Path | None, image: MedicalImage, keyring,
                 lat: dict[str, float]) -> tuple[dict, bool]:
    """Seal and sign a written DICOM output, timed as ``lat['seal']``.

    Returns the RunRecord's seal fields and whether sealing failed (the file is then removed).
    """
    if written is None:
        return {}, False
    if keyring is None:
        return {"seal_reason": "no key ring given: not sealed"}, False
    fmt = FORMAT_BY_SUFFIX.get(Path(written).suffix.lower(), image.meta.source_format)
    if fmt != "dicom":
        return {"seal_reason": f"{fmt.upper()} output cannot carry a seal (DICOM only): not sealed"}, False
    ts = time.perf_counter()
    try:
        result = seal_file(written, keyring)
    except MedsecError as exc:
        Path(written).unlink(missing_ok=True)  # nothing leaves the job unsigned
        return {"seal_reason": str(exc)}, True
    finally:
        lat["seal"] = (time.perf_counter() - ts) * 1e3
    return {"sealed": True, "seal_key_id": result.seal_key_id}, False


def run_batch(files: list[Path], names: list[Path], out: Path, watermarker: Watermarker, bundle: Bundle,
              key: WatermarkKey | None, explicit: bytes | None, *, checker: TamperChecker | None,
              operating_point: str | None, check_note: str, ring, on_done=None) -> tuple[dict, list[RunRecord]]:
    """The acquisition-time job over ``files``: each is written to ``out / names[i]`` (tampered ones
    to ``out/tampered/``), and the report (counts, per-stage latency percentiles, one PHI-free
    record per image) is written to ``out/report.json`` and returned with the records."""
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for path, name in zip(files, names):
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        records.append(watermark_file(path, target, watermarker, bundle, key, explicit, checker=checker,
                                      operating_point=operating_point, aside_path=out / "tampered" / name,
                                      keyring=ring))
        if on_done is not None:
            on_done()
    stages = sorted({k for r in records for k in r.latency_ms})
    report = {
        "bundle": bundle.manifest.name, "bundle_key_id": bundle.key_id,
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
    return report, records


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values)
    return {"p50": round(float(np.percentile(arr, 50)), 2), "p99": round(float(np.percentile(arr, 99)), 2),
            "n": int(arr.size)}
