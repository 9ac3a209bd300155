"""Async JSON-RPC client for the daemon's socket (used by qvirsh, tests and benchmarks).

Several calls may be in flight on one connection; replies are matched by id. Notifications
(`event`, `event-overflow`) go to a bounded queue that `next_event()` reads.

An error reply with id null is the daemon saying it could not read a request of ours (parse
error, message too large) or will not serve this connection (too many clients, idle): every
call pending then fails with the daemon's own message, and so does every later call once the
daemon has closed the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
from pathlib import Path
from typing import Any

from .qemu.unixpath import short_path


class RpcError(Exception):
    """An error reply: `code` is the JSON-RPC code, `kind` the daemon's error kind."""

    def __init__(self, code: int, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.kind = kind


class ConnectionLost(Exception):
    pass


def _rpc_error(err: Any) -> RpcError:
    if not isinstance(err, dict):
        return RpcError(0, f"malformed error reply: {err!r}")
    kind = (err.get("data") or {}).get("kind")
    return RpcError(err.get("code", 0), err.get("message", "unknown error"), kind)


def _connected(path: str | Path) -> socket.socket:
    """A socket connected to the daemon at `path` (a local UNIX socket: qvirsh may block
    here; the daemon itself uses qemu/unixpath.connect_unix)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with short_path(Path(path)) as where:
            sock.connect(where)
    except OSError:
        sock.close()
        raise
    return sock


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.notifications: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=100000)
        self._daemon_error: RpcError | None = None  # the last error reply with id null
        self._closed_error: Exception | None = None  # set once the connection is gone
        self._reader_task = asyncio.create_task(self._read_loop())

    @classmethod
    async def connect(cls, path: str | Path, limit: int = 64 * 1024 * 1024) -> Client:
        reader, writer = await asyncio.open_unix_connection(sock=_connected(path),
                                                            limit=limit)
        return cls(reader, writer)

    async def _read_loop(self) -> None:
        error: Exception = ConnectionLost("connection to qvirtd closed")
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                msg = json.loads(line)
                if "id" in msg and ("result" in msg or "error" in msg):
                    if msg["id"] is None:
                        if "error" in msg:
                            # Not tied to a request: it concerns whatever is pending.
                            self._daemon_error = _rpc_error(msg["error"])
                            self._fail_pending(self._daemon_error)
                            with contextlib.suppress(asyncio.QueueFull):
                                self.notifications.put_nowait(msg)
                        continue
                    self._daemon_error = None
                    fut = self._pending.pop(msg["id"], None)
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
                elif "method" in msg:
                    with contextlib.suppress(asyncio.QueueFull):
                        self.notifications.put_nowait(msg)
        except (ConnectionError, ValueError, RecursionError) as exc:
            error = ConnectionLost(f"connection to qvirtd broken: {exc}")
        finally:
            # The daemon's own words, if it said why before it closed the connection.
            if self._daemon_error is not None:
                error = self._daemon_error
            self._closed_error = error
            self._fail_pending(error)
            with contextlib.suppress(asyncio.QueueFull):
                self.notifications.put_nowait({"method": "__closed__"})

    def _fail_pending(self, error: Exception) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(error)
        self._pending.clear()

    async def call(self, method: str, params: dict[str, Any] | None = None,
                   timeout_s: float | None = None) -> Any:
        if self._closed_error is not None:
            raise self._closed_error
        req_id = next(self._ids)
        msg = {"jsonrpc": "2.0", "id": req_id, "method": method, "params": params or {}}
        data = json.dumps(msg).encode() + b"\n"
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = fut
        try:
            self._writer.write(data)
            await self._writer.drain()
        except (ConnectionError, RuntimeError):
            pass  # the connection is gone: the reader fails `fut`, with the daemon's reason
        try:
            # asyncio.timeout, not wait_for: no extra callback hop between the reply and us
            async with asyncio.timeout(timeout_s or None):
                reply = await fut
        finally:
            self._pending.pop(req_id, None)
        if "error" in reply:
            raise _rpc_error(reply["error"])
        return reply["result"]

    async def next_event(self, timeout_s: float | None = None) -> dict[str, Any] | None:
        """The next notification; None when the connection closed."""
        # asyncio.timeout: wait_for would run the get() in a task of its own, two more
        # turns of the loop between the event's arrival and its reader.
        async with asyncio.timeout(timeout_s or None):
            msg = await self.notifications.get()
        if msg.get("method") == "__closed__":
            return None
        return msg

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()
        self._reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader_task

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def open_stream(path: str | Path, method: str, params: dict[str, Any],
                      timeout_s: float = 30.0) -> tuple[Any, asyncio.StreamReader,
                                                        asyncio.StreamWriter]:
    """Call an upgrade method (`console`) on a connection of its own: its result, then the
    connection's reader and writer for the raw bytes that follow the reply (RpcError if
    the daemon refused; the connection is then closed)."""
    reader, writer = await asyncio.open_unix_connection(sock=_connected(path))
    try:
        writer.write(json.dumps({"jsonrpc": "2.0", "id": 1, "method": method,
                                 "params": params}).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout_s)
        if not line:
            raise ConnectionLost("connection to qvirtd closed")
        reply = json.loads(line)
        if "error" in reply:
            raise _rpc_error(reply["error"])
        return reply.get("result"), reader, writer
    except BaseException:
        writer.close()
        raise
