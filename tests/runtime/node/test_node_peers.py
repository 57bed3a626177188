"""The acquisition node between real peers: DCMTK storescu (and Orthanc) as the modality, Orthanc
as the PACS, the node as its own process, killed with SIGKILL at the spool's step boundaries and
from outside in mid-flow, and restarted.

What every delivery test checks in the PACS, per source image: exactly one stored instance names
it in its SourceImageSequence, under the SOP Instance UID the device key derives from it, sealed
and signed (``verify_file``) and watermarked (the extractor finds the mark); nothing else is
stored in the test's study (no unprocessed copy, no second derived instance).

Marker ``network``: it needs local servers. Without Orthanc or DCMTK the tests skip with the
reason; ``MEDSEC_EDGE_REQUIRE_ORTHANC=1`` (set by .ci/run where Orthanc is installed) turns that
skip into a failure. Every process a test starts is ended by its PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest
from medsec_edge.runtime.node.audit import uid_hash
from medsec_edge.runtime.node.faults import POINTS
from pydicom.uid import ExplicitVRLittleEndian

from tests.runtime.node import peers
from tests.runtime.node.peers import (
    HOST,
    NodeProcess,
    Orthanc,
    Sender,
    echo,
    make_series,
    store,
    store_until_acknowledged,
    wait_for,
)

pytestmark = pytest.mark.network

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
UNKNOWN_CLASS = "1.2.3.4.5.6"
CANNOT_UNDERSTAND, DOES_NOT_MATCH = 0xC000, 0xA900


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tools():
    peers.require_tools()


@pytest.fixture(scope="module")
def keys(tools, tmp_path_factory):
    """The device key set every node of this module uses: (folder, ring)."""
    from medsec_edge.runtime.crypto.device_keys import load_or_create_ring

    folder = tmp_path_factory.mktemp("keys") / "keys"
    return folder, load_or_create_ring(folder)


@pytest.fixture(scope="module")
def watermarker(tools):
    from medsec_edge.runtime.pipeline import load_watermarker

    wm, _ = load_watermarker(threads=1)
    return wm


@pytest.fixture(scope="module")
def pacs(tools, tmp_path_factory):
    server = Orthanc(tmp_path_factory.mktemp("pacs"), aet="PACS")
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def node(keys, pacs, tmp_path_factory):
    """One node the tests that need no crash share; calling AEs limited to two."""
    root = tmp_path_factory.mktemp("shared-node")
    proc = NodeProcess(root / "spool", keys[0], pacs.address, registry=root / "registry.sqlite3",
                       extra=("--allow-aet", "MODALITY", "--allow-aet", "ORTHSEND"))
    try:
        yield proc.start()
    finally:
        proc.stop()


@pytest.fixture()
def new_node(keys, pacs, tmp_path):
    """Make nodes of the test's own (own spool); each is stopped by its PID afterwards."""
    made: list[NodeProcess] = []

    def make(forward: str | None = None, extra: tuple[str, ...] = (), listen: str = f"{HOST}:0",
             name: str = "node") -> NodeProcess:
        proc = NodeProcess(tmp_path / name / "spool", keys[0], forward or pacs.address,
                           registry=tmp_path / name / "registry.sqlite3", extra=extra, listen=listen)
        made.append(proc)
        return proc

    try:
        yield make
    finally:
        for proc in made:
            proc.stop()


