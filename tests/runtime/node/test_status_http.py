"""Status endpoint: real HTTP on a free loopback port, JSON and Prometheus, 404/405, loopback only."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import pytest

from medsec_edge.runtime.errors import ConfigError, InputError, MedsecError, UsageError
from medsec_edge.runtime.node.metrics import Metrics
from medsec_edge.runtime.node.status_http import PROMETHEUS_TYPE, StatusServer, fetch_status

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, method: str = "GET"):
    return _NO_PROXY.open(urllib.request.Request(url, method=method), timeout=5)


@pytest.fixture()
def metrics() -> Metrics:
    m = Metrics()
    m.count("received", 2)
    m.observe("embed", 12.5)
    m.gauge("queue_received", lambda: 1)
    return m


@pytest.fixture()
def server(metrics):
    with StatusServer(metrics.snapshot, metrics.prometheus) as srv:
        yield srv


def test_status_and_root_serve_the_snapshot_as_json(server, metrics):
    assert server.port > 0
    for path in ("/status", "/", "/status?pretty=1"):
        with _get(f"http://127.0.0.1:{server.port}{path}") as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "application/json"
            body = json.loads(response.read())
        assert body["counters"] == {"received": 2}
        assert body["gauges"] == {"queue_received": 1}
        assert body["stages"]["embed"]["p50"] == 12.5
    metrics.count("received")
    assert json.loads(_get(server.url + "/status").read())["counters"]["received"] == 3


def test_metrics_serves_prometheus_text(server):
    with _get(f"http://127.0.0.1:{server.port}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == PROMETHEUS_TYPE
        assert PROMETHEUS_TYPE == "text/plain; version=0.0.4; charset=utf-8"
        text = response.read().decode("utf-8")
    assert "# TYPE medsec_edge_node_received_total counter\n" in text
    assert "medsec_edge_node_received_total 2\n" in text


def test_unknown_path_is_404(server):
    with pytest.raises(urllib.error.HTTPError) as caught:
        _get(f"http://127.0.0.1:{server.port}/admin")
    assert caught.value.code == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "BREW"])
def test_non_get_is_405(server, method):
    with pytest.raises(urllib.error.HTTPError) as caught:
        _get(f"http://127.0.0.1:{server.port}/status", method=method)
    assert caught.value.code == 405
    assert caught.value.headers["Allow"] == "GET"


def test_failing_snapshot_is_500_and_server_keeps_serving(metrics):
    calls = []

    def snapshot():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return {"ok": True}

    with StatusServer(snapshot, metrics.prometheus) as srv:
        with pytest.raises(urllib.error.HTTPError) as caught:
            _get(srv.url + "/status")
        assert caught.value.code == 500
        assert fetch_status(srv.url) == {"ok": True}


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "192.168.0.10"])
def test_non_loopback_host_is_refused(metrics, host):
    with pytest.raises(ConfigError, match="allow_remote"):
        StatusServer(metrics.snapshot, metrics.prometheus, host=host)


def test_allow_remote_binds_on_purpose(metrics):
    with StatusServer(metrics.snapshot, metrics.prometheus, host="0.0.0.0", allow_remote=True) as srv:
        assert fetch_status(f"http://127.0.0.1:{srv.port}")["counters"] == {"received": 2}


def test_localhost_name_is_loopback(metrics):
    with StatusServer(metrics.snapshot, metrics.prometheus, host="localhost") as srv:
        assert fetch_status(f"http://localhost:{srv.port}")["counters"] == {"received": 2}


def test_stop_releases_the_port_and_is_idempotent(metrics):
    srv = StatusServer(metrics.snapshot, metrics.prometheus)
    port = srv.start()
    assert srv.port == port
    with pytest.raises(UsageError):
        srv.start()
    srv.stop()
    srv.stop()
    with pytest.raises(InputError):
        fetch_status(f"http://127.0.0.1:{port}", timeout=2)
    # The port is free again: a new server can take it.
    again = StatusServer(metrics.snapshot, metrics.prometheus, port=port)
    assert again.start() == port
    again.stop()


def test_port_in_use_is_a_config_error(server, metrics):
    with pytest.raises(ConfigError, match=str(server.port)):
        StatusServer(metrics.snapshot, metrics.prometheus, port=server.port).start()


def test_fetch_status_ignores_proxy_environment(server, monkeypatch):
    # A proxy that does not exist: a request routed through it would fail.
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    assert fetch_status(server.url + "/")["counters"] == {"received": 2}


def test_fetch_status_unreachable_names_the_url():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(InputError) as caught:
        fetch_status(url, timeout=2)
    assert f"{url}/status" in str(caught.value)
    assert isinstance(caught.value, MedsecError)


def test_fetch_status_empty_snapshot_and_bad_scheme(metrics):
    with StatusServer(dict, metrics.prometheus) as srv:
        assert fetch_status(srv.url) == {}
    with pytest.raises(UsageError):
        fetch_status("file:///etc/passwd")
