"""The guest's serial console: QEMU serves it on a socket, the daemon keeps its log.

QEMU's serial chardev is a listening socket in the run directory (`console.sock`, passed to
QEMU as an fd like the monitor's). The daemon connects to it when the run starts and again
after a daemon restart, and appends what the guest writes to `console.log`, capped at
`console_log_max_bytes` and rotated to `console.log.1` when full, so a chatty guest can never
fill `/run` (with a plain `-chardev file` QEMU writes without limit).

Writes go through the FileWriter (off the loop, in order). While the daemon is away nothing is
connected and QEMU drops the output (it never blocks the guest for it); if the log cannot
keep up (more than `PENDING_MAX` bytes not yet written), reading pauses, which slows the
guest's serial port rather than the daemon's memory.
"""

from __future__ import annotations

import asyncio
import logging
import os
from functools import partial
from pathlib import Path
from typing import cast

from ..writer import ROTATED_SUFFIX, FileWriter
from .unixpath import connect_unix

log = logging.getLogger(__name__)

FLUSH_DELAY_S = 0.05
FLUSH_BYTES = 64 * 1024
PENDING_MAX = 1024 * 1024


class ConsoleLog(asyncio.Protocol):
    """Reads one run's serial console into its capped log."""

    def __init__(self, domain_name: str, socket_path: Path, log_path: Path,
                 writer: FileWriter, max_bytes: int) -> None:
        self.domain_name = domain_name
        self.socket_path = socket_path
        self.log_path = log_path
        self.writer = writer
        self.max_bytes = max_bytes
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

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.Transport, but are one.
        self._transport = cast(asyncio.Transport, transport)
        if self.closed:
            transport.close()

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) >= FLUSH_BYTES:
            self._write()
        elif self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(FLUSH_DELAY_S, self._write)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._write()

    # --- writing ----------------------------------------------------------------------------

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

    def close(self) -> None:
        """Stop reading (the run ended, or the daemon stops); what was read is written."""
        self.closed = True
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
