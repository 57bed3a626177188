"""Real peers for the node's integration tests: Orthanc, DCMTK's storescu/echoscu, the node itself.

Every process started here is ended by its PID (``Orthanc.stop``, ``NodeProcess.stop``/``kill9``,
``Sender``'s Popen), never by name. Orthanc gets a temporary configuration and storage folder on
free loopback ports, as in ``tests/runtime/test_pacs.py``; the Debian service is never used.
Test series are made from the repository's samples with fresh UIDs, one study per series, so a
test counts what it sent by its own study even in an Orthanc other tests share.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

ORTHANC = Path("/usr/sbin/Orthanc")
STORESCU = Path("/usr/bin/storescu")
ECHOSCU = Path("/usr/bin/echoscu")
STORESCP = Path("/usr/bin/storescp")
REQUIRE_ORTHANC_ENV = "MEDSEC_EDGE_REQUIRE_ORTHANC"
REPO = Path(__file__).resolve().parents[3]
SAMPLES = (REPO / "samples" / "CT_small.dcm", REPO / "samples" / "MR_small.dcm")
HOST = "127.0.0.1"
# Loopback only, and never through a proxy the environment may name.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# Debian's DCMTK leaves Nagle's algorithm on unless told: 88 ms per C-STORE on loopback with it.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def missing_tools() -> str:
    for tool in (ORTHANC, STORESCU, ECHOSCU, STORESCP):
        if not tool.exists():
            return f"{tool} is not installed (apt-get install orthanc dcmtk)"
    return ""


def require_tools() -> None:
    """Skip without Orthanc/DCMTK, or fail where ``MEDSEC_EDGE_REQUIRE_ORTHANC=1`` says they must be."""
    missing = missing_tools()
    if missing:
        if os.environ.get(REQUIRE_ORTHANC_ENV, "").strip() == "1":
            pytest.fail(f"{missing}; {REQUIRE_ORTHANC_ENV}=1 requires it", pytrace=False)
        pytest.skip(missing)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def end_process(process: subprocess.Popen, term_timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL, this one process (by its PID), and reap it."""
    if process.poll() is None:
        try:
            os.kill(process.pid, signal.SIGTERM)
            process.wait(timeout=term_timeout)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        except ProcessLookupError:
            pass
    process.poll()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1, details=lambda: ""):
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}. {details()}", pytrace=False)
        time.sleep(interval)


# -- test series -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    path: Path
    sop_uid: str
    study_uid: str
    patient_name: str
    patient_id: str


