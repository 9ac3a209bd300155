"""JSON-RPC 2.0 over the UNIX socket: one JSON object per line, each way.

One client can never hurt the daemon or the other clients:
* at most `max_clients` connections at once; one more gets an error line (id null) and is
  closed;
* a line longer than `max_message_bytes` gets an error reply; the daemon then discards what
  the client still sends (briefly, so that the client can read the reply) and closes (there
  is no way to find the next message boundary that is both cheap and safe);
* bytes that are not JSON, or JSON nested too deep to parse, get a parse-error reply; a
  client that keeps sending them is cut off. Params passed on as they are (`definition`,
  `device`, `command`) may nest at most `MAX_JSON_DEPTH` levels;
* a request is in flight from when it is read until its reply is handed to the transport.
  At `max_requests_in_flight` the daemon holds the next request and reads no more until one
  finishes (backpressure: a pipelining client is slowed down, not refused). While the
  client's replies are backed up (it does not read them) that lasts as long as it takes (the
  write timeout bounds it); otherwise its requests are slow operations, and after
  `CAP_WAIT_S` the held request, and every further one until a request finishes, gets
  TOO_MANY_REQUESTS;
* all a client is sent goes through its outbound queue, bounded by bytes
  (`client_outbound_max_bytes`, see outbound.py): a reply that does not fit cuts that client
  off, an event that does not fit ends that subscription (streams.py);
* a connection with nothing in flight, no subscription and no request for
  `client_idle_timeout_s` is closed;
* every request runs as its own task, so a client that disconnects does not cancel an
  operation half-way (the reply is simply dropped); everything else the connection owns
  (subscriptions, replay tasks, its writer) ends with it. Except reads that can answer at
  once (a verb's `now=`: `dominfo`, `list`): while the locks they read are free they are
  answered inline, with no task and no await (docs/design.md, "Inline reads").

A method in `upgrade_methods` (`console`) turns the connection into a raw byte stream: the
daemon stops reading JSON as soon as it sees the request, runs it inline, sends its reply
line, and from then on the connection carries raw bytes both ways for the session the
handler attached (`Connection.upgrade`), until either side closes. Raw output goes through
the same bounded outbound queue; a client that does not read it is detached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from pydantic import ValidationError
from pydantic_core import from_json, to_json

from ..config import Settings
from ..errors import QvirtError, describe_validation_error
from ..locks import WouldWait
from ..tls import HANDSHAKE_S, PEER_METHODS, peer_name
from .limits import FREE_FORM_PARAMS, MAX_JSON_DEPTH, nested_deeper_than
from .methods import Caller, Method, Params
from .outbound import Outbound
from .streams import EventStream

log = logging.getLogger(__name__)

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
OPERATION_FAILED = -32000
TOO_MANY_REQUESTS = -32001
MESSAGE_TOO_LARGE = -32002
TOO_MANY_CLIENTS = -32003
IDLE_TIMEOUT = -32004

MAX_BAD_MESSAGES = 8
# At the in-flight cap, how long a request waits for a slot before TOO_MANY_REQUESTS (when
# the client is reading its replies: its requests in flight are slow operations).
CAP_WAIT_S = 1.0
# After an over-long line: discard input until the client is quiet this long, at most LINGER_S.
LINGER_QUIET_S = 0.5
LINGER_S = 5.0
# Refused connections (max_clients) linger less, and only this many at once.
REFUSE_LINGER_S = 1.0
MAX_REFUSED_LINGERING = 16

# A method that needs the connection itself (it streams to it): params model and handler.
ConnectionMethod = tuple[type[Params], Callable[["Connection", Any], Awaitable[Any]]]
# A read answered inline when the locks it reads are free (verbs.py, `now=`): params model
# and a plain function that returns the result or raises WouldWait.
NowMethod = tuple[type[Params], Callable[["Connection", Any], Any]]


class Upgrade(Protocol):
    """What an upgraded connection serves: raw bytes in (`run`) until it ends (`end`)."""

    closed: bool

    async def run(self, reader: asyncio.StreamReader) -> None: ...
    def end(self, abort: bool = False) -> None: ...


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


def failure_reply(method: str, req_id: Any, exc: Exception) -> dict[str, Any]:
    """The reply to a handler that raised: our errors say what failed; anything else is a
    bug, logged with its traceback and answered as an internal error."""
    if isinstance(exc, QvirtError):
        return error_reply(req_id, OPERATION_FAILED, str(exc), exc.kind)
    log.error("method %s failed", method, exc_info=exc)
    return error_reply(req_id, INTERNAL_ERROR, f"internal error: {exc}")


def encode(obj: Any) -> bytes:
    """One message line. pydantic-core's encoder (Rust): a quarter of json.dumps' time."""
    return to_json(obj) + b"\n"


def decode(line: bytes) -> Any:
    """One received line, parsed (pydantic-core's parser, a fifth of json.loads' time).
    ValueError names what is wrong; nesting deeper than its recursion limit (200, far above
    MAX_JSON_DEPTH) is a RecursionError, as json.loads would raise."""
    try:
        return from_json(line)
    except ValueError as exc:
        if "recursion limit" in str(exc):
            raise RecursionError(str(exc)) from None
        raise


def raise_fd_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard one: every client costs a descriptor."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard and hard != resource.RLIM_INFINITY:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.info("open file limit raised from %d to %d", soft, hard)
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open file limit: %s", exc)


async def discard_input(reader: asyncio.StreamReader, quiet_s: float, max_s: float) -> None:
    """Read and drop input until EOF, `quiet_s` without any, or `max_s` in all."""
    with contextlib.suppress(TimeoutError, ConnectionError, OSError):
        async with asyncio.timeout(max_s):
            while True:
                async with asyncio.timeout(quiet_s):
                    if not await reader.read(1 << 16):
                        return


class Connection:
    """One client connection: framing, limits, its requests in flight, its subscriptions."""

    def __init__(self, server: RpcServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.caller = peer_credentials(writer)
        # A TLS client (a peer daemon): who its certificate names, and what it may call.
        self.allowed: frozenset[str] | None = None
        if writer.get_extra_info("sslcontext") is not None:
            self.caller = Caller(None, None, peer_name(writer.get_extra_info("peercert")))
            self.allowed = PEER_METHODS
        self.running = 0  # requests whose handler has not returned yet
        self.closed = False
        self.outbound = Outbound(writer, server.outbound_max_bytes, server.write_timeout_s,
                                 self._stuck)
        self.streams: set[EventStream] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._saturated = False  # waited CAP_WAIT_S at the cap: refuse until a slot frees
        self.upgraded: Upgrade | None = None  # a raw session (console) once upgraded
        # Received a request, or finished one: the idle time counts from the later.
        self.last_active = asyncio.get_running_loop().time()

    @property
    def in_flight(self) -> int:
        """Requests read whose reply is not yet handed to the transport."""
        return self.running + self.outbound.replies.queued

    def who(self) -> str:
        return f"client pid {self.caller.pid} uid {self.caller.uid}"

    # -- sending -------------------------------------------------------------------------

    async def send(self, obj: dict[str, Any]) -> None:
        """Queue one message (kept for callers outside the server; never blocks)."""
        self.emit(encode(obj))

    async def send_line(self, data: bytes) -> None:
        """Queue one encoded message line."""
        self.emit(data)

    def emit(self, data: bytes) -> None:
        """Queue a line that is not an event; if it does not fit, the client is cut off."""
        if not self.outbound.offer(data):
            self._over_bound(len(data))

    def _reply(self, reply: dict[str, Any], req_id: Any) -> None:
        try:
            data = encode(reply)
        except (TypeError, ValueError, RecursionError) as exc:
            log.error("reply to request %r cannot be encoded: %s", req_id, exc)
            data = encode(error_reply(req_id, INTERNAL_ERROR,
                                      f"internal error: the reply cannot be encoded: {exc}"))
        if not self.outbound.offer(data, self.outbound.replies):
            self._over_bound(len(data))

    def send_raw(self, data: bytes) -> bool:
        """Raw bytes of an upgraded connection; False if they do not fit (not reading)."""
        return self.outbound.offer(data)

    def upgrade(self, session: Upgrade) -> None:
        """Called by an upgrade method's handler: after its reply, the connection is the
        session's (raw bytes both ways)."""
        self.upgraded = session

    def _over_bound(self, size: int) -> None:
        self.cut_off(f"a message of {size} bytes would take its outbound queue past "
                     f"client_outbound_max_bytes ({self.outbound.max_bytes}): "
                     f"{self.outbound.size} bytes are waiting to be read")

    def cut_off(self, why: str) -> None:
        """Close now, dropping whatever is queued: the client is not reading."""
        if self.closed:
            return
        self.server.cut_off += 1
        log.warning("%s cut off: %s", self.who(), why)
        self.close(abort=True)

    def _stuck(self, why: str) -> None:
        if why:
            self.cut_off(why)
        else:
            self.close(abort=True)

    # -- what the connection owns -----------------------------------------------------------

    def add_stream(self, stream: EventStream) -> None:
        if self.closed:
            stream.close()
        else:
            self.streams.add(stream)

    def forget_stream(self, stream: EventStream) -> None:
        self.streams.discard(stream)

    def start_task(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """A task that only serves this connection: cancelled when it closes (at once, if it
        already has: a handler that outlived its connection must not leave one behind)."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if self.closed:
            task.cancel()
        return task

    def close(self, abort: bool = False) -> None:
        """End the connection and all it owns. Handlers still running finish; their replies
        are dropped. Graceful: what is queued is still written, for at most
        `client_write_timeout_s`. `abort`: dropped at once."""
        if self.closed:
            return
        self.closed = True
        if self.upgraded is not None and not self.upgraded.closed:
            self.upgraded.end(abort)
        for stream in list(self.streams):
            stream.close()
        self.streams.clear()
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        if not abort:
            self.outbound.flush_to_transport()
        self.outbound.close()
        transport = self.writer.transport
        try:
            if abort:
                transport.abort()
                return
            transport.close()
            if transport.get_write_buffer_size():
                asyncio.get_running_loop().call_later(self.server.write_timeout_s,
                                                      _abort, transport)
        except RuntimeError:
            pass

    # -- reading -----------------------------------------------------------------------------

    async def serve(self) -> None:
        server = self.server
        reader = self.reader
        loop = asyncio.get_running_loop()
        limit = server.max_message_bytes
        bad = 0
        try:
            while not self.closed:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError as exc:
                    if exc.partial.strip():
                        self.emit(encode(error_reply(
                            None, INVALID_REQUEST, "message not terminated by a newline")))
                    break
                except asyncio.LimitOverrunError:
                    self.emit(encode(error_reply(
                        None, MESSAGE_TOO_LARGE,
                        f"message too large: the limit is {limit} bytes per line "
                        "(max_message_bytes)")))
                    for stream in list(self.streams):
                        stream.close()
                    self.streams.clear()
                    # Let the client finish sending, so that it gets to read the reply.
                    await discard_input(reader, LINGER_QUIET_S, LINGER_S)
                    break
                self.last_active = loop.time()
                try:
                    msg = decode(line)
                except ValueError as exc:
                    if not line.strip():
                        continue
                    bad += 1
                    self.emit(encode(error_reply(None, PARSE_ERROR, f"parse error: {exc}")))
                    if bad >= MAX_BAD_MESSAGES:
                        break
                    continue
                except RecursionError:
                    bad += 1
                    self.emit(encode(error_reply(
                        None, PARSE_ERROR,
                        "parse error: message nested too deep (params may nest at most "
                        f"{MAX_JSON_DEPTH} levels)")))
                    if bad >= MAX_BAD_MESSAGES:
                        break
                    continue
                if (isinstance(msg, dict) and msg.get("method") in server.upgrade_methods
                        and msg.get("jsonrpc") == "2.0"):
                    if await self._upgrade(msg):
                        break  # the session ran; the connection is over
                    continue
                if self.in_flight >= server.max_in_flight:
                    await self._wait_for_slot()  # reads nothing more meanwhile
                    if self.closed:
                        break
                if not self._accept(msg):
                    bad += 1
                    if bad >= MAX_BAD_MESSAGES:
                        break
        except (ConnectionError, OSError):
            pass
        except Exception:
            log.exception("connection of %s failed", self.who())
        finally:
            self.close()
            server.forget(self)

    async def _wait_for_slot(self) -> None:
        """At the cap: wait for a request to finish. Unbounded while the client's replies
        are backed up (they are why it is at the cap, and the write timeout bounds that);
        else at most CAP_WAIT_S, after which `_accept` refuses until a slot frees."""
        loop = asyncio.get_running_loop()
        cap = self.server.max_in_flight
        deadline = loop.time() + CAP_WAIT_S
        while self.in_flight >= cap and not self.closed:
            if self.outbound.backlogged:
                await self.outbound.pulse.wait()
                deadline = loop.time() + CAP_WAIT_S
                continue
            remaining = deadline - loop.time()
            if self._saturated or remaining <= 0:
                self._saturated = True
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self.outbound.pulse.wait()
        self._saturated = False

    async def _upgrade(self, msg: dict[str, Any]) -> bool:
        """Run an upgrade method inline (nothing more is read as JSON meanwhile), reply, then
        serve the session it attached until it ends. False if it attached none (an error
        reply: the connection stays JSON)."""
        req_id = msg.get("id")
        if not isinstance(req_id, str | int) or isinstance(req_id, bool):
            req_id = None
        self.running += 1
        try:
            reply = await self.server.dispatch(self, msg, req_id)
        finally:
            self.running -= 1
        self._reply(reply, req_id)
        session = self.upgraded
        if session is None or "error" in reply:
            self.upgraded = None
            return False
        await session.run(self.reader)
        return True

    def _accept(self, msg: Any) -> bool:
        """Validate the envelope and start the request's task; False for a bad envelope."""
        req_id = msg.get("id") if isinstance(msg, dict) else None
        if (not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0"
                or not isinstance(msg.get("method"), str)
                or not isinstance(req_id, str | int | None)
                or isinstance(req_id, bool)):
            self.emit(encode(error_reply(
                req_id if isinstance(req_id, str | int) and not isinstance(req_id, bool)
                else None, INVALID_REQUEST,
                "invalid request: need jsonrpc '2.0', a string 'method' and an id that is a "
                "string, a number or null")))
            return False
        if self.in_flight >= self.server.max_in_flight:
            self.emit(encode(error_reply(
                req_id, TOO_MANY_REQUESTS,
                f"too many requests in flight (limit {self.server.max_in_flight}, "
                f"max_requests_in_flight) and none finished within {CAP_WAIT_S:g} s: wait "
                "for a reply first")))
            return True
        if self.allowed is None:
            now = self.server.now_methods.get(msg["method"])
            if now is not None and self._answer_now(msg, req_id, now):
                return True
        self.running += 1
        self.server.spawn(self._run(msg, req_id, "id" in msg))
        return True

    def _answer_now(self, msg: dict[str, Any], req_id: Any, now: NowMethod) -> bool:
        """A read that can be answered inline (no task, no await): True if it was. False if
        a lock it reads is held (WouldWait): the request then takes the task path."""
        server = self.server
        params = server.params(msg, now[0], req_id)
        if isinstance(params, dict):
            reply = params  # the error reply
        else:
            try:
                reply = {"jsonrpc": "2.0", "id": req_id, "result": now[1](self, params)}
            except WouldWait:
                return False
            except Exception as exc:
                reply = failure_reply(msg["method"], req_id, exc)
        if "id" in msg:
            self._reply(reply, req_id)
        return True

    async def _run(self, msg: dict[str, Any], req_id: Any, wants_reply: bool) -> None:
        try:
            reply = await self.server.dispatch(self, msg, req_id)
        finally:
            self.running -= 1
            self.last_active = asyncio.get_running_loop().time()
        if wants_reply and not self.closed:
            self._reply(reply, req_id)
        self.outbound.pulse.fire()


def _abort(transport: asyncio.BaseTransport) -> None:
    """A graceful close that did not finish within the write timeout."""
    with contextlib.suppress(Exception):
        if isinstance(transport, asyncio.WriteTransport):
            transport.abort()


class RpcServer:
    def __init__(self, methods: dict[str, Method], max_message_bytes: int,
                 max_in_flight: int,
                 connection_methods: dict[str, ConnectionMethod] | None = None,
                 write_timeout_s: float = 10.0, *, settings: Settings | None = None,
                 upgrade_methods: frozenset[str] = frozenset(),
                 now_methods: dict[str, NowMethod] | None = None) -> None:
        self.methods = methods
        self.now_methods = dict(now_methods or {})
        self.upgrade_methods = upgrade_methods
        self.max_message_bytes = max_message_bytes
        self.max_in_flight = max_in_flight
        self.write_timeout_s = write_timeout_s
        limits = settings if settings is not None else Settings()
        self.max_clients = limits.max_clients
        self.idle_timeout_s = limits.client_idle_timeout_s
        self.outbound_max_bytes = limits.client_outbound_max_bytes
        self.connections: set[Connection] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.AbstractServer | None = None
        self._tls_server: asyncio.AbstractServer | None = None
        self._sweep_handle: asyncio.TimerHandle | None = None
        # Methods that need the connection itself (event subscription) register here.
        self.connection_methods = dict(connection_methods or {})
        # Counters for daemon-stats.
        self.cut_off = 0
        self.refused = 0
        self.idle_closed = 0
        self._refusing = 0
        self._refusal_logged = float("-inf")

    def spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def forget(self, conn: Connection) -> None:
        self.connections.discard(conn)

    async def start(self, sock: socket.socket) -> None:
        raise_fd_limit()
        self._server = await asyncio.start_unix_server(
            self._on_client, sock=sock, limit=self.max_message_bytes)
        self._arm_sweep()

    async def start_tls(self, host: str, port: int, context: ssl.SSLContext) -> None:
        """Also serve peer daemons on TCP with mutual TLS (tls.py: what they may call)."""
        self._tls_server = await asyncio.start_server(
            self._on_client, host, port, ssl=context, limit=self.max_message_bytes,
            ssl_handshake_timeout=HANDSHAKE_S)

    async def _on_client(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        if len(self.connections) >= self.max_clients:
            await self._refuse(reader, writer)
            return
        conn = Connection(self, reader, writer)
        self.connections.add(conn)
        await conn.serve()

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One client too many: one error line, then close."""
        self.refused += 1
        loop = asyncio.get_running_loop()
        if loop.time() - self._refusal_logged >= 10.0:
            self._refusal_logged = loop.time()
            caller = peer_credentials(writer)
            log.warning("refused client pid %s uid %s: %d clients connected (max_clients); "
                        "%d refused so far", caller.pid, caller.uid, len(self.connections),
                        self.refused)
        try:
            writer.write(encode(error_reply(
                None, TOO_MANY_CLIENTS,
                f"too many clients: the daemon serves at most {self.max_clients} connections "
                "at once (max_clients); try again later")))
            if self._refusing < MAX_REFUSED_LINGERING:
                self._refusing += 1
                try:  # let it finish sending its request, so that it reads the error
                    await discard_input(reader, LINGER_QUIET_S / 2, REFUSE_LINGER_S)
                finally:
                    self._refusing -= 1
        except (ConnectionError, RuntimeError, OSError):
            pass
        finally:
            writer.close()

    def _arm_sweep(self) -> None:
        if self.idle_timeout_s > 0:
            interval = min(max(self.idle_timeout_s / 4, 0.05), 5.0)
            self._sweep_handle = asyncio.get_running_loop().call_later(interval, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle for `client_idle_timeout_s`: nothing in flight, no
        subscription, no request received."""
        now = asyncio.get_running_loop().time()
        limit = self.idle_timeout_s
        for conn in list(self.connections):
            if (not conn.closed and conn.in_flight == 0 and not conn.streams
                    and conn.upgraded is None and now - conn.last_active >= limit):
                self.idle_closed += 1
                log.info("closing the idle connection of %s (client_idle_timeout_s %g)",
                         conn.who(), limit)
                conn.emit(encode(error_reply(
                    None, IDLE_TIMEOUT,
                    f"connection closed: idle for {limit:g} s (client_idle_timeout_s)")))
                conn.close()
        self._arm_sweep()

    def stats(self) -> dict[str, Any]:
        """The `rpc` part of daemon-stats."""
        return {
            "clients": len(self.connections),
            "max_clients": self.max_clients,
            "requests_in_flight": sum(c.in_flight for c in self.connections),
            "outbound_bytes": sum(c.outbound.size for c in self.connections),
            "cut_off": self.cut_off,
            "refused": self.refused,
            "idle_closed": self.idle_closed,
            "tasks": len(asyncio.all_tasks()),
        }

    @staticmethod
    def params(msg: dict[str, Any], model: type[Params],
               req_id: Any) -> Params | dict[str, Any]:
        """The request's params, validated by `model`; or the error reply naming what is
        wrong."""
        name = msg["method"]
        raw_params = msg.get("params", {})
        if raw_params is None:
            raw_params = {}
        if not isinstance(raw_params, dict):
            return error_reply(req_id, INVALID_PARAMS,
                               "invalid params: params must be an object (named params)")
        for key in FREE_FORM_PARAMS:
            value = raw_params.get(key)
            if isinstance(value, dict | list) and nested_deeper_than(value, MAX_JSON_DEPTH):
                return error_reply(req_id, INVALID_PARAMS,
                                   f"invalid params for '{name}': {key}: nested more than "
                                   f"{MAX_JSON_DEPTH} levels deep (the limit)")
        try:
            return model.model_validate(raw_params)
        except ValidationError as exc:
            return error_reply(req_id, INVALID_PARAMS,
                               f"invalid params for '{name}': {describe_validation_error(exc)}")

    async def dispatch(self, conn: Connection, msg: dict[str, Any], req_id: Any) -> dict[str, Any]:
        name = msg["method"]
        method = self.methods.get(name)
        conn_method = self.connection_methods.get(name)
        if method is None and conn_method is None:
            return error_reply(req_id, METHOD_NOT_FOUND, f"unknown method '{name}'")
        if conn.allowed is not None and name not in conn.allowed:
            return error_reply(req_id, METHOD_NOT_FOUND,
                               f"method '{name}' is not available over TLS (peer daemons "
                               f"may call {', '.join(sorted(conn.allowed))})")
        model = method.params if method is not None else conn_method[0]  # type: ignore[index]
        params = self.params(msg, model, req_id)
        if isinstance(params, dict):
            return params
        try:
            if conn_method is not None:
                result = await conn_method[1](conn, params)
            else:
                assert method is not None
                result = await method.handler(params, conn.caller)
        except Exception as exc:
            return failure_reply(name, req_id, exc)
        if name == "daemon-stats" and isinstance(result, dict):
            result.setdefault("rpc", self.stats())
        return {"jsonrpc": "2.0", "id": req_id, "result": result}

    async def stop(self, grace_s: float) -> None:
        """Stop accepting; give in-flight requests `grace_s` to finish; close connections."""
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
        for srv in (self._server, self._tls_server):
            if srv is not None:
                srv.close()
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
