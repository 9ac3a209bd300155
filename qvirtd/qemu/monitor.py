"""One QMP connection per running domain, on `qemu.qmp`, with every wait bounded.

What this wrapper adds to the library, and why:

* Every command has a timeout (`monitor_timeout_s`, overridable per call). A late reply to a
  command we gave up on is dropped by the library (QMP says to drop unknown ids), so a timeout
  never poisons the connection.
* The library's default `events` listener keeps every event forever (an unbounded queue and an
  unbounded `history` list). We unregister it and use a listener whose `put` hands each event
  straight to the domain's callback, so nothing accumulates here.
* `disconnect()` re-raises the error that broke the connection; closing is always quiet here.
  Closing while `connect()` waits for QEMU's greeting cancels that connect (which disconnects
  on its way out) instead of disconnecting beside it: two disconnects at once trip the
  library's internal assert ("This is a bug in the QMP library").
* The library logs expected failures (EOF when QEMU exits, dropped late replies) at ERROR or
  WARNING; its logger is quietened and we log what matters ourselves.
* Losing the connection (QEMU died or closed it) is reported once through `on_lost`, and every
  command in flight or issued later fails with `MonitorClosedError` at once.
* `connect()` never blocks the loop (rule L6): the socket is non-blocking, and a full listen
  backlog (a frozen QEMU does not accept; QEMU listens with a backlog of 1, so after two
  queued attempts a blocking `connect()` would sleep in the kernel for good) is retried
  until the deadline rather than waited for.
* The library formats a traceback whenever a connection is lost (QEMU exits, is destroyed),
  even with its debug log off (`pretty_traceback()` is an argument of the debug call), and
  formatting reads source lines from disk: on the loop (rule L6; 21 ms in D state was seen
  under load). `warm_sources()` reads its and asyncio's stream sources into `linecache`
  once, at start, in a thread.
* The library logs every message it sends or receives at DEBUG, but builds the text first
  (`str(msg)`: an indented JSON dump) even with DEBUG off: about a third of the CPU of a
  `suspend` (issue 12). `_Client` overrides its two message hooks to build it only when the
  line is logged.
* A command is written by the task that runs it, and its reply comes back through a future
  (`_Client._issue`, `_OneReply`): the library queued each command for its writer task and
  made a one-slot queue per reply, a task switch and two queues per command (issue 12).
* `listen(names)` lets an operation wait for QMP events (DEVICE_DELETED for a detach, later
  the migration events) without a hand-made map of futures: open it before sending the
  command, read what arrives, close it (a `with` block). Events still reach the pump.

Rule L4: `execute()` and `connect()` check that the calling task holds no driver or domain
lock.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import linecache
import logging
import os
import socket
import struct
import sys
from collections.abc import Callable, Coroutine, Iterable, Iterator
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, ExecInterruptedError, ExecuteError, QMPClient, Runstate
from qemu.qmp.error import QMPError
from qemu.qmp.message import Message

from ..errors import MonitorClosedError, MonitorError, MonitorTimeoutError
from ..locks import check_no_locks
from .unixpath import connect_unix

log = logging.getLogger(__name__)

# (event name, data, QEMU's timestamp of the event in seconds since the epoch)
EventCallback = Callable[[str, dict[str, Any], float | None], None]


def warm_sources() -> None:
    """Blocking (call it in a thread, once): the sources of the modules whose frames the
    library's tracebacks show (its own, and the asyncio stream it reads), into linecache, so
    that formatting one reads no file. About 0.3 MiB (all of asyncio would be 1.3)."""
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if (name.startswith("qemu.qmp") or name == "asyncio.streams") and path and \
                path.endswith(".py"):
            linecache.getlines(path)


def quieten_library_logging(debug: bool = False) -> None:
    logging.getLogger("qemu.qmp").setLevel(logging.DEBUG if debug else logging.CRITICAL)


LISTEN_QUEUE = 256


class QmpListener:
    """QMP events of some names, as they arrive, for one operation (`Monitor.listen`).
    Bounded: past `LISTEN_QUEUE` unread events the oldest are dropped (and `overflowed`)."""

    def __init__(self, monitor: Monitor, names: frozenset[str]) -> None:
        self.monitor = monitor
        self.names = names
        self._queue: collections.deque[tuple[str, dict[str, Any]]] = collections.deque(
            maxlen=LISTEN_QUEUE)
        self._ready = asyncio.Event()
        self.overflowed = False
        self.closed = False

    def _push(self, name: str, data: dict[str, Any]) -> None:
        if len(self._queue) == self._queue.maxlen:
            self.overflowed = True
        self._queue.append((name, data))
        self._ready.set()

    def _close(self) -> None:
        self.closed = True
        self._ready.set()

    async def get(self, timeout_s: float) -> tuple[str, dict[str, Any]]:
        """The next event; TimeoutError after `timeout_s`, MonitorClosedError if the
        connection is gone (rule L4: no lock may be held)."""
        check_no_locks(f"QMP events on {self.monitor.domain_name}")
        async with asyncio.timeout(timeout_s):
            while not self._queue:
                if self.closed:
                    raise MonitorClosedError(f"domain '{self.monitor.domain_name}': the QEMU "
                                             "monitor closed while waiting for an event")
                self._ready.clear()
                await self._ready.wait()
        return self._queue.popleft()

    async def wait_for(self, predicate: Callable[[str, dict[str, Any]], bool],
                       timeout_s: float) -> tuple[str, dict[str, Any]]:
        """The first event for which `predicate` holds (others are skipped)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            name, data = await self.get(max(0.0, deadline - loop.time()))
            if predicate(name, data):
                return name, data


