"""Audit log: whitelisted fields only, 0600 file, one valid JSON line per event, durable, concurrent."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import threading

import pytest

from medsec_edge.runtime.errors import InputError
from medsec_edge.runtime.node.audit import ALLOWED_FIELDS, AuditLog, read_audit, uid_hash

_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


def test_write_appends_one_json_line_with_time_and_event(tmp_path):
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as audit:
        audit.write("received", calling_ae="CT1", peer="10.0.0.5:51234", uid_sha256="ab" * 8)
        audit.write("forwarded", destination="PACS", attempt=1, latency_ms=12.34)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert list(first)[:2] == ["time", "event"]
    assert _TIME.match(first["time"]) and _TIME.match(second["time"])
    assert first == {
        "time": first["time"], "event": "received", "calling_ae": "CT1",
        "peer": "10.0.0.5:51234", "uid_sha256": "ab" * 8,
    }
    assert second["attempt"] == 1 and second["latency_ms"] == 12.34
    assert read_audit(path) == [first, second]


@pytest.mark.parametrize("key", ["PatientName", "patient_id", "PatientID", "note", "time", "uid"])
def test_fields_outside_the_whitelist_are_refused(tmp_path, key):
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as audit, pytest.raises(ValueError, match=key):
        audit.write("received", status="ok", **{key: "DOE^JOHN"})
    assert path.read_text() == ""  # nothing half-written


def test_whitelist_is_exactly_the_agreed_keys():
    assert ALLOWED_FIELDS == {
        "calling_ae", "called_ae", "peer", "association", "sop_class", "image_id",
        "source_uid_sha256", "uid_sha256", "derived_uid_sha256", "status", "status_code",
        "reason", "action", "stage", "latency_ms", "bytes", "attempt", "destination", "policy",
        "flags", "worker", "spool_id", "transfer_syntax", "count", "pid", "version", "config",
        "tls",
    }
    assert isinstance(ALLOWED_FIELDS, frozenset)
    assert not {name for name in ALLOWED_FIELDS if "patient" in name.lower()}


def test_file_is_0600_and_created_folders_0700(tmp_path):
    tmp_path.chmod(0o755)
    old_umask = os.umask(0o002)  # a permissive umask must not widen what we create
    try:
        path = tmp_path / "var" / "log" / "audit.jsonl"
        AuditLog(path).close()
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "var").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "var" / "log").stat().st_mode) == 0o700
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755  # a folder it did not create: untouched


def test_existing_world_readable_file_is_tightened_and_appended(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_text('{"time": "t", "event": "old"}\n')
    path.chmod(0o644)
    with AuditLog(path) as audit:
        audit.write("started", pid=1)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [r["event"] for r in read_audit(path)] == ["old", "started"]


def test_values_with_newlines_stay_on_one_line(tmp_path):
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as audit:
        audit.write("refused", reason="bad\nline\r\x00\u2028end")
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 2
    assert read_audit(path)[0]["reason"] == "bad\nline\r\x00\u2028end"


def test_write_after_close_raises(tmp_path):
    audit = AuditLog(tmp_path / "a.jsonl")
    audit.close()
    audit.close()
    assert audit.closed
    with pytest.raises(ValueError):
        audit.write("received")


def test_records_survive_a_process_killed_without_close(tmp_path):
    path = tmp_path / "audit.jsonl"
    code = (
        "import os\n"
        "from medsec_edge.runtime.node.audit import AuditLog\n"
        f"a = AuditLog({str(path)!r})\n"
        "a.write('received', image_id='img1')\n"
        "a.write('forwarded', image_id='img1')\n"
        "os._exit(9)\n"  # no close, no flush at exit
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, timeout=60)
    assert result.returncode == 9
    assert [r["event"] for r in read_audit(path)] == ["received", "forwarded"]
    with AuditLog(path) as audit:  # reopen appends after them
        audit.write("started", pid=os.getpid())
    assert [r["event"] for r in read_audit(path)] == ["received", "forwarded", "started"]


def test_write_fsyncs_each_record(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    with AuditLog(tmp_path / "a.jsonl") as audit:
        audit.write("received")
        audit.write("processed")
    assert len(synced) == 2


def test_concurrent_writers_produce_whole_lines(tmp_path):
    path = tmp_path / "audit.jsonl"
    threads_n, per_thread = 8, 50
    reason = "x" * 3000  # long lines: a torn write would show as a bad line
    with AuditLog(path) as audit:
        barrier = threading.Barrier(threads_n)

        def work(worker: int) -> None:
            barrier.wait()
            for i in range(per_thread):
                audit.write("processed", worker=worker, count=i, reason=reason)

        threads = [threading.Thread(target=work, args=(w,)) for w in range(threads_n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == threads_n * per_thread
    records = [json.loads(line) for line in lines]
    seen = {(r["worker"], r["count"]) for r in records}
    assert seen == {(w, i) for w in range(threads_n) for i in range(per_thread)}
    for w in range(threads_n):  # each writer's records in its own order
        assert [r["count"] for r in records if r["worker"] == w] == list(range(per_thread))


def test_uid_hash_is_sha256_prefix_of_the_stripped_uid():
    uid = "1.2.840.113619.2.55.3.604688119"
    expected = hashlib.sha256(uid.encode("ascii")).hexdigest()[:16]
    assert uid_hash(uid) == expected
    assert uid_hash(uid + "\x00") == expected
    assert uid_hash(uid + " ") == expected
    assert len(expected) == 16 and uid not in expected
    assert uid_hash("1.2.3") != uid_hash("1.2.4")
    with pytest.raises(ValueError):
        uid_hash("1.2.\u00e9")


def test_read_audit_skips_only_a_torn_last_line(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_text('{"event": "a"}\n{"event": "b"}\n{"event": "c", "rea')
    assert [r["event"] for r in read_audit(path)] == ["a", "b"]
    path.write_text('{"event": "a"}\n{"event": \n{"event": "c"}\n')
    with pytest.raises(InputError, match="line 2"):
        read_audit(path)
    with pytest.raises(InputError, match="missing"):
        read_audit(tmp_path / "missing.jsonl")
