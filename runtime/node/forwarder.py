"""The node's DICOM side facing the PACS: C-STORE SCU over a reused association, with retries.

Layer: runtime (node). One thread sends the outgoing/ objects in arrival order over one
association that stays open while there is work (released after a few idle seconds, opened again
with the SOP classes it needs). An object leaves the spool only after the PACS answered success
(or a warning, PS3.4 B.2.3: it has the object), so delivery is at least once; a resend carries the
same SOP Instance UID, so the PACS keeps one instance. A connection that cannot be made or breaks
is retried with exponential backoff for as long as it takes (nothing is dropped because the PACS
is down); a refusal status from the PACS is retried ``forward_retries`` times, then the object is
held in quarantine/ with the PACS's status as the reason.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import warnings

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from medsec_edge.runtime.node import faults
from medsec_edge.runtime.node.audit import AuditLog, uid_hash
from medsec_edge.runtime.node.config import NodeConfig
from medsec_edge.runtime.node.metrics import Metrics
from medsec_edge.runtime.node.receiver import no_delay
from medsec_edge.runtime.node.spool import Spool
from medsec_edge.runtime.node.tls import client_context

__all__ = ["Forwarder"]

log = logging.getLogger(__name__)

# Success, and the warnings that still mean the PACS stored the object (coercion, elements
# discarded, data set does not match SOP class).
STORED = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
IDLE_RELEASE_S = 5.0
MAX_CONTEXTS = 120  # PS3.8: at most 128 presentation contexts per association


class _Unreachable(Exception):
    """The PACS could not be reached or the association broke: retry, it is not the object's fault."""


