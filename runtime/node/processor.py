"""The node's workers: the acquisition-time job (``pipeline.watermark_file``) on each spooled object.

Layer: runtime (node). Each worker thread takes spool IDs from one queue and runs the same job as
``run``: check, watermark, verify, fingerprint, seal and sign, register. ONNX Runtime and numpy
release the GIL, so threads use the cores (measured: 2 threads ran the job 1.86x as fast as one). The output goes to
the spool's outgoing/ under a SOP Instance UID derived from the source's (a redo gives the same
instance); only then is the received copy removed. What the policy does not let through is held
in quarantine/ with its reason. One bad object is one quarantined object: the others go on.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from medsec_edge.runtime.io.image import ImageMeta, MedicalImage
from medsec_edge.runtime.node import faults
from medsec_edge.runtime.node.audit import AuditLog, uid_hash
from medsec_edge.runtime.node.config import Policy
from medsec_edge.runtime.node.metrics import Metrics
from medsec_edge.runtime.node.spool import Spool
from medsec_edge.runtime.pipeline import OutputPolicy, RunRecord, watermark_file
from medsec_edge.runtime.tamper.fingerprint import compute_fingerprint
from medsec_edge.runtime.tamper.registry import Registry

__all__ = ["Job", "Processor"]

log = logging.getLogger(__name__)

RETRY_AFTER_S = 2.0  # an output the disk refused (full, read-only) is tried again after this


@dataclass(frozen=True)
class Job:
    """What every worker shares: loaded once, read-only (ONNX Runtime sessions are thread-safe)."""

    watermarker: object
    bundle: object
    ring: object
    checker: object | None
    registry_path: Path | None
    policy: Policy

    @property
    def output_policy(self) -> OutputPolicy:
        return OutputPolicy(mark_tampered=self.policy.tampered == "forward-flagged",
                            write_unverified=self.policy.verify_failed == "forward-flagged")


def warm_up(job: Job) -> float:
    """Run the models and the fingerprint once on a synthetic 512x512 image; the seconds it took.

    The first image through a fresh process pays for ONNX Runtime's first runs and numpy's first
    FFT plans (measured: 608 ms instead of ~110 ms), and at 15 images/s the queue behind it took
    1.5 s to drain, which was the whole p99 of a 300-image stream. Each worker does this before it
    takes its first image, and the node listens only after.
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    pixels = np.clip(rng.normal(1000.0, 200.0, (512, 512)), 0, 4095).astype(np.uint16)
    image = MedicalImage(pixels=pixels, meta=ImageMeta(bits_stored=12, signed=False, window=(1000.0, 800.0),
                                                       modality="CT", image_id="warm-up", source_format="dicom"))
    if job.checker is not None:
        job.checker.check(image)
    marked = replace(image, pixels=job.watermarker.embed(image, bytes(8), kind="user").pixels)
    job.watermarker.extract(marked)
    compute_fingerprint(marked)
    return time.perf_counter() - t0


