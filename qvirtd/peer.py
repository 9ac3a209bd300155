"""Another qvirtd, as a migration talks to it: where it is, one connection, bounded calls.

A destination is named by a URI: `unix:///path/to/qvirtd.sock` (a daemon on this machine,
under another `--root` for example) or `tls://host:port` (another host's daemon listening
with `listen_tls`; mutual TLS with the certificates of `tls_dir`, tls.py). The connection
is made without blocking the loop (rule L6: a full listen backlog is retried, bounded; the
TLS files are read in a worker thread, the handshake bounded), every call is bounded by
`peer_timeout_s`, and every call is made inside `ctx.remote()` by the caller (no lock
held, the domain re-checked afterwards).

Errors: `PeerError` (kind `peer`) when the peer cannot be reached or does not answer in
time: the outcome of that call is unknown. An error the peer answered with is re-raised as
the peer's own (`PeerRefusedError`, with the peer's kind), a definite answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .client import Client, ConnectionLost, RpcError
from .errors import InvalidOperationError, QvirtError
from .qemu.unixpath import connect_unix
from .tls import HANDSHAKE_S, client_context, split_hostport

LIMIT = 64 * 1024 * 1024


class PeerError(QvirtError):
    """The peer daemon could not be reached, or did not answer in time (outcome unknown)."""

    kind = "peer"


class PeerRefusedError(QvirtError):
    """The peer daemon answered with an error (a definite answer)."""

    kind = "peer-refused"

    def __init__(self, message: str, peer_kind: str | None) -> None:
        super().__init__(message)
        self.peer_kind = peer_kind


def parse_uri(uri: str) -> Path | tuple[str, int]:
    """A destination URI: the socket path (unix://) or (host, port) (tls://)."""
    parsed = urlparse(uri)
    if parsed.scheme == "unix" and not parsed.netloc and parsed.path.startswith("/"):
        return Path(parsed.path)
    if parsed.scheme == "tls" and parsed.netloc and parsed.path in ("", "/"):
        return split_hostport(parsed.netloc, "destination")
    raise InvalidOperationError(f"destination {uri!r}: give unix:///PATH/qvirtd.sock (a "
                                "qvirtd on this machine) or tls://HOST:PORT")


class Peer:
    """One connection to a peer daemon."""

    def __init__(self, uri: str, client: Client, timeout_s: float,
                 tls_host: str | None = None) -> None:
        self.uri = uri
        self._client = client
        self.timeout_s = timeout_s
        self.tls_host = tls_host  # the host of a tls:// peer (its QEMU streams there too)

    @classmethod
    async def connect(cls, uri: str, timeout_s: float, tls_dir: Path | None = None) -> Peer:
        where = parse_uri(uri)
        try:
            async with asyncio.timeout(timeout_s):
                if isinstance(where, Path):
                    sock = await connect_unix(where)
                    reader, writer = await asyncio.open_unix_connection(
                        sock=sock, limit=LIMIT)
                else:
                    if tls_dir is None:
                        raise InvalidOperationError("no tls_dir for a tls:// destination")
                    context = await asyncio.to_thread(client_context, tls_dir)
                    reader, writer = await asyncio.open_connection(
                        where[0], where[1], ssl=context, server_hostname=where[0],
                        limit=LIMIT, ssl_handshake_timeout=HANDSHAKE_S)
        except TimeoutError:
            raise PeerError(f"the destination {uri} did not accept a connection within "
                            f"{timeout_s:g} s") from None
        except OSError as exc:  # ssl.SSLError too: a certificate refused either way
            raise PeerError(f"cannot reach the destination {uri}: "
                            f"{exc.strerror or exc}") from exc
        return cls(uri, Client(reader, writer), timeout_s,
                   None if isinstance(where, Path) else where[0])

    async def call(self, method: str, params: dict[str, Any],
                   timeout_s: float | None = None) -> Any:
        try:
            return await self._client.call(method, params, timeout_s or self.timeout_s)
        except TimeoutError:
            raise PeerError(f"the destination {self.uri} did not answer '{method}' within "
                            f"{timeout_s or self.timeout_s:g} s") from None
        except RpcError as exc:
            raise PeerRefusedError(f"the destination {self.uri} refused '{method}': {exc}",
                                   exc.kind) from None
        except (ConnectionLost, OSError) as exc:
            raise PeerError(f"the connection to the destination {self.uri} broke during "
                            f"'{method}': {exc}") from exc

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._client.close()
