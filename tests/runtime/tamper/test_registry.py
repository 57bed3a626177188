"""The evidence registry on real SQLite files: round trip, lookups, idempotence, privacy of the
stored bytes, permissions, schema and corruption refusals, two writing processes, prune, paths."""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import re
import sqlite3
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medsec_edge.runtime.errors import ConfigError, PayloadError, UsageError
from medsec_edge.runtime.tamper import registry as registry_module
from medsec_edge.runtime.tamper.registry import (
    MAX_FINGERPRINT_BYTES,
    SCHEMA_VERSION,
    Entry,
    Registry,
    default_registry_path,
    uid_sha256,
)
from medsec_edge.runtime.watermark.payload import PAYLOAD_KINDS

T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)
# Distinctive UIDs: their long components could not appear in a file by chance.
SOP_UID = "1.2.826.0.1.3680043.8.498.48151623429876543210"
STUDY_UID = "1.2.826.0.1.3680043.8.498.99887766554433221100"


def make_entry(i: int = 0, *, sop_uid: str | None = None, payload: str | None = None,
               kind: str = "identity", fingerprint: bytes | None = None,
               recorded_at: datetime = T0, **extra) -> Entry:
    sop = sop_uid if sop_uid is not None else f"1.2.3.4.{i}"
    return Entry.from_uids(
        payload_hex=payload if payload is not None else f"{i:016x}",
        payload_kind=kind,
        image_id=hashlib.sha256(sop.encode()).hexdigest()[:12],
        fingerprint=fingerprint if fingerprint is not None else hashlib.sha256(b"fp%d" % i).digest() * 8,
        frames=1, rows=512, columns=512,
        sop_uid=sop, study_uid=extra.pop("study_uid", "1.2.3.9"),
        key_id=extra.pop("key_id", "0123456789abcdef"),
        recorded_at=recorded_at, **extra,
    )


@pytest.fixture
def reg(tmp_path):
    with Registry.open(tmp_path / "registry.sqlite3") as registry:
        yield registry


# -- round trip and lookups ------------------------------------------------------------------

def test_round_trip_keeps_every_field(tmp_path):
    entry = Entry.from_uids(
        payload_hex="00FF00FF00FF00FF", payload_kind="user", image_id="abcdef012345",
        fingerprint=bytes(range(256)) * 16, frames=3, rows=2048, columns=1536,
        sop_uid=SOP_UID, study_uid=STUDY_UID, key_id="fedcba9876543210",
        working_geometry={"scale": 0.5, "tile": [128, 128], "origin": {"y": 3, "x": 7}},
        recorded_at=T0,
    )
    path = tmp_path / "registry.sqlite3"
    with Registry.open(path) as registry:
        assert registry.record(entry) is True
    with Registry.open(path) as registry:  # read back by a fresh connection, from the file
        (found,) = registry.find_by_payload("00ff00ff00ff00ff")
    assert found == entry
    assert found.payload_hex == "00ff00ff00ff00ff"  # normalised to lower case on the way in
    assert found.fingerprint == bytes(range(256)) * 16
    assert (found.frames, found.rows, found.columns) == (3, 2048, 1536)
    assert found.working_geometry == {"scale": 0.5, "tile": [128, 128], "origin": {"y": 3, "x": 7}}
    assert found.sop_sha256 == hashlib.sha256(SOP_UID.encode()).hexdigest()
    assert found.study_sha256 == hashlib.sha256(STUDY_UID.encode()).hexdigest()
    assert found.recorded_at == T0 and found.recorded_at.tzinfo == timezone.utc
    assert found.entry_id == entry.entry_id


