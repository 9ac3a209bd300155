"""The guest's serial console: QEMU serves it on a socket; the daemon owns it.

QEMU's serial chardev is a listening socket in the run directory (`console.sock`, passed to
QEMU as an fd like the monitor's). The daemon connects to it when the run starts and again
after a daemon restart, and then:

* **keeps the log**: what the guest writes is appended to `console.log`, capped at
  `console_log_max_bytes` and rotated to `console.log.1` when full, whether or not anybody is
  attached, so a chatty guest can never fill `/run` (with a plain `-chardev file` QEMU writes
  without limit). Writes go through the FileWriter (off the loop, in order);
* **serves attached clients** (`qvirsh console`): each `ConsoleSession` receives what the
  guest writes from the moment it attached; at most one of them is the *writer*, whose
  keystrokes go to the guest's serial port (`--force` takes that over from another writer,
  which is told and detached); the others watch read-only. The log and the sessions get the
  same bytes from the same callback, so attaching never loses or duplicates log output.

Bounds: a session that does not read its output (more than its connection's outbound bound
waiting) is detached; the guest and the log never wait for it. If the log cannot keep up
(more than `PENDING_MAX` bytes not yet written), reading pauses, which slows the guest's
serial port rather than growing the daemon's memory. Keystrokes go to QEMU only while its
socket takes them (`INPUT_MAX` bytes at most waiting). While the daemon is away nothing is
connected and QEMU drops the guest's output (it never blocks the guest for it).
"""

from __future__ import annotations

import asyncio
import logging
import os
from functools import partial
from pathlib import Path
from typing import Protocol, cast

from ..errors import DomainBusyError
from ..writer import ROTATED_SUFFIX, FileWriter
from .unixpath import connect_unix

log = logging.getLogger(__name__)

FLUSH_DELAY_S = 0.05
FLUSH_BYTES = 64 * 1024
PENDING_MAX = 1024 * 1024
INPUT_MAX = 64 * 1024
READ_CHUNK = 4096


class Peer(Protocol):
    """The client end of a session (an upgraded RPC connection)."""

    def send_raw(self, data: bytes) -> bool: ...   # False: it is not reading (over its bound)
    def close(self, abort: bool = False) -> None: ...


