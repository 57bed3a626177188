"""TLS contexts for the node's two sides, from certificate, key and CA paths (DICOM PS3.15 B.1).

Layer: runtime (node, standard library ``ssl``). TLS 1.2 at least. Receiving: our certificate
and key; with a CA the sender must present a certificate it signed (mutual TLS). Forwarding: the
PACS's certificate is checked against the CA (the system's if only our certificate is given); our own
certificate is presented when one is configured.
"""

from __future__ import annotations

import ssl

from medsec_edge.runtime.errors import ConfigError
from medsec_edge.runtime.node.config import TlsConfig

__all__ = ["client_context", "server_context"]


def server_context(tls: TlsConfig) -> ssl.SSLContext | None:
    if not tls.enabled:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(ctx, tls)
    if tls.ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(tls: TlsConfig) -> ssl.SSLContext | None:
    if not tls.enabled:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.ca is None:
        ctx.load_default_certs()
    _load(ctx, tls)
    return ctx


def _load(ctx: ssl.SSLContext, tls: TlsConfig) -> None:
    try:
        if tls.cert is not None:
            ctx.load_cert_chain(tls.cert, tls.key)
        if tls.ca is not None:
            ctx.load_verify_locations(cafile=tls.ca)
    except (OSError, ssl.SSLError) as exc:
        # the message names the file, never its contents (a key)
        raise ConfigError(f"TLS certificate, key or CA cannot be loaded ({type(exc).__name__}: "
                          f"{getattr(exc, 'strerror', None) or getattr(exc, 'reason', None) or 'invalid'}); "
                          f"check the paths and that the key matches the certificate") from None