class Processor:
    def __init__(self, job: Job, spool: Spool, audit: AuditLog, metrics: Metrics,
                 forward: Callable[[str], None]) -> None:
        self.job = job
        self.spool = spool
        self.audit = audit
        self.metrics = metrics
        self.forward = forward
        self._queue: queue.Queue[str] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._busy = 0
        self._lock = threading.Lock()

    def submit(self, spool_id: str) -> None:
        self._queue.put(spool_id)

    @property
    def pending(self) -> int:
        """Queued plus in progress."""
        with self._lock:
            return self._queue.qsize() + self._busy

    def start(self, workers: int, *, warm: bool = True) -> None:
        """Start ``workers`` threads; with ``warm`` each first runs ``warm_up`` and this returns
        when all have (so the node takes no image before)."""
        ready = threading.Barrier(workers + 1) if warm else None
        for i in range(workers):
            t = threading.Thread(target=self._loop, args=(i, ready), name=f"medsec-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        if ready is not None:
            try:
                ready.wait(timeout=120)
            except threading.BrokenBarrierError:
                log.warning("the workers' warm-up did not finish in 120 s; serving anyway")

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish the images in progress; queued ones stay in the spool for the next start."""
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def _loop(self, worker: int, ready: threading.Barrier | None = None) -> None:
        registry = None
        if ready is not None:
            try:
                log.debug("worker %d warmed up in %.2f s", worker, warm_up(self.job))
            except Exception:  # noqa: BLE001 - a failed warm-up only costs the first image its time
                log.exception("worker %d warm-up failed", worker)
            try:
                ready.wait(timeout=120)
            except threading.BrokenBarrierError:
                pass
        try:
            if self.job.registry_path is not None:
                registry = Registry.open(self.job.registry_path, create=True)
            while not self._stop.is_set():
                try:
                    spool_id = self._queue.get(timeout=0.2)
                except queue.Empty:
                    continue
                with self._lock:
                    self._busy += 1
                try:
                    self._process(spool_id, registry, worker)
                except Exception:  # noqa: BLE001 - a bug must not end the worker; the object stays spooled
                    log.exception("worker %d failed on spool object %s", worker, spool_id)
                    self.metrics.count("errors")
                finally:
                    with self._lock:
                        self._busy -= 1
        finally:
            if registry is not None:
                registry.close()

    def _process(self, spool_id: str, registry, worker: int) -> None:
        src = self.spool.received_path(spool_id)
        if not src.exists():
            return  # done already (a resubmission after recovery)
        out = self.spool.outgoing_path(spool_id)
        job = self.job
        try:
            rec = watermark_file(src, out, job.watermarker, job.bundle, job.ring.watermark, None,
                                 checker=job.checker, aside_path=self.spool.quarantine_path(spool_id),
                                 keyring=job.ring, registry=registry, policy=job.output_policy,
                                 uid_key=job.ring.watermark)
        except OSError as exc:  # the output could not be written: not the image's fault, try again
            self.metrics.count("errors")
            self.audit.write("error", spool_id=spool_id, stage="write", worker=worker,
                             reason=f"output not written ({exc.strerror or type(exc).__name__}); retried")
            threading.Timer(RETRY_AFTER_S, self.submit, args=(spool_id,)).start()
            return
        for stage, ms in rec.latency_ms.items():
            self.metrics.observe(stage, ms)
        for miss in rec.budget_misses:
            self.metrics.budget_miss(miss.split()[0])
        if rec.output == str(out):
            self._written(spool_id, rec, out, worker)
        elif rec.status == "tampered" and rec.output:  # the input was copied to quarantine/ with its reason
            self.spool.processed(spool_id)
            self._held(spool_id, rec, worker)
        else:
            self.spool.hold(spool_id, src, _reason(rec))
            self._held(spool_id, rec, worker)

    def _written(self, spool_id: str, rec: RunRecord, out: Path, worker: int) -> None:
        faults.reached("processed")
        if rec.budget_misses and self.job.policy.budget_overrun == "quarantine":
            self.spool.hold(spool_id, out, _reason(rec, "over budget: " + "; ".join(rec.budget_misses)))
            self.spool.processed(spool_id)
            self._held(spool_id, rec, worker, "over budget")
            return
        self.spool.processed(spool_id)
        self.metrics.count("processed")
        if rec.flags or rec.budget_misses:
            self.metrics.count("flagged")
        self.audit.write("processed", spool_id=spool_id, image_id=rec.image_id, status=rec.status,
                         derived_uid_sha256=uid_hash(rec.sop_uid or ""), flags=rec.flags + rec.budget_misses,
                         latency_ms=rec.latency_ms.get("total"), worker=worker)
        self.forward(spool_id)

    def _held(self, spool_id: str, rec: RunRecord, worker: int, why: str = "") -> None:
        self.metrics.count("quarantined")
        self.audit.write("quarantined", spool_id=spool_id, image_id=rec.image_id, status=rec.status,
                         reason=why or rec.reason, action="held in quarantine", worker=worker)


def _reason(rec: RunRecord, reason: str = "") -> dict:
    return {"status": rec.status, "reason": reason or rec.reason, "image_id": rec.image_id, "flags": rec.flags,
            "budget_misses": rec.budget_misses, "tamper": rec.tamper}