# -- what the PACS must hold ----------------------------------------------------------------------
def assert_delivered_once(orthanc: Orthanc, sources, ring, watermarker, folder: Path,
                          node: NodeProcess | None = None) -> dict:
    """Each source exactly once in ``orthanc``, derived UID, sealed, watermarked; nothing else;
    and nothing the node held in quarantine (its reasons are in the report when there is)."""
    from medsec_edge.runtime.crypto.verification import verify_file
    from medsec_edge.runtime.io.derived_uid import derived_instance_uid
    from medsec_edge.runtime.io.readers import read_image

    grouped = orthanc.by_source({s.study_uid for s in sources}, folder)
    wanted = {s.sop_uid for s in sources}
    lost = sorted(uid for uid in wanted if not grouped.get(uid))
    duplicated = sorted(uid for uid in wanted if len(grouped.get(uid, [])) > 1)
    foreign = {uid: len(paths) for uid, paths in grouped.items() if uid not in wanted}  # "" = unprocessed
    unmarked, unsealed, wrong_uid = [], [], []
    for uid in wanted - set(lost):
        for path in grouped[uid]:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if ds.SOPInstanceUID != derived_instance_uid(uid, ring.watermark.secret):
                wrong_uid.append(uid)
            row, code = verify_file(path, ring)
            if code != 0 or not row["valid"]:
                unsealed.append((uid, row.get("reason")))
            if not watermarker.extract(read_image(path)).found:
                unmarked.append(uid)
    report = {"sources": len(wanted), "stored": sum(len(p) for p in grouped.values()), "lost": len(lost),
              "duplicates": len(duplicated), "foreign": foreign, "unwatermarked": len(unmarked),
              "unsealed": unsealed, "wrong_uid": len(wrong_uid)}
    if node is not None:
        report["quarantined"] = [json.loads(p.read_text()) for p in (node.spool / "quarantine").glob("*.reason.json")]
    assert (lost, duplicated, foreign, unmarked, unsealed, wrong_uid) == ([], [], {}, [], [], []), report
    assert report["stored"] == len(wanted), report
    assert not report.get("quarantined"), report
    return report


def stored_sources(orthanc: Orthanc, sources, folder: Path) -> dict[str, int]:
    """How many stored instances name each source (only sources with at least one)."""
    grouped = orthanc.by_source({s.study_uid for s in sources}, folder)
    return {uid: len(paths) for uid, paths in grouped.items()}


def status_cli(spool: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medsec_edge.runtime.cli", "status", "--spool", str(spool), "--json"],
                          check=False, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})


def received_count(proc: NodeProcess) -> int:
    try:
        return (proc.spool / "audit.jsonl").read_text().count('"event": "received"')
    except FileNotFoundError:
        return 0


# -- 1. storescu -> node -> Orthanc -----------------------------------------------------------------
def test_storescu_to_orthanc_derived_sealed_watermarked_and_audited(node, pacs, keys, watermarker, tmp_path):
    sources = make_series(tmp_path / "src", 4, "basic")
    code, acked = store(node.port, [s.path for s in sources], tmp_path / "storescu.log")
    assert code == 0 and acked == {s.path for s in sources}, (tmp_path / "storescu.log").read_text()
    node.wait_drained(60)
    assert_delivered_once(pacs, sources, keys[1], watermarker, tmp_path / "got", node)

    from medsec_edge.runtime.io.derived_uid import derived_instance_uid

    audit = node.audit()
    secret = keys[1].watermark.secret
    for s in sources:
        received = [r for r in audit if r["event"] == "received" and r.get("source_uid_sha256") == uid_hash(s.sop_uid)]
        assert len(received) == 1 and received[0]["calling_ae"] == "MODALITY" and received[0]["status_code"] == 0
        derived = uid_hash(derived_instance_uid(s.sop_uid, secret))
        for event in ("processed", "forwarded"):
            assert [r for r in audit if r["event"] == event and r.get("derived_uid_sha256") == derived], event
    raw = (node.spool / "audit.jsonl").read_text()
    study_series = {str(pydicom.dcmread(s.path, stop_before_pixels=True).SeriesInstanceUID) for s in sources}
    for secret_text in {sources[0].patient_name, sources[0].patient_id, sources[0].study_uid,
                        *study_series, *(s.sop_uid for s in sources)}:
        assert secret_text not in raw


# -- 2. C-ECHO, calling AE allow-list ---------------------------------------------------------------
def test_echo_and_a_calling_ae_not_allowed_is_rejected_then_the_next_is_served(node, pacs, keys, watermarker,
                                                                               tmp_path):
    result = echo(node.port)
    assert result.returncode == 0, result.stdout + result.stderr
    assert any(r["event"] == "echo" and r["calling_ae"] == "MODALITY" for r in node.audit())

    sources = make_series(tmp_path / "src", 2, "allow")
    code, acked = store(node.port, [s.path for s in sources], tmp_path / "intruder.log", calling="INTRUDER")
    assert code != 0 and acked == set()
    rejected = [r for r in node.audit() if r["event"] == "association_rejected"]
    assert rejected and rejected[-1]["calling_ae"] == "INTRUDER"
    assert echo(node.port, calling="INTRUDER").returncode != 0
    assert not stored_sources(pacs, sources, tmp_path / "none")

    assert node.alive()
    code, acked = store(node.port, [s.path for s in sources], tmp_path / "allowed.log")
    assert code == 0 and len(acked) == 2
    node.wait_drained(60)
    assert_delivered_once(pacs, sources, keys[1], watermarker, tmp_path / "got", node)


