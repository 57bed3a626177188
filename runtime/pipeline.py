"""The acquisition-time job and its building blocks: open the default bundle, check, watermark, verify, seal.

Layer: runtime. ``run`` reads each image once, checks it for tampering (refusing tampered ones),
watermarks it with a payload bound to its DICOM identity, re-extracts from the in-memory result
to verify before anything is written, builds the output dataset, seals and signs it in memory
(``crypto.sealing``) and writes it once, atomically (``io.atomic``): an output exists under its
name only complete and sealed. Every stage is timed and compared with the bundle's latency
budgets (the seal has none); an image that fails is a record, never the end of the batch.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from medsec_edge.runtime.bundle import Bundle, open_bundle
from medsec_edge.runtime.bundle_store import resolve_bundle_path
from medsec_edge.runtime.crypto.reversible import build_reversible_dataset, record_for_image, write_reversible
from medsec_edge.runtime.crypto.sealing import sealed_bytes
from medsec_edge.runtime.crypto.watermark_key import WatermarkKey
from medsec_edge.runtime.errors import BundleError, MedsecError
from medsec_edge.runtime.io.atomic import (
    atomic_output,
    remove_stale_temporaries,
    write_bytes_atomic,
)
from medsec_edge.runtime.io.derived_uid import derived_instance_uid
from medsec_edge.runtime.io.dicom_writer import attach_fingerprint, build_derived_dataset
from medsec_edge.runtime.io.image import MedicalImage
from medsec_edge.runtime.io.readers import read_image
from medsec_edge.runtime.io.writers import checked_pixels, output_format, write_image
from medsec_edge.runtime.tamper.checker import TamperChecker
from medsec_edge.runtime.tamper.fingerprint import compute_fingerprint, sign_fingerprint
from medsec_edge.runtime.tamper.registry import Entry, Registry
from medsec_edge.runtime.watermark.identity import payload_for
from medsec_edge.runtime.watermark.models import BundleWatermarkModels
from medsec_edge.runtime.watermark.payload import PayloadCodec
from medsec_edge.runtime.watermark.spec import capacity
from medsec_edge.runtime.watermark.watermarker import Watermarker

log = logging.getLogger(__name__)

BUNDLE_ENV = "MEDSEC_EDGE_BUNDLE"
# A mark that does not read back is embedded again this much stronger (in turn) before the image
# is given up. On samples/MR_small.dcm (64x64) 5 of 1,500 random payloads failed at the bundle's
# target and read back 1.5 dB stronger; one identity payload seen in CI needed 3 dB.
STRONGER_RETRY_DB = (1.5, 3.0, 4.5)


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
    bundle = open_bundle(resolve_bundle_path(path))  # a device directory: its current bundle
    models = BundleWatermarkModels(bundle, backend=backend, threads=threads)
    target = float(bundle.manifest.payload.get("target_psnr_db", 42.5))
    return Watermarker(models, PayloadCodec(), target_psnr_db=target), bundle


def load_checker(bundle_path: Path | None = None, *, key: WatermarkKey | None = None,
                 threads: int | None = None, backend: str | None = None):
    """The tamper check of a verified bundle, watermark-aware (identity too when ``key`` is given)."""
    watermarker, bundle = load_watermarker(bundle_path, threads=threads, backend=backend)
    return TamperChecker.from_bundle(bundle, watermarker=watermarker, key=key, backend=backend, threads=threads)


@dataclass(frozen=True)
class OutputPolicy:
    """What the job writes for an image it cannot fully vouch for; the defaults are ``run``'s.

    By default a tampered image is set aside unwatermarked and an output whose watermark does not
    verify is not written. The node may be told otherwise: ``mark_tampered`` watermarks and seals
    a flagged image anyway, ``write_unverified`` writes the output although its watermark did not
    read back. Either way the reason is in the output's private record (``flags``), under the seal.
    """

    mark_tampered: bool = False
    write_unverified: bool = False


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
    capacity: dict | None = None  # what the image's size can carry (watermark.spec.capacity)
    latency_ms: dict[str, float] = field(default_factory=dict)
    budget_misses: list[str] = field(default_factory=list)
    tamper: dict | None = None  # the check stage's verdict (None when the bundle has no detector)
    sealed: bool = False  # the written file carries our seal and a PS3.15 signature
    seal_key_id: str | None = None
    seal_reason: str = ""  # why it is not sealed (non-DICOM output, no key ring, failure)
    fingerprint_bytes: int = 0  # size of the signed content fingerprint written/recorded (0: none)
    registered: bool = False  # recorded in the evidence registry
    evidence_reason: str = ""  # why no fingerprint or no registry entry was made (the image is still written)
    flags: list[str] = field(default_factory=list)  # what an output written under OutputPolicy carries
    sop_uid: str | None = field(default=None, repr=False)  # of the written image; kept out of reports

    def to_dict(self) -> dict:
        """The PHI-free record for reports: everything but the UID."""
        out = asdict(self)
        del out["sop_uid"]
        return out


def size_class(shape_hw: tuple[int, int]) -> str:
    """Budget key suffix: images up to ~1 Mpx count as 512, larger ones as 2048."""
    return "512" if shape_hw[0] * shape_hw[1] <= 1024 * 1024 else "2048"


def _keep_aside(path: Path, aside_path: Path, image: MedicalImage, verdict) -> Path:
    """Copy a refused input next to a JSON of why (named by hash: no patient data), atomically."""
    aside_path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "rb") as src, atomic_output(aside_path, path) as dst:
        shutil.copyfileobj(src, dst)
    reason = {"image_id": image.meta.image_id, **verdict.to_dict()}
    write_bytes_atomic(aside_path.with_name(aside_path.name + ".reason.json"), json.dumps(reason, indent=1).encode())
    return aside_path


_QUOTED = re.compile(r"""'[^']*'|"[^"]*"|\b\d+(?:\.\d+){2,}\b""")


