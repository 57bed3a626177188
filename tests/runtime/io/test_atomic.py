"""io/atomic.py: a file appears whole under its name or not at all; stale temporaries of ours
(and only ours) are removed; final files get the umask's permissions, not mkstemp's 0600."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medsec_edge.runtime.errors import UsageError
from medsec_edge.runtime.io.atomic import (
    STALE_AFTER_S,
    atomic_output,
    is_our_temporary,
    output_mode,
    remove_stale_temporaries,
    temporary_prefix,
    write_bytes_atomic,
)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if is_our_temporary(p.name))


@pytest.fixture
def umask():
    """Set the process umask for one test and put the old one back."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield lambda mask: os.umask(mask)
    os.umask(saved)


def test_a_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.dcm"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_output(target) as fp:
        fp.write(b"half of the new")
        assert _temporaries(tmp_path), "the bytes go to a temporary of ours, not the target"
        raise RuntimeError("encoder failed")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.dcm"]


def test_temporary_names_are_ours_and_cannot_be_an_input(tmp_path):
    with atomic_output(tmp_path / "x.dcm") as fp:
        name = Path(fp.name).name
        assert Path(fp.name).parent == tmp_path
    assert is_our_temporary(name) and name.startswith(".medsec-") and name.endswith(".tmp")
    assert name.startswith(temporary_prefix()) and f"-{os.getpid()}-" in name
    for other in (".x.dcm.abc123.tmp", "medsec-1-abc.tmp", ".medsec-0123abcd-1-abc.tmp.dcm", "x.dcm",
                  ".medsec-1-abc.tmp", ".medsec-0123abcd--abc.tmp"):
        assert not is_our_temporary(other), other


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_final_files_follow_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    assert output_mode() == mode
    path = write_bytes_atomic(tmp_path / "out.bin", b"data")
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_never_over_the_source_and_never_into_a_missing_folder(tmp_path):
    src = tmp_path / "in.dcm"
    src.write_bytes(b"input")
    link = tmp_path / "alias.dcm"
    link.symlink_to(src)
    for target in (src, link):
        with pytest.raises(UsageError, match="inputs are never modified"):
            write_bytes_atomic(target, b"x", src)
    assert src.read_bytes() == b"input"
    with pytest.raises(UsageError, match="does not exist"):
        write_bytes_atomic(tmp_path / "missing" / "out.dcm", b"x")
    assert _temporaries(tmp_path) == []


def test_stale_temporaries_of_ours_are_removed_and_nothing_else(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    sub = tmp_path / "series"
    sub.mkdir()
    stale = [tmp_path / f"{temporary_prefix(dead)}abc_12.tmp", sub / f"{temporary_prefix(dead)}zz9.tmp"]
    old = tmp_path / f"{temporary_prefix(alive)}old.tmp"  # its pid lives (reused?) but it is a day old
    in_progress = tmp_path / f"{temporary_prefix(alive)}busy.tmp"  # another job writing right now
    elsewhere = tmp_path / f".medsec-{'f' * 8}-{dead}-x.tmp"  # another host's: its pid says nothing here
    theirs = [tmp_path / ".CT.dcm.k2j3.tmp", tmp_path / "medsec-1-x.tmp", tmp_path / "CT.dcm",
              sub / f"{temporary_prefix(dead)}a.tmp.dcm", elsewhere]
    for path in [*stale, old, in_progress, *theirs]:
        path.write_bytes(b"x")
    past = time.time() - STALE_AFTER_S - 60
    os.utime(old, (past, past))
    outside = tmp_path.parent / f"{tmp_path.name}-outside.dcm"
    outside.write_bytes(b"an input elsewhere")
    link = tmp_path / f"{temporary_prefix(dead)}link.tmp"
    link.symlink_to(outside)

    assert remove_stale_temporaries(tmp_path) == 3
    for path in [*stale, old]:
        assert not path.exists(), path
    for path in [in_progress, *theirs]:
        assert path.exists(), path
    assert link.is_symlink() and outside.read_bytes() == b"an input elsewhere", "links are never followed"
    assert remove_stale_temporaries(tmp_path / "missing") == 0


_KILLED_WRITER = """
import os, signal, sys
from medsec_edge.runtime.io.atomic import atomic_output
with atomic_output(sys.argv[1]) as fp:
    fp.write(b"half a file")
    fp.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_writer_killed_mid_write_leaves_no_final_file_and_its_temporary_is_removed(tmp_path):
    target = tmp_path / "out.dcm"
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(target)], capture_output=True, timeout=60, check=False)
    assert proc.returncode == -signal.SIGKILL
    assert not target.exists()
    left = _temporaries(tmp_path)
    assert len(left) == 1 and (tmp_path / left[0]).read_bytes() == b"half a file"
    assert remove_stale_temporaries(tmp_path) == 1
    assert list(tmp_path.iterdir()) == []
