"""``medsec-edge bundle inspect|verify|install|rollback`` and ``--bundle DEVICE_DIR`` (issue 12).

In-process through typer's CliRunner on the full app. Every refusal class (unsigned, untrusted
signer, altered manifest, model or .tar, newer medsec-edge, newer ONNX opset, foreign engine
target) exits 3 with its precise message from verify, inspect and install alike; install and
rollback switch the device directory's current bundle, which the image commands then load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medsec_edge.runtime.bundle import Manifest, pack_tar, write_bundle
from medsec_edge.runtime.cli import app
from tests.runtime.cli.helpers import json_lines, run_report
from tests.runtime.test_bundle_store import make_bundle, make_keys
from tests.tamper_fixtures import REPO, base_env, restore_logging  # noqa: F401 - fixtures

DEFAULT = REPO / "bundles" / "default"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def cli(base_env, restore_logging):  # noqa: F811
    def invoke(*args, columns: int = 80):
        return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": str(columns)})

    return invoke


def _flip(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x10
    path.write_bytes(bytes(data))


# Each refusal: how to make the bundle, what the message must say, and whether the signature and
# files still check out (then inspect says "cannot run here" rather than "not verified").
def _unsigned(root, keys):
    bundle = make_bundle(root / "b", keys["private"])
    (bundle / "manifest.sig").unlink()
    return bundle


def _untrusted(root, keys):
    return make_bundle(root / "b", keys["other_private"])


def _altered_manifest(root, keys):
    bundle = make_bundle(root / "b", keys["private"])
    path = bundle / "manifest.json"
    path.write_bytes(path.read_bytes().replace(b'"bits": 64', b'"bits": 65'))
    return bundle


def _altered_model(root, keys):
    bundle = make_bundle(root / "b", keys["private"])
    _flip(bundle / "conv_int8-qdq.onnx", 40)
    return bundle


def _altered_tar(root, keys):
    tar_path = pack_tar(make_bundle(root / "b", keys["private"]), root / "b.tar")
    _flip(tar_path, 512 + 100)  # inside the first member's data
    return tar_path


def _newer_runtime(root, keys):
    return make_bundle(root / "b", keys["private"], requires={"runtime": ">=99.0"})


def _newer_opset(root, keys):
    return make_bundle(root / "b", keys["private"], requires={"onnx_opset": 999})


def _engine_target(root, keys):
    return make_bundle(root / "b", keys["private"], target="tensorrt-10.8-sm_87", variant=False)


REFUSALS = {
    "unsigned": (_unsigned, r"no manifest\.sig: unsigned bundles are refused", False),
    "untrusted": (_untrusted, r"signed by unknown key id \w+, which is not trusted", False),
    "altered manifest": (_altered_manifest, r"signature check failed for manifest\.json", False),
    "altered model": (_altered_model, r"'conv_int8-qdq\.onnx' has sha256 \w+…, the signed manifest expects", False),
    "altered tar": (_altered_tar, r"b\.tar.*(signature check failed|has sha256|not a readable tar|refused)", False),
    "newer runtime": (_newer_runtime, r"requires medsec-edge >=99\.0, this is medsec-edge [\d.]+.*pip install -U medsec-edge", True),
    "newer opset": (_newer_opset, r"needs ONNX opset 999, onnxruntime [\d.]+ runs opsets up to \d+", True),
    "engine target": (_engine_target, r"cannot run here: conv: .*(TensorRT 10\.8 / sm_87|tensorrt-10\.8-sm_87)", True),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_every_refusal_exits_3_with_its_message(cli, tmp_path, keys, case):
    make, pattern, intact = REFUSALS[case]
    bundle = make(tmp_path, keys)
    trust = ["--trusted-keys", keys["trusted_dir"]]

    res = cli("bundle", "verify", bundle, *trust)
    assert res.exit_code == 3, res.output
    assert res.stdout == ""
    assert re.search(pattern, " ".join(res.stderr.split())), res.stderr
    (row,) = json_lines(cli("bundle", "verify", bundle, *trust, "--json").stdout)
    assert row["ok"] is False and re.search(pattern, row["error"])

    res = cli("bundle", "inspect", bundle, *trust, "--json")
    assert res.exit_code == 3, res.output
    (info,) = json_lines(res.stdout)
    assert info["status"] == ("cannot run here" if intact else "not verified")
    assert info["name"] == "tiny" and re.search(pattern, info["problem"])
    shown = cli("bundle", "inspect", bundle, *trust)
    assert shown.exit_code == 3
    assert ("CANNOT RUN HERE" if intact else "NOT VERIFIED") in shown.stdout + shown.stderr

    device = tmp_path / "device"
    res = cli("bundle", "install", bundle, "--device", device, *trust)
    assert res.exit_code == 3, res.output
    assert not (device / "current").is_symlink() and not list((device / "versions").glob("*"))


def test_verify_ok_is_one_line(cli, tmp_path, keys):
    bundle = make_bundle(tmp_path / "b", keys["private"])
    res = cli("bundle", "verify", bundle, "--trusted-keys", keys["trusted_dir"], columns=300)
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"OK {bundle}: bundle 'tiny' (2 models) signed by {keys['id']}")
    (row,) = json_lines(cli("bundle", "verify", bundle, "--trusted-keys", keys["trusted_dir"], "--json").stdout)
    assert row["ok"] is True and row["key_id"] == keys["id"] and row["version_id"].startswith("tiny-")
    # the repo's default bundle verifies with the default trust store
    assert cli("bundle", "verify", DEFAULT).exit_code == 0


def test_inspect_groups_variants_and_summarises(cli, tmp_path, keys):
    bundle = make_bundle(tmp_path / "b", keys["private"], requires={"runtime": ">=0.1.0", "onnx_opset": 17})
    tar_path = pack_tar(bundle, tmp_path / "b.tar")
    for source in (bundle, tar_path):
        res = cli("bundle", "inspect", source, "--trusted-keys", keys["trusted_dir"], "--json")
        assert res.exit_code == 0, res.output
        (info,) = json_lines(res.stdout)
        assert info["status"] == "verified" and info["problem"] is None and info["key_id"] == keys["id"]
        assert [(m["model"], m["variant"], m["precision"]) for m in info["models"]] == [
            ("conv", None, "fp32"), ("conv", "int8-qdq", "int8-qdq")]
        assert info["models"][0]["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["N", 1, 8, 8]}]
        assert all(m["runs_here"] is True and len(m["sha256"]) == 64 for m in info["models"])
        assert info["requires"] == {"runtime": ">=0.1.0", "onnx_opset": 17}
        assert info["budgets_ms"] == {"embed_512": 20} and info["payload"] == {"bits": 64}
        assert info["commands"] == {"training.command": "medsec-edge train --tiny",
                                    "export.command": "medsec-edge export watermark --tiny"}
        assert info["calibration"] == ["watermark: presence.frames=4, presence.threshold=1.5"]  # manifest order (sorted)
        assert info["evaluation"] == ["false_detections: found=0, n=10"]
    table = cli("bundle", "inspect", bundle, "--trusted-keys", keys["trusted_dir"])
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80
    assert any(line.strip().startswith("@int8-qdq") and "int8-qdq" in line for line in lines)
    assert "training.command: medsec-edge train --tiny" in table.stdout
    assert "x float32 [N,1,8,8] -> y float32 [N,2,8,8]" in table.stdout
    # the real default bundle: its six models, all runnable here
    (info,) = json_lines(cli("bundle", "inspect", DEFAULT, "--json").stdout)
    assert info["status"] == "verified" and len(info["models"]) == 6


def test_install_rollback_and_the_image_commands_follow_current(cli, tmp_path, keys, monkeypatch):
    monkeypatch.setenv("MEDSEC_EDGE_TRUSTED_KEYS",
                       os.pathsep.join([str(REPO / "bundles" / "trusted_keys"), str(keys["trusted_dir"])]))
    manifest = Manifest.from_json_bytes((DEFAULT / "manifest.json").read_bytes())
    files = {name: DEFAULT / entry.file for name, entry in manifest.models.items()}
    copy = write_bundle(tmp_path / "copy", replace(manifest, name="default-copy"), files, keys["private"])
    device = tmp_path / "device"

    res = cli("bundle", "rollback", "--device", device)
    assert res.exit_code == 3 and "does not exist" in res.stderr
    (first,) = json_lines(cli("bundle", "install", DEFAULT, "--device", device, "--json").stdout)
    assert first["action"] == "install" and first["previous"] is None
    res = cli("bundle", "rollback", "--device", device)
    assert res.exit_code == 3 and "has no previous bundle to roll back to" in " ".join(res.stderr.split())
    (second,) = json_lines(cli("bundle", "install", pack_tar(copy), "--device", device, "--json").stdout)
    assert second["action"] == "install" and second["previous"] == first["current"]
    assert os.readlink(device / "current") == second["current"]
    (again,) = json_lines(cli("bundle", "install", copy, "--device", device, "--json").stdout)
    assert again["action"] == "unchanged"

    sample = REPO / "samples" / "MR_small.dcm"
    res = cli("run", sample, "--out", tmp_path / "out", "--bundle", device, "--json", "--threads", "1")
    assert res.exit_code == 0, res.output
    assert run_report(res.stdout)["bundle"] == "default-copy"  # current

    res = cli("bundle", "rollback", "--device", device)
    assert res.exit_code == 0, res.output
    assert "rollback" in res.stdout and os.readlink(device / "current") == first["current"]
    marked = next((tmp_path / "out").rglob("*.dcm"))
    res = cli("extract", marked, "--bundle", device, "--json")
    assert res.exit_code == 0, res.output
    assert json_lines(res.stdout)[0]["found"] is True
    monkeypatch.setenv("MEDSEC_EDGE_BUNDLE", str(device))
    res = cli("run", sample, "--out", tmp_path / "out2", "--json", "--threads", "1")
    assert res.exit_code == 0, res.output
    assert run_report(res.stdout)["bundle"] == "medsec-edge-default"  # current after the rollback

    log = [json.loads(line) for line in (device / "install.log").read_text().splitlines()]
    assert [r["action"] for r in log] == ["install", "install", "unchanged", "rollback"]

    # --keep 0 after a third install leaves current and previous only
    third = make_bundle(tmp_path / "third", keys["private"])
    res = cli("bundle", "install", third, "--device", device, "--keep", "0", "--json")
    (row,) = json_lines(res.stdout)
    assert row["removed"] == [second["current"]]
    assert sorted(p.name for p in (device / "versions").iterdir()) == sorted(
        [row["current"].split("/")[1], first["current"].split("/")[1]])
    shutil.rmtree(device)
