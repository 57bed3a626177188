"""Watermark key files: creation mode, refusal of shared or malformed files, no secret leaks."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from medsec_edge.runtime.crypto import watermark_key as keys_mod
from medsec_edge.runtime.errors import KeyFileError
from medsec_edge.runtime.crypto.watermark_key import (
    KEY_BYTES,
    WatermarkKey,
    create_key,
    default_key_path,
    key_id_of,
    load_key,
    load_or_create_key,
)

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _secret_forms(key: WatermarkKey) -> list[str]:
    return [
        base64.b64encode(key.secret).decode(),
        key.secret.hex(),
        key.secret.hex().upper(),
        repr(key.secret),
    ]


def _write(path: Path, doc: object, mode: int = 0o600) -> None:
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    path.chmod(mode)


@posix_only
def test_creates_owner_only_file_and_directory(tmp_path):
    path = tmp_path / "cfg" / "medsec-edge" / "watermark.key"
    key = load_or_create_key(path)
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    assert len(key.secret) == KEY_BYTES
    doc = json.loads(path.read_text())
    assert doc == {
        "kind": "medsec-edge-watermark-key",
        "version": 1,
        "key": base64.b64encode(key.secret).decode(),
    }
    assert [p.name for p in path.parent.iterdir()] == ["watermark.key"]  # no temp file left


@posix_only
def test_creation_mode_is_0600_even_with_a_lax_umask(tmp_path):
    old = os.umask(0o000)
    try:
        load_or_create_key(tmp_path / "k.key")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "k.key") == 0o600


def test_second_load_returns_the_same_key_and_id_is_stable(tmp_path):
    path = tmp_path / "k.key"
    first = load_or_create_key(path)
    second = load_or_create_key(path)
    assert first == second
    assert first.key_id == key_id_of(first.secret)
    assert len(first.key_id) == 16 and int(first.key_id, 16) >= 0
    known = WatermarkKey.from_secret(bytes(range(32)))
    assert known.key_id == "630dcd2966c43366"  # sha256(bytes(range(32)))[:8]


def test_two_keys_differ(tmp_path):
    assert load_or_create_key(tmp_path / "a").secret != load_or_create_key(tmp_path / "b").secret


def test_repr_and_str_hide_the_secret(tmp_path):
    key = load_or_create_key(tmp_path / "k.key")
    for text in (repr(key), str(key)):
        assert key.key_id in text
        for form in _secret_forms(key):
            assert form not in text


def test_missing_file_without_create_is_refused(tmp_path):
    path = tmp_path / "absent.key"
    with pytest.raises(KeyFileError, match="medsec-edge keys new") as info:
        load_or_create_key(path, create=False)
    assert str(path) in str(info.value)
    assert not path.exists()


def test_create_key_refuses_to_overwrite(tmp_path):
    path = tmp_path / "k.key"
    first = create_key(path)
    with pytest.raises(KeyFileError, match="already exists"):
        create_key(path)
    assert load_key(path) == first


@posix_only
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o660])
def test_group_or_other_access_is_refused_without_leaking(tmp_path, mode):
    path = tmp_path / "k.key"
    key = load_or_create_key(path)
    path.chmod(mode)
    with pytest.raises(KeyFileError) as info:
        load_or_create_key(path)
    message = str(info.value)
    assert str(path) in message and f"chmod 600 {path}" in message
    assert f"{mode:04o}" in message
    for form in _secret_forms(key):
        assert form not in message
    path.chmod(0o600)
    assert load_key(path) == key


@posix_only
def test_owner_only_stricter_modes_are_accepted(tmp_path):
    path = tmp_path / "k.key"
    key = load_or_create_key(path)
    path.chmod(0o400)
    assert load_key(path) == key


SECRET = bytes(range(100, 132))
GOOD = {
    "kind": "medsec-edge-watermark-key",
    "version": 1,
    "key": base64.b64encode(SECRET).decode(),
}


@pytest.mark.parametrize(
    "doc, fragment",
    [
        ("not json {", "not valid JSON"),
        ("\udcff", "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        (dict(GOOD, kind="something-else"), "wrong 'kind'"),
        ({k: v for k, v in GOOD.items() if k != "kind"}, "wrong 'kind'"),
        (dict(GOOD, version=2), "format version 2"),
        (dict(GOOD, version=True), "format version"),
        ({k: v for k, v in GOOD.items() if k != "key"}, "lacks a base64 'key'"),
        (dict(GOOD, key=12), "lacks a base64 'key'"),
        (dict(GOOD, key=GOOD["key"][:-4] + "!!!!"), "not valid base64"),
        (dict(GOOD, key=base64.b64encode(SECRET[:16]).decode()), "16 bytes, expected 32"),
        (dict(GOOD, key=base64.b64encode(SECRET + b"\x00").decode()), "33 bytes, expected 32"),
    ],
)
def test_malformed_files_are_refused_clearly_without_leaking(tmp_path, doc, fragment):
    path = tmp_path / "k.key"
    if doc == "\udcff":
        path.write_bytes(b"\xff" + SECRET)
        path.chmod(0o600)
    else:
        _write(path, doc)
    with pytest.raises(KeyFileError, match=fragment) as info:
        load_or_create_key(path)
    message = str(info.value)
    assert str(path) in message
    for form in (GOOD["key"], GOOD["key"][:20], SECRET.hex()):
        assert form not in message
    # "from None": no chained decoder error that could quote file bytes
    exc = info.value
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)


def test_valid_hand_written_file_loads(tmp_path):
    path = tmp_path / "k.key"
    _write(path, GOOD)
    key = load_key(path)
    assert key.secret == SECRET and key.key_id == key_id_of(SECRET)


def test_oversized_file_and_directory_are_refused(tmp_path):
    path = tmp_path / "k.key"
    _write(path, dict(GOOD, pad="x" * 10_000))
    with pytest.raises(KeyFileError, match="bytes"):
        load_key(path)
    (tmp_path / "dir.key").mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match="dir.key"):
        load_or_create_key(tmp_path / "dir.key")


def test_watermark_key_validates_itself():
    with pytest.raises(KeyFileError):
        WatermarkKey.from_secret(b"short")
    with pytest.raises(KeyFileError):
        WatermarkKey(key_id="0" * 16, secret=SECRET)


def test_default_key_path(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDSEC_EDGE_KEY", str(tmp_path / "env.key"))
    assert default_key_path() == tmp_path / "env.key"
    monkeypatch.setenv("MEDSEC_EDGE_KEY", "")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_key_path() == tmp_path / ".config" / "medsec-edge" / "watermark.key"
    monkeypatch.delenv("MEDSEC_EDGE_KEY")
    assert default_key_path() == tmp_path / ".config" / "medsec-edge" / "watermark.key"


def test_falls_back_to_exclusive_create_without_hard_links(tmp_path, monkeypatch):
    def no_link(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(keys_mod.os, "link", no_link)
    path = tmp_path / "k.key"
    key = load_or_create_key(path)
    assert load_key(path) == key
    if os.name == "posix":
        assert _mode(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["k.key"]
    with pytest.raises(KeyFileError, match="already exists"):
        create_key(path)


def test_concurrent_creator_wins_and_is_used(tmp_path, monkeypatch):
    path = tmp_path / "k.key"
    real_link = os.link
    theirs: list[WatermarkKey] = []

    def racing_link(src, dst):
        monkeypatch.setattr(keys_mod.os, "link", real_link)
        theirs.append(create_key(path))  # another process gets there first
        return real_link(src, dst)

    monkeypatch.setattr(keys_mod.os, "link", racing_link)
    key = load_or_create_key(path)
    assert key == theirs[0]


@posix_only
def test_store_key_writes_the_same_secret_owner_only_and_never_overwrites(tmp_path):
    """What the key set's migration uses: the imported file is the same key, same id."""
    old = create_key(tmp_path / "old.key")
    target = tmp_path / "set" / "watermark.key"
    keys_mod.store_key(target, old)
    assert _mode(target) == 0o600
    again = load_key(target)
    assert again.secret == old.secret and again.key_id == old.key_id
    assert target.read_bytes() == (tmp_path / "old.key").read_bytes()  # one file format
    before = target.read_bytes()
    with pytest.raises(KeyFileError, match="refusing to overwrite") as info:
        keys_mod.store_key(target, WatermarkKey.from_secret(bytes(KEY_BYTES)))
    assert target.read_bytes() == before
    for form in _secret_forms(old):
        assert form not in str(info.value)
    assert sorted(p.name for p in target.parent.iterdir()) == ["watermark.key"]  # no temp file left
