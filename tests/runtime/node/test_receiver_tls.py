"""The receiver over TLS (and mutual TLS), and its answer when the spool cannot store.

A real node on loopback receives from a real pynetdicom SCU; certificates are made here with
``cryptography`` (a CA, the node's certificate, a modality's). Nothing is forwarded (the PACS
address is unused), so no PACS is needed: what is checked is the receiving side.
"""

from __future__ import annotations

import datetime
import shutil
import socket
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydicom import dcmread
from pynetdicom import AE

from medsec_edge.runtime.node.audit import read_audit
from medsec_edge.runtime.node.config import load_config
from medsec_edge.runtime.node.node import Node
from medsec_edge.runtime.node.processor import Job

REPO = Path(__file__).resolve().parents[3]
CT = REPO / "samples" / "CT_small.dcm"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cert(name: str, issuer_key, issuer_name, key, *, ca: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                                     x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]),
                                        critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = _cert("test CA", ca_key, ca_name, ca_key, ca=True)
    files = {"ca": root / "ca.pem"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for who in ("node", "modality"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(who, ca_key, ca_name, key)
        files[f"{who}_cert"] = root / f"{who}.pem"
        files[f"{who}_key"] = root / f"{who}.key"
        files[f"{who}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{who}_key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    return files


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    from medsec_edge.runtime.node.node import load_job

    root = tmp_path_factory.mktemp("job")
    cfg = load_config(spool=root / "unused", forward="P@127.0.0.1:104", keys=root / "keys",
                      registry=root / "registry.sqlite3")
    return load_job(cfg)


def _node(tmp_path, job: Job, **settings) -> Node:
    cfg = load_config(spool=tmp_path / "spool", forward=f"PACS@127.0.0.1:{_free_port()}", listen="127.0.0.1:0",
                      workers=1, **settings)
    node = Node(cfg, job=job)
    node.start()
    return node


def _store(port: int, context: ssl.SSLContext | None = None):
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CT_STORAGE)
    assoc = ae.associate("127.0.0.1", port, ae_title="EDGE",
                         tls_args=(context, "localhost") if context is not None else None)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(dcmread(CT))
        return int(status.Status) if status else None
    finally:
        assoc.release()


def _client(pki, *, with_cert: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
    if with_cert:
        ctx.load_cert_chain(pki["modality_cert"], pki["modality_key"])
    return ctx


def test_tls_store_is_received_and_a_plain_one_is_not(tmp_path, pki, job):
    node = _node(tmp_path, job, tls_cert=pki["node_cert"], tls_key=pki["node_key"])
    try:
        assert _store(node.dicom_port, _client(pki, with_cert=False)) == 0x0000
        assert _store(node.dicom_port) is None  # plain DICOM to a TLS port: no association
        accepted = [e for e in read_audit(node.config.audit_path) if e["event"] == "association_accepted"]
        assert len(accepted) == 1 and accepted[0]["tls"] is True
    finally:
        node.stop(drain_s=0.1)


def test_mutual_tls_needs_a_certificate_the_ca_signed(tmp_path, pki, job):
    node = _node(tmp_path, job, tls_cert=pki["node_cert"], tls_key=pki["node_key"], tls_ca=pki["ca"])
    try:
        assert _store(node.dicom_port, _client(pki, with_cert=False)) is None
        assert _store(node.dicom_port, _client(pki, with_cert=True)) == 0x0000
    finally:
        node.stop(drain_s=0.1)


def test_a_spool_that_cannot_store_answers_out_of_resources_and_recovers(tmp_path, job):
    node = _node(tmp_path, job)
    received = node.spool.received
    try:
        shutil.rmtree(received)
        received.write_text("a file where the folder was: every write fails")
        assert _store(node.dicom_port) == 0xA700  # the modality keeps the image and resends
        refused = [e for e in read_audit(node.config.audit_path) if e["event"] == "refused"]
        assert refused and refused[-1]["status_code"] == 0xA700 and "spool write failed" in refused[-1]["reason"]
        received.unlink()
        received.mkdir(mode=0o700)
        assert _store(node.dicom_port) == 0x0000  # the next one is served
    finally:
        node.stop(drain_s=0.1)


def _store_bytes_of(port: int, ds) -> int | None:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(str(ds.SOPClassUID))
    assoc = ae.associate("127.0.0.1", port, ae_title="EDGE")
    try:
        status = assoc.send_c_store(ds)
        return int(status.Status) if status else None
    finally:
        assoc.release()


def _report():
    ds = dcmread(CT)
    del ds.PixelData
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    return ds


def test_an_object_without_pixels_is_refused_unless_the_policy_lets_it_pass(tmp_path, job):
    node = _node(tmp_path / "refuse", job)
    try:
        assert _store_bytes_of(node.dicom_port, _report()) == 0xC000
        assert node.spool.depth() == {"received": 0, "outgoing": 0, "quarantine": 0}
    finally:
        node.stop(drain_s=0.1)
    node = _node(tmp_path / "pass", job, on_non_image="forward-unchanged")
    try:
        assert _store_bytes_of(node.dicom_port, _report()) == 0x0000
        # straight to outgoing/ (nothing to watermark), unchanged: same SOP Instance UID
        (held,) = node.spool.outgoing.glob("*.dcm")
        assert dcmread(held).SOPInstanceUID == _report().SOPInstanceUID
        assert node.spool.depth()["received"] == 0
        received = [e for e in read_audit(node.config.audit_path) if e["event"] == "received"]
        assert "forwarded unchanged" in received[0]["action"]
    finally:
        node.stop(drain_s=0.1)


def test_stop_ends_an_association_the_sender_holds_open(tmp_path, job):
    node = _node(tmp_path, job)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CT_STORAGE)
    assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title="EDGE")
    assert assoc.is_established
    import time

    t0 = time.monotonic()
    node.stop(drain_s=0.1)
    assert time.monotonic() - t0 < 20
    deadline = time.monotonic() + 10
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted or not assoc.is_established


def test_forwarding_over_tls_to_a_tls_peer(tmp_path, pki, job):
    """Node A forwards over TLS (checking the peer's certificate against the CA, presenting its own)
    to node B, which requires mutual TLS: B receives A's output; without TLS A cannot reach B."""
    b = _node(tmp_path / "b", job, tls_cert=pki["node_cert"], tls_key=pki["node_key"], tls_ca=pki["ca"])
    a_cfg = load_config(spool=tmp_path / "a" / "spool", forward=f"EDGE@127.0.0.1:{b.dicom_port}",
                        listen="127.0.0.1:0", workers=1, forward_tls_ca=pki["ca"],
                        forward_tls_cert=pki["modality_cert"], forward_tls_key=pki["modality_key"])
    a = Node(a_cfg, job=job)
    a.start()
    try:
        assert _store(a.dicom_port) == 0x0000
        import time

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(
                e["event"] == "received" for e in read_audit(b.config.audit_path)):
            time.sleep(0.1)
        got = [e for e in read_audit(b.config.audit_path) if e["event"] == "received"]
        assert len(got) == 1 and got[0]["calling_ae"] == "EDGE"
        accepted = [e for e in read_audit(b.config.audit_path) if e["event"] == "association_accepted"]
        assert accepted and all(e["tls"] for e in accepted)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and a.spool.depth()["outgoing"]:
            time.sleep(0.1)
        assert a.spool.depth() == {"received": 0, "outgoing": 0, "quarantine": 0}
    finally:
        a.stop(drain_s=0.1)
        b.stop(drain_s=0.1)
