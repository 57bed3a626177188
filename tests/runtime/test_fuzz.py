"""Seeded mutational fuzzing of every command that reads images, as real `medsec-edge` processes.

Real files (pydicom's test set, a 16-bit PNG, a 16-bit RGB PNG, a TIFF, an NPY) are mutated: bit
flips, truncation, header fields rewritten to huge, negative, zero or NaN values, elements removed
or duplicated, wrong VRs, random tails. Each command gets many files per invocation (folders where
it takes them) and must answer every one: no traceback, exit codes 0-4 only, no hang, bounded
memory, no output left by a failure, no patient data of the sources on stdout, stderr or in the
report. The normal suite runs a few hundred cases; ``-m slow`` runs 10,000.
"""

from __future__ import annotations

import collections
import io
import json
import os
import random
import struct
import subprocess
import sys
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest
from medsec_edge.runtime.io.png16 import png16_encode
from pydicom.data import get_testdata_file

CLI = [sys.executable, "-m", "medsec_edge.runtime.cli"]
SEED = 20261204
DICOM_SOURCES = ("CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "SC_rgb_rle.dcm", "emri_small.dcm",
                 "SC_ybr_full_422_uncompressed.dcm", "JPEG2000.dcm", "SC_rgb.dcm", "rtplan.dcm")
# Small limits make a header that passes them still cheap, and prove the environment overrides.
ENV_LIMITS = {"MEDSEC_EDGE_MAX_IMAGE_BYTES": "64M", "MEDSEC_EDGE_MAX_FILE_BYTES": "16M"}
MAX_RSS_MB = 1500
TIMEOUT_S = 300
# Image pixel module and display attributes whose values decide allocations and arithmetic.
HEADER_FIELDS = ("Rows", "Columns", "NumberOfFrames", "BitsAllocated", "BitsStored", "HighBit",
                 "SamplesPerPixel", "PixelRepresentation", "PlanarConfiguration", "RescaleSlope",
                 "RescaleIntercept", "WindowCenter", "WindowWidth", "PhotometricInterpretation")
BAD_NUMBERS = ("0", "-1", "-32768", "65535", "4294967295", "1e308", "-1e308", "NaN", "inf", "-inf", "1e-308",
               "999999999999", "")
VRS = (b"OB", b"OW", b"SQ", b"UN", b"FD", b"US", b"SS", b"UL", b"DS", b"IS", b"CS", b"LO", b"AT", b"UT")


# ------------------------------------------------------------------------------------------
# sources


def _sources(tmp: Path) -> tuple[list[tuple[str, bytes]], set[str]]:
    """(name, bytes) of the real files to mutate, and their patient names and IDs."""
    files, phi = [], set()
    for name in DICOM_SOURCES:
        path = get_testdata_file(name, download=False)
        if path is None:
            continue
        data = Path(path).read_bytes()
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        for keyword in ("PatientName", "PatientID"):
            value = str(ds.get(keyword, "") or "")
            if len(value) >= 3:
                phi.add(value)
        files.append((name, data))
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False)).pixel_array
    grey16 = (ct.astype(np.int32) - ct.min()).astype(np.uint16)
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(grey16).save(buf, format="PNG")
    files.append(("grey16.png", buf.getvalue()))
    rgb16 = np.stack([grey16, grey16[::-1], grey16[:, ::-1]], axis=-1)
    files.append(("rgb16.png", png16_encode(rgb16)))
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, grey16, photometric="minisblack")
    files.append(("grey16.tif", buf.getvalue()))
    buf = io.BytesIO()
    np.save(buf, grey16.astype(np.int16))
    files.append(("ct.npy", buf.getvalue()))
    assert len(files) >= 10 and phi, "the pydicom test files are needed (pip install pydicom)"
    return files, phi


# ------------------------------------------------------------------------------------------
# mutators: each takes (rng, name, data) and returns new bytes


def _bit_flips(rng, name, data):
    out = bytearray(data)
    for _ in range(rng.randint(1, 24)):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def _truncate(rng, name, data):
    return data[: rng.randrange(len(data))]


def _random_tail(rng, name, data):
    cut = rng.randrange(len(data)) if rng.random() < 0.5 else len(data)
    return data[:cut] + rng.randbytes(rng.randint(1, 4096))


def _duplicate_chunk(rng, name, data):
    start = rng.randrange(len(data))
    chunk = data[start : start + rng.randint(1, 256)]
    at = rng.randrange(len(data))
    return data[:at] + chunk * rng.randint(1, 3) + data[at:]