# -- 3. malformed objects ---------------------------------------------------------------------------
def test_malformed_objects_get_error_statuses_and_audit_lines_and_the_node_serves_on(
        node, pacs, keys, watermarker, tmp_path, monkeypatch):
    from pynetdicom import AE, _config

    sources = make_series(tmp_path / "src", 5, "malformed")  # 0, 2, 4: CT; 1, 3: MR
    ct = pydicom.dcmread(sources[0].path)
    short = ct.copy()
    short.PixelData = ct.PixelData[:-100]  # wrong length: Rows x Columns x 2 bytes needs 100 more

    # A file whose meta (and so the C-STORE request) names MR Image Storage, its data set CT.
    mismatch = pydicom.dcmread(sources[2].path)
    mismatch.file_meta.MediaStorageSOPClassUID = MR_IMAGE
    mismatch_path = tmp_path / "mismatch.dcm"
    mismatch.save_as(mismatch_path, enforce_file_format=False)

    # A file cut in the middle of its pixel data; its meta is intact, so it is sent as it is.
    truncated_path = tmp_path / "truncated.dcm"
    data = sources[4].path.read_bytes()
    truncated_path.write_bytes(data[: len(data) - 5000])

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the file's bytes, not a re-encoding
    ae = AE(ae_title="MODALITY")
    for cls in (CT_IMAGE, MR_IMAGE, UNKNOWN_CLASS):
        ae.add_requested_context(cls, ExplicitVRLittleEndian)
    assoc = ae.associate(HOST, node.port, ae_title="EDGE")
    assert assoc.is_established
    try:
        rejected = [str(cx.abstract_syntax) for cx in assoc.rejected_contexts]
        assert rejected == [UNKNOWN_CLASS]
        statuses = {
            "short": int(assoc.send_c_store(short).Status),
            "mismatch": int(assoc.send_c_store(mismatch_path).Status),
            "truncated": int(assoc.send_c_store(truncated_path).Status),
        }
        with pytest.raises(ValueError):  # no accepted context for it: the SCU cannot even send it
            unknown = ct.copy()
            unknown.SOPClassUID = UNKNOWN_CLASS
            assoc.send_c_store(unknown)
        statuses["valid"] = int(assoc.send_c_store(sources[1].path).Status)
    finally:
        assoc.release()
    assert statuses == {"short": CANNOT_UNDERSTAND, "mismatch": DOES_NOT_MATCH, "truncated": CANNOT_UNDERSTAND,
                        "valid": 0}

    audit = node.audit()
    refused = {r["source_uid_sha256"]: r for r in audit if r["event"] == "refused" and "source_uid_sha256" in r}
    for source, code, words in ((sources[0], CANNOT_UNDERSTAND, "Pixel Data has"),
                                (sources[2], DOES_NOT_MATCH, "SOP Class UID"),
                                (sources[4], CANNOT_UNDERSTAND, "Pixel Data has")):
        row = refused[uid_hash(source.sop_uid)]
        assert row["status_code"] == code and words in row["reason"] and row["calling_ae"] == "MODALITY"
    assert any(r["event"] == "context_rejected" and r["sop_class"] == UNKNOWN_CLASS for r in audit)

    # Still alive, and the next association is served.
    assert node.alive()
    code, acked = store(node.port, [sources[3].path], tmp_path / "next.log")
    assert code == 0 and acked == {sources[3].path}
    node.wait_drained(60)
    assert_delivered_once(pacs, [sources[1], sources[3]], keys[1], watermarker, tmp_path / "got", node)
    refused_here = {uid for uid in stored_sources(pacs, sources, tmp_path / "got")} & {
        sources[0].sop_uid, sources[2].sop_uid, sources[4].sop_uid}
    assert not refused_here


