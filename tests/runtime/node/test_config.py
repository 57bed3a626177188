"""Node settings: flags over a TOML file, and a precise refusal for every bad setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from medsec_edge.runtime.errors import ConfigError
from medsec_edge.runtime.node.config import Destination, load_config, parse_destination


def test_flags_alone_make_a_config_with_the_documented_defaults(tmp_path):
    cfg = load_config(spool=tmp_path / "spool", forward="ORTHANC@127.0.0.1:4242")
    assert cfg.forward == Destination("ORTHANC", "127.0.0.1", 4242)
    assert cfg.listen == ("127.0.0.1", 11112) and cfg.aet == "EDGE" and cfg.allowed_aets == ()
    assert cfg.policy.tampered == "quarantine" and cfg.policy.verify_failed == "quarantine"
    assert cfg.policy.budget_overrun == "forward-flagged"
    assert cfg.audit_path == tmp_path / "spool" / "audit.jsonl"
    assert cfg.worker_count >= 1


def test_a_toml_file_gives_settings_and_flags_win(tmp_path):
    (tmp_path / "node.toml").write_text(
        'listen = "0.0.0.0:104"\naet = "FILEAE"\nforward = "PACS@10.0.0.5:104"\nspool = "spool"\n'
        'allowed-aets = ["CT1", "MR1"]\non-tampered = "forward-flagged"\nworkers = 3\ntls-cert = "c.pem"\n'
        'tls-key = "k.pem"\n')
    cfg = load_config(tmp_path / "node.toml", aet="FLAGAE", workers=None)
    assert cfg.aet == "FLAGAE"  # the flag wins
    assert cfg.workers == 3 and cfg.listen == ("0.0.0.0", 104)
    assert cfg.spool == tmp_path / "spool"  # relative to the file's folder
    assert cfg.tls.cert == tmp_path / "c.pem" and cfg.tls.enabled
    assert cfg.allowed_aets == ("CT1", "MR1") and cfg.policy.tampered == "forward-flagged"


@pytest.mark.parametrize("text,needle", [
    ("PACS127.0.0.1:4242", "AE@HOST:PORT"),
    ("PACS@127.0.0.1", "HOST:PORT"),
    ("PACS@127.0.0.1:99999", "port"),
    ("A_TITLE_LONGER_THAN_16@127.0.0.1:104", "AE title"),
    ("PACS@127.0.0.1:0", "cannot be 0"),
])
def test_a_bad_destination_is_refused_with_the_expected_form(text, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_destination(text)


@pytest.mark.parametrize("content,needle", [
    ('forward = "P@h:1"\nspool = "s"\nwrkers = 2\n', "unknown setting 'wrkers'"),
    ('forward = "P@h:1"\nspool = "s"\n[node]\nx = 1\n', "tables are not used"),
    ('forward = "P@h:1"\nspool = "s"\non-tampered = "delete"\n', "not one of quarantine, forward-flagged"),
    ('forward = "P@h:1"\nspool = "s"\nworkers = "many"\n', "not a int"),
    ('forward = "P@h:1"\nspool = "s"\ntls-cert = "c.pem"\n', "needs both --tls-cert and --tls-key"),
    ('forward = "P@h:1"\nspool = "s"\nlisten = "off"\n', "nothing to receive from"),
    ('forward = = 1', "cannot be read"),
    ('spool = "s"\n', "no PACS"),
    ('forward = "P@h:1"\n', "no spool"),
])
def test_a_bad_config_file_is_refused_naming_the_setting(tmp_path, content, needle):
    path = tmp_path / "node.toml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=needle):
        load_config(path)


def test_a_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_watch_only_needs_no_listener(tmp_path):
    cfg = load_config(spool=tmp_path / "s", forward="P@127.0.0.1:104", listen="off", watch=Path(tmp_path / "in"))
    assert cfg.listen is None and cfg.watch == tmp_path / "in"


def test_the_documented_example_config_loads():
    """docs/node/node.toml is what the README tells integrators to start from: it must load."""
    example = Path(__file__).resolve().parents[3] / "docs" / "node" / "node.toml"
    cfg = load_config(example)
    assert cfg.forward == Destination("PACS", "10.0.0.5", 104)
    assert cfg.allowed_aets == ("CT_ROOM1", "MR_ROOM2") and cfg.status_listen == ("127.0.0.1", 8470)
    assert cfg.spool == Path("/var/spool/medsec-edge") and cfg.forward_retries == 5