def _dicom_field(rng, name, data):
    """A header field set to a huge, negative, zero, NaN or foreign value (written as text, or
    patched as raw bytes where the VR is binary)."""
    if not name.endswith(".dcm"):
        return _bit_flips(rng, name, data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(data))
        keyword = rng.choice(HEADER_FIELDS)
        value = rng.choice(BAD_NUMBERS)
        elem = ds.data_element(keyword) if keyword in ds else None
        if elem is not None and elem.VR in ("US", "SS", "UL"):
            number = rng.choice((0, 1, 0xFFFF, 0x8000, 7, 33, 3))
            tag = struct.pack("<HH", elem.tag.group, elem.tag.element)
            at = data.find(tag)
            if at >= 0:
                # Explicit VR: tag, VR, 2-byte length, value; implicit: tag, 4-byte length, value.
                offset = at + 8
                out = bytearray(data)
                out[offset : offset + 2] = struct.pack("<H", number)
                return bytes(out)
            return data
        if keyword == "PhotometricInterpretation":
            value = rng.choice(("PALETTE COLOR", "YBR_PARTIAL_420", "HSV", "Doe^Jane", "", "RGB", "MONOCHROME1"))
        try:
            setattr(ds, keyword, value)
            buf = io.BytesIO()
            ds.save_as(buf)
            return buf.getvalue()
        except Exception:  # noqa: BLE001 - pydicom refused the value: flip bits instead
            return _bit_flips(rng, name, data)


def _dicom_remove(rng, name, data):
    if not name.endswith(".dcm"):
        return _truncate(rng, name, data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(data))
        tags = [e.tag for e in ds]
        for tag in rng.sample(tags, min(len(tags), rng.randint(1, 3))):
            del ds[tag]
        if rng.random() < 0.3 and "TransferSyntaxUID" in ds.file_meta:
            del ds.file_meta.TransferSyntaxUID
        buf = io.BytesIO()
        try:
            ds.save_as(buf)
        except Exception:  # noqa: BLE001 - pydicom cannot write it: the original bytes, cut
            return data[: len(data) // 2]
        return buf.getvalue()


def _wrong_vr(rng, name, data):
    """Overwrite the VR of an explicit-VR element (found by its even-group tag pattern)."""
    out = bytearray(data)
    candidates = [i for i in range(132, len(data) - 6, 2) if data[i + 4 : i + 6] in VRS]
    if not candidates:
        return _bit_flips(rng, name, data)
    for i in rng.sample(candidates, min(len(candidates), rng.randint(1, 3))):
        out[i + 4 : i + 6] = rng.choice(VRS)
    return bytes(out)


def _png_ihdr(rng, name, data):
    if not name.endswith(".png"):
        return _random_tail(rng, name, data)
    width, height = (rng.choice((0, 1, 15, 2**31 - 1, 65535, 20000, 4_000_000)) for _ in range(2))
    body = struct.pack(">II", width, height) + data[24:29]
    if rng.random() < 0.3:
        body = body[:8] + bytes([rng.choice((1, 8, 16, 3, 99)), rng.choice((0, 2, 3, 4, 6, 7))]) + body[10:]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + body))
    return data[:16] + body + crc + data[33:]


def _tiff_tags(rng, name, data):
    if not name.endswith(".tif"):
        return _bit_flips(rng, name, data)
    out = bytearray(data)
    (ifd,) = struct.unpack("<I", data[4:8])
    if ifd + 2 > len(data):
        return _bit_flips(rng, name, data)
    (count,) = struct.unpack("<H", data[ifd : ifd + 2])
    for k in range(min(count, 64)):
        entry = ifd + 2 + 12 * k
        tag = struct.unpack("<H", data[entry : entry + 2])[0]
        if tag in (256, 257, 258, 273, 277, 279, 259, 262) and rng.random() < 0.5:
            out[entry + 8 : entry + 12] = struct.pack("<I", rng.choice((0, 1, 2**31, 2**32 - 1, 65535, 1 << 20)))
    return bytes(out)