def test_lookups_by_payload_and_by_sop_find_the_right_images(reg):
    entries = [make_entry(i) for i in range(20)]
    shared_a = make_entry(100, payload="feedfacecafebeef", kind="user")
    shared_b = make_entry(101, payload="feedfacecafebeef", kind="user", recorded_at=T0 + timedelta(seconds=1))
    assert reg.record_many([*entries, shared_b, shared_a]) == 22
    assert reg.count() == 22
    assert reg.find_by_payload(f"{7:016x}") == [entries[7]]
    assert reg.find_by_sop("1.2.3.4.7") == [entries[7]]
    assert reg.find_by_sop("1.2.3.4.7\0") == [entries[7]]  # DICOM's UI padding hashes alike
    assert reg.find_by_payload("FEEDFACECAFEBEEF") == [shared_a, shared_b]  # oldest first
    assert reg.find_by_payload("0123012301230123") == []
    assert reg.find_by_sop("1.2.3.4.999") == []


def test_lookups_use_the_indexes(reg):
    plans = {}
    for column in ("payload_hex", "sop_sha256"):
        rows = reg._conn().execute(f"EXPLAIN QUERY PLAN SELECT * FROM entries WHERE {column} = ?", ("x",))
        plans[column] = " ".join(str(r[-1]) for r in rows)
    assert "entries_by_payload" in plans["payload_hex"]
    assert "entries_by_sop" in plans["sop_sha256"]


# -- idempotence -----------------------------------------------------------------------------

def test_the_same_evidence_twice_is_one_row_and_keeps_the_first_time(reg):
    first = make_entry(1, recorded_at=T0)
    resent = make_entry(1, recorded_at=T0 + timedelta(hours=2))  # a modality re-sending
    assert first.entry_id == resent.entry_id
    assert reg.record(first) is True
    assert reg.record(resent) is False
    assert reg.count() == 1
    assert reg.find_by_sop("1.2.3.4.1")[0].recorded_at == T0


def test_different_evidence_for_the_same_image_is_kept_beside_and_logged(reg, caplog):
    first = make_entry(1, recorded_at=T0)
    other = make_entry(1, fingerprint=b"another fingerprint", recorded_at=T0 + timedelta(days=1))
    reg.record(first)
    with caplog.at_level(logging.WARNING, logger=registry_module.__name__):
        assert reg.record(other) is True
    assert reg.find_by_sop("1.2.3.4.1") == [first, other]
    warnings = [r.getMessage() for r in caplog.records if r.name == registry_module.__name__]
    assert any(first.image_id in m and "kept" in m for m in warnings), warnings
    assert not any("1.2.3.4.1" in m for m in warnings)  # named by image id, never by UID


# -- privacy of what is stored ---------------------------------------------------------------

def test_no_raw_uid_reaches_the_database_files(tmp_path):
    folder = tmp_path / "reg"
    path = folder / "registry.sqlite3"
    entry = make_entry(sop_uid=SOP_UID, study_uid=STUDY_UID)
    with Registry.open(path) as registry:
        registry.record(entry)
        registry.find_by_sop(SOP_UID)
        # While open, the WAL holds the new pages: check it too, not only the checkpointed file.
        live = b"".join(p.read_bytes() for p in folder.iterdir())
    at_rest = b"".join(p.read_bytes() for p in folder.iterdir())
    for blob in (live, at_rest):
        assert entry.sop_sha256.encode() in blob  # the grep does find what is stored
        for uid in (SOP_UID, STUDY_UID):
            long_parts = [part for part in uid.split(".") if len(part) >= 10]
            for needle in (uid, *long_parts):
                assert needle.encode("ascii") not in blob
                assert needle.encode("utf-16-le") not in blob
    assert SOP_UID not in repr(entry) and STUDY_UID not in repr(entry)


def test_errors_describe_a_bad_uid_without_quoting_it(reg):
    bad = "1.2.3.4.5.6.7.8." + "9" * 2000
    with pytest.raises(UsageError) as info:
        reg.find_by_sop(bad)
    assert "9999999999" not in str(info.value)
    with pytest.raises(UsageError) as info:
        reg.find_by_sop("1.2.3.\x01secret")
    assert "secret" not in str(info.value)


# -- file, folder, schema --------------------------------------------------------------------

