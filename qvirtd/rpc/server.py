"""JSON-RPC 2.0 over the UNIX socket: one JSON object per line, each way.

Limits that keep one client from hurting the others or the daemon:
* a line longer than `max_message_bytes` gets an error reply and the connection is closed
  (there is no way to find the next message boundary that is both cheap and safe);
* bytes that are not JSON get a parse-error reply; a client that keeps sending them is cut off;
* at most `max_requests_in_flight` requests per client run at once; more get an error reply;
* every request runs as its own task, so a client that disconnects does not cancel an
  operation half-way (the reply is simply dropped).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError

from ..errors import QvirtError, describe_validation_error
from .methods import Caller, Method, Params

log = logging.getLogger(__name__)

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
OPERATION_FAILED = -32000
TOO_MANY_REQUESTS = -32001
MESSAGE_TOO_LARGE = -32002

MAX_BAD_MESSAGES = 8

# A method that needs the connection itself (it streams to it): params model and handler.
ConnectionMethod = tuple[type[Params], Callable[["Connection", Any], Awaitable[Any]]]


def peer_credentials(writer: asyncio.StreamWriter) -> Caller:
    sock = writer.get_extra_info("socket")
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", raw)
        return Caller(pid, uid)
    except (OSError, AttributeError):
        return Caller(None, None)


def error_reply(req_id: Any, code: int, message: str, kind: str | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if kind is not None:
        err["data"] = {"kind": kind}
    return {"jsonrpc": "2.0", "id": req_id, "error": err}


class Connection:
    """One client connection: framing, limits, and its in-flight requests."""

    def __init__(self, server: RpcServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.caller = peer_credentials(writer)
        self.in_flight = 0
        self.closed = False
        self._write_lock = asyncio.Lock()

    async def send(self, obj: dict[str, Any]) -> None:
        """Write one message; a slow or gone client only loses its own messages."""
        await self.send_line(json.dumps(obj, separators=(",", ":")).encode() + b"\n")

    async def send_line(self, data: bytes) -> None:
        """Write one encoded message line (an event notification is encoded only once)."""
        if self.closed:
            return
        try:
            async with self._write_lock:  # one writer at a time keeps lines whole
                self.writer.write(data)
                # asyncio.timeout, not wait_for: no extra task per message on 3.11.
                async with asyncio.timeout(self.server.write_timeout_s):
                    await self.writer.drain()
        except (ConnectionError, TimeoutError, RuntimeError):
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.writer.close()

    async def serve(self) -> None:
        bad = 0
        limit = self.server.max_message_bytes
        try:
            while not self.closed:
                try:
                    line = await self.reader.readuntil(b"\n")
                except asyncio.IncompleteReadError as exc:
                    if exc.partial.strip():
                        await self.send(error_reply(None, INVALID_REQUEST,
                                                    "message not terminated by a newline"))
                    break
                except asyncio.LimitOverrunError:
                    await self.send(error_reply(
                        None, MESSAGE_TOO_LARGE,
                        f"message too large: the limit is {limit} bytes per line"))
                    break
                if not line.strip():
                    continue
                try:
                    msg = json.loads(line)
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    bad += 1
                    await self.send(error_reply(None, PARSE_ERROR, f"parse error: {exc}"))
                    if bad >= MAX_BAD_MESSAGES:
                        break
                    continue
                if not self._accept(msg):
                    bad += 1
                    if bad >= MAX_BAD_MESSAGES:
                        break
        except (ConnectionError, OSError):
            pass
        finally:
            self.close()
            self.server.forget(self)

    def _accept(self, msg: Any) -> bool:
        """Validate the envelope and start the request's task; False for a bad envelope."""
        req_id = msg.get("id") if isinstance(msg, dict) else None
        if (not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0"
                or not isinstance(msg.get("method"), str)
                or not isinstance(req_id, str | int | None)
                or isinstance(req_id, bool)):
            self.server.spawn(self.send(error_reply(
                req_id if isinstance(req_id, str | int) else None, INVALID_REQUEST,
                "invalid request: need jsonrpc '2.0', a string 'method' and an id that is a "
                "string, a number or null")))
            return False
        if self.in_flight >= self.server.max_in_flight:
            self.server.spawn(self.send(error_reply(
                req_id, TOO_MANY_REQUESTS,
                f"too many requests in flight (limit {self.server.max_in_flight})")))
            return True
        self.in_flight += 1
        self.server.spawn(self._run(msg, req_id, "id" in msg))
        return True

    async def _run(self, msg: dict[str, Any], req_id: Any, wants_reply: bool) -> None:
        try:
            reply = await self.server.dispatch(self, msg, req_id)
        finally:
            self.in_flight -= 1
        if wants_reply:
            await self.send(reply)


class RpcServer:
    def __init__(self, methods: dict[str, Method], max_message_bytes: int,
                 max_in_flight: int,
                 connection_methods: dict[str, ConnectionMethod] | None = None,
                 write_timeout_s: float = 10.0) -> None:
        self.methods = methods
        self.max_message_bytes = max_message_bytes
        self.max_in_flight = max_in_flight
        self.write_timeout_s = write_timeout_s
        self.connections: set[Connection] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.AbstractServer | None = None
        # Methods that need the connection itself (event subscription) register here.
        self.connection_methods = dict(connection_methods or {})

    def spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def forget(self, conn: Connection) -> None:
        self.connections.discard(conn)

    async def start(self, sock: socket.socket) -> None:
        self._server = await asyncio.start_unix_server(
            self._on_client, sock=sock, limit=self.max_message_bytes)

    async def _on_client(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        conn = Connection(self, reader, writer)
        self.connections.add(conn)
        await conn.serve()

    async def dispatch(self, conn: Connection, msg: dict[str, Any], req_id: Any) -> dict[str, Any]:
        name = msg["method"]
        method = self.methods.get(name)
        conn_method = self.connection_methods.get(name)
        if method is None and conn_method is None:
            return error_reply(req_id, METHOD_NOT_FOUND, f"unknown method '{name}'")
        raw_params = msg.get("params", {})
        if raw_params is None:
            raw_params = {}
        if not isinstance(raw_params, dict):
            return error_reply(req_id, INVALID_PARAMS,
                               "invalid params: params must be an object (named params)")
        model = method.params if method is not None else conn_method[0]  # type: ignore[index]
        try:
            params = model.model_validate(raw_params)
        except ValidationError as exc:
            return error_reply(req_id, INVALID_PARAMS,
                               f"invalid params for '{name}': {describe_validation_error(exc)}")
        try:
            if conn_method is not None:
                result = await conn_method[1](conn, params)
            else:
                assert method is not None
                result = await method.handler(params, conn.caller)
        except QvirtError as exc:
            return error_reply(req_id, OPERATION_FAILED, str(exc), exc.kind)
        except Exception as exc:
            log.exception("method %s failed", name)
            return error_reply(req_id, INTERNAL_ERROR, f"internal error: {exc}")
        return {"jsonrpc": "2.0", "id": req_id, "result": result}

    async def stop(self, grace_s: float) -> None:
        """Stop accepting; give in-flight requests `grace_s` to finish; close connections."""
        if self._server is not None:
            self._server.close()
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=grace_s)
        for conn in list(self.connections):
            conn.close()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            if self._server is not None:
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