def make_series(folder: Path, count: int, tag: str) -> list[Source]:
    """``count`` small images (CT and MR alternately) of one new study and patient, fresh UIDs."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = {}, {}
    patient_id = f"PID{tag.upper()}{os.getpid() % 1000:03d}{int(time.time() * 1000) % 100000:05d}"
    patient_name = f"Testpatient^{tag.capitalize()}{len(patient_id)}"
    templates = [_template(path) for path in SAMPLES]
    sources = []
    for i in range(count):
        ds = templates[i % 2].copy()
        kind = i % 2
        study.setdefault("uid", generate_uid())
        series.setdefault(kind, generate_uid())
        ds.StudyInstanceUID = study["uid"]
        ds.SeriesInstanceUID = series[kind]
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.InstanceNumber = i + 1
        path = folder / f"{tag}_{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        sources.append(Source(path, str(ds.SOPInstanceUID), study["uid"], patient_name, patient_id))
    return sources


def _template(path: Path) -> pydicom.Dataset:
    """A sample as it is: MR_small's 64x64 is the smallest image the watermark carries, and about 1
    in 300 payloads did not read back there at the bundle's target until the job re-embeds such a
    mark 1.5, 3 or 4.5 dB stronger (pipeline.STRONGER_RETRY_DB); these tests see that path too."""
    return pydicom.dcmread(path)


# -- Orthanc -----------------------------------------------------------------------------------
@dataclass
class Orthanc:
    """An Orthanc of our own; ``start`` it, ``stop`` it (by PID)."""

    root: Path
    aet: str = "PACS"
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    _downloaded: dict = field(default_factory=dict)

    def start(self, timeout: float = 30.0) -> Orthanc:
        self.root.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": f"medsec-edge-node-test-{self.aet}",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "OverwriteInstances": False,
            "StorageCompression": False,
            "SyncStorageArea": False,  # the node is what the tests kill, not Orthanc
            "LimitFindResults": 0,
            "LimitFindInstances": 0,
            "DicomScuTimeout": 30,
            "Plugins": [],
        }
        (self.root / "orthanc.json").write_text(json.dumps(config))
        self._log = (self.root / "orthanc.log").open("ab")
        self.process = subprocess.Popen([str(ORTHANC), str(self.root / "orthanc.json")], stdout=self._log,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            try:
                json.loads(self.get("/system"))
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"Orthanc did not start on loopback: {self.log_tail()}", pytrace=False)
                time.sleep(0.2)

    def stop(self) -> None:
        if self.process is not None:
            end_process(self.process)
            self._log.close()

    def log_tail(self, n: int = 1500) -> str:
        try:
            return (self.root / "orthanc.log").read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""

    @property
    def address(self) -> str:
        return f"{self.aet}@{HOST}:{self.dicom_port}"

    def url(self, path: str) -> str:
        return f"http://{HOST}:{self.http_port}{path}"

    def get(self, path: str) -> bytes:
        with _HTTP.open(self.url(path), timeout=30) as response:
            return response.read()

    def request(self, method: str, path: str, body: bytes | dict) -> bytes:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        request = urllib.request.Request(self.url(path), data=data, method=method)
        with _HTTP.open(request, timeout=120) as response:
            return response.read()

    def instance_count(self) -> int:
        return len(json.loads(self.get("/instances")))

    def study_instances(self, study_uid: str) -> list[str]:
        body = {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}}
        return json.loads(self.request("POST", "/tools/find", body))

    def download(self, instance: str, folder: Path) -> Path:
        """The stored file of ``instance`` (fetched once)."""
        if instance not in self._downloaded:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{instance}.dcm"
            path.write_bytes(self.get(f"/instances/{instance}/file"))
            self._downloaded[instance] = path
        return self._downloaded[instance]

    def by_source(self, studies, folder: Path) -> dict[str, list[Path]]:
        """Files stored for the given studies, grouped by the source UID their SourceImageSequence
        names (``""`` for a stored object that references none: not one of the node's outputs)."""
        grouped: dict[str, list[Path]] = {}
        for study in set(studies):
            for instance in self.study_instances(study):
                path = self.download(instance, folder)
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                refs = [str(item.ReferencedSOPInstanceUID) for item in ds.get("SourceImageSequence", [])]
                for ref in refs or [""]:
                    grouped.setdefault(ref, []).append(path)
        return grouped


# -- the node ----------------------------------------------------------------------------------
class NodeProcess:
    """``medsec-edge serve`` as a subprocess of its own, on a free port, with a spool of its own."""

    def __init__(self, spool: Path, keys: Path, forward: str, *, registry: Path, workers: int = 2,
                 extra: tuple[str, ...] = (), listen: str = f"{HOST}:0") -> None:
        self.spool = spool
        self.keys = keys
        self.forward = forward
        self.registry = registry
        self.workers = workers
        self.extra = extra
        self.listen = listen
        self.process: subprocess.Popen | None = None
        self.info: dict = {}
        self.starts = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def port(self) -> int:
        return int(self.info["dicom"].rsplit(":", 1)[1])

    @property
    def log_path(self) -> Path:
        return self.spool.parent / f"{self.spool.name}.node.log"

    def start(self, fault: str | None = None, timeout: float = 90.0) -> NodeProcess:
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "MEDSEC_EDGE_THREADS": "1",
               "MEDSEC_EDGE_REGISTRY": str(self.registry)}
        env.pop("MEDSEC_EDGE_NODE_FAULT", None)
        if fault:
            env["MEDSEC_EDGE_NODE_FAULT"] = fault
        args = [sys.executable, "-m", "medsec_edge.runtime.cli", "serve", "--listen", self.listen, "--aet", "EDGE",
                "--forward", self.forward, "--spool", str(self.spool), "--keys", str(self.keys),
                "--registry", str(self.registry), "--workers", str(self.workers), *self.extra]
        self.starts += 1
        self.spool.parent.mkdir(parents=True, exist_ok=True)
        if self.process is not None:
            self.stop()  # the previous run's process (killed or stopped by now) and its log
        self._log = self.log_path.open("ab")
        self._log.write(f"\n===== start {self.starts} fault={fault}\n".encode())
        self._log.flush()
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        proc = self.process

        def ready():
            if proc.poll() is not None:
                pytest.fail(f"the node exited with {proc.returncode} while starting: {self.log_tail()}",
                            pytrace=False)
            try:
                info = json.loads((self.spool / "node.json").read_text())
            except (FileNotFoundError, ValueError):
                return None
            return info if info.get("pid") == proc.pid else None  # not a killed run's stale file

        self.info = wait_for(ready, timeout, "the node to write node.json", details=self.log_tail)
        return self

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill9(self) -> int:
        os.kill(self.process.pid, signal.SIGKILL)
        return self.wait_dead(30)

    def wait_dead(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the node (pid {self.process.pid}) did not exit within {timeout:.0f} s: {self.log_tail()}",
                        pytrace=False)

    def stop(self) -> None:
        if self.process is not None:
            end_process(self.process, term_timeout=60)
            self._log.close()

    # -- the spool, as the tests look at it ----------------------------------------------------
    def depth(self) -> dict[str, int]:
        return {name: len(list((self.spool / name).glob("*.dcm"))) for name in ("received", "outgoing",
                                                                                 "quarantine")}

    def audit(self) -> list[dict]:
        from medsec_edge.runtime.node.audit import read_audit

        path = self.spool / "audit.jsonl"
        return list(read_audit(path)) if path.exists() else []

    def events(self, name: str) -> list[dict]:
        return [row for row in self.audit() if row.get("event") == name]

    def wait_drained(self, timeout: float = 120.0) -> None:
        """Until received/ and outgoing/ are empty: everything acknowledged reached the PACS."""
        def drained():
            if not self.alive():
                pytest.fail(f"the node died: {self.log_tail()}", pytrace=False)
            d = self.depth()
            return d["received"] == 0 and d["outgoing"] == 0

        wait_for(drained, timeout, "the spool to drain", interval=0.2,
                 details=lambda: f"spool {self.depth()}; {self.log_tail(1500)}")