@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("umask", [0o000, 0o277], ids=["umask000", "umask277"])  # lets others in; takes the owner's bits
def test_created_owner_only_whatever_the_umask(tmp_path, umask):
    existing = tmp_path / "home"
    existing.mkdir(mode=0o755)
    os.chmod(existing, 0o755)
    path = existing / "a" / "b" / "registry.sqlite3"
    old = os.umask(umask)
    try:
        with Registry.open(path) as registry:
            registry.record(make_entry(1))
            wal = Path(f"{path}-wal")
            assert wal.exists() and stat.S_IMODE(wal.stat().st_mode) == 0o600
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((existing / "a").stat().st_mode) == 0o700
    assert stat.S_IMODE((existing / "a" / "b").stat().st_mode) == 0o700
    assert stat.S_IMODE(existing.stat().st_mode) == 0o755  # not ours: left as it was


def test_schema_is_versioned_wal_and_foreign_keys_on(tmp_path):
    path = tmp_path / "registry.sqlite3"
    with Registry.open(path) as registry:
        assert registry._conn().execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert registry._conn().execute("PRAGMA busy_timeout").fetchone()[0] >= 1000
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent in the file
        meta = dict(db.execute("SELECT name, value FROM meta"))
        assert meta["schema_version"] == str(SCHEMA_VERSION)
    finally:
        db.close()


def test_schema_uses_only_portable_sql():
    """DESIGN.md: a site moves to PostgreSQL with the same schema (BLOB spelt BYTEA there)."""
    ddl = " ".join(registry_module._SCHEMA).upper()
    for sqlite_only in ("AUTOINCREMENT", "WITHOUT ROWID", "STRICT", "ROWID", "PRAGMA"):
        assert sqlite_only not in ddl
    types = set(re.findall(r"^\s+\w+\s+(\w+)", " \n".join(registry_module._SCHEMA), re.MULTILINE))
    assert types <= {"TEXT", "INTEGER", "BLOB"}, types


