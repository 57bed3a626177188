"""The acquisition node: receiver, workers, forwarder, folder watch and status, around one spool.

Layer: runtime (node). ``Node.start`` opens the spool (one node per spool), loads the bundle and
the device key set once, recovers what a previous run left (received objects are processed,
outgoing ones forwarded) and starts the threads; ``Node.stop`` is the graceful shutdown SIGTERM
asks for: stop taking objects (a sender still mid-association gets 0xA700 and resends), finish
the images in progress, forward what is ready for a few seconds, and leave the rest spooled for
the next start. ``SPOOL/node.json`` says where the running node's status endpoint is.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from medsec_edge.runtime.io.atomic import write_bytes_atomic
from medsec_edge.runtime.node.audit import AuditLog
from medsec_edge.runtime.node.config import NodeConfig
from medsec_edge.runtime.node.forwarder import Forwarder
from medsec_edge.runtime.node.metrics import Metrics
from medsec_edge.runtime.node.processor import Job, Processor
from medsec_edge.runtime.node.receiver import Receiver
from medsec_edge.runtime.node.spool import Spool
from medsec_edge.runtime.node.status_http import StatusServer
from medsec_edge.runtime.node.watch import FolderWatch

__all__ = ["NODE_FILE", "Node", "load_job"]

log = logging.getLogger(__name__)

NODE_FILE = "node.json"


def _version() -> str:
    try:
        return version("medsec-edge")
    except PackageNotFoundError:
        return "unknown"


def load_job(config: NodeConfig) -> Job:
    """The device key set, the bundle's models and the registry, each loaded and checked once."""
    from medsec_edge.runtime.crypto.device_keys import load_or_create_ring
    from medsec_edge.runtime.errors import ConfigError
    from medsec_edge.runtime.pipeline import load_watermarker
    from medsec_edge.runtime.tamper.checker import MODEL_NAME, TamperChecker
    from medsec_edge.runtime.tamper.registry import Registry, default_registry_path

    ring = load_or_create_ring(config.keys)
    if ring.watermark is None:
        raise ConfigError("the key set has no watermark key: the node binds every image to its identity with it "
                          "(medsec-edge keys new DIR makes a complete set)")
    watermarker, bundle = load_watermarker(config.bundle, threads=config.threads)
    checker = None
    if MODEL_NAME in bundle.manifest.models:
        checker = TamperChecker.from_bundle(bundle, watermarker=watermarker, key=ring.watermark,
                                            threads=config.threads)
    else:
        log.warning("the bundle has no tamper detector: images are not checked before watermarking")
    registry_path = None
    if not config.no_registry:
        registry_path = config.registry or default_registry_path()
        Registry.open(registry_path, create=True).close()  # created and its schema checked now, not per worker
    return Job(watermarker=watermarker, bundle=bundle, ring=ring, checker=checker, registry_path=registry_path,
               policy=config.policy)