# -- DCMTK -------------------------------------------------------------------------------------
_SENDING = re.compile(r"Sending file: (.+)$")
_RESPONSE = re.compile(r"Received Store Response \(([^)]*)")


def acknowledged(output: str) -> set[Path]:
    """The files storescu -v says the peer answered Success for."""
    acked, current = set(), None
    for line in output.splitlines():
        sending = _SENDING.search(line)
        if sending:
            current = Path(sending.group(1).strip())
            continue
        response = _RESPONSE.search(line)
        if response and current is not None:
            if response.group(1).startswith("Success"):
                acked.add(current)
            current = None
    return acked


def storescu_args(port: int, files, calling: str = "MODALITY", called: str = "EDGE") -> list[str]:
    return [str(STORESCU), "-v", "-to", "10", "-ta", "30", "-td", "60", "-aet", calling, "-aec", called,
            HOST, str(port), *[str(f) for f in files]]


class Sender:
    """One storescu run (a modality's association), started in the background."""

    def __init__(self, port: int, files, log: Path, calling: str = "MODALITY") -> None:
        self.files = [Path(f) for f in files]
        self.log = log
        self._out = log.open("wb")
        self.process = subprocess.Popen(storescu_args(port, self.files, calling), stdout=self._out,
                                        stderr=subprocess.STDOUT, env=DCMTK_ENV)

    def wait(self, timeout: float = 120.0) -> tuple[int, set[Path]]:
        try:
            code = self.process.wait(timeout=timeout)
        finally:
            self.end()
        return code, acknowledged(self.log.read_text(errors="replace"))

    def end(self) -> None:
        end_process(self.process, term_timeout=5)
        self._out.close()


def store(port: int, files, log: Path, calling: str = "MODALITY") -> tuple[int, set[Path]]:
    """storescu in the foreground: its exit code and the files it saw acknowledged."""
    return Sender(port, files, log, calling).wait()


def store_until_acknowledged(port: int, files, log_dir: Path, tag: str, rounds: int = 6,
                             acked: set[Path] | None = None) -> set[Path]:
    """Send every file not yet acknowledged, again, until the node has acknowledged them all."""
    acked = set(acked or ())
    for attempt in range(rounds):
        todo = [f for f in files if Path(f) not in acked]
        if not todo:
            return acked
        _, got = store(port, todo, log_dir / f"{tag}.resend{attempt}.log")
        acked |= got
        if Path(todo[0]) not in got:
            time.sleep(0.5)
    todo = [f for f in files if Path(f) not in acked]
    assert not todo, f"{len(todo)} files never acknowledged after {rounds} rounds"
    return acked


def echo(port: int, calling: str = "MODALITY", called: str = "EDGE") -> subprocess.CompletedProcess:
    return subprocess.run([str(ECHOSCU), "-v", "-to", "10", "-aet", calling, "-aec", called, HOST, str(port)],
                          check=False, capture_output=True, text=True, timeout=60, env=DCMTK_ENV)
