"""A throwaway CA and the server and client certificates qvirtd and QEMU read from a
`tls_dir` (made with the openssl command, for tests of migration over TLS)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_tls_dir(where: Path, host: str = "127.0.0.1") -> Path:
    """ca-cert.pem, server-cert.pem/-key.pem (for `host` and localhost), client-cert.pem/
    -key.pem, all signed by ca-cert.pem, in `where` (returned)."""
    where.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-subj", "/CN=qvirtd test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=where)
    for role, usage in (("server", "serverAuth"), ("client", "clientAuth")):
        ext = where / f"{role}.ext"
        ext.write_text("basicConstraints=critical,CA:FALSE\n"
                       "keyUsage=critical,digitalSignature,keyEncipherment\n"
                       f"extendedKeyUsage={usage}\n"
                       f"subjectAltName=IP:{host},DNS:localhost\n")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{role}-key.pem",
                 "-out", f"{role}.csr", "-subj", f"/CN=qvirtd test {role}", cwd=where)
        _openssl("x509", "-req", "-in", f"{role}.csr", "-CA", "ca-cert.pem", "-CAkey",
                 "ca-key.pem", "-CAcreateserial", "-days", "2", "-out", f"{role}-cert.pem",
                 "-extfile", ext.name, cwd=where)
    for key in where.glob("*-key.pem"):
        key.chmod(0o600)
    return where
