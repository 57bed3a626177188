"""The node commands: ``serve`` (the acquisition node) and ``status`` (what a running node is doing).

Layer: runtime (cli). ``serve`` parses flags over an optional TOML file into a ``NodeConfig``,
starts the ``Node`` and waits for SIGTERM or SIGINT, then shuts it down gracefully (nothing
acknowledged is lost; what is not done stays in the spool for the next start). ``status`` asks
the node's loopback HTTP endpoint, found through ``SPOOL/node.json`` or given as ``--url``.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Optional

import typer

from medsec_edge.runtime.cli.help import command
from medsec_edge.runtime.cli.options import BundleOpt, JsonOpt, keys_option, registry_option
from medsec_edge.runtime.cli.output import fail, json_line, stdout
from medsec_edge.runtime.errors import MedsecError, UsageError

log = logging.getLogger("medsec_edge")


def register(app: typer.Typer) -> None:
    command(app, serve, """
        medsec-edge serve --listen 0.0.0.0:11112 --aet EDGE --forward PACS@10.0.0.5:104 --spool /var/spool/medsec-edge
        medsec-edge serve --config /etc/medsec-edge/node.toml""")
    command(app, status, """
        medsec-edge status --spool /var/spool/medsec-edge
        medsec-edge status --url http://127.0.0.1:8042 --json""")


def serve(
    config_file: Optional[Path] = typer.Option(None, "--config", metavar="FILE",
                                               help="TOML file with any of these settings (flags win)."),
    listen: Optional[str] = typer.Option(None, "--listen", metavar="HOST:PORT",
                                         help="Where modalities send C-STORE (default 127.0.0.1:11112; 'off': "
                                              "folder watch only)."),
    aet: Optional[str] = typer.Option(None, "--aet", help="This node's AE title (default EDGE)."),
    forward: Optional[str] = typer.Option(None, "--forward", metavar="AE@HOST:PORT", help="The PACS."),
    spool: Optional[Path] = typer.Option(None, "--spool", metavar="DIR",
                                         help="Holds every image until the PACS has it (one node per spool)."),
    allow_aet: Optional[list[str]] = typer.Option(None, "--allow-aet", metavar="AE",
                                                  help="Calling AE title allowed to store (repeat; default any)."),
    tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help="TLS certificate (PEM) for receiving."),
    tls_key: Optional[Path] = typer.Option(None, "--tls-key", help="Its private key (PEM)."),
    tls_ca: Optional[Path] = typer.Option(None, "--tls-ca", help="CA of senders' certificates: mutual TLS."),
    watch: Optional[Path] = typer.Option(None, "--watch", metavar="DIR",
                                         help="Also take DICOM files a modality exports into DIR."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Worker threads (default: the cores)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Inference threads per worker (default 1)."),
    keys: Optional[Path] = keys_option("created on first use"),
    bundle: Optional[Path] = BundleOpt,
    registry: Optional[Path] = registry_option("created on first use"),
    no_registry: Optional[bool] = typer.Option(None, "--no-registry", help="Record no evidence in the registry."),
    on_tampered: Optional[str] = typer.Option(None, "--on-tampered", metavar="POLICY",
                                              help="quarantine (default) or forward-flagged (watermarked, flagged)."),
    on_verify_failed: Optional[str] = typer.Option(None, "--on-verify-failed", metavar="POLICY",
                                                   help="quarantine (default) or forward-flagged."),
    on_budget_overrun: Optional[str] = typer.Option(None, "--on-budget-overrun", metavar="POLICY",
                                                    help="forward-flagged (default) or quarantine."),
    on_non_image: Optional[str] = typer.Option(None, "--on-non-image", metavar="POLICY",
                                               help="An object without pixel data: refuse (default, 0xC000) or "
                                                    "forward-unchanged."),
    status_listen: Optional[str] = typer.Option(None, "--status-listen", metavar="HOST:PORT",
                                                help="Loopback HTTP status endpoint (default 127.0.0.1, any free "
                                                     "port; 'off': none)."),
    audit_log: Optional[Path] = typer.Option(None, "--audit-log", metavar="FILE",
                                             help="JSON-lines audit log (default SPOOL/audit.jsonl)."),
    deadline_ms: Optional[float] = typer.Option(None, "--deadline-ms",
                                                help="Receive-to-forward deadline per image (default 250)."),
) -> None:
    """Run the acquisition node between modalities and a PACS: receive (C-STORE, or files in a
    watched folder), check, watermark, verify, seal and sign, record the evidence, forward
    (C-STORE). An object is acknowledged only once it is on disk in the spool, and leaves the
    spool only once the PACS has it; SIGTERM stops gracefully. Audit log and status endpoint
    carry hashed identifiers only."""
    from medsec_edge.runtime.node.config import load_config
    from medsec_edge.runtime.node.node import Node

    try:
        config = load_config(
            config_file, listen=listen, aet=aet, forward=forward, spool=spool, allowed_aets=tuple(allow_aet or ()),
            tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca, watch=watch, workers=workers, threads=threads,
            keys=keys, bundle=bundle, registry=registry, no_registry=no_registry, on_tampered=on_tampered,
            on_verify_failed=on_verify_failed, on_budget_overrun=on_budget_overrun, on_non_image=on_non_image,
            status_listen=status_listen,
            audit_log=audit_log, deadline_ms=deadline_ms,
        )
        node = Node(config)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        node.start()
    except MedsecError as exc:
        fail(exc)
        return
    log.info("serving; SIGTERM or Ctrl-C stops gracefully; status: %s", node.status_url or "off")
    try:
        while not stop.wait(1.0):
            pass
    finally:
        log.info("stopping: finishing the images in progress")
        node.stop()