def _one_line(exc: BaseException) -> str:
    """A refusal as one PHI-free line.

    Our own errors name images by hash already; a decoder's or numpy's message may quote a value
    from the file (a name, a UID), so quoted text and UID-like numbers are blanked out of it.
    """
    text = " ".join(str(exc).split())
    if not isinstance(exc, MedsecError):
        text = f"{type(exc).__name__}: {_QUOTED.sub('…', text)}" if text else type(exc).__name__
    return text if len(text) <= 300 else text[:299] + "…"


def watermark_file(path: Path, out_path: Path, watermarker: Watermarker, bundle: Bundle,
                   key: WatermarkKey | None, explicit: bytes | None, *, checker=None,
                   operating_point: str | None = None, aside_path: Path | None = None,
                   reversible_to=None, keyring=None, registry: Registry | None = None,
                   policy: OutputPolicy = OutputPolicy(), uid_key: WatermarkKey | None = None) -> RunRecord:
    """Read, check, embed, verify in memory, seal in memory, write once atomically; every stage timed.

    With ``checker`` an image found tampered is not watermarked: it is reported and, with
    ``aside_path``, copied there with a ``.reason.json`` beside it. With ``keyring`` (a
    ``keyset.KeyRing`` that can sign) a DICOM output is built, sealed and signed in memory and
    only then written, so it never exists under its name unsealed; if sealing fails nothing is
    written (status ``seal_failed``). ``policy`` says what is written for a tampered image or an
    unverified watermark (default: nothing); with ``uid_key`` a DICOM output's new SOP Instance UID
    is derived from the source's under that key (``io.derived_uid``), so a redo gives the same UID.
    PNG, TIFF, JPEG and NPY outputs have nowhere to keep a seal: they are written unsealed, with
    the reason.

    An image that fails anywhere after the read (our refusals, a decoder's or numpy's error, a
    model output that is not finite) is answered with a ``bad_input`` record naming the stage and
    why, never an exception, so a batch goes on. Only an ``OSError`` of the output (a full disk)
    is raised: it is no image's fault and the next image would meet it too.
    """
    lat: dict[str, float] = {}
    state = {"stage": "read", "image": None}
    t0 = time.perf_counter()
    try:
        return _watermark(path, out_path, watermarker, bundle, key, explicit, checker=checker,
                          operating_point=operating_point, aside_path=aside_path, reversible_to=reversible_to,
                          keyring=keyring, registry=registry, policy=policy, uid_key=uid_key, lat=lat,
                          state=state, t0=t0)
    except OSError as exc:
        if state["stage"] in ("write", "aside"):
            raise
        failure = exc
    except MedsecError as exc:
        failure = exc
    except Exception as exc:  # noqa: BLE001 - a decoder, numpy or a backend failing on this image
        failure = exc
    image = state["image"]
    lat["total"] = (time.perf_counter() - t0) * 1e3
    log.info("image %s refused at %s: %s", image.meta.image_id if image is not None else "(unread)",
             state["stage"], type(failure).__name__)
    return RunRecord(
        image_id=image.meta.image_id if image is not None else "", input=str(path), output=None,
        status="bad_input", reason=f"{state['stage']}: {_one_line(failure)}",
        shape=tuple(int(s) for s in image.pixels.shape) if image is not None else (),
        latency_ms={k: round(v, 2) for k, v in lat.items()},
    )


