"""The node's workers on real spooled objects: the default bundle on ONNX Runtime, a real key
ring, real DICOM files. No network: the forwarder is replaced by a list of what was handed on.

Where a verdict must be forced, the real components are configured to force it: a real
TamperChecker whose operating point flags everything, a real Watermarker aimed at a PSNR so high
that its mark cannot be read back.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medsec_edge.runtime.crypto.device_keys import load_or_create_ring
from medsec_edge.runtime.crypto.verification import verify_file
from medsec_edge.runtime.io.derived_uid import derived_instance_uid
from medsec_edge.runtime.io.dicom_writer import read_record
from medsec_edge.runtime.node.audit import AuditLog, read_audit
from medsec_edge.runtime.node.config import Policy
from medsec_edge.runtime.node.metrics import Metrics
from medsec_edge.runtime.node.processor import Job, Processor
from medsec_edge.runtime.node.spool import Spool
from medsec_edge.runtime.pipeline import load_watermarker
from medsec_edge.runtime.tamper.checker import OperatingPoint, TamperChecker
from medsec_edge.runtime.watermark.payload import PayloadCodec
from medsec_edge.runtime.watermark.watermarker import Watermarker

REPO = Path(__file__).resolve().parents[3]
CT = REPO / "samples" / "CT_small.dcm"


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    ring = load_or_create_ring(tmp_path_factory.mktemp("keys") / "keys")
    watermarker, bundle = load_watermarker(threads=1)
    checker = TamperChecker.from_bundle(bundle, watermarker=watermarker, key=ring.watermark, threads=1)
    return ring, watermarker, bundle, checker


def _job(parts, tmp_path, policy=Policy(), *, checker="default", watermarker=None, bundle=None) -> Job:
    ring, wm, bndl, chk = parts
    return Job(watermarker=watermarker or wm, bundle=bundle or bndl, ring=ring,
               checker=chk if checker == "default" else checker, registry_path=tmp_path / "registry.sqlite3",
               policy=policy)


def _process(job: Job, tmp_path: Path, data: bytes) -> tuple[Spool, str, list[str], Path]:
    spool = Spool.open(tmp_path / "spool")
    audit = AuditLog(tmp_path / "audit.jsonl")
    forwarded: list[str] = []
    processor = Processor(job, spool, audit, Metrics(), forward=forwarded.append)
    sid = spool.accept(data)
    processor.start(1, warm=False)
    processor.submit(sid)
    _until_idle(processor)
    processor.stop()
    audit.close()
    spool.close()
    return spool, sid, forwarded, tmp_path / "audit.jsonl"


def _until_idle(processor: Processor, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while processor.pending and time.monotonic() < deadline:
        time.sleep(0.02)


def _flag_everything(parts) -> TamperChecker:
    ring, wm, bundle, _ = parts
    strict = {"fpr0.1": OperatingPoint("fpr0.1", 0.001, blind_logit=-1e9, wm_deficit=1e9)}
    return TamperChecker(bundle.session("tamper_detector", threads=1), strict, wm, ring.watermark)


def test_an_image_is_watermarked_sealed_under_its_derived_uid_and_handed_on(parts, tmp_path):
    ring = parts[0]
    spool, sid, forwarded, audit = _process(_job(parts, tmp_path), tmp_path, CT.read_bytes())
    assert forwarded == [sid]
    out = spool.outgoing_path(sid)
    assert not spool.received_path(sid).exists()
    ds = pydicom.dcmread(out)
    source = pydicom.dcmread(CT)
    assert ds.SOPInstanceUID == derived_instance_uid(source.SOPInstanceUID, ring.watermark.secret)
    assert ds.SeriesInstanceUID == source.SeriesInstanceUID  # the PACS files it with its series
    row, code = verify_file(out, ring)
    assert code == 0 and row["valid"], row
    assert read_record(ds)["verified"] is True and "flags" not in read_record(ds)
    events = [e["event"] for e in read_audit(audit)]
    assert events == ["processed"]
    assert str(source.PatientName) not in audit.read_text() and source.SOPInstanceUID not in audit.read_text()


def test_a_redo_gives_the_same_instance(parts, tmp_path):
    first, sid1, _, _ = _process(_job(parts, tmp_path / "a"), tmp_path / "a", CT.read_bytes())
    second, sid2, _, _ = _process(_job(parts, tmp_path / "b"), tmp_path / "b", CT.read_bytes())
    a, b = pydicom.dcmread(first.outgoing_path(sid1)), pydicom.dcmread(second.outgoing_path(sid2))
    assert a.SOPInstanceUID == b.SOPInstanceUID
    assert np.array_equal(a.pixel_array, b.pixel_array)


def test_a_tampered_image_is_held_unwatermarked_with_its_reason(parts, tmp_path):
    job = _job(parts, tmp_path, checker=_flag_everything(parts))
    spool, sid, forwarded, audit = _process(job, tmp_path, CT.read_bytes())
    assert forwarded == [] and not spool.outgoing_path(sid).exists() and not spool.received_path(sid).exists()
    held = spool.quarantine_path(sid)
    assert held.read_bytes() == CT.read_bytes()
    reason = json.loads(held.with_name(held.name + ".reason.json").read_text())
    assert reason["tampered"] is True
    assert [e["event"] for e in read_audit(audit)] == ["quarantined"]


def test_a_tampered_image_under_forward_flagged_is_watermarked_and_flagged(parts, tmp_path):
    job = _job(parts, tmp_path, Policy(tampered="forward-flagged"), checker=_flag_everything(parts))
    spool, sid, forwarded, _ = _process(job, tmp_path, CT.read_bytes())
    assert forwarded == [sid]
    ds = pydicom.dcmread(spool.outgoing_path(sid))
    flags = read_record(ds)["flags"]
    assert any(f.startswith("tampered") for f in flags)
    assert verify_file(spool.outgoing_path(sid), parts[0])[1] == 0  # the flag is under the seal


def _weak(parts) -> Watermarker:
    wm = parts[1]
    return Watermarker(wm.models, PayloadCodec(), target_psnr_db=110.0)


def test_an_unverified_watermark_is_held_by_default(parts, tmp_path):
    spool, sid, forwarded, _ = _process(_job(parts, tmp_path, watermarker=_weak(parts), checker=None), tmp_path,
                                        CT.read_bytes())
    assert forwarded == []
    reason = json.loads(spool.quarantine_path(sid).with_name(f"{sid}.dcm.reason.json").read_text())
    assert reason["status"] == "verify_failed"
    assert spool.quarantine_path(sid).read_bytes() == CT.read_bytes()


def test_an_unverified_watermark_under_forward_flagged_goes_on_flagged(parts, tmp_path):
    job = _job(parts, tmp_path, Policy(verify_failed="forward-flagged"), watermarker=_weak(parts), checker=None)
    spool, sid, forwarded, _ = _process(job, tmp_path, CT.read_bytes())
    assert forwarded == [sid]
    record = read_record(pydicom.dcmread(spool.outgoing_path(sid)))
    assert record["verified"] is False and "watermark not verified" in record["flags"]


def test_an_image_the_job_cannot_read_is_held_and_the_next_goes_on(parts, tmp_path):
    ds = pydicom.dcmread(CT)
    ds.Rows, ds.Columns = 8, 8  # below the smallest side the watermark works on
    ds.PixelData = ds.PixelData[: 8 * 8 * 2]
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    spool, sid, forwarded, _ = _process(_job(parts, tmp_path), tmp_path, buf.getvalue())
    assert forwarded == []
    reason = json.loads(spool.quarantine_path(sid).with_name(f"{sid}.dcm.reason.json").read_text())
    assert reason["status"] == "bad_input"
    spool2, sid2, forwarded2, _ = _process(_job(parts, tmp_path / "next"), tmp_path / "next", CT.read_bytes())
    assert forwarded2 == [sid2]


def test_a_budget_overrun_is_held_when_the_policy_says_so(parts, tmp_path):
    bundle = copy.copy(parts[2])
    tiny = {k: 1e-6 for k in bundle.manifest.budgets_ms}
    object.__setattr__(bundle, "manifest", dataclasses.replace(bundle.manifest, budgets_ms=tiny))
    job = _job(parts, tmp_path, Policy(budget_overrun="quarantine"), bundle=bundle)
    spool, sid, forwarded, _ = _process(job, tmp_path, CT.read_bytes())
    assert forwarded == [] and not spool.outgoing_path(sid).exists()
    held = spool.quarantine_path(sid)
    assert pydicom.dcmread(held).SOPInstanceUID != pydicom.dcmread(CT).SOPInstanceUID  # the output is held
    assert "over budget" in json.loads(held.with_name(held.name + ".reason.json").read_text())["reason"]
    job = _job(parts, tmp_path / "fwd", Policy(budget_overrun="forward-flagged"), bundle=bundle)
    spool, sid, forwarded, audit = _process(job, tmp_path / "fwd", CT.read_bytes())
    assert forwarded == [sid]
    assert any("ms >" in f for f in read_audit(audit)[0]["flags"])


def test_workers_warm_up_before_start_returns_and_then_process(parts, tmp_path):
    from medsec_edge.runtime.node.processor import warm_up

    job = _job(parts, tmp_path)
    assert warm_up(job) > 0
    spool = Spool.open(tmp_path / "spool")
    audit = AuditLog(tmp_path / "audit.jsonl")
    forwarded: list[str] = []
    processor = Processor(job, spool, audit, Metrics(), forward=forwarded.append)
    processor.start(2)  # returns once both workers have warmed up
    assert all(t.is_alive() for t in processor._threads)
    sid = spool.accept(CT.read_bytes())
    processor.submit(sid)
    _until_idle(processor)
    processor.stop()
    audit.close()
    spool.close()
    assert forwarded == [sid]
