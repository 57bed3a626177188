"""Streams of 512x512 16-bit images through the acquisition node, beside storescp as the ceiling.

Used by ``test_node_bench.py`` and runnable on its own (``python benchmarks/node_stream.py --help``)
to write ``docs/node/benchmarks.json`` and its plot. Every process is real and separate: DCMTK's
``storescu`` as the modalities, the node as ``medsec-edge serve`` (its own process, 2 workers on 2
cores), DCMTK's ``storescp`` as the PACS. The same files go once straight to a ``storescp`` (what
the machine's DICOM transport alone manages: the ceiling) and once through the node. Times come
from the node's audit log (first ``received`` to last ``forwarded``), latencies from its
``forwarded`` lines (receive to PACS acknowledgement), memory from /proc/PID/status of the node.
Debian's DCMTK leaves Nagle's algorithm on unless ``TCP_NODELAY=1`` (88 ms per C-STORE on loopback
otherwise), so the DCMTK peers get it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

STORESCU = Path("/usr/bin/storescu")
STORESCP = Path("/usr/bin/storescp")
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
SOURCE = "693_UNCR.dcm"  # a real 512x512 16-bit CT, held out: timing only


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_tools() -> str:
    for tool in (STORESCU, STORESCP):
        if not tool.exists():
            return f"{tool} is not installed (apt-get install dcmtk)"
    return ""


def source_file() -> Path | None:
    from pydicom.data import get_testdata_file

    found = get_testdata_file(SOURCE, download=False)
    return Path(found) if found else None


def make_stream(source: Path, folder: Path, n: int, *, per_series: int = 100) -> list[Path]:
    """``n`` copies of ``source`` with their own SOP Instance UIDs (a series per ``per_series``)."""
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(source)
    files = []
    study = generate_uid()
    for i in range(n):
        if i % per_series == 0:
            series = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i % per_series + 1
        path = folder / f"img{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


class StoreSCP:
    """DCMTK's storescp on a free loopback port; ``--ignore`` keeps the disk out of the ceiling."""

    def __init__(self, folder: Path, aet: str = "PACS", *, ignore: bool = True) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.aet = aet
        args = [str(STORESCP), "-aet", aet, "-od", str(folder), "--fork"]
        if ignore:
            args.append("--ignore")
        self.process = subprocess.Popen([*args, str(self.port)], env=DCMTK_ENV, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        _wait_port(self.port, self.process)

    def stop(self) -> None:
        _end(self.process)


def _wait_port(port: int, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process {process.pid} ended with {process.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def _end(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def send(files: list[Path], port: int, aet: str, *, senders: int = 2) -> float:
    """``senders`` concurrent storescu processes, each one association for its share; wall seconds."""
    shares = [files[i::senders] for i in range(senders)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen([str(STORESCU), "-aet", f"MOD{i}", "-aec", aet, "127.0.0.1", str(port),
                               *map(str, share)], env=DCMTK_ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for i, share in enumerate(shares) if share]
    for p in procs:
        _, err = p.communicate(timeout=3600)
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed ({p.returncode}): {err.decode(errors='replace')[-400:]}")
    return time.perf_counter() - t0


_PACED_SENDER = r"""
import sys, time
from pynetdicom import AE
from pydicom.uid import ExplicitVRLittleEndian
port, rate, files = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
ae = AE(ae_title="MODPACED")
ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", [ExplicitVRLittleEndian])
assoc = ae.associate("127.0.0.1", port, ae_title="EDGE")
assert assoc.is_established, "association refused"
import socket
assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
t0 = time.perf_counter()
for i, path in enumerate(files):
    delay = t0 + i / rate - time.perf_counter()
    if delay > 0:
        time.sleep(delay)
    status = assoc.send_c_store(path)
    assert status and status.Status == 0, f"store failed: {status}"
assoc.release()
"""


def paced_send(files: list[Path], port: int, aet: str, rate_per_s: float, *, per_image: bool = False) -> float:
    """A modality sending as it acquires: one image every 1/rate seconds over one association
    (pynetdicom, its own process), or with ``per_image`` one storescu (one association) per image."""
    t0 = time.perf_counter()
    if not per_image:
        subprocess.run([sys.executable, "-c", _PACED_SENDER, str(port), str(rate_per_s), *map(str, files)],
                       check=True, timeout=3600)
        return time.perf_counter() - t0
    running = []
    for i, path in enumerate(files):
        delay = t0 + i / rate_per_s - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        running.append(subprocess.Popen([str(STORESCU), "-aet", "MODP", "-aec", aet, "127.0.0.1", str(port),
                                         str(path)], env=DCMTK_ENV, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL))
        running = [p for p in running if p.poll() is None]
    for p in running:
        p.wait(timeout=600)
    return time.perf_counter() - t0


class NodeProcess:
    """``medsec-edge serve`` in its own process, forwarding to ``pacs``."""

    def __init__(self, root: Path, pacs: StoreSCP, *, workers: int = 2, keys: Path | None = None) -> None:
        self.root = root
        self.spool = root / "spool"
        cli = [sys.executable, "-m", "medsec_edge.runtime.cli"]
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "MEDSEC_EDGE_REGISTRY": str(root / "registry.sqlite3")}
        self.log = open(root / "node.log", "wb")
        self.process = subprocess.Popen(
            [*cli, "serve", "--listen", "127.0.0.1:0", "--aet", "EDGE", "--forward", f"{pacs.aet}@127.0.0.1:{pacs.port}",
             "--spool", str(self.spool), "--keys", str(keys or root / "keys"), "--workers", str(workers),
             "--threads", "1"], env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not (self.spool / "node.json").exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the node did not start: " + (root / "node.log").read_text()[-800:])
            time.sleep(0.1)
        info = json.loads((self.spool / "node.json").read_text())
        self.port = int(info["dicom"].rsplit(":", 1)[1])
        self.status_url = info["status_url"]

    def rss_mb(self) -> float:
        with open(f"/proc/{self.process.pid}/status") as fp:
            for line in fp:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def audit(self) -> list[dict]:
        from medsec_edge.runtime.node.audit import read_audit

        return read_audit(self.spool / "audit.jsonl")

    def forwarded(self) -> int:
        from medsec_edge.runtime.node.status_http import fetch_status

        return int(fetch_status(self.status_url)["counters"].get("forwarded", 0))

    def wait_forwarded(self, n: int, timeout: float = 3600, on_poll=None) -> None:
        deadline = time.monotonic() + timeout
        while self.forwarded() < n:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"node forwarded {self.forwarded()} of {n}")
            if on_poll is not None:
                on_poll()
            time.sleep(0.25)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(timeout=10)
        self.log.close()
        return code


@dataclass
class StreamResult:
    images: int
    node_images_per_s: float  # first received to last forwarded
    ceiling_images_per_s: float  # the same files straight to storescp
    p50_ms: float  # receive to PACS acknowledgement
    p99_ms: float
    max_ms: float
    quarantined: int
    deadline_misses: int
    rss_start_mb: float = float("nan")  # after the warm-up
    rss_end_mb: float = float("nan")
    rss_max_mb: float = float("nan")
    offered_per_s: float | None = None  # None: as fast as the senders go
    # per image in forwarding order: seconds since the first receive, receive-to-forward ms; and
    # [images forwarded, node RSS MB] samples (for the plot)
    series: dict = field(default_factory=dict)

    @property
    def rss_growth_mb(self) -> float:
        return self.rss_end_mb - self.rss_start_mb


def _iso(t: str) -> float:
    from datetime import datetime

    return datetime.strptime(t, "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()


def summarise(audit: list[dict], n: int, ceiling: float, offered: float | None, deadline_ms: float = 250.0,
              skip: int = 0) -> StreamResult:
    received = [e for e in audit if e["event"] == "received"]
    forwarded = [e for e in audit if e["event"] == "forwarded"]
    lat = np.array([e["latency_ms"] for e in forwarded[skip:]], float)
    start = _iso(received[0]["time"])
    span = _iso(forwarded[-1]["time"]) - start
    return StreamResult(
        images=len(forwarded), node_images_per_s=round(len(forwarded) / span, 2), ceiling_images_per_s=round(ceiling, 2),
        p50_ms=round(float(np.percentile(lat, 50)), 1), p99_ms=round(float(np.percentile(lat, 99)), 1),
        max_ms=round(float(lat.max()), 1), quarantined=sum(e["event"] == "quarantined" for e in audit),
        deadline_misses=int((lat > deadline_ms).sum()), offered_per_s=offered,
        series={"t_s": [round(_iso(e["time"]) - start, 3) for e in forwarded[skip:]],
                "latency_ms": [round(float(v), 1) for v in lat]})


def run_stream(root: Path, n: int, *, rate: float | None = None, senders: int = 2, memory: bool = False,
               warmup: int = 100, per_image: bool = False) -> StreamResult:
    """``n`` images through the node (as fast as ``senders`` go, or paced at ``rate``), and the
    same files straight to storescp first for the ceiling."""
    source = source_file()
    if source is None:
        raise FileNotFoundError(f"pydicom-data's {SOURCE} is not installed (pip install pydicom-data)")
    files = make_stream(source, root / "images", n)
    # The stream's files (0.5 MB each) were just written: flush them now, or the kernel's writeback
    # of them 30 s later (dirty_expire) stalls every fsync of the node for ~0.4 s (measured).
    os.sync()
    ceiling_scp = StoreSCP(root / "ceiling")
    try:
        ceiling = n / send(files, ceiling_scp.port, ceiling_scp.aet, senders=senders)
    finally:
        ceiling_scp.stop()
    pacs = StoreSCP(root / "pacs")
    node = NodeProcess(root, pacs)
    rss: list[tuple[int, float]] = []
    try:
        sampler_stop = threading.Event()

        def sample() -> None:
            while not sampler_stop.wait(0.5):
                try:
                    rss.append((node.forwarded(), node.rss_mb()))
                except Exception:  # noqa: BLE001 - a sample missed while the node is busy
                    pass

        sampler = threading.Thread(target=sample, daemon=True)
        if memory:
            sampler.start()
        if rate is None:
            send(files, node.port, "EDGE", senders=senders)
        else:
            paced_send(files, node.port, "EDGE", rate, per_image=per_image)
        node.wait_forwarded(n)
        sampler_stop.set()
        end_rss = node.rss_mb()
        result = summarise(node.audit(), n, ceiling, rate, skip=0)
    finally:
        node.stop()
        pacs.stop()
    if memory and rss:
        after_warmup = [m for f, m in rss if f >= warmup] or [rss[0][1]]
        result.rss_start_mb = round(after_warmup[0], 1)
        result.rss_end_mb = round(end_rss, 1)
        result.rss_max_mb = round(max(m for _, m in rss), 1)
        result.series["rss"] = [[f, round(m, 1)] for f, m in rss]
    return result


def plot(benchmark_json: Path, out_png: Path, deadline_ms: float = 250.0) -> None:
    """Receive-to-forward latency of every image over time, and the node's RSS, from the JSON of
    ``pytest benchmarks/test_node_bench.py --benchmark-json=FILE``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [b for b in json.loads(Path(benchmark_json).read_text())["benchmarks"] if b["extra_info"].get("series")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for b in runs:
        info = b["extra_info"]
        label = (f"{b['name'].removeprefix('test_')}: {info['images']} images, {info['node_images_per_s']}/s, "
                 f"p99 {info['p99_ms']} ms")
        axes[0].plot(info["series"]["t_s"], info["series"]["latency_ms"], ".", ms=2, label=label)
        if info["series"].get("rss"):
            f, m = zip(*info["series"]["rss"])
            axes[1].plot(f, m, "-", label=f"{info['images']} images: +{info['rss_growth_mb']:.1f} MB after warm-up")
    axes[0].axhline(deadline_ms, color="k", lw=0.8, ls="--", label=f"target p99 {deadline_ms:.0f} ms")
    axes[0].set(xlabel="s since the first image was received", ylabel="receive to PACS ack, ms", yscale="log",
                title="each image through the node (512x512 16-bit, 2 cores)")
    axes[0].legend(fontsize=7)
    axes[1].set(xlabel="images forwarded", ylabel="node RSS, MB", title="memory (target: <= 50 MB growth)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)


def main() -> None:
    if sys.argv[1:2] == ["plot"]:
        plot(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="or: node_stream.py plot BENCHMARK.json OUT.png")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--rate", type=float, default=None, help="offered images/s (default: as fast as sent)")
    parser.add_argument("--senders", type=int, default=2)
    parser.add_argument("--per-image", action="store_true", help="paced: one association per image (storescu)")
    parser.add_argument("--memory", action="store_true", help="sample the node's RSS")
    parser.add_argument("--out", type=Path, default=None, help="append the result (JSON) to this file")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="node-stream-"))
    try:
        result = run_stream(root, args.images, rate=args.rate, senders=args.senders, memory=args.memory,
                            per_image=args.per_image)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    row = {**asdict(result), "rss_growth_mb": round(result.rss_growth_mb, 1)}
    print(json.dumps(row))
    if args.out is not None:
        rows = json.loads(args.out.read_text()) if args.out.exists() else []
        rows.append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
