"""``serve`` and ``status`` as a user meets them: bad settings refused with exit 2 before anything
starts, the status of a spool with no node running, the status of a running node.

In-process on the real app (CliRunner) for the refusals; the running node is a real ``Node`` on
loopback (its forward target need not exist: nothing is sent in this test).
"""

from __future__ import annotations

import json
import socket

import pytest
from typer.testing import CliRunner

from medsec_edge.runtime.cli.root import app
from medsec_edge.runtime.node.config import load_config
from medsec_edge.runtime.node.node import Node

runner = CliRunner()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args,needle", [
    (["--spool", "s"], "no PACS to forward to"),
    (["--forward", "PACS@127.0.0.1:104"], "no spool folder"),
    (["--forward", "PACS", "--spool", "s"], "AE@HOST:PORT"),
    (["--forward", "P@127.0.0.1:104", "--spool", "s", "--on-tampered", "ignore"], "not one of"),
    (["--forward", "P@127.0.0.1:104", "--spool", "s", "--listen", "localhost"], "HOST:PORT"),
    (["--forward", "P@127.0.0.1:104", "--spool", "s", "--tls-cert", "c.pem"], "--tls-key"),
])
def test_serve_refuses_bad_settings_with_exit_2(tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["serve", *args])
    assert result.exit_code == 2, result.output
    assert needle in " ".join(result.output.split())


def test_serve_refuses_a_missing_config_file(tmp_path):
    result = runner.invoke(app, ["serve", "--config", str(tmp_path / "none.toml")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_status_without_a_node_shows_the_spool_and_exits_1(tmp_path):
    spool = tmp_path / "spool"
    (spool / "received").mkdir(parents=True)
    (spool / "received" / "1796441907628382150-5e86ea19.dcm").write_bytes(b"x")
    result = runner.invoke(app, ["status", "--spool", str(spool), "--json"])
    assert result.exit_code == 1
    row = json.loads(result.output)
    assert row == {"running": False, "spool": str(spool), "queue": {"received": 1, "outgoing": 0, "quarantine": 0}}


def test_status_needs_exactly_one_of_spool_and_url(tmp_path):
    assert runner.invoke(app, ["status"]).exit_code == 2
    assert runner.invoke(app, ["status", "--spool", str(tmp_path), "--url", "http://127.0.0.1:1"]).exit_code == 2


def test_status_of_a_running_node(tmp_path):
    cfg = load_config(spool=tmp_path / "spool", forward=f"PACS@127.0.0.1:{_free_port()}", listen="127.0.0.1:0",
                      keys=tmp_path / "keys", registry=tmp_path / "registry.sqlite3", workers=1)
    node = Node(cfg)
    node.start()
    try:
        result = runner.invoke(app, ["status", "--spool", str(cfg.spool), "--json"])
        assert result.exit_code == 0, result.output
        snap = json.loads(result.output)
        assert snap["running"] is True
        assert snap["gauges"]["queue_received"] == 0 and snap["gauges"]["workers"] == 1
        table = runner.invoke(app, ["status", "--url", node.status_url])
        assert table.exit_code == 0 and "queue:" in table.output
    finally:
        node.stop(drain_s=0.5)
    assert not (cfg.spool / "node.json").exists()
    assert runner.invoke(app, ["status", "--spool", str(cfg.spool)]).exit_code == 1