class Node:
    def __init__(self, config: NodeConfig, job: Job | None = None) -> None:
        self.config = config
        self._job = job
        self.metrics = Metrics()
        self.spool: Spool | None = None
        self.audit: AuditLog | None = None
        self.receiver: Receiver | None = None
        self.watch: FolderWatch | None = None
        self.status: StatusServer | None = None
        self.processor: Processor | None = None
        self.forwarder: Forwarder | None = None
        self._accepting = threading.Event()
        self._stopped = threading.Event()

    @property
    def dicom_port(self) -> int:
        return self.receiver.port if self.receiver is not None else 0

    @property
    def status_url(self) -> str | None:
        return self.status.url if self.status is not None else None

    def start(self) -> None:
        cfg = self.config
        self.spool = Spool.open(cfg.spool)
        try:
            self._start(cfg)
        except BaseException:
            self._close()
            raise

    def _start(self, cfg: NodeConfig) -> None:
        job = self._job or load_job(cfg)
        self.audit = AuditLog(cfg.audit_path)
        self.forwarder = Forwarder(cfg, self.spool, self.audit, self.metrics)
        self.processor = Processor(job, self.spool, self.audit, self.metrics, forward=self.forwarder.submit)
        to_process, to_forward = self.spool.recover()
        for spool_id in to_forward:
            self.forwarder.submit(spool_id)
        for spool_id in to_process:
            self.processor.submit(spool_id)
        spool = self.spool
        self.metrics.gauge("queue_received", lambda: spool.count("received"))
        self.metrics.gauge("queue_outgoing", lambda: spool.count("outgoing"))
        self.metrics.gauge("quarantine", lambda: spool.count("quarantine"))
        self.metrics.gauge("workers", lambda: float(cfg.worker_count))
        self.forwarder.start()
        self.processor.start(cfg.worker_count)
        self._accepting.set()
        if cfg.listen is not None:
            self.receiver = Receiver(cfg, self.spool, self.audit, self.metrics, self.processor.submit,
                                     accept=self._accepting.is_set, on_ready=self.forwarder.submit)
            self.receiver.start()
        if cfg.watch is not None:
            passing = self.forwarder.submit if cfg.policy.non_image == "forward-unchanged" else None
            self.watch = FolderWatch(cfg.watch, self.spool, self.audit, self.metrics, self.processor.submit,
                                     on_ready=passing)
            self.watch.start()
        if cfg.status_listen is not None:
            self.status = StatusServer(self.metrics.snapshot, self.metrics.prometheus, *cfg.status_listen)
            self.status.start()
        self.audit.write("node_started", version=_version(), pid=os.getpid(), count=len(to_process) + len(to_forward),
                         called_ae=cfg.aet, destination=str(cfg.forward), tls=cfg.tls.enabled,
                         policy=f"tampered={cfg.policy.tampered} verify_failed={cfg.policy.verify_failed} "
                                f"budget_overrun={cfg.policy.budget_overrun} non_image={cfg.policy.non_image}")
        write_bytes_atomic(cfg.spool / NODE_FILE, json.dumps({
            "pid": os.getpid(), "version": _version(), "aet": cfg.aet,
            "dicom": f"{cfg.listen[0]}:{self.dicom_port}" if cfg.listen is not None else None,
            "status_url": self.status_url, "forward": str(cfg.forward),
        }, indent=1).encode())
        log.info("node %s listening on %s, forwarding to %s; %d recovered to process, %d to forward",
                 cfg.aet, f"{cfg.listen[0]}:{self.dicom_port}" if cfg.listen else "(folder watch only)",
                 cfg.forward, len(to_process), len(to_forward))

    def stop(self, drain_s: float = 10.0) -> None:
        """Graceful shutdown: nothing acknowledged is lost, what is not done stays in the spool."""
        if self._stopped.is_set():
            return
        self._accepting.clear()
        if self.receiver is not None:
            self.receiver.stop()
        if self.watch is not None:
            self.watch.stop()
        if self.processor is not None:
            self.processor.stop()
        if self.forwarder is not None:
            self.forwarder.stop(drain_s)
        if self.audit is not None and self.spool is not None:
            depth = self.spool.depth()
            self.audit.write("node_stopped", pid=os.getpid(), count=depth["received"] + depth["outgoing"],
                             reason=f"{depth['received']} to process and {depth['outgoing']} to forward left "
                                    f"in the spool")
        self._close()
        self._stopped.set()

    def _close(self) -> None:
        if self.status is not None:
            self.status.stop()
        if self.spool is not None:
            try:
                (self.spool.root / NODE_FILE).unlink()
            except FileNotFoundError:
                pass
        if self.audit is not None:
            self.audit.close()
        if self.spool is not None:
            self.spool.close()


def read_node_file(spool: Path) -> dict | None:
    """The running node's ``SPOOL/node.json``; None if there is none, or if the node that wrote it
    is gone (a node killed with SIGKILL or by a power cut cannot remove its file)."""
    try:
        info = json.loads((Path(spool) / NODE_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(int(info["pid"]), 0)
    except (KeyError, TypeError, ValueError, ProcessLookupError):
        return None
    except PermissionError:
        pass  # alive, run by another user
    return info
