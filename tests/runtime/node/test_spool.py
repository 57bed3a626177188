"""The spool: durable steps by rename, recovery after a kill, one node per spool."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import pytest

from medsec_edge.runtime.errors import ConfigError
from medsec_edge.runtime.node.spool import Spool


def test_an_object_moves_received_outgoing_forwarded(tmp_path):
    spool = Spool.open(tmp_path / "spool")
    before = time.time()
    sid = spool.accept(b"DICOM bytes")
    assert spool.received_path(sid).read_bytes() == b"DICOM bytes"
    assert before - 1 <= spool.received_at(sid) <= time.time() + 1
    assert stat.S_IMODE(os.stat(spool.root).st_mode) == 0o700
    spool.outgoing_path(sid).write_bytes(b"output")
    spool.processed(sid)
    assert not spool.received_path(sid).exists()
    assert spool.depth() == {"received": 0, "outgoing": 1, "quarantine": 0}
    spool.forwarded(sid)
    assert spool.depth() == {"received": 0, "outgoing": 0, "quarantine": 0}
    spool.close()


def test_recover_returns_unfinished_work_in_arrival_order_and_drops_done_copies(tmp_path):
    spool = Spool.open(tmp_path / "spool")
    ids = [spool.accept(bytes([i])) for i in range(4)]
    # ids[1] was processed, only the removal of its received copy was lost (a kill in between)
    spool.outgoing_path(ids[1]).write_bytes(b"out1")
    spool.outgoing_path(ids[3]).write_bytes(b"out3")
    spool.processed(ids[3])
    spool.close()
    again = Spool.open(tmp_path / "spool")
    to_process, to_forward = again.recover()
    assert to_process == [ids[0], ids[2]]
    assert to_forward == [ids[1], ids[3]]
    assert not again.received_path(ids[1]).exists()


def test_hold_writes_the_reason_before_moving_the_file(tmp_path):
    spool = Spool.open(tmp_path / "spool")
    sid = spool.accept(b"x")
    held = spool.hold(sid, spool.received_path(sid), {"status": "bad_input", "reason": "why"})
    assert held.read_bytes() == b"x" and not spool.received_path(sid).exists()
    reason = json.loads(held.with_name(held.name + ".reason.json").read_text())
    assert reason == {"spool_id": sid, "status": "bad_input", "reason": "why"}
    assert spool.depth()["quarantine"] == 1


def test_a_second_node_on_the_same_spool_is_refused(tmp_path):
    spool = Spool.open(tmp_path / "spool")
    code = ("import sys; from pathlib import Path; from medsec_edge.runtime.node.spool import Spool\n"
            "try:\n    Spool.open(Path(sys.argv[1]))\nexcept Exception as e:\n    print(e); sys.exit(3)\n")
    other = subprocess.run([sys.executable, "-c", code, str(tmp_path / "spool")], capture_output=True, text=True)
    assert other.returncode == 3 and "in use by another running node" in other.stdout
    spool.close()
    assert Spool.open(tmp_path / "spool") is not None  # free again once the first let go


def test_a_temporary_left_by_a_killed_writer_is_removed_on_open(tmp_path):
    spool = Spool.open(tmp_path / "spool")
    spool.close()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    from medsec_edge.runtime.io.atomic import temporary_prefix

    stale = spool.received / f"{temporary_prefix(int(dead.stdout))}abc.tmp"
    stale.write_bytes(b"half")
    Spool.open(tmp_path / "spool")
    assert not stale.exists()


def test_an_unusable_spool_is_a_config_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ConfigError, match="cannot be used"):
        Spool.open(tmp_path / "file" / "spool")