def _watermark(path, out_path, watermarker, bundle, key, explicit, *, checker, operating_point, aside_path,
               reversible_to, keyring, registry, policy, uid_key, lat, state, t0) -> RunRecord:
    image = read_image(path)
    state["image"] = image
    lat["read"] = (time.perf_counter() - t0) * 1e3
    dicom_out = output_format(image, out_path) == "dicom"
    if reversible_to is not None and (image.dataset is None or not dicom_out):
        return RunRecord(image_id=image.meta.image_id, input=str(path), output=None, status="bad_input",
                         reason="--reversible needs a DICOM input and a DICOM output "
                                "(the record lives in its private block)")
    tamper = None
    flags: list[str] = []
    if checker is not None:
        state["stage"] = "check"
        tc = time.perf_counter()
        verdict = checker.check(image, operating_point)
        lat["check"] = (time.perf_counter() - tc) * 1e3
        tamper = {"tampered": verdict.tampered, "score": round(verdict.score, 6), "watermark": verdict.watermark,
                  "reasons": list(verdict.reasons), "regions": [r.to_dict() for r in verdict.regions]}
        if verdict.tampered and policy.mark_tampered:
            flags.append("tampered: " + "; ".join(verdict.reasons))
        elif verdict.tampered:
            state["stage"] = "aside"
            kept = _keep_aside(path, aside_path, image, verdict) if aside_path is not None else None
            lat["total"] = (time.perf_counter() - t0) * 1e3
            return RunRecord(
                image_id=image.meta.image_id, input=str(path), output=str(kept) if kept else None,
                status="tampered", reason="tamper check: " + "; ".join(verdict.reasons) + "; not watermarked",
                shape=tuple(int(s) for s in image.pixels.shape),
                latency_ms={k: round(v, 2) for k, v in lat.items()}, tamper=tamper,
            )
    state["stage"] = "embed"
    payload, mode = payload_for(image, key, explicit)
    kind = "user" if mode == "explicit" else "identity"  # a reader must never take --payload for an identity
    t1 = time.perf_counter()
    embedded = watermarker.embed(image, payload, kind=kind)
    lat["embed"] = (time.perf_counter() - t1) * 1e3
    state["stage"] = "verify"
    t2 = time.perf_counter()
    embedded, check, ok = verified_embedding(watermarker, image, payload, kind, embedded)
    lat["verify"] = (time.perf_counter() - t2) * 1e3
    misses = _budget_misses(bundle, image, lat)  # in the report, not the file: timing is no property of the image
    if not ok:
        flags.append("watermark not verified")
    record = {
        "kind": "medsec-edge watermark", "version": 1, "payload_mode": mode,
        "key_id": key.key_id if (key is not None and mode == "identity-hmac") else None,
        "bundle": bundle.manifest.name, "bundle_key_id": bundle.key_id,
        "target_psnr_db": embedded.target_psnr_db, "verified": bool(ok),
    }
    if flags:
        record["flags"] = flags
    written, seal, seal_failed, evidence, sop_uid = None, {}, False, {}, None
    if ok or policy.write_unverified:
        fingerprint = None
        if keyring is not None:
            tf = time.perf_counter()
            try:
                fingerprint = sign_fingerprint(compute_fingerprint(replace(image, pixels=embedded.pixels)),
                                               keyring.signer)
                evidence["fingerprint_bytes"] = len(fingerprint)
            except (MedsecError, ValueError, ArithmeticError) as exc:
                # the image is still watermarked, sealed and written; only this evidence is missing
                evidence["evidence_reason"] = f"no fingerprint: {_one_line(exc)}"
            lat["fingerprint"] = (time.perf_counter() - tf) * 1e3
        state["stage"] = "write"
        written, seal, seal_failed, sop_uid = _write_output(image, embedded.pixels, out_path, record, reversible_to,
                                                            keyring, lat, state, fingerprint, uid_key)
        if registry is not None and fingerprint is not None and written is not None:
            tr = time.perf_counter()
            try:
                evidence["registered"] = _register(registry, image, payload, kind, fingerprint, sop_uid, keyring)
            except MedsecError as exc:  # a value the registry refuses, or its file: the output stands
                evidence["evidence_reason"] = f"not registered: {_one_line(exc)}"
            lat["register"] = (time.perf_counter() - tr) * 1e3
    lat["total"] = (time.perf_counter() - t0) * 1e3
    if seal_failed:
        status = "seal_failed"
        reason = "sealing failed, so the output was removed before it was written: " + seal["seal_reason"]
    elif not ok:
        status = "verify_failed"
        reason = "the watermark did not verify after embedding; " + (
            "written flagged, as the policy says" if written else "nothing written")
    elif tamper is not None and tamper["tampered"]:
        status, reason = "tampered", "tamper check: " + "; ".join(tamper["reasons"]) + "; watermarked flagged"
    else:
        status, reason = "ok", ""
    return RunRecord(
        image_id=image.meta.image_id, input=str(path), output=str(written) if written else None,
        status=status, reason=reason,
        shape=tuple(int(s) for s in image.pixels.shape), payload_mode=mode, found=check.found,
        confidence=round(check.confidence, 4), bits_corrected=check.bits_corrected,
        capacity=capacity(*image.shape_hw),
        latency_ms={k: round(v, 2) for k, v in lat.items()}, budget_misses=misses, tamper=tamper, **seal,
        **evidence, flags=flags, sop_uid=sop_uid if written else None,
    )


