"""Mutual TLS between qvirtd daemons on different hosts (migration), and for their QEMUs.

One directory (`tls_dir`, default /etc/pki/qvirtd) holds the files in the layout QEMU's
`tls-creds-x509` object reads (and libvirt's /etc/pki/qemu uses):

    ca-cert.pem                      the CA every daemon of the cluster trusts
    server-cert.pem, server-key.pem  this host as a server (its name or address in the
                                     certificate's subjectAltName)
    client-cert.pem, client-key.pem  this host as a client

The daemon listens on TCP only when `listen_tls` is set ("HOST:PORT"); a client must show a
certificate signed by the CA (CERT_REQUIRED), and may call only the methods a peer daemon
needs (`PEER_METHODS`): a migration's prepare and finish and a few queries. A migration to
`tls://HOST:PORT` makes the daemons talk over that connection, and their QEMUs stream over
TCP with the same certificates (`tls-creds-x509` objects, verify-peer on).
"""

from __future__ import annotations

import ssl
from pathlib import Path

from .errors import InvalidOperationError

CA = "ca-cert.pem"
SERVER_CERT, SERVER_KEY = "server-cert.pem", "server-key.pem"
CLIENT_CERT, CLIENT_KEY = "client-cert.pem", "client-key.pem"
HANDSHAKE_S = 10.0

# What a TLS client (a peer daemon) may call.
PEER_METHODS = frozenset({"migrate-prepare", "migrate-finish", "domjobinfo", "dominfo",
                          "list"})


def split_hostport(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidOperationError(f"{what} {text!r}: give HOST:PORT")
    return host, int(port)


def _load(ctx: ssl.SSLContext, tls_dir: Path, cert: str, key: str) -> ssl.SSLContext:
    try:
        ctx.load_verify_locations(cafile=str(tls_dir / CA))
        ctx.load_cert_chain(str(tls_dir / cert), str(tls_dir / key))
    except (OSError, ssl.SSLError) as exc:
        raise InvalidOperationError(f"TLS files in {tls_dir} ({CA}, {cert}, {key}) cannot be "
                                    f"used: {exc}") from exc
    return ctx


def server_context(tls_dir: Path) -> ssl.SSLContext:
    """Blocking (reads the files): the listener's context; clients must show a certificate
    the CA signed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    return _load(ctx, tls_dir, SERVER_CERT, SERVER_KEY)


def client_context(tls_dir: Path) -> ssl.SSLContext:
    """Blocking (reads the files): a peer connection's context; the server's certificate
    must be the CA's and name the host we asked for."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return _load(ctx, tls_dir, CLIENT_CERT, CLIENT_KEY)


def qemu_creds(obj_id: str, tls_dir: Path, endpoint: str) -> dict[str, object]:
    """`object-add` arguments of QEMU's x509 credentials for a migration stream."""
    return {"qom-type": "tls-creds-x509", "id": obj_id, "dir": str(tls_dir),
            "endpoint": endpoint, "verify-peer": True}


def peer_name(peercert: object) -> str:
    """A peer certificate's subject CN (for logs: who asked)."""
    if isinstance(peercert, dict):
        for rdn in peercert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    return str(value)
    return "?"