# -- 4. Orthanc as the sender -----------------------------------------------------------------------
def test_orthanc_as_sender_through_the_node(node, pacs, keys, watermarker, tmp_path):
    sender = Orthanc(tmp_path / "sender", aet="ORTHSEND")
    try:
        sender.start()
        sources = make_series(tmp_path / "src", 3, "orthsend")
        ids = [json.loads(sender.request("POST", "/instances", s.path.read_bytes()))["ID"] for s in sources]
        sender.request("PUT", "/modalities/EDGE", {"AET": "EDGE", "Host": HOST, "Port": node.port})
        result = json.loads(sender.request("POST", "/modalities/EDGE/store",
                                           {"Resources": ids, "Synchronous": True}))
        assert result.get("InstancesCount") == 3 and result.get("FailedInstancesCount", 0) == 0, result
    finally:
        sender.stop()
    node.wait_drained(60)
    assert_delivered_once(pacs, sources, keys[1], watermarker, tmp_path / "got", node)
    hashes = {uid_hash(s.sop_uid) for s in sources}
    received = [r for r in node.audit() if r["event"] == "received" and r.get("source_uid_sha256") in hashes]
    assert len(received) == 3 and {r["calling_ae"] for r in received} == {"ORTHSEND"}


# -- 5. SIGKILL at each step boundary, restart -------------------------------------------------------
@pytest.mark.parametrize("point", POINTS)
def test_kill9_at_a_step_boundary_then_restart_delivers_each_image_once(point, new_node, pacs, keys, watermarker,
                                                                         tmp_path):
    sources = make_series(tmp_path / "src", 8, f"kill{point}")
    files = [s.path for s in sources]
    proc = new_node().start(fault=f"{point}:3")
    code, acked = store(proc.port, files, tmp_path / "first.log")
    assert proc.wait_dead(60) == -signal.SIGKILL
    if point in ("receive", "spooled"):  # killed while the 3rd object's association was open
        assert code != 0 and acked == set(files[:2])
    after_kill = proc.depth()

    proc.start()
    recovered = proc.events("node_started")[-1]["count"]
    if point != "receive":
        assert recovered >= 1  # the kill left work in the spool, and the restart took it up
    proc.wait_drained(60)
    before_resend = stored_sources(pacs, sources, tmp_path / "got")
    by_path = {s.path: s.sop_uid for s in sources}
    for path in acked:  # every acknowledged image is there, once, before any resend
        assert before_resend.get(by_path[path]) == 1, (point, after_kill)
    if point == "receive":  # the 3rd object was in memory only: nothing beyond what was acknowledged
        assert set(before_resend) == {by_path[p] for p in acked}
    if point == "spooled":  # on disk but not acknowledged: delivered all the same
        assert before_resend.get(sources[2].sop_uid) == 1

    store_until_acknowledged(proc.port, files, tmp_path, "resend", acked=acked)
    proc.wait_drained(60)
    assert_delivered_once(pacs, sources, keys[1], watermarker, tmp_path / "got", proc)


def _node_and_senders(new_node, tmp_path: Path, senders_n: int, per_sender: int, tag: str):
    """A started node and ``senders_n`` modalities (not yet sending), each with a series of its own."""
    series = [make_series(tmp_path / f"src{i}", per_sender, f"{tag}{i}") for i in range(senders_n)]
    everything = [s for group in series for s in group]
    proc = new_node().start()
    senders = [Sender(proc.port, [s.path for s in group], tmp_path / f"sender{i}.log")
               for i, group in enumerate(series)]
    return series, everything, proc, senders