def verified_embedding(watermarker: Watermarker, image: MedicalImage, payload: bytes, kind: str, embedded):
    """``embedded`` read back from memory; if its mark does not read back, embedded again
    ``STRONGER_RETRY_DB`` stronger in turn. Returns (the embedding, its extraction, verified)."""
    target = embedded.target_psnr_db
    for stronger_db in (0.0, *STRONGER_RETRY_DB):
        if stronger_db:
            embedded = watermarker.embed(image, payload, kind=kind, target_psnr_db=target - stronger_db)
        check = watermarker.extract(replace(image, pixels=embedded.pixels))
        if check.found and check.payload == payload.hex() and check.payload_kind in (kind, None):
            return embedded, check, True
    return embedded, check, False


def _budget_misses(bundle: Bundle, image: MedicalImage, lat: dict[str, float]) -> list[str]:
    """The bundle's per-stage budgets this image exceeded (known before anything is written)."""
    budgets = bundle.manifest.budgets_ms
    cls = size_class(image.shape_hw)
    misses = []
    for budget_stage, stage in (("check", "check"), ("embed", "embed"), ("extract", "verify")):
        limit = budgets.get(f"{budget_stage}_{cls}")
        if limit is not None and stage in lat and lat[stage] > limit:
            misses.append(f"{budget_stage} {lat[stage]:.1f} ms > {limit} ms")
    return misses