def _npy_header(rng, name, data):
    if not name.endswith(".npy"):
        return _truncate(rng, name, data)
    header_end = data.index(b"\n") + 1
    header = data[10:header_end].decode("latin1")
    shape = rng.choice(("(0, 0)", "(-1, 128)", "(100000, 100000)", "(2**40,)", "(1, 1, 1, 1, 1)",
                        "(128, 128, 3)", "(4096, 128, 128)", "(128,)", "(nan, 3)"))
    dtype = rng.choice(("'<i2'", "'|O'", "'<f8'", "'>u4'", "'<c16'", "'<i2'", "'|b1'", "'<U4'"))
    new = header.split("'shape':")[0].replace("'<i2'", dtype) + f"'shape': {shape}, }}"
    new = new.ljust(len(header) - 1) + "\n"
    return data[:8] + struct.pack("<H", len(new)) + new.encode("latin1") + data[header_end:]


MUTATORS = (_bit_flips, _truncate, _random_tail, _duplicate_chunk, _dicom_field, _dicom_field,
            _dicom_remove, _wrong_vr, _png_ihdr, _tiff_tags, _npy_header)


def _mutate(mutator, rng, name, data):
    try:
        return mutator(rng, name, data)
    except Exception:  # noqa: BLE001 - pydicom cannot parse an earlier mutant: flip bits instead
        return _bit_flips(rng, name, data)


def make_mutants(folder: Path, n: int, seed: int) -> dict[str, str]:
    """``n`` mutants in ``folder`` (plus one FIFO and one link to /dev/zero in the folder walk);
    returns mutant name -> how it was made."""
    rng = random.Random(seed)
    sources, _phi = _sources(folder)
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    for i in range(n):
        name, data = rng.choice(sources)
        mutator = rng.choice(MUTATORS)
        out = _mutate(mutator, rng, name, data)
        if rng.random() < 0.15 and out:  # a second mutation on top
            out = _mutate(rng.choice(MUTATORS), rng, name, out)
        suffix = Path(name).suffix
        mutant = f"m{i:05d}{suffix}"
        (folder / mutant).write_bytes(out)
        made[mutant] = f"{mutator.__name__} of {name}"
    return made


# ------------------------------------------------------------------------------------------
# running the commands


def _run(args: list[str], env: dict[str, str], cwd: Path) -> dict:
    """One process: exit code, output, wall time; a hang is killed and reported as a timeout."""
    start = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return {"args": args, "rc": "timeout", "out": out.decode(errors="replace"),
                "err": err.decode(errors="replace"), "rss_mb": 0, "s": TIMEOUT_S}
    return {"args": args, "rc": proc.returncode, "out": out.decode(errors="replace"),
            "err": err.decode(errors="replace"), "s": time.monotonic() - start}


def _run_measured(args: list[str], env: dict[str, str], cwd: Path) -> dict:
    """``_run`` with the process's own peak RSS, from a one-line wrapper that calls wait4."""
    wrapper = ("import os,sys,json,time,resource,signal\n"
               "pid=os.fork()\n"
               "if pid==0:\n os.execv(sys.executable,[sys.executable]+sys.argv[1:])\n"
               "_,status,ru=os.wait4(pid,0)\n"
               "sys.stderr.write('\\nFUZZ_RSS_KB=%d\\n'%ru.ru_maxrss)\n"
               "sys.exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 99)\n")
    result = _run([sys.executable, "-c", wrapper, "-m", "medsec_edge.runtime.cli"] + args, env, cwd)
    result["args"] = args
    rss = [line for line in result["err"].splitlines() if line.startswith("FUZZ_RSS_KB=")]
    result["rss_mb"] = int(rss[-1].split("=")[1]) // 1024 if rss else 0
    result["err"] = "\n".join(line for line in result["err"].splitlines() if not line.startswith("FUZZ_RSS_KB="))
    return result


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDSEC_EDGE_")}
    env.update(ENV_LIMITS, HOME=str(home), COLUMNS="200", NO_COLOR="1")
    return env


