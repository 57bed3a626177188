"""Input files: only regular files are read, without blocking, never more than the limit."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from medsec_edge.runtime.errors import InputError
from medsec_edge.runtime.io.inputs import collect_inputs, read_input_bytes
from medsec_edge.runtime.io.limits import ReadLimits
from medsec_edge.runtime.io.readers import read_image


@pytest.fixture
def odd_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.dcm").write_bytes(b"x")
    (folder / "sub" / "b.png").write_bytes(b"x")
    (folder / "notes.txt").write_bytes(b"x")
    (folder / ".hidden.dcm").write_bytes(b"x")
    os.mkfifo(folder / "fifo.dcm")
    os.symlink("/dev/zero", folder / "zero.dcm")
    os.symlink(folder / "a.dcm", folder / "link.dcm")
    os.symlink(folder, folder / "sub" / "loop")  # a link back up must not loop the walk
    return folder


def test_folder_walk_skips_non_regular_files_and_follows_file_links(odd_folder: Path):
    found = collect_inputs([odd_folder])
    assert [p.relative_to(odd_folder).as_posix() for p in found] == ["a.dcm", "link.dcm", "sub/b.png"]


@pytest.mark.parametrize("name, kind", [("fifo.dcm", "FIFO"), ("zero.dcm", "character device")])
def test_named_non_regular_files_are_refused(odd_folder: Path, name: str, kind: str):
    with pytest.raises(InputError, match=kind):
        collect_inputs([odd_folder / name])
    with pytest.raises(InputError, match="no such file"):
        collect_inputs([odd_folder / "missing.dcm"])


def _within(seconds: float, call):
    """``call()``'s outcome, failing the test if it blocks (a FIFO read would block forever)."""
    outcome = {}

    def target():
        try:
            outcome["value"] = call()
        except Exception as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    worker = threading.Thread(target=target, daemon=True)
    start = time.monotonic()
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"blocked for more than {seconds} s"
    return outcome, time.monotonic() - start


@pytest.mark.parametrize("name", ["fifo.dcm", "zero.dcm"])
def test_read_image_refuses_a_fifo_or_device_without_blocking(odd_folder: Path, name: str):
    outcome, _ = _within(5, lambda: read_image(odd_folder / name))
    error = outcome.get("error")
    assert isinstance(error, InputError) and "not a regular file" in str(error)
    assert error.exit_code == 4


def test_reads_are_bounded_by_the_file_limit(tmp_path: Path):
    path = tmp_path / "big.dcm"
    path.write_bytes(b"\0" * 5000)
    assert read_input_bytes(path, ReadLimits(max_file_bytes=5000)) == b"\0" * 5000
    with pytest.raises(InputError, match="larger than the limit of 4999"):
        read_input_bytes(path, ReadLimits(max_file_bytes=4999))


def test_file_limit_comes_from_the_environment(tmp_path: Path, monkeypatch):
    path = tmp_path / "img.npy"
    path.write_bytes(b"\0" * 2048)
    monkeypatch.setenv("MEDSEC_EDGE_MAX_FILE_BYTES", "1K")
    with pytest.raises(InputError, match="larger than the limit of 1024"):
        read_image(path)