class ConsoleSession:
    """One client attached to a guest's serial console (raw bytes both ways)."""

    def __init__(self, console: SerialConsole, peer: Peer, writer: bool, who: str) -> None:
        self.console = console
        self.peer = peer
        self.writer = writer
        self.who = who
        self.closed = False

    def output(self, data: bytes) -> None:
        """What the guest wrote, for this client (a loop callback; never blocks)."""
        if not self.closed and not self.peer.send_raw(data):
            log.warning("domain %s: console client %s does not read its output: detached",
                        self.console.domain_name, self.who)
            self.end(abort=True)

    async def run(self, reader: asyncio.StreamReader) -> None:
        """Until the client goes: its keystrokes to the guest (the writer's only)."""
        try:
            while not self.closed:
                data = await reader.read(READ_CHUNK)
                if not data:
                    break
                if self.writer and not self.closed:
                    self.console.write(data)
        except (ConnectionError, OSError):
            pass
        finally:
            self.end()

    def notice(self, text: str) -> None:
        """A line from the daemon itself, between the guest's output (bracketed)."""
        if not self.closed:
            self.peer.send_raw(f"\r\n[qvirtd: {text}]\r\n".encode())

    def end(self, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.console.detach(self)
        self.peer.close(abort)


class SerialConsole(asyncio.Protocol):
    """One run's serial console: its capped log, its attached sessions, its input."""

    def __init__(self, domain_name: str, socket_path: Path, log_path: Path,
                 writer: FileWriter, max_bytes: int) -> None:
        self.domain_name = domain_name
        self.socket_path = socket_path
        self.log_path = log_path
        self.writer = writer
        self.max_bytes = max_bytes
        self.sessions: set[ConsoleSession] = set()
        self.input_writer: ConsoleSession | None = None
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._flush: asyncio.TimerHandle | None = None
        self._pending = 0  # bytes handed to the writer and not yet written
        self._paused = False
        self.closed = False

    async def connect(self, timeout_s: float) -> None:
        """Connect to QEMU's console socket (bounded; never blocks the loop)."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout_s):
            sock = await connect_unix(self.socket_path)
        await loop.create_unix_connection(lambda: self, sock=sock)
        # The log exists from the start, even before the guest says anything.
        self.writer.append(self.log_path, b"", max_bytes=self.max_bytes)

    # --- sessions -------------------------------------------------------------------------

    def attach(self, session: ConsoleSession, force: bool) -> None:
        """Add `session`; as the writer it needs the seat free, or `force` to take it."""
        if self.closed:
            raise DomainBusyError(f"domain '{self.domain_name}': its console is closed")
        if session.writer:
            current = self.input_writer
            if current is not None and not current.closed:
                if not force:
                    raise DomainBusyError(
                        f"domain '{self.domain_name}': its console is in use by "
                        f"{current.who}; use --force to take it over, or --readonly to "
                        "watch")
                current.notice(f"console taken over by {session.who}")
                current.end()
            self.input_writer = session
        self.sessions.add(session)
        log.info("domain %s: console attached by %s (%s)", self.domain_name, session.who,
                 "read-write" if session.writer else "read-only")

    def detach(self, session: ConsoleSession) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            log.info("domain %s: console detached by %s", self.domain_name, session.who)
        if self.input_writer is session:
            self.input_writer = None

    def write(self, data: bytes) -> None:
        """Keystrokes for the guest's serial port (from the writer session)."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size() > INPUT_MAX:
            return  # QEMU is not taking input (the guest is frozen): drop, never queue
        transport.write(data)

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.Transport, but are one.
        self._transport = cast(asyncio.Transport, transport)
        if self.closed:
            transport.close()

    def data_received(self, data: bytes) -> None:
        for session in list(self.sessions):
            session.output(data)
        self._buf += data
        if len(self._buf) >= FLUSH_BYTES:
            self._write()
        elif self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(FLUSH_DELAY_S, self._write)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._write()

    # --- the log --------------------------------------------------------------------------

    def _write(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if not self._buf:
            return
        data = bytes(self._buf)
        self._buf.clear()
        self._pending += len(data)
        fut = self.writer.append(self.log_path, data, max_bytes=self.max_bytes)
        fut.add_done_callback(partial(self._written, len(data)))
        if self._pending > PENDING_MAX and self._transport is not None and not self._paused:
            self._paused = True
            self._transport.pause_reading()

    def _written(self, n: int, _fut: asyncio.Future[None]) -> None:
        self._pending -= n
        if self._paused and self._pending <= PENDING_MAX // 2:
            self._paused = False
            if self._transport is not None:
                self._transport.resume_reading()

    def close(self, why: str = "the domain stopped") -> None:
        """Stop (the run ended, or the daemon stops): what was read is written, and every
        attached client is told why and detached."""
        self.closed = True
        for session in list(self.sessions):
            session.notice(why)
            session.end()
        if self._transport is not None:
            self._transport.close()
        self._write()


def read_tail(log_path: Path, max_bytes: int) -> tuple[int, bytes]:
    """Blocking (call it off the loop): the last `max_bytes` of the console log, reaching into
    the rotated file when the current one is shorter. Returns (total size, data).
    FileNotFoundError when the domain never ran."""
    rotated = log_path.with_name(log_path.name + ROTATED_SUFFIX)
    chunks: list[bytes] = []
    total = 0
    wanted = max_bytes
    found = False
    for path in (log_path, rotated):
        try:
            with open(path, "rb") as f:
                found = True
                size = os.fstat(f.fileno()).st_size
                total += size
                if wanted > 0:
                    f.seek(max(0, size - wanted))
                    data = f.read(wanted)
                    chunks.insert(0, data)
                    wanted -= len(data)
        except FileNotFoundError:
            continue
    if not found:
        raise FileNotFoundError(str(log_path))
    return total, b"".join(chunks)