# -- 6. the target: 4 senders x 50 images, SIGKILL from outside mid-flow ------------------------------
def test_four_senders_kill9_mid_flow_restart_every_acknowledged_image_once(new_node, pacs, keys, watermarker,
                                                                           tmp_path):
    t0 = time.perf_counter()
    per_sender, senders_n = 50, 4
    series, everything, proc, senders = _node_and_senders(new_node, tmp_path, senders_n, per_sender, "target")
    acked: list[set[Path]] = []
    try:
        kill_at = len(everything) // 3
        wait_for(lambda: received_count(proc) >= kill_at or not proc.alive(), 120,
                 f"{kill_at} objects received", interval=0.01)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait_dead(30) == -signal.SIGKILL
        for sender in senders:
            acked.append(sender.wait(60)[1])
    finally:
        for sender in senders:
            sender.end()
    first_round = sum(len(a) for a in acked)
    # "received" is written before the status goes back, so a few spooled ones were not acknowledged
    assert 0 < first_round < len(everything), "the kill did not land mid-flow"
    after_kill = proc.depth()
    # The killed node's node.json is still there; status must see that no node runs (exit 1) and
    # show the spool's depths, not try the dead endpoint.
    result = status_cli(proc.spool)
    assert result.returncode == 1, result.stdout + result.stderr
    snap = json.loads(result.stdout.strip().splitlines()[-1])
    assert snap["running"] is False and snap["queue"] == after_kill

    proc.start()
    errors: list[BaseException] = []

    def resend(i: int) -> None:
        try:
            acked[i] = store_until_acknowledged(proc.port, [s.path for s in series[i]], tmp_path, f"resend{i}",
                                                acked=acked[i])
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=resend, args=(i,)) for i in range(senders_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not errors, errors
    assert all(len(a) == per_sender for a in acked)
    proc.wait_drained(120)
    report = assert_delivered_once(pacs, everything, keys[1], watermarker, tmp_path / "got", proc)
    wall_s = time.perf_counter() - t0
    print(f"\ntarget: {senders_n}x{per_sender} images, killed after {first_round} acknowledged "
          f"(spool then {after_kill}); {report}; wall {wall_s:.1f} s")


# -- 7. SIGTERM while images flow ---------------------------------------------------------------------
def test_sigterm_mid_flow_exits_0_and_nothing_acknowledged_is_lost(new_node, pacs, keys, watermarker, tmp_path):
    series, everything, proc, senders = _node_and_senders(new_node, tmp_path, 2, 30, "term")
    acked: list[set[Path]] = []
    try:
        wait_for(lambda: received_count(proc) >= 15, 60, "15 objects received", interval=0.01)
        t_term = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait_dead(45) == 0
        assert time.monotonic() - t_term < 30
        for sender in senders:
            acked.append(sender.wait(60)[1])
    finally:
        for sender in senders:
            sender.end()
    stopped = proc.events("node_stopped")
    assert stopped, "no node_stopped line: the shutdown was not the graceful one"

    proc.start()
    for i, group in enumerate(series):
        acked[i] = store_until_acknowledged(proc.port, [s.path for s in group], tmp_path, f"resend{i}",
                                            acked=acked[i])
    proc.wait_drained(60)
    assert_delivered_once(pacs, everything, keys[1], watermarker, tmp_path / "got", proc)


# -- 8. folder watch ----------------------------------------------------------------------------------
def test_folder_watch_delivers_files_and_refuses_a_non_dicom_one(new_node, pacs, keys, watermarker, tmp_path):
    watched = tmp_path / "watched"
    watched.mkdir()
    proc = new_node(extra=("--watch", str(watched)), listen="off").start()
    assert proc.info["dicom"] is None
    sources = make_series(tmp_path / "src", 3, "watch")
    for s in sources:
        shutil.copy(s.path, watched / s.path.name)
    (watched / "notes.txt").write_text("not a DICOM file\n")

    def settled():
        left = [p for p in watched.rglob("*") if p.is_file() and "refused" not in p.relative_to(watched).parts]
        return not left and (watched / "refused" / "notes.txt.reason.json").exists()

    wait_for(settled, 60, "the watched folder to be taken", details=lambda: str(list(watched.rglob("*"))))
    assert (watched / "refused" / "notes.txt").read_text() == "not a DICOM file\n"
    reason = json.loads((watched / "refused" / "notes.txt.reason.json").read_text())
    assert reason["status_code"] == CANNOT_UNDERSTAND and reason["reason"]
    proc.wait_drained(60)
    assert_delivered_once(pacs, sources, keys[1], watermarker, tmp_path / "got", proc)
    audit = proc.audit()
    assert sum(r["event"] == "received" and r["calling_ae"] == "folder-watch" for r in audit) == 3
    assert any(r["event"] == "refused" and r["calling_ae"] == "folder-watch" for r in audit)


# -- 9. the PACS down, then up ------------------------------------------------------------------------
def test_pacs_down_then_up_images_wait_in_outgoing_then_arrive(new_node, keys, watermarker, tmp_path):
    late = Orthanc(tmp_path / "late-pacs", aet="LATEPACS")
    try:
        proc = new_node(forward=late.address).start()
        sources = make_series(tmp_path / "src", 3, "pacsdown")
        code, acked = store(proc.port, [s.path for s in sources], tmp_path / "storescu.log")
        assert code == 0 and len(acked) == 3
        wait_for(lambda: proc.depth()["outgoing"] == 3 and proc.events("forward_retry"), 60,
                 "3 objects waiting in outgoing/ with a forward_retry line", details=lambda: str(proc.depth()))
        time.sleep(1.0)
        assert proc.depth() == {"received": 0, "outgoing": 3, "quarantine": 0}
        late.start()
        proc.wait_drained(90)
        assert_delivered_once(late, sources, keys[1], watermarker, tmp_path / "got", proc)
    finally:
        late.stop()


# -- 9b. a PACS that refuses ------------------------------------------------------------------------
def test_a_pacs_that_refuses_an_image_puts_it_in_quarantine_with_its_status(new_node, keys, tmp_path):
    """A PACS that cannot store answers C-STORE with a refusal: DCMTK's storescp whose output
    folder was replaced by a file answers 0xA700 (out of resources) to every image. (Orthanc 1.10,
    the Debian one, cannot be made to refuse: its Lua filter answers success, a storage error
    ends its worker without a response.) After forward-retries refusals the image is held with
    the PACS's status: not lost, not retried forever."""
    out = tmp_path / "picky-out"
    out.mkdir()
    port = peers.free_port()
    scp = subprocess.Popen([str(peers.STORESCP), "-aet", "PICKY", "-od", str(out), str(port)],
                           env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    config = tmp_path / "node.toml"
    config.write_text("forward-retries = 2\nbackoff-s = 0.1\nbackoff-max-s = 0.2\n")
    try:
        wait_for(lambda: _listening(port), 30, "storescp to listen")
        out.rmdir()
        out.write_bytes(b"")  # every file storescp writes now fails
        proc = new_node(forward=f"PICKY@{HOST}:{port}", extra=("--config", str(config))).start()
        sources = make_series(tmp_path / "src", 2, "refused")
        code, acked = store(proc.port, [s.path for s in sources], tmp_path / "storescu.log")
        assert code == 0 and len(acked) == 2
        wait_for(lambda: proc.depth()["quarantine"] == 2, 60, "both images in quarantine",
                 details=lambda: str(proc.depth()))
        assert proc.depth() == {"received": 0, "outgoing": 0, "quarantine": 2}
        reasons = [json.loads(p.read_text()) for p in (proc.spool / "quarantine").glob("*.reason.json")]
        assert all(r["status"] == "forward_refused" and r["status_code"] == 0xA700 for r in reasons), reasons
        assert all("refused it 3 times" in r["reason"] for r in reasons), reasons
        held = proc.events("quarantined")
        assert len(held) == 2 and all(e["destination"] == f"PICKY@{HOST}:{port}" for e in held)
    finally:
        peers.end_process(scp)


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex((HOST, port)) == 0


# -- 10. status ---------------------------------------------------------------------------------------
def test_status_command_and_prometheus_metrics(node, tmp_path):
    sources = make_series(tmp_path / "src", 2, "status")
    code, acked = store(node.port, [s.path for s in sources], tmp_path / "storescu.log")
    assert code == 0 and len(acked) == 2
    node.wait_drained(60)
    result = status_cli(node.spool)
    assert result.returncode == 0, result.stdout + result.stderr
    snap = json.loads(result.stdout.strip().splitlines()[-1])
    assert snap["running"] is True
    counters = snap["counters"]
    assert counters["received"] >= 2 and counters["forwarded"] >= 2
    for stage in ("receive", "forward", "receive_to_forward"):
        s = snap["stages"][stage]
        assert 0 < s["p50"] <= s["p99"] <= s["max"] and s["n"] >= 2
    assert snap["gauges"]["queue_received"] == 0 and snap["gauges"]["queue_outgoing"] == 0

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(node.info["status_url"] + "/metrics", timeout=10) as response:
        text = response.read().decode()
    forwarded = [line for line in text.splitlines() if line.startswith("medsec_edge_node_forwarded_total ")]
    assert forwarded and int(float(forwarded[0].split()[1])) >= counters["forwarded"]