def _register(registry: Registry, image: MedicalImage, payload: bytes, kind: str, fingerprint: bytes,
              sop_uid: str | None, keyring) -> bool:
    """Record the evidence of one written image; True if it was new (a rerun records nothing twice)."""
    study_uid = None
    if image.dataset is not None:
        study_uid = str(image.dataset.get("StudyInstanceUID", "") or "") or None
    entry = Entry.from_uids(
        payload_hex=payload.hex(), payload_kind=kind, image_id=image.meta.image_id, fingerprint=fingerprint,
        frames=image.n_frames, rows=image.shape_hw[0], columns=image.shape_hw[1], sop_uid=sop_uid,
        study_uid=study_uid, key_id=keyring.signer.key_id,
    )
    return registry.record(entry)


_WATERMARK_DESCRIPTION = "Invisible watermark embedded by medsec-edge"


def _write_output(image: MedicalImage, pixels: np.ndarray, out_path: Path, record: dict, reversible_to,
                  keyring, lat: dict[str, float], state: dict, fingerprint: bytes | None = None,
                  uid_key: WatermarkKey | None = None) -> tuple[Path | None, dict, bool, str | None]:
    """Write the one output: a sealed DICOM built and sealed in memory, else as ``write_image`` does.

    Returns the path written (None if nothing was), the RunRecord's seal fields, whether sealing
    failed and the SOP Instance UID the image is known by (the new one of a DICOM output, else the
    source's, else None). ``lat`` gets ``write`` (build the dataset, write the bytes) and ``seal``
    (seal, sign, encode and check the encoding reads back as sealed).
    """
    source_uid = None
    if image.dataset is not None:
        source_uid = str(image.dataset.get("SOPInstanceUID", "") or "") or None
    fmt = output_format(image, out_path)
    new_uid = derived_instance_uid(source_uid, uid_key.secret) if (uid_key is not None and source_uid) else None
    t3 = time.perf_counter()
    if fmt == "dicom" and keyring is not None:
        pixels = checked_pixels(image, pixels, out_path)
        if reversible_to is None:
            ds = build_derived_dataset(image, pixels, record=record, description=_WATERMARK_DESCRIPTION,
                                       sop_uid=new_uid)
        else:
            reversible = record_for_image(image, pixels, reversible_to)
            record["reversible"] = reversible.to_dict()  # sizes and key ids only
            ds = build_reversible_dataset(image, pixels, reversible, watermark_record=record,
                                          description=_WATERMARK_DESCRIPTION + " (reversible)", sop_uid=new_uid)
        if fingerprint is not None:
            attach_fingerprint(ds, fingerprint)
        built = time.perf_counter()
        state["stage"] = "seal"
        try:
            data, result = sealed_bytes(ds, keyring)
        except Exception as exc:  # noqa: BLE001 - whatever stops the seal, nothing unsealed is written
            lat["write"] = (built - t3) * 1e3
            lat["seal"] = (time.perf_counter() - built) * 1e3
            return None, {"seal_reason": _one_line(exc)}, True, None
        sealed = time.perf_counter()
        lat["seal"] = (sealed - built) * 1e3
        state["stage"] = "write"
        written = write_bytes_atomic(out_path, data, image.path)
        lat["write"] = (built - t3 + time.perf_counter() - sealed) * 1e3
        return written, {"sealed": True, "seal_key_id": result.seal_key_id}, False, str(ds.SOPInstanceUID)
    if reversible_to is None:
        written = write_image(image, pixels, out_path, record=record, description=_WATERMARK_DESCRIPTION)
    else:
        reversible = record_for_image(image, pixels, reversible_to)
        record["reversible"] = reversible.to_dict()  # sizes and key ids only
        written = write_reversible(image, pixels, out_path, reversible, watermark_record=record,
                                   description=_WATERMARK_DESCRIPTION + " (reversible)")
    lat["write"] = (time.perf_counter() - t3) * 1e3
    if keyring is None:
        return written, {"seal_reason": "no key ring given: not sealed"}, False, source_uid
    return (written, {"seal_reason": f"{fmt.upper()} output cannot carry a seal (DICOM only): not sealed"},
            False, source_uid)