class _ForwardingListener(EventListener):
    """Hands each QMP event to a callback and to the open `listen()`s; keeps no history."""

    def __init__(self, callback: EventCallback, listeners: set[QmpListener]) -> None:
        super().__init__()
        self._callback = callback
        self._listeners = listeners

    async def put(self, event: Message) -> None:
        data = event.get("data")
        stamp = event.get("timestamp")
        when = None
        if isinstance(stamp, dict):
            when = float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6
        name = str(event["event"])
        payload = dict(data) if isinstance(data, dict) else {}
        try:
            self._callback(name, payload, when)
        except Exception:
            log.exception("QMP event handler failed on %s", name)
        for listener in self._listeners:
            if name in listener.names:
                listener._push(name, payload)


class _OneReply:
    """A command's reply slot: one future, where the library makes a one-slot asyncio.Queue
    per command. It has what the library calls on the slot: put, put_nowait, get."""

    __slots__ = ("_reply",)

    def __init__(self) -> None:
        self._reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def put(self, msg: Any) -> None:
        self.put_nowait(msg)

    def put_nowait(self, msg: Any) -> None:
        if not self._reply.done():
            self._reply.set_result(msg)

    async def get(self) -> Any:
        return await self._reply


class _Client(QMPClient):
    """QMPClient with a shorter path per command (issue 12): the message is written by the
    command's own task, not queued for the library's writer task (one task switch less per
    command), and its reply comes back through a future (`_OneReply`). Everything else, the
    reader task, the routing of replies and events, disconnects, is the library's. Its
    message hooks format a message only when its debug line is logged."""

    async def _issue(self, msg: Message) -> str | None:
        msg_id = msg.get("id")
        assert msg_id is None or isinstance(msg_id, str)
        self._pending[msg_id] = _OneReply()  # type: ignore[assignment]
        try:
            await self._send(msg)  # writes to the transport; never waits
        except BaseException:
            del self._pending[msg_id]
            raise
        return msg_id

    def _cb_outbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("--> %s", str(msg))
        return msg

    def _cb_inbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("<-- %s", str(msg))
        return msg


