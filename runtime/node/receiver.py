"""The node's DICOM side facing the modality: C-STORE and C-ECHO SCP (pynetdicom).

Layer: runtime (node). An object is parsed (``admission``), written to the spool and made durable
before the success status goes back; if it cannot be understood the sender gets 0xA900/0xC000/
0x0122, if it cannot be stored 0xA700 (out of resources), so it resends. Every association,
refusal and object is a line in the audit log, with AE titles, addresses and hashed UIDs only.
Calling AE titles can be limited to an allow-list; TLS when configured (``tls``).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from medsec_edge.runtime.errors import MedsecError
from medsec_edge.runtime.node import faults
from medsec_edge.runtime.node.admission import (
    OUT_OF_RESOURCES,
    accepted_transfer_syntaxes,
    admit,
    storage_sop_classes,
)
from medsec_edge.runtime.node.audit import AuditLog, uid_hash
from medsec_edge.runtime.node.config import NodeConfig
from medsec_edge.runtime.node.metrics import Metrics
from medsec_edge.runtime.node.spool import Spool
from medsec_edge.runtime.node.tls import server_context

__all__ = ["Receiver"]

log = logging.getLogger(__name__)


def no_delay(assoc) -> None:
    """Turn off Nagle's algorithm on an association's socket: a DIMSE message is several small
    writes, and Nagle plus the peer's delayed ACK cost 40 ms per message (measured: 88 ms per
    C-STORE on loopback with it, 1.5 ms without)."""
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


class _SharedContexts(list):
    """The acceptor's presentation contexts, shared read-only by every association.

    pynetdicom deep-copies the server's contexts for each association it accepts; with every
    storage SOP class and each decodable transfer syntax that copy was 60% of an association's
    CPU (measured with py-spy: 17 ms per C-ECHO association). Negotiation only reads them
    (``presentation.negotiate_as_acceptor`` builds new result contexts), so a copy of the list
    holding the same items is enough.
    """

    def __deepcopy__(self, memo) -> _SharedContexts:
        return _SharedContexts(self)


def _peer(assoc) -> dict:
    requestor = assoc.requestor
    return {"calling_ae": str(requestor.ae_title).strip(), "peer": f"{requestor.address}:{requestor.port}",
            "association": assoc.name}


class Receiver:
    """Listens on ``config.listen``; ``on_spooled(spool_id)`` is called for every stored image,
    ``on_ready(spool_id)`` for an object without pixel data the policy lets pass unchanged."""

    def __init__(self, config: NodeConfig, spool: Spool, audit: AuditLog, metrics: Metrics,
                 on_spooled: Callable[[str], None], accept: Callable[[], bool] = lambda: True,
                 on_ready: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.spool = spool
        self.audit = audit
        self.metrics = metrics
        self.on_spooled = on_spooled
        self.on_ready = on_ready
        self.accept = accept  # False while shutting down: 0xA700, the sender resends later
        self._server = None

    def start(self) -> int:
        """Start serving in background threads; the bound port."""
        ae = AE(ae_title=self.config.aet)
        ae.maximum_pdu_size = 0  # no limit: fewer, larger PDUs from the sender
        ae.network_timeout = 60
        ae.dimse_timeout = 60
        ae.acse_timeout = 30
        ae.maximum_associations = 32
        syntaxes = list(accepted_transfer_syntaxes())
        for sop_class in sorted(storage_sop_classes()):
            ae.add_supported_context(sop_class, syntaxes)
        ae.add_supported_context(Verification)
        if self.config.allowed_aets:
            ae.require_calling_aet = list(self.config.allowed_aets)
        else:
            log.warning("any calling AE title may store to this node: give --allow-aet to limit them")
        handlers = [
            (evt.EVT_CONN_OPEN, lambda event: no_delay(event.assoc)),
            (evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_ACCEPTED, self._on_accepted), (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ABORTED, self._on_aborted),
        ]
        self._server = ae.start_server(self.config.listen, block=False, evt_handlers=handlers,
                                       ssl_context=server_context(self.config.tls),
                                       contexts=_SharedContexts(ae.supported_contexts))
        return self.port

    @property
    def port(self) -> int:
        return int(self._server.server_address[1]) if self._server is not None else 0

    def stop(self) -> None:
        """Stop accepting associations; ones still open are aborted (their unacknowledged objects
        are resent by the sender; acknowledged ones are in the spool already)."""
        if self._server is not None:
            server, self._server = self._server, None
            open_ones = list(server.active_associations)
            server.shutdown()
            for assoc in open_ones:  # a sender holding its association open must not hold up the stop
                assoc.abort()

    # -- handlers (pynetdicom calls them in each association's thread) ----------------------
    def _on_accepted(self, event) -> None:
        self.metrics.count("associations")
        peer = _peer(event.assoc)
        self.audit.write("association_accepted", called_ae=self.config.aet, tls=self.config.tls.enabled, **peer)
        for cx in event.assoc.rejected_contexts:
            self.audit.write("context_rejected", sop_class=str(cx.abstract_syntax), status="rejected",
                             reason="abstract syntax or transfer syntaxes not supported", **peer)

    def _on_rejected(self, event) -> None:
        self.metrics.count("associations_rejected")
        self.audit.write("association_rejected", reason="calling AE title not allowed or association refused",
                         **_peer(event.assoc))

    def _on_aborted(self, event) -> None:
        self.audit.write("association_aborted", **_peer(event.assoc))

    def _on_echo(self, event) -> int:
        self.metrics.count("echo")
        self.audit.write("echo", status_code=0, **_peer(event.assoc))
        return 0x0000

    def _on_store(self, event) -> int:
        t0 = time.perf_counter()
        peer = _peer(event.assoc)
        if not self.accept():
            self.audit.write("refused", status_code=OUT_OF_RESOURCES, reason="node is shutting down", **peer)
            return OUT_OF_RESOURCES
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception as exc:  # noqa: BLE001 - a data set pynetdicom cannot give back as bytes
            return self._refuse(peer, 0xC000, f"the data set cannot be read ({type(exc).__name__})", "", len(b""))
        passing = self.config.policy.non_image == "forward-unchanged" and self.on_ready is not None
        admission = admit(data, str(event.request.AffectedSOPClassUID or ""), images_only=not passing)
        if not admission.accepted:
            return self._refuse(peer, admission.status, admission.reason, admission.sop_class, len(data),
                                admission.sop_uid)
        faults.reached("receive")
        try:
            spool_id = self.spool.accept(data, ready=not admission.has_pixels)
        except (OSError, MedsecError) as exc:  # a full disk, a spool folder gone: the sender keeps it and resends
            why = getattr(exc, "strerror", None) or type(exc).__name__
            log.error("cannot spool a received object: %s", why)
            return self._refuse(peer, OUT_OF_RESOURCES, f"spool write failed ({why})",
                                admission.sop_class, len(data), admission.sop_uid)
        faults.reached("spooled")
        ms = (time.perf_counter() - t0) * 1e3
        self.metrics.count("received")
        self.metrics.observe("receive", ms)
        extra = {} if admission.has_pixels else {"action": "no pixel data: forwarded unchanged, as the policy says"}
        self.audit.write("received", spool_id=spool_id, sop_class=admission.sop_class,
                         source_uid_sha256=uid_hash(admission.sop_uid), transfer_syntax=admission.transfer_syntax,
                         bytes=len(data), status_code=0, latency_ms=round(ms, 2), **peer, **extra)
        if admission.has_pixels:
            self.on_spooled(spool_id)
        else:
            self.metrics.count("passed_unchanged")
            self.on_ready(spool_id)
        return 0x0000

    def _refuse(self, peer: dict, code: int, reason: str, sop_class: str, size: int, sop_uid: str = "") -> int:
        self.metrics.count("refused")
        fields = {"status_code": code, "reason": reason, "bytes": size, **peer}
        if sop_class:
            fields["sop_class"] = sop_class
        if sop_uid:
            fields["source_uid_sha256"] = uid_hash(sop_uid)
        self.audit.write("refused", **fields)
        return code
