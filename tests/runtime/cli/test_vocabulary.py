"""One CLI vocabulary (issue 8): --keys DIR everywhere, the old spellings still working with a note,
files and folders for every image command, JSON lines, 80-column tables, an example in every
help screen and flags shown as flags.

In-process through typer's CliRunner with the default bundle; the device key set and the old
watermark key file's place live in a temporary folder (``base_env``), never in the real home.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import typer
from pydicom import dcmread
from typer.testing import CliRunner

from medsec_edge.runtime.cli import app
from medsec_edge.runtime.crypto.keyset import WATERMARK_KEY, KeyRing, new_key_dir
from medsec_edge.runtime.crypto.watermark_key import create_key, load_key
from tests.runtime.cli.helpers import json_lines, run_report
from tests.tamper_fixtures import REPO, base_env, restore_logging  # noqa: F401 - fixtures

SAMPLES = REPO / "samples"
BUNDLE = REPO / "bundles" / "default"


@pytest.fixture
def cli(base_env, restore_logging):  # noqa: F811
    def invoke(*args, columns: int = 80):
        return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": str(columns)})

    return invoke


@pytest.fixture
def device_keys(base_env) -> Path:  # noqa: F811
    return Path(os.environ["MEDSEC_EDGE_KEYS"])


@pytest.fixture
def old_key_file(base_env) -> Path:  # noqa: F811
    """Where earlier versions kept the watermark key ($MEDSEC_EDGE_KEY)."""
    return Path(os.environ["MEDSEC_EDGE_KEY"])


@pytest.fixture
def folder(tmp_path) -> Path:
    """Six DICOM files (the samples under other names), one in a subfolder."""
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    for i in range(3):
        shutil.copy(SAMPLES / "CT_small.dcm", root / f"ct_{i}.dcm")
        shutil.copy(SAMPLES / "MR_small.dcm", root / ("sub" if i == 2 else ".") / f"mr_{i}.dcm")
    return root


def _width(text: str) -> int:
    return max((len(line) for line in text.splitlines()), default=0)


# --- help ---------------------------------------------------------------------------------------


def _help_paths() -> list[list[str]]:
    paths = []

    def walk(cmd, path):
        paths.append(path)
        for name, sub in sorted(getattr(cmd, "commands", {}).items()):
            if not sub.hidden:
                walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return paths


def test_every_help_screen_has_an_example_and_shows_flags_as_flags(restore_logging):  # noqa: F811
    paths = _help_paths()
    assert len(paths) >= 25  # root, the device commands, keys, and the workstation groups
    for path in paths:
        res = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "80"})
        name = " ".join(path) or "(root)"
        assert res.exit_code == 0, name
        text = res.output
        assert "Example:" in text and "$ medsec-edge " in text, f"{name}: no example"
        assert "<bool>" not in text, f"{name}: a flag shown with a type"
        assert _width(text) <= 80, name
        # the example keeps its own lines: each "$ medsec-edge" starts a line
        for line in text.splitlines():
            if "$ medsec-edge" in line:
                assert line.strip().strip("│").strip().startswith("$ medsec-edge"), line


def test_key_options_are_one_vocabulary_and_old_spellings_are_hidden(restore_logging):  # noqa: F811
    for command in ("run", "embed", "extract", "check", "seal", "verify", "decrypt", "restore"):
        text = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output
        assert "--keys" in text, command
        assert "--key " not in text and "--key\n" not in text, f"{command} shows the old --key"
    for command in ("encrypt", "embed"):
        assert "--to" in CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output


# --- deprecated spellings -----------------------------------------------------------------------


def test_decrypt_and_restore_take_keys_and_still_take_the_old_key(cli, tmp_path, crypto_keyset):
    ct = SAMPLES / "CT_small.dcm"
    enc = tmp_path / "enc.dcm"
    assert cli("encrypt", ct, enc, "--to", crypto_keyset.path).exit_code == 0
    new = cli("decrypt", enc, tmp_path / "a.dcm", "--keys", crypto_keyset.path)
    assert new.exit_code == 0, new.output
    assert new.stderr == "", "the new spelling prints no note"
    old = cli("decrypt", enc, tmp_path / "b.dcm", "--key", crypto_keyset.path)
    assert old.exit_code == 0, old.output
    assert (tmp_path / "b.dcm").read_bytes() == ct.read_bytes()
    notes = old.stderr.strip().splitlines()
    assert len(notes) == 1 and "--key DIR is deprecated" in notes[0] and "--keys DIR" in notes[0]
    both = cli("decrypt", enc, tmp_path / "c.dcm", "--key", crypto_keyset.path, "--keys", crypto_keyset.path)
    assert both.exit_code == 2 and not (tmp_path / "c.dcm").exists()
    res = cli("restore", enc, tmp_path / "d.dcm", "--key", crypto_keyset.path)
    assert "--key DIR is deprecated" in res.stderr and res.exit_code == 4  # not a reversible file


def test_the_old_watermark_key_file_option_still_works(cli, tmp_path, device_keys):
    old = tmp_path / "elsewhere" / "wm.key"
    key = create_key(old)
    out = tmp_path / "marked.dcm"
    res = cli("embed", SAMPLES / "CT_small.dcm", out, "--key", old, "--json")
    assert res.exit_code == 0, res.output
    assert "--key FILE is deprecated" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = cli("extract", out, "--key", old, "--json")
    (row,) = json_lines(res.stdout)
    assert row["identity_match"] is True and row["key_id"] == key.key_id
    assert not device_keys.exists(), "embed --key FILE needs no key set"


# --- the watermark key in the key set -------------------------------------------------------------


def test_embed_makes_the_device_set_with_its_watermark_key(cli, tmp_path, device_keys, old_key_file):
    out = tmp_path / "marked.dcm"
    res = cli("embed", SAMPLES / "CT_small.dcm", out, "--json")
    assert res.exit_code == 0, res.output
    assert stat.S_IMODE((device_keys / WATERMARK_KEY).stat().st_mode) == 0o600
    assert not old_key_file.exists(), "the key lives in the set, not in the old file"
    ring = KeyRing.load(device_keys)
    res = cli("extract", out, "--json")
    (row,) = json_lines(res.stdout)
    assert row["identity_match"] is True and row["key_id"] == ring.watermark.key_id


def test_an_old_watermark_key_is_imported_into_the_set_and_old_marks_keep_matching(
        cli, tmp_path, device_keys, old_key_file):
    old = create_key(old_key_file)
    # a mark made by an earlier version, with the key file
    marked = tmp_path / "old-mark.dcm"
    assert cli("embed", SAMPLES / "CT_small.dcm", marked, "--key", old_key_file).exit_code == 0
    # the device set of an earlier version: no watermark key inside
    new_key_dir(device_keys, watermark=False)
    assert not (device_keys / WATERMARK_KEY).exists()

    res = cli("extract", marked, "--json")
    assert res.exit_code == 0, res.output
    (row,) = json_lines(res.stdout)
    assert row["identity_match"] is True and row["key_id"] == old.key_id
    imported = load_key(device_keys / WATERMARK_KEY)
    assert imported.secret == old.secret and imported.key_id == old.key_id
    assert stat.S_IMODE((device_keys / WATERMARK_KEY).stat().st_mode) == 0o600
    assert old.key_id in res.stderr, "the import is logged by key id"
    for form in (base64.b64encode(old.secret).decode(), old.secret.hex()):
        assert form not in res.output + res.stderr, "never the secret"
    # imported once: the next command says nothing more
    again = cli("extract", marked, "--json")
    assert again.exit_code == 0 and old.key_id not in again.stderr


def test_a_new_device_set_takes_the_old_key_file_too(cli, tmp_path, device_keys, old_key_file):
    old = create_key(old_key_file)
    out = tmp_path / "run"
    res = cli("run", SAMPLES / "MR_small.dcm", "--out", out, "--json", "--threads", "1")
    assert res.exit_code == 0, res.output
    assert KeyRing.load(device_keys).watermark.key_id == old.key_id


def test_without_a_device_set_extract_and_check_create_nothing(cli, tmp_path, device_keys):
    res = cli("extract", SAMPLES / "CT_small.dcm", "--json")
    (row,) = json_lines(res.stdout)
    assert row["identity_match"] is None and row["key_id"] is None
    assert not device_keys.exists()
    missing = cli("extract", SAMPLES / "CT_small.dcm", "--keys", tmp_path / "nowhere")
    assert missing.exit_code == 2 and "no key set" in missing.stderr


def test_export_public_leaves_the_watermark_key_out_and_identity_is_unknown(cli, tmp_path, device_keys):
    marked = tmp_path / "marked.dcm"
    assert cli("embed", SAMPLES / "CT_small.dcm", marked).exit_code == 0
    public = tmp_path / "public"
    res = cli("keys", "export-public", device_keys, public, "--json")
    assert res.exit_code == 0, res.output
    (row,) = json_lines(res.stdout)
    assert row["watermark_key_id"] is None and row["private"] is False
    assert not (public / WATERMARK_KEY).exists()
    res = cli("extract", marked, "--keys", public, "--json")
    assert res.exit_code == 0, res.output
    (row,) = json_lines(res.stdout)
    assert row["found"] is True and row["identity_match"] is None
    assert not (public / WATERMARK_KEY).exists(), "a public export is never given a secret"
    # and with the device set the same mark is this image's
    (row,) = json_lines(cli("extract", marked, "--keys", device_keys, "--json").stdout)
    assert row["identity_match"] is True


def test_keys_rotate_keeps_the_watermark_key(cli, tmp_path):
    ring = tmp_path / "ring"
    first = json_lines(cli("keys", "rotate", ring, "--json").stdout)[0]
    second = json_lines(cli("keys", "rotate", ring, "--json").stdout)[0]
    assert second["seal_key_id"] != first["seal_key_id"]
    assert second["watermark_key_id"] == first["watermark_key_id"] is not None
    loaded = KeyRing.load(ring)
    assert loaded.watermark.secret == loaded.sets[0].watermark.secret


# --- files and folders, JSON lines, tables ------------------------------------------------------


def test_extract_and_verify_take_folders(cli, tmp_path, folder, device_keys):
    out = tmp_path / "run"
    res = cli("run", folder, "--out", out, "--json", "--threads", "1")
    assert res.exit_code == 0, res.output
    report = run_report(res.stdout)
    assert report["ok"] == report["sealed"] == 6
    assert json.loads((out / "report.json").read_text()) == report

    res = cli("extract", out, "--json", "--threads", "1")
    assert res.exit_code == 0, res.output
    rows = json_lines(res.stdout)
    assert sorted(Path(r["path"]).relative_to(out).as_posix() for r in rows) == sorted(
        ["ct_0.dcm", "ct_1.dcm", "ct_2.dcm", "mr_0.dcm", "mr_1.dcm", "sub/mr_2.dcm"])
    assert all(r["found"] and r["identity_match"] and r["payload_kind"] == "identity" for r in rows)

    res = cli("verify", out, "--json")  # report.json in the folder is not a DICOM file: skipped
    assert res.exit_code == 0, res.output
    assert [r["valid"] for r in json_lines(res.stdout)] == [True] * 6

    # a folder with an unsealed file: that row fails, the others still verify
    shutil.copy(SAMPLES / "CT_small.dcm", out / "sub" / "unsealed.dcm")
    res = cli("verify", out, "--json")
    rows = json_lines(res.stdout)
    assert res.exit_code == 1 and len(rows) == 7
    assert [r["seal"]["status"] for r in rows if not r["valid"]] == ["unsigned"]


def test_run_table_stays_one_line_per_image_at_80_columns(cli, tmp_path, folder):
    long_dir = folder / ("a-rather-long-folder-name-from-the-modality-" * 2)
    long_dir.mkdir()
    shutil.copy(SAMPLES / "CT_small.dcm", long_dir / "series-0001-image-0001.dcm")
    res = cli("run", folder, "--out", tmp_path / "run", "--threads", "1")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert _width(res.stdout) <= 80
    rows = [line for line in lines if " ok " in line]
    assert len(rows) == 7, "one line per image"
    assert any(line.lstrip().startswith("…") and "image-0001.dcm" in line for line in rows), \
        "a long path is cut from the left: its file name stays"
    # the table, the summary and the latency table: a few lines beyond one per image
    assert len(lines) <= 7 + 20


def test_check_extract_verify_tables_fit_80_columns_with_details_below(cli, tmp_path, crypto_keyset):
    sealed = tmp_path / "sealed.dcm"
    assert cli("seal", SAMPLES / "CT_small.dcm", sealed, "--keys", crypto_keyset.path).exit_code == 0
    ds = dcmread(sealed)
    ds.PatientID = "SOMEONE-ELSE"
    moved = tmp_path / "moved.dcm"
    ds.save_as(moved)
    res = cli("verify", sealed, moved, SAMPLES / "MR_small.dcm", "--keys", crypto_keyset.path)
    assert res.exit_code == 1
    assert _width(res.stdout) <= 80
    lines = res.stdout.splitlines()
    assert sum(" yes " in f"{line} " or " no " in f"{line} " for line in lines) >= 3
    assert any(line.startswith("moved.dcm: seal invalid") for line in lines), "the reason goes below"
    assert "SOMEONE-ELSE" not in res.stdout
    for command in (("extract",), ("check",)):
        res = cli(*command, SAMPLES, "--threads", "1")
        assert _width(res.stdout) <= 80, command
        assert len([line for line in res.stdout.splitlines() if ".dcm" in line]) == 2, command


def test_run_json_lines_one_per_image_then_a_summary(cli, tmp_path, folder):
    res = cli("run", folder, "--out", tmp_path / "run", "--json", "--threads", "1")
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 7
    objects = [json.loads(line) for line in lines]  # every line is one object
    assert all(o["status"] == "ok" for o in objects[:-1])
    assert objects[-1]["images"] == 6 and "records" not in objects[-1]
    assert res.stderr == "", "no progress bar when stderr is not a terminal"


def test_progress_shows_on_a_terminal_only_for_more_than_a_few_files(tmp_path, crypto_keyset):
    """verify over 5 sealed files with stderr on a pseudo-terminal: the bar appears there only."""
    import pty
    import subprocess
    import sys

    from medsec_edge.runtime.crypto.sealing import seal_file

    files = []
    for i in range(5):
        path = tmp_path / f"f{i}.dcm"
        shutil.copy(SAMPLES / "CT_small.dcm", path)
        seal_file(path, KeyRing((crypto_keyset,)))
        files.append(str(path))
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "medsec_edge.runtime.cli", "verify", *files, "--keys",
                             str(crypto_keyset.path), "--json"], stdout=subprocess.PIPE, stderr=slave,
                            stdin=subprocess.DEVNULL)
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    stdout, _ = proc.communicate(timeout=120)
    os.close(master)
    assert proc.returncode == 0
    assert len(stdout.decode().strip().splitlines()) == 5 and b"\x1b" not in stdout, "stdout stays JSON"
    assert b"verify" in seen and b"/5" in seen, seen[-400:]