class Forwarder:
    def __init__(self, config: NodeConfig, spool: Spool, audit: AuditLog, metrics: Metrics) -> None:
        self.config = config
        self.spool = spool
        self.audit = audit
        self.metrics = metrics
        self._queue: queue.Queue[str] = queue.Queue()
        self._stop = threading.Event()
        self._drain_until = float("inf")
        self._thread: threading.Thread | None = None
        self._assoc = None
        self._classes: list[tuple[str, str]] = []  # (SOP class, transfer syntax) proposed
        self._last_send = 0.0
        self._busy = False
        self._ssl = client_context(config.forward_tls)

    def submit(self, spool_id: str) -> None:
        self._queue.put(spool_id)

    @property
    def pending(self) -> int:
        return self._queue.qsize() + int(self._busy)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="medsec-forwarder", daemon=True)
        self._thread.start()

    def stop(self, drain_s: float = 10.0) -> None:
        """Send what is queued for up to ``drain_s`` seconds, then stop; the rest stays spooled."""
        self._drain_until = time.monotonic() + drain_s
        self._stop.set()
        if self._thread is not None:
            self._thread.join(drain_s + 60.0)
        self._release()

    def _stopping_now(self) -> bool:
        return self._stop.is_set() and time.monotonic() >= self._drain_until

    def _loop(self) -> None:
        while not self._stopping_now():
            try:
                spool_id = self._queue.get(timeout=0.2)
            except queue.Empty:
                if self._stop.is_set():
                    break
                if self._assoc is not None and time.monotonic() - self._last_send > IDLE_RELEASE_S:
                    self._release()
                continue
            self._busy = True
            try:
                self._forward(spool_id)
            except Exception:  # noqa: BLE001 - a bug must not end forwarding; the object stays spooled
                log.exception("forwarding spool object %s failed", spool_id)
                self.metrics.count("errors")
                self._release()
            finally:
                self._busy = False

    def _forward(self, spool_id: str) -> None:
        path = self.spool.outgoing_path(spool_id)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                head = dcmread(path, stop_before_pixels=True)
        except FileNotFoundError:
            return  # sent already (queued twice after a recovery)
        sop_class = str(head.SOPClassUID)
        ts = str(head.file_meta.TransferSyntaxUID)
        uid_sha = uid_hash(str(head.SOPInstanceUID))
        delay = self.config.backoff_s
        refusals = 0
        attempt = 0
        while True:
            attempt += 1
            t0 = time.perf_counter()
            try:
                code = self._send(path, sop_class, ts)
            except _Unreachable as exc:
                if self._stopping_now():
                    return
                if attempt == 1 or attempt % 10 == 0:
                    self.audit.write("forward_retry", spool_id=spool_id, destination=str(self.config.forward),
                                     reason=str(exc), attempt=attempt)
            else:
                self.metrics.observe("forward", (time.perf_counter() - t0) * 1e3)
                if code in STORED:
                    break
                refusals += 1
                if refusals > self.config.forward_retries:
                    self._hold(spool_id, path, code, refusals, attempt, uid_sha)
                    return
                if self._stopping_now():
                    return  # tried again after the restart
            self.metrics.count("retries")
            self._sleep(delay)
            delay = min(delay * 2, self.config.backoff_max_s)
        faults.reached("forward")
        self.spool.forwarded(spool_id)
        ms = (time.time() - self.spool.received_at(spool_id)) * 1e3
        self.metrics.count("forwarded")
        self.metrics.observe("receive_to_forward", ms)
        if ms > self.config.deadline_ms:
            self.metrics.budget_miss("deadline")
        self.audit.write("forwarded", spool_id=spool_id, derived_uid_sha256=uid_sha, status_code=code,
                         destination=str(self.config.forward), attempt=attempt, latency_ms=round(ms, 2))

    def _hold(self, spool_id: str, path, code: int, refusals: int, attempt: int, uid_sha: str) -> None:
        """A refused object to quarantine/, with the PACS's last status as the reason."""
        destination = str(self.config.forward)
        self.spool.hold(spool_id, path, {"status": "forward_refused", "status_code": code, "destination": destination,
                                         "reason": f"the PACS refused it {refusals} times, last status 0x{code:04X}"})
        self.metrics.count("quarantined")
        self.audit.write("quarantined", spool_id=spool_id, derived_uid_sha256=uid_sha, status_code=code,
                         destination=destination, attempt=attempt, action="held in quarantine",
                         reason=f"PACS refused with 0x{code:04X} after {refusals} attempts")

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self._stopping_now():
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.05, left))

    # -- the association --------------------------------------------------------------------
    def _send(self, path, sop_class: str, ts: str) -> int:
        assoc = self._association(sop_class, ts)
        try:
            try:
                rsp = assoc.send_c_store(path)  # sent as the file is encoded, without decoding it
            except ValueError:
                # the PACS did not accept the file's transfer syntax: let pynetdicom re-encode
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    rsp = assoc.send_c_store(dcmread(path))
        except (RuntimeError, OSError) as exc:
            self._release(abort=True)
            raise _Unreachable(f"association failed ({type(exc).__name__})") from None
        self._last_send = time.monotonic()
        if not rsp or "Status" not in rsp:
            self._release(abort=True)
            raise _Unreachable("no response: the association was aborted or timed out")
        return int(rsp.Status)

    def _association(self, sop_class: str, ts: str):
        """The open association if it has ``sop_class`` in ``ts``, else a new one proposing every
        class sent so far (in our outputs' Explicit VR Little Endian, Implicit VR, and ``ts`` for
        objects passed unchanged)."""
        wanted = (sop_class, ts)
        if self._assoc is not None and self._assoc.is_established and wanted in self._classes:
            return self._assoc
        self._release()
        if wanted not in self._classes:
            self._classes = ([c for c in self._classes if c != wanted] + [wanted])[-MAX_CONTEXTS:]
        ae = AE(ae_title=self.config.aet)
        ae.maximum_pdu_size = 0
        ae.acse_timeout = 30
        ae.dimse_timeout = 60
        ae.network_timeout = 60
        for cls, syntax in self._classes:
            ae.add_requested_context(cls, list(dict.fromkeys([syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian])))
        dest = self.config.forward
        tls_args = (self._ssl, dest.host) if self._ssl is not None else None
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.aet, tls_args=tls_args)
        if not assoc.is_established:
            raise _Unreachable("association rejected by the PACS" if assoc.is_rejected
                               else "PACS unreachable or the association was aborted")
        no_delay(assoc)
        self._assoc = assoc
        return assoc

    def _release(self, abort: bool = False) -> None:
        assoc, self._assoc = self._assoc, None
        if assoc is None:
            return
        try:
            if abort or not assoc.is_established:
                assoc.abort()
            else:
                assoc.release()
        except Exception:  # noqa: BLE001 - a broken association is gone either way
            pass