def run_batch(files: list[Path], names: list[Path], out: Path, watermarker: Watermarker, bundle: Bundle,
              key: WatermarkKey | None, explicit: bytes | None, *, checker: TamperChecker | None,
              operating_point: str | None, check_note: str, ring, on_done=None,
              registry: Registry | None = None) -> tuple[dict, list[RunRecord]]:
    """The acquisition-time job over ``files``: each is written to ``out / names[i]`` (tampered ones
    to ``out/tampered/``), and the report (counts, per-stage latency percentiles, one PHI-free
    record per image) is written to ``out/report.json`` and returned with the records.

    Temporaries of ours that a killed run left under ``out`` are removed first. One bad image
    is one ``bad_input`` record and the batch goes on; the report is written whatever happens,
    also when an error of the output itself (a full disk) or an interrupt stops the batch: it
    then says so under ``interrupted`` and counts what was not processed, and the error goes on.
    """
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    records: list[RunRecord] = []
    interrupted = None
    try:
        for path, name in zip(files, names):
            target = out / name
            target.parent.mkdir(parents=True, exist_ok=True)
            records.append(watermark_file(path, target, watermarker, bundle, key, explicit, checker=checker,
                                          operating_point=operating_point, aside_path=out / "tampered" / name,
                                          keyring=ring, registry=registry))
            if on_done is not None:
                on_done()
    except BaseException as exc:
        interrupted = _one_line(exc) if isinstance(exc, Exception) else type(exc).__name__
        raise
    finally:
        report = _report(records, bundle, check_note, ring, interrupted, len(files))
        write_bytes_atomic(out / "report.json", json.dumps(report, indent=1).encode())
    return report, records


def _report(records: list[RunRecord], bundle: Bundle, check_note: str, ring, interrupted: str | None,
            total: int) -> dict:
    stages = sorted({k for r in records for k in r.latency_ms})
    report = {
        "bundle": bundle.manifest.name, "bundle_key_id": bundle.key_id,
        "images": len(records),
        "tamper_check": check_note,
        "seal_key_id": ring.signer.key_id, "dicom_key_id": ring.dicom_signer.key_id,
        "ok": sum(r.status == "ok" for r in records),
        "sealed": sum(r.sealed for r in records),
        "fingerprinted": sum(r.fingerprint_bytes > 0 for r in records),
        "registered": sum(r.registered for r in records),
        "tampered": sum(r.status == "tampered" for r in records),
        "verify_failed": sum(r.status == "verify_failed" for r in records),
        "seal_failed": sum(r.status == "seal_failed" for r in records),
        "bad_input": sum(r.status == "bad_input" for r in records),
        "budget_misses": sum(bool(r.budget_misses) for r in records),
        "latency_ms": {s: percentiles([r.latency_ms[s] for r in records if s in r.latency_ms]) for s in stages},
        "records": [r.to_dict() for r in records],
    }
    if interrupted is not None:
        report["interrupted"] = interrupted
        report["not_processed"] = total - len(records)
    return report


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values)
    return {"p50": round(float(np.percentile(arr, 50)), 2), "p99": round(float(np.percentile(arr, 99)), 2),
            "n": int(arr.size)}
