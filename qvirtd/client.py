"""Async JSON-RPC client for the daemon's socket (used by qvirsh, tests and benchmarks).

Several calls may be in flight on one connection; replies are matched by id. Notifications
(`event`, `event-overflow`) go to a bounded queue that `next_event()` reads.
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


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.notifications: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=100000)
        self._reader_task = asyncio.create_task(self._read_loop())

    @classmethod
    async def connect(cls, path: str | Path, limit: int = 64 * 1024 * 1024) -> Client:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            with short_path(Path(path)) as where:
                sock.connect(where)  # local UNIX socket: does not block
        except OSError:
            sock.close()
            raise
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=limit)
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
                    fut = self._pending.pop(msg["id"], None) if msg["id"] is not None else None
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
                    elif msg["id"] is None and "error" in msg:
                        # An error the daemon could not tie to a request (parse error, ...).
                        with contextlib.suppress(asyncio.QueueFull):
                            self.notifications.put_nowait(msg)
                elif "method" in msg:
                    with contextlib.suppress(asyncio.QueueFull):
                        self.notifications.put_nowait(msg)
        except (ConnectionError, json.JSONDecodeError, ValueError) as exc:
            error = ConnectionLost(f"connection to qvirtd broken: {exc}")
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(error)
            self._pending.clear()
            with contextlib.suppress(asyncio.QueueFull):
                self.notifications.put_nowait({"method": "__closed__"})

    async def call(self, method: str, params: dict[str, Any] | None = None,
                   timeout_s: float | None = None) -> Any:
        req_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = fut
        msg = {"jsonrpc": "2.0", "id": req_id, "method": method, "params": params or {}}
        self._writer.write(json.dumps(msg).encode() + b"\n")
        await self._writer.drain()
        reply = await asyncio.wait_for(fut, timeout_s) if timeout_s else await fut
        if "error" in reply:
            err = reply["error"]
            kind = (err.get("data") or {}).get("kind")
            raise RpcError(err.get("code", 0), err.get("message", "unknown error"), kind)
        return reply["result"]

    async def next_event(self, timeout_s: float | None = None) -> dict[str, Any] | None:
        """The next notification; None when the connection closed."""
        msg = await (asyncio.wait_for(self.notifications.get(), timeout_s) if timeout_s
                     else self.notifications.get())
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