class Monitor:
    """The QMP monitor of one running domain."""

    def __init__(self, domain_name: str, on_event: EventCallback,
                 on_lost: Callable[[], None], default_timeout_s: float) -> None:
        self.domain_name = domain_name
        self.default_timeout_s = default_timeout_s
        self._on_lost = on_lost
        self._client = _Client(domain_name)
        # Pitfall: drop the default all-events listener (unbounded queue and history).
        self._client._listeners.remove(self._client.events)
        self._listeners: set[QmpListener] = set()
        self._client.register_listener(_ForwardingListener(on_event, self._listeners))
        self._closed = False
        self._connected = False  # negotiated: commands may be sent
        self._lost_reported = False
        self._watch: asyncio.Task[None] | None = None
        self._connecting: asyncio.Future[None] | None = None  # the library's connect()

    @property
    def closed(self) -> bool:
        return self._closed

    async def connect(self, socket_path: Path, timeout_s: float) -> None:
        """Connect and negotiate, or fail within `timeout_s` (QEMU may die or hang first)."""
        check_no_locks(f"QMP connect of {self.domain_name}")
        try:
            async with asyncio.timeout(timeout_s):
                sock = await connect_unix(socket_path)
                if self._closed:  # closed meanwhile: QEMU will not greet us (it is gone)
                    sock.close()
                    raise MonitorClosedError(self._closed_while_connecting())
                await self._negotiate(sock)
        except TimeoutError:
            await self.close()
            raise MonitorTimeoutError(
                f"domain '{self.domain_name}': QEMU monitor did not answer within "
                f"{timeout_s:.1f} s") from None
        except (QMPError, OSError, EOFError) as exc:
            await self.close()
            raise MonitorClosedError(
                f"domain '{self.domain_name}': cannot connect to the QEMU monitor: "
                f"{exc}") from exc
        self._connected = True
        self._watch = asyncio.create_task(self._watch_connection(),
                                          name=f"monitor-watch-{self.domain_name}")

    async def _negotiate(self, sock: socket.socket) -> None:
        """The library's connect, as a task that close() can cancel (pitfall: a close while
        QEMU has not greeted us yet must not disconnect beside the connect's own clean-up:
        two disconnects at once trip the library's internal assert)."""
        task = asyncio.ensure_future(self._client.connect(sock))
        self._connecting = task
        try:
            await task
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if self._closed and task.cancelled() and (me is None or not me.cancelling()):
                raise MonitorClosedError(self._closed_while_connecting()) from None
            raise
        finally:
            self._connecting = None

    def _closed_while_connecting(self) -> str:
        return (f"domain '{self.domain_name}': cannot connect to the QEMU monitor: it was "
                "closed while connecting (QEMU is gone)")

    @contextlib.contextmanager
    def listen(self, names: Iterable[str]) -> Iterator[QmpListener]:
        """Collect QMP events named `names` while the block runs (open it before sending the
        command whose events you want: none that arrive after entering is missed)."""
        listener = QmpListener(self, frozenset(names))
        if self._closed:
            listener._close()
        self._listeners.add(listener)
        try:
            yield listener
        finally:
            self._listeners.discard(listener)

    async def _watch_connection(self) -> None:
        """Report the loss of the connection once (QEMU exited or closed the monitor)."""
        while self._client.runstate is Runstate.RUNNING:
            await self._client.runstate_changed()
        self._closed = True
        for listener in self._listeners:
            listener._close()
        if not self._lost_reported:
            self._lost_reported = True
            self._on_lost()

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      timeout_s: float | None = None) -> Any:
        """Run one QMP command; MonitorTimeoutError after the timeout, never a hang."""
        return await self._bounded(command, self._client.execute(command, arguments),
                                   timeout_s)

    async def execute_raw(self, message: dict[str, Any], timeout_s: float | None = None) -> Any:
        """Pass one user-supplied QMP message through (qemu-monitor-command)."""
        msg = Message({k: v for k, v in message.items() if k != "id"})
        return await self._bounded(str(message.get("execute", "?")),
                                   self._client.execute_msg(msg), timeout_s)

    async def _bounded(self, command: str, call: Coroutine[Any, Any, Any],
                       timeout_s: float | None) -> Any:
        """Await `call` under the timeout; map the library's errors to ours (rule L4 first)."""
        try:
            check_no_locks(f"QMP command '{command}' on {self.domain_name}")
            if self._closed:
                raise MonitorClosedError(f"domain '{self.domain_name}': the QEMU monitor is "
                                         f"closed ('{command}' not sent)")
            if not self._connected:
                # A command beside the start's connect (a QUERY job may run then): refused,
                # and the connection is not taken for broken (the library would raise
                # for a client that is not connected yet, which closed the monitor).
                raise MonitorError(f"domain '{self.domain_name}': the QEMU monitor is not "
                                   f"connected yet ('{command}' not sent)", "NotConnected")
        except BaseException:
            call.close()  # never awaited: close it so Python does not warn
            raise
        timeout = self.default_timeout_s if timeout_s is None else timeout_s
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for runs `call` in a task of its
            # own (one more task and two more turns of the loop per command).
            async with asyncio.timeout(timeout):
                return await call
        except TimeoutError:
            raise MonitorTimeoutError(
                f"domain '{self.domain_name}': QMP command '{command}' got no answer within "
                f"{timeout:.1f} s") from None
        except ExecuteError as exc:
            raise MonitorError(
                f"domain '{self.domain_name}': QEMU refused '{command}': {exc}",
                exc.error_class) from exc
        except (ExecInterruptedError, QMPError, OSError, EOFError) as exc:
            self._closed = True
            raise MonitorClosedError(
                f"domain '{self.domain_name}': QEMU monitor closed while '{command}' "
                "was running") from exc

    async def send_fd(self, name: str, fd: int, timeout_s: float | None = None) -> None:
        """Hand `fd` to QEMU under `name` (SCM_RIGHTS, then `getfd`), for `migrate fd:NAME`.

        The library's own `send_fd_scm` reaches into the transport's socket object, which
        uvloop does not expose; a duplicate of the connection's fd carries the message
        instead. The fd rides on one space (JSON whitespace to QEMU's parser), written only
        when nothing else is waiting in the transport's buffer, so it cannot split a
        command. Our copy of `fd` stays open (the caller closes it)."""
        check_no_locks(f"QMP getfd on {self.domain_name}")
        writer = self._client._writer  # the library keeps it private
        if self._closed or writer is None:
            raise MonitorClosedError(f"domain '{self.domain_name}': the QEMU monitor is "
                                     "closed (no fd sent)")
        transport = writer.transport
        while transport.get_write_buffer_size() > 0:
            await writer.drain()
        raw = transport.get_extra_info("socket")
        try:
            with socket.socket(fileno=os.dup(raw.fileno())) as sock:
                sock.sendmsg([b" "], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                       struct.pack("@i", fd))])
        except OSError as exc:
            raise MonitorClosedError(f"domain '{self.domain_name}': cannot pass a file to "
                                     f"QEMU: {exc}") from exc
        await self.execute("getfd", {"fdname": name}, timeout_s)

    async def wait_lost(self, timeout_s: float) -> bool:
        """Wait until the connection is gone (QEMU's last events have been read)."""
        if self._watch is None:
            return True
        done, _ = await asyncio.wait({self._watch}, timeout=timeout_s)
        return bool(done)

    async def close(self) -> None:
        """Close quietly: the library's disconnect() re-raises the root cause of a failure."""
        self._closed = True
        self._lost_reported = True  # an orderly close is not a loss
        for listener in self._listeners:
            listener._close()
        connecting = self._connecting
        if connecting is not None and not connecting.done():
            connecting.cancel()  # it disconnects on its way out: never beside it
            await asyncio.wait({connecting})
        try:
            await self._client.disconnect()
        except Exception as exc:  # the original connection error, already handled
            log.debug("domain '%s': monitor closed after error: %s", self.domain_name, exc)
        if self._watch is not None and self._watch is not asyncio.current_task():
            self._watch.cancel()