def _json_lines(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            rows.append(json.loads(line))
    return rows


def fuzz(tmp: Path, n: int, single_per_command: int, batch: int, seed: int = SEED) -> dict:
    """Make ``n`` mutants, run them through every image command, check every invocation; return
    the counts (cases per command, exit-code histogram, worst memory)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        made = make_mutants(tmp / "in", n, seed)
        _, phi = _sources(tmp)
    home = tmp / "home"
    home.mkdir()
    env = _env(home)
    keys = tmp / "keys"
    assert subprocess.run(CLI + ["keys", "new", str(keys)], check=False, env=env, capture_output=True).returncode == 0
    names = sorted(made)
    batches = [names[i : i + batch] for i in range(0, len(names), batch)]
    jobs = []
    for b, group in enumerate(batches):
        folder = tmp / f"batch{b}"
        folder.mkdir()
        for name in group:
            os.link(tmp / "in" / name, folder / name)
        if b == 0:  # the walk must skip these, not hang on them
            os.mkfifo(folder / "fifo.dcm")
            os.symlink("/dev/zero", folder / "zero.dcm")
        jobs.append(("check", ["check", "--json", "--keys", str(keys), str(folder)], group))
        jobs.append(("extract", ["extract", "--json", "--keys", str(keys), str(folder)], group))
        jobs.append(("verify", ["verify", "--json", "--keys", str(keys), str(folder)], group))
        jobs.append(("run", ["run", "--json", "--keys", str(keys), str(folder), "--out", str(tmp / f"run{b}")], group))
    rng = random.Random(seed + 1)
    singles = rng.sample(names, min(single_per_command, len(names)))
    for i, name in enumerate(singles):
        src = str(tmp / "in" / name)
        jobs.append(("embed", ["embed", "--keys", str(keys), src, str(tmp / "out" / f"e{i}{Path(name).suffix}")], [name]))
        jobs.append(("seal", ["seal", src, str(tmp / "out" / f"s{i}.dcm"), "--keys", str(keys)], [name]))
        jobs.append(("encrypt", ["encrypt", src, str(tmp / "out" / f"x{i}.dcm"), "--to", str(keys)], [name]))
    (tmp / "out").mkdir()

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda job: (job, _run_measured(job[1], env, tmp)), jobs))

    failures, cases, exits, worst_rss = [], collections.Counter(), collections.Counter(), 0
    outcomes = collections.Counter()
    for (command, args, group), res in results:
        cases[command] += len(group)
        exits[f"{command}:{res['rc']}"] += 1
        outcomes.update(f"{command}:{_outcome(command, row)}" for row in _json_lines(res["out"])
                        if command in ("check", "extract", "verify") or "status" in row)
        if command in ("embed", "seal", "encrypt"):
            outcomes[f"{command}:exit {res['rc']}"] += 1
        worst_rss = max(worst_rss, res.get("rss_mb", 0))
        where = f"{command} on {group[0]}{'...' if len(group) > 1 else ''} ({made[group[0]]})"
        text = res["out"] + res["err"]
        if res["rc"] == "timeout" or res["rc"] not in (0, 1, 2, 3, 4):
            failures.append(f"{where}: exit {res['rc']}: {res['err'][-600:]}")
        if "Traceback" in text:
            failures.append(f"{where}: traceback on stderr: {res['err'][-1500:]}")
        if "pydicom" in res["err"] or "tifffile" in res["err"]:
            # Third-party records and warnings quote element and tag values: never on stderr.
            failures.append(f"{where}: a pydicom or tifffile message on stderr: {res['err'][-600:]}")
        if res.get("rss_mb", 0) > MAX_RSS_MB:
            failures.append(f"{where}: {res['rss_mb']} MB peak memory")
        report_text = ""
        if command == "run":
            out = Path(args[args.index("--out") + 1])
            report = out / "report.json"
            if not report.exists():
                failures.append(f"{where}: no report.json")
            else:
                report_text = report.read_text()
                records = [r for r in _json_lines(res["out"]) if "status" in r]
                if len(records) != len(group):
                    failures.append(f"{where}: {len(records)} records for {len(group)} inputs")
                failures += _check_run_outputs(out, records, where)
        elif command in ("embed", "seal", "encrypt"):
            target = Path(args[4] if command == "embed" else args[2])
            if target.exists() and res["rc"] != 0:
                failures.append(f"{where}: exit {res['rc']} but {target.name} was written")
            leftovers = [p.name for p in target.parent.iterdir() if p.name.startswith(".")]
            if leftovers:
                failures.append(f"{where}: temporary files left: {leftovers[:3]}")
        for value in phi:
            if value in text or value in report_text:
                failures.append(f"{where}: patient data of a source file in the output")
    return {"cases": dict(cases), "exits": dict(sorted(exits.items())), "worst_rss_mb": worst_rss,
            "outcomes": dict(sorted(outcomes.items())),
            "failures": failures, "invocations": len(results)}


def _outcome(command: str, row: dict) -> str:
    """What one input's row says: refused as bad input, or the command's verdict."""
    if command == "run":
        return row["status"]
    if row.get("error"):
        return "refused"
    if command == "check":
        return "tampered" if row.get("tampered") else "untouched"
    if command == "extract":
        return "found" if row.get("found") else "not found"
    return "valid" if row.get("valid") else "not valid"


def _check_run_outputs(out: Path, records: list[dict], where: str) -> list[str]:
    """An output exists only for a record that says ok (tampered ones are kept aside by design),
    and no temporary file is left."""
    failures = []
    ok_outputs = {Path(r["output"]).name for r in records if r.get("status") == "ok" and r.get("output")}
    written = {p.name for p in out.iterdir() if p.is_file() and p.name != "report.json"}
    hidden = [p.name for p in out.rglob(".*")]
    if hidden:
        failures.append(f"{where}: temporary files left in the run output: {hidden[:3]}")
    if records and written - ok_outputs:
        failures.append(f"{where}: outputs without an ok record: {sorted(written - ok_outputs)[:5]}")
    return failures


def _summary(result: dict) -> str:
    return (f"{result['invocations']} invocations, cases per command {result['cases']}, exit codes "
            f"per invocation {result['exits']}, rows {result['outcomes']}, worst peak memory "
            f"{result['worst_rss_mb']} MB")


def test_fuzz_every_image_command(tmp_path, capsys):
    result = fuzz(tmp_path, n=600, single_per_command=30, batch=200)
    with capsys.disabled():
        sys.stderr.write(f"\nfuzz: {_summary(result)}\n")
    assert result["cases"]["check"] == 600 and result["cases"]["run"] == 600
    # The mutants are hostile enough to be refused, and mild enough to be processed too.
    assert result["outcomes"].get("run:bad_input", 0) > 100 and result["outcomes"].get("run:ok", 0) > 100
    assert not result["failures"], "\n".join(result["failures"][:20])


@pytest.mark.slow
def test_fuzz_ten_thousand(tmp_path, capsys):
    result = fuzz(tmp_path, n=10_000, single_per_command=150, batch=500, seed=SEED + 10_000)
    with capsys.disabled():
        sys.stderr.write(f"\nfuzz (slow): {_summary(result)}\n")
    assert not result["failures"], "\n".join(result["failures"][:40])


# Every command that reads a named input: the image commands through io.readers.read_image, the
# crypto ones through io.readers.read_dataset (crypto/verification.read_dicom).
NAMED_INPUT_COMMANDS = {
    "check": lambda f, keys, out: ["check", "--json", f],
    "extract": lambda f, keys, out: ["extract", "--json", f],
    "embed": lambda f, keys, out: ["embed", "--keys", keys, f, out + ".dcm"],
    "verify": lambda f, keys, out: ["verify", "--json", "--keys", keys, f],
    "run": lambda f, keys, out: ["run", "--keys", keys, f, "--out", out],
    "seal": lambda f, keys, out: ["seal", "--keys", keys, f, out + ".dcm"],
    "encrypt": lambda f, keys, out: ["encrypt", "--to", keys, f, out + ".dcm"],
    "decrypt": lambda f, keys, out: ["decrypt", "--keys", keys, f, out + ".dcm"],
}


@pytest.fixture(scope="module")
def device_keys(tmp_path_factory) -> Path:
    keys = tmp_path_factory.mktemp("fuzz-keys") / "keys"
    env = _env(keys.parent)
    assert subprocess.run(CLI + ["keys", "new", str(keys)], check=False, env=env, capture_output=True).returncode == 0
    return keys


@pytest.mark.parametrize("command", sorted(NAMED_INPUT_COMMANDS))
def test_named_fifo_and_device_answered_at_once(tmp_path, command, device_keys):
    """A FIFO named *.dcm hung these commands forever and a link to /dev/zero ran them out of
    memory; now each is one line of bad input (exit 4) within seconds."""
    env = _env(tmp_path)
    keys = device_keys
    os.mkfifo(tmp_path / "fifo.dcm")
    os.symlink("/dev/zero", tmp_path / "zero.dcm")
    for name in ("fifo.dcm", "zero.dcm"):
        args = NAMED_INPUT_COMMANDS[command](str(tmp_path / name), str(keys), str(tmp_path / f"out-{name}"))
        proc = subprocess.run(CLI + args, check=False, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 4, proc.stdout + proc.stderr
        assert "not a regular file" in proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / f"out-{name}.dcm").exists()