def status(
    spool: Optional[Path] = typer.Option(None, "--spool", metavar="DIR", help="The node's spool."),
    url: Optional[str] = typer.Option(None, "--url", help="The node's status endpoint (instead of --spool)."),
    as_json: bool = JsonOpt,
) -> None:
    """What a running node is doing: counts, queue depths, per-stage p50/p99 latency, budget
    misses. Without a running node (exit 1) the spool's queue depths are still shown."""
    from medsec_edge.runtime.node.node import read_node_file
    from medsec_edge.runtime.node.spool import Spool
    from medsec_edge.runtime.node.status_http import fetch_status

    try:
        if (spool is None) == (url is None):
            raise UsageError("give the node's --spool DIR or its status --url")
        if url is None:
            info = read_node_file(spool)
            url = info.get("status_url") if info else None
            if not url:
                depth = Spool(spool).depth()
                if as_json:
                    json_line({"running": False, "spool": str(spool), "queue": depth})
                else:
                    stdout().print(f"no node running on {spool}; spool: {depth['received']} to process, "
                                   f"{depth['outgoing']} to forward, {depth['quarantine']} in quarantine",
                                   highlight=False)
                raise typer.Exit(1)
        snap = fetch_status(url)
    except MedsecError as exc:
        fail(exc)
        return
    snap = {"running": True, **snap}
    if as_json:
        json_line(snap)
        return
    _print_status(snap)


def _print_status(snap: dict) -> None:
    from rich.table import Table

    console = stdout()
    counters = snap.get("counters", {})
    gauges = snap.get("gauges", {})
    console.print(f"up {snap.get('uptime_s', 0):.0f} s; " + ", ".join(f"{k} {v}" for k, v in sorted(counters.items())),
                  highlight=False)
    console.print("queue: " + ", ".join(f"{k} {v:g}" for k, v in sorted(gauges.items())), highlight=False)
    t = Table("stage", "p50 ms", "p99 ms", "max ms", "n", "budget misses")
    misses = snap.get("budget_misses", {})
    for stage, s in snap.get("stages", {}).items():
        t.add_row(stage, f"{s['p50']:.1f}", f"{s['p99']:.1f}", f"{s['max']:.1f}", str(s["n"]),
                  str(misses.get(stage, "")))
    console.print(t)
    if "deadline" in misses:
        console.print(f"receive-to-forward deadline missed {misses['deadline']} times", highlight=False)
