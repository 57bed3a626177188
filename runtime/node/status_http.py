"""A small read-only HTTP endpoint for the node's status: JSON on ``/status``, Prometheus on ``/metrics``.

Layer: runtime, standard library only (``http.server`` in a daemon thread). The node's health
must be readable by ``medsec-edge status`` and by a scraper without a web framework on the edge
box. It listens on loopback unless the caller says ``allow_remote=True``: the page carries no
patient data, but counters and queue depths of a clinical device are still not for the whole
hospital network by default. Only GET is served; anything else is 405, unknown paths 404.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import socketserver
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

from medsec_edge.runtime.errors import ConfigError, InputError, UsageError

_log = logging.getLogger(__name__)

JSON_TYPE = "application/json"
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# How often serve_forever looks for a shutdown request: stop() waits up to this long.
_POLL_S = 0.1


def _is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback address."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "medsec-edge"
    sys_version = ""

    def do_GET(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        try:
            if path in ("/", "/status"):
                body = json.dumps(self.server.snapshot(), sort_keys=True).encode("utf-8")
                self._send(200, JSON_TYPE, body)
            elif path == "/metrics":
                self._send(200, PROMETHEUS_TYPE, self.server.prometheus().encode("utf-8"))
            else:
                self._send(404, JSON_TYPE, b'{"error": "not found"}')
        except Exception:  # noqa: BLE001 - a failing callable is a 500, not a dead thread
            _log.exception("status endpoint failed on %s", path)
            self._send(500, JSON_TYPE, b'{"error": "internal error"}')

    def __getattr__(self, name: str):
        # http.server answers 501 for a method it finds no do_<METHOD> for; every method other
        # than GET, known or invented, is a 405 here.
        if name.startswith("do_"):
            return self._not_allowed
        raise AttributeError(name)

    def _not_allowed(self) -> None:
        self._send(405, JSON_TYPE, b'{"error": "method not allowed"}', allow="GET")

    def _send(self, code: int, content_type: str, body: bytes, allow: str | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        if allow:
            self.send_header("Allow", allow)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        _log.debug("%s - " + format, self.address_string(), *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, snapshot, prometheus, family) -> None:
        self.address_family = family
        self.snapshot = snapshot
        self.prometheus = prometheus
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, which can hang for seconds on an
        # edge box without DNS; the name is only used in CGI environments.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class StatusServer:
    """The status endpoint, served from a daemon thread; ``start()`` returns the bound port."""

    def __init__(
        self,
        snapshot: Callable[[], dict],
        prometheus: Callable[[], str],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        allow_remote: bool = False,
    ) -> None:
        if not allow_remote and not _is_loopback(host):
            raise ConfigError(
                f"status endpoint host {host!r} is not a loopback address: it would expose the "
                "node's status to the network; use 127.0.0.1 or ::1, or pass allow_remote=True "
                "to listen there on purpose"
            )
        self._snapshot = snapshot
        self._prometheus = prometheus
        self._host = host
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port once started (the requested one before)."""
        return self._server.server_address[1] if self._server else self._port

    @property
    def url(self) -> str:
        """``http://host:port`` of the endpoint (IPv6 hosts bracketed)."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    def start(self) -> int:
        """Bind and serve in a daemon thread; return the bound port."""
        if self._server is not None:
            raise UsageError("status endpoint already started; stop() it before starting again")
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        try:
            server = _Server((self._host, self._port), self._snapshot, self._prometheus, family)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen for status on {self._host}:{self._port}: {exc.strerror or exc}; "
                "choose another port or stop what holds it"
            ) from exc
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, args=(_POLL_S,), name="medsec-edge-status", daemon=True
        )
        self._thread.start()
        _log.info("status endpoint on %s", self.url)
        return self.port

    def stop(self) -> None:
        """Stop serving, close the socket and join the thread; a no-op when not running."""
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join()
        self._port = server.server_address[1]
        self._server = self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def fetch_status(url: str, timeout: float = 5) -> dict:
    """GET ``<url>/status`` of a running node, bypassing any proxy; the decoded JSON."""
    target = url.rstrip("/") + "/status"
    if urllib.parse.urlsplit(target).scheme not in ("http", "https"):
        raise UsageError(f"status URL {url!r} is not http(s); give it as http://127.0.0.1:PORT")
    # A proxy from the environment would carry a loopback request off the box, or fail it.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(target, timeout=timeout) as response:
            return json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        raise InputError(
            f"node status at {target} answered HTTP {exc.code}, expected 200 with JSON: "
            "is that the status port of 'medsec-edge serve'?"
        ) from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise InputError(
            f"cannot reach node status at {target}: {reason}; "
            "is 'medsec-edge serve' running with its status endpoint on that port?"
        ) from exc
    except ValueError as exc:
        raise InputError(
            f"node status at {target} is not JSON ({exc}): "
            "is that the status port of 'medsec-edge serve'?"
        ) from exc