def test_a_newer_schema_version_is_refused_naming_the_upgrade(tmp_path):
    path = tmp_path / "registry.sqlite3"
    with Registry.open(path) as registry:
        registry.record(make_entry(1))
    db = sqlite3.connect(path)
    with db:
        db.execute("UPDATE meta SET value = ? WHERE name = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    db.close()
    with pytest.raises(ConfigError) as info:
        Registry.open(path)
    message = str(info.value)
    assert str(path) in message and f"schema version {SCHEMA_VERSION + 1}" in message
    assert "upgrade medsec-edge" in message


@pytest.mark.parametrize("content", [os.urandom(8192), b"not a database\n" * 100,
                                     b"SQLite format 3\x00" + b"\xff" * 4080])
def test_a_corrupt_file_is_refused_cleanly(tmp_path, content):
    path = tmp_path / "registry.sqlite3"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        Registry.open(path)
    message = str(info.value)
    assert str(path) in message and "move it aside" in message
    assert path.read_bytes() == content  # refused, not "repaired" over the user's file


def test_a_foreign_database_is_refused(tmp_path):
    path = tmp_path / "other.db"
    db = sqlite3.connect(path)
    with db:
        db.execute("CREATE TABLE patients (name TEXT)")
    db.close()
    with pytest.raises(ConfigError, match="not a medsec-edge registry"):
        Registry.open(path)


def test_a_row_edited_by_hand_is_a_config_error_on_read(reg):
    reg.record(make_entry(1))
    reg._conn().execute("UPDATE entries SET image_id = 'not hex'")
    with pytest.raises(ConfigError, match="does not read back"):
        reg.find_by_payload(f"{1:016x}")


def test_open_without_create_refuses_a_missing_file_and_creates_nothing(tmp_path):
    path = tmp_path / "none" / "registry.sqlite3"
    with pytest.raises(ConfigError, match="no registry at"):
        Registry.open(path, create=False)
    assert not path.parent.exists()


def test_a_closed_registry_refuses_use(tmp_path):
    registry = Registry.open(tmp_path / "registry.sqlite3")
    registry.close()
    registry.close()  # twice is harmless
    with pytest.raises(UsageError, match="closed"):
        registry.count()


# -- concurrency -----------------------------------------------------------------------------

N_PER_PROCESS = 300
N_SHARED = 50


def _write_from_another_process(path: str, worker: int, barrier) -> None:
    barrier.wait(timeout=60)
    with Registry.open(path) as registry:
        for i in range(N_PER_PROCESS):
            registry.record(make_entry(worker * 100_000 + i))
            if i < N_SHARED:  # both processes record the same instances: one row each
                registry.record(make_entry(900_000 + i))


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    path = tmp_path / "registry.sqlite3"
    Registry.open(path).close()  # and once more below with a race on creation
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    workers = [ctx.Process(target=_write_from_another_process, args=(str(path), w, barrier)) for w in (1, 2)]
    for proc in workers:
        proc.start()
    for proc in workers:
        proc.join(timeout=240)
    assert [p.exitcode for p in workers] == [0, 0]
    with Registry.open(path) as registry:
        assert registry.count() == 2 * N_PER_PROCESS + N_SHARED
        for w in (1, 2):
            for i in (0, N_PER_PROCESS // 2, N_PER_PROCESS - 1):
                assert registry.find_by_payload(f"{w * 100_000 + i:016x}") == [make_entry(w * 100_000 + i)]
        assert len(registry.find_by_sop(f"1.2.3.4.{900_000}")) == 1


def test_two_processes_creating_the_registry_at_once_agree(tmp_path):
    path = tmp_path / "new" / "registry.sqlite3"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    workers = [ctx.Process(target=_write_from_another_process, args=(str(path), w, barrier)) for w in (3, 4)]
    for proc in workers:
        proc.start()
    for proc in workers:
        proc.join(timeout=240)
    assert [p.exitcode for p in workers] == [0, 0]
    with Registry.open(path) as registry:
        assert registry.count() == 2 * N_PER_PROCESS + N_SHARED


# -- prune -----------------------------------------------------------------------------------

def test_prune_deletes_only_entries_older_than_the_period(reg):
    now = datetime(2026, 6, 1, tzinfo=timezone.utc)
    ages = {1: 400, 2: 91, 3: 89, 4: 0}
    reg.record_many(make_entry(i, recorded_at=now - timedelta(days=d)) for i, d in ages.items())
    assert reg.prune(90, now=now) == 2
    assert reg.count() == 2
    assert reg.find_by_sop("1.2.3.4.1") == [] and reg.find_by_sop("1.2.3.4.2") == []
    assert len(reg.find_by_sop("1.2.3.4.3")) == 1 and len(reg.find_by_sop("1.2.3.4.4")) == 1
    assert reg.prune(1e300, now=now) == 0  # a period longer than history removes nothing


@pytest.mark.parametrize("days", [0, -1, float("nan"), float("inf"), True, "30", None])
def test_prune_refuses_a_period_that_is_not_positive(reg, days):
    reg.record(make_entry(1))
    with pytest.raises(UsageError):
        reg.prune(days)
    assert reg.count() == 1


# -- default path ----------------------------------------------------------------------------

def test_default_path_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MEDSEC_EDGE_REGISTRY", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    assert default_registry_path() == tmp_path / "home" / ".local" / "share" / "medsec-edge" / "registry.sqlite3"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
    assert default_registry_path() == tmp_path / "home" / ".local" / "share" / "medsec-edge" / "registry.sqlite3"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_registry_path() == tmp_path / "xdg" / "medsec-edge" / "registry.sqlite3"
    monkeypatch.setenv("MEDSEC_EDGE_REGISTRY", str(tmp_path / "env" / "r.sqlite3"))
    assert default_registry_path() == tmp_path / "env" / "r.sqlite3"
    with Registry.open() as registry:  # no path: the environment's
        registry.record(make_entry(1))
        assert registry.path == tmp_path / "env" / "r.sqlite3"
    assert (tmp_path / "env" / "r.sqlite3").is_file()
    assert not (tmp_path / "xdg").exists() and not (tmp_path / "home").exists()


# -- input validation ------------------------------------------------------------------------

HEX = "0123456789abcdefABCDEF"


def _valid_payload(text: str) -> bool:
    stripped = text.strip()
    return len(stripped) == 16 and all(c in HEX for c in stripped)


@settings(max_examples=300, deadline=None)
@given(
    payload=st.one_of(st.text(alphabet=HEX, min_size=14, max_size=18), st.text(max_size=20)),
    kind=st.one_of(st.sampled_from(PAYLOAD_KINDS), st.text(max_size=10)),
    size=st.one_of(st.sampled_from([0, 1, MAX_FINGERPRINT_BYTES, MAX_FINGERPRINT_BYTES + 1]),
                   st.integers(0, 4096)),
    frames=st.one_of(st.integers(-2, 3), st.just(2**31), st.booleans()),
    rows=st.integers(-1, 70_000),
    key_id=st.one_of(st.none(), st.text(alphabet="0123456789abcdef", min_size=15, max_size=17)),
)
def test_entries_accept_exactly_the_valid_inputs(payload, kind, size, frames, rows, key_id):
    valid = (
        _valid_payload(payload)
        and kind in PAYLOAD_KINDS
        and 1 <= size <= MAX_FINGERPRINT_BYTES
        and not isinstance(frames, bool) and 1 <= frames <= 2**31 - 1
        and 1 <= rows <= 65535
        and (key_id is None or len(key_id) == 16)
    )
    try:
        entry = Entry(payload_hex=payload, payload_kind=kind, image_id="abcdef012345",
                      fingerprint=b"\0" * size, frames=frames, rows=rows, columns=64,
                      recorded_at=T0, key_id=key_id)
    except UsageError as exc:  # PayloadError is one
        assert not valid, exc
        if not _valid_payload(payload):  # checked first, and named as a payload error
            assert isinstance(exc, PayloadError)
        return
    assert valid
    assert entry.payload_hex == payload.strip().lower()


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=40))
def test_lookups_take_any_text_without_crashing(tmp_path_factory, text):
    path = tmp_path_factory.getbasetemp() / "lookup.sqlite3"
    with Registry.open(path) as registry:
        try:
            assert registry.find_by_payload(text) == []
        except PayloadError:
            assert not _valid_payload(text)
        try:
            assert registry.find_by_sop(text) == []
        except UsageError as exc:
            if len(text.strip("\0 ")) >= 8:
                assert text.strip("\0 ") not in str(exc)


@settings(max_examples=100, deadline=None)
@given(uid=st.text(alphabet="0123456789.", min_size=8, max_size=64).filter(lambda u: u.strip(".")))
def test_uid_hash_is_plain_sha256_of_the_value(uid):
    assert uid_sha256(uid) == hashlib.sha256(uid.encode()).hexdigest()
    assert uid_sha256(uid + "\0") == uid_sha256(" " + uid)


@pytest.mark.parametrize("bad", [
    {"working_geometry": {"nan": float("nan")}},
    {"working_geometry": {1: 2}},
    {"working_geometry": {"big": "x" * 20_000}},
    {"working_geometry": [1, 2]},
    {"recorded_at": datetime(2026, 1, 1)},  # naive
    {"recorded_at": datetime(1969, 12, 31, tzinfo=timezone.utc)},
    {"image_id": "ABCDEF012345"},
    {"sop_sha256": "1.2.3"},
])
def test_entry_refuses_bad_fields(bad):
    fields = {"payload_hex": "0011223344556677", "payload_kind": "identity", "image_id": "abcdef012345",
              "fingerprint": b"fp", "frames": 1, "rows": 8, "columns": 8, "recorded_at": T0}
    fields.update(bad)
    with pytest.raises(UsageError):
        Entry(**fields)


def test_record_refuses_what_is_not_an_entry(reg):
    with pytest.raises(UsageError):
        reg.record({"payload_hex": "0011223344556677"})
    assert reg.count() == 0
