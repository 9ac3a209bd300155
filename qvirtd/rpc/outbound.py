"""What one connection sends: one FIFO of encoded lines, bounded by bytes, one writer.

Replies, error replies and event notifications all go through the connection's `Outbound`,
in order. A line is written straight into the transport while the client keeps up (the
transport is below its high-water mark and nothing is queued ahead of it): no task switch,
no copy. Otherwise it waits in the queue, and one writer task per connection (started only
while there is a backlog) moves the queue into the transport as the client reads, each wait
bounded by `client_write_timeout_s`.

Bytes counted against `client_outbound_max_bytes`: the encoded lines waiting in the queue
plus what the transport has accepted but not yet handed to the kernel. The kernel's own
socket buffer comes on top (a fixed size per socket).

Who decides what happens when a line does not fit is the caller (`offer()` says no): a reply
cuts the client off, an event ends that subscription. `force()` is for the lines that must
not be dropped: replayed events (paced by `until_empty()`) and the overflow notice itself.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Protocol

# The transport's own buffer: above this the line waits in our queue, not in the transport.
HIGH_WATER = 64 * 1024


class Tally(Protocol):
    """Counts its lines that are still queued (not yet in the transport)."""

    queued: int


class Counter:
    __slots__ = ("queued",)

    def __init__(self) -> None:
        self.queued = 0


class Pulse:
    """Wakes every current waiter; each waiter has its own future (cancel-safe)."""

    def __init__(self) -> None:
        self._waiters: set[asyncio.Future[None]] = set()

    async def wait(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(fut)
        try:
            await fut
        finally:
            self._waiters.discard(fut)

    def fire(self) -> None:
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)


class Outbound:
    def __init__(self, writer: asyncio.StreamWriter, max_bytes: int, write_timeout_s: float,
                 on_stuck: Callable[[str], None]) -> None:
        self._writer = writer
        self._transport = writer.transport
        self._transport.set_write_buffer_limits(high=HIGH_WATER)
        self.max_bytes = max_bytes
        self.write_timeout_s = write_timeout_s
        self._on_stuck = on_stuck
        self._queue: collections.deque[tuple[bytes, Tally | None]] = collections.deque()
        self._queued_bytes = 0
        self._task: asyncio.Task[None] | None = None
        self.closed = False
        self.replies = Counter()  # replies still queued: part of the requests in flight
        self.pulse = Pulse()  # fired when queued lines move on, and at close

    @property
    def size(self) -> int:
        """Bytes counted against the bound: queued plus not yet taken by the kernel."""
        if self.closed:
            return 0
        return self._queued_bytes + self._transport.get_write_buffer_size()

    @property
    def backlogged(self) -> bool:
        """Lines are waiting for the client to read (not even the transport takes them)."""
        return bool(self._queue)

    def offer(self, data: bytes, tally: Tally | None = None, max_queued: int | None = None) -> bool:
        """Queue `data` unless it would take the queue over the bound; False if it does not
        fit. A line bigger than the whole bound still goes out while nothing is backed up."""
        if self.closed:
            return True  # the client is gone: the line is dropped, nobody is to blame
        in_transport = self._transport.get_write_buffer_size()
        total = self._queued_bytes + in_transport
        if total + len(data) > self.max_bytes and total > HIGH_WATER:
            return False
        if max_queued is not None and tally is not None and tally.queued >= max_queued:
            return False
        self._put(data, tally, in_transport)
        return True

    def force(self, data: bytes, tally: Tally | None = None) -> None:
        """Queue `data` whatever the bound (its sender paces itself, or it is a final notice)."""
        if not self.closed:
            self._put(data, tally, self._transport.get_write_buffer_size())

    def _put(self, data: bytes, tally: Tally | None, in_transport: int) -> None:
        if not self._queue and in_transport <= HIGH_WATER:
            if not self._write(data):  # the client keeps up: straight through
                return
            if self._task is None and self._transport.get_write_buffer_size() > HIGH_WATER:
                self._start()  # the transport is paused now: someone must watch the drain
            return
        self._queue.append((data, tally))
        self._queued_bytes += len(data)
        if tally is not None:
            tally.queued += 1
        self._start()

    def _start(self) -> None:
        if self._task is None and not self.closed:
            self._task = asyncio.get_running_loop().create_task(self._write_loop(),
                                                                name="client-writer")

    async def _write_loop(self) -> None:
        """Move the queue into the transport as the client reads; each drain is bounded."""
        transport = self._transport
        try:
            while not self.closed:
                if transport.get_write_buffer_size() > HIGH_WATER:
                    async with asyncio.timeout(self.write_timeout_s):
                        await self._writer.drain()
                    continue
                if not self._queue:
                    return
                self._move(HIGH_WATER - transport.get_write_buffer_size())
        except TimeoutError:
            self._task = None
            self._on_stuck(f"it read nothing for {self.write_timeout_s:g} s "
                           f"(client_write_timeout_s) with {self.size} bytes waiting")
        except (ConnectionError, RuntimeError, OSError):
            self._task = None
            self._on_stuck("")  # the connection broke: nothing to report
        finally:
            self._task = None

    def _move(self, budget: int) -> None:
        """Hand queued lines to the transport, about `budget` bytes of them (at least one)."""
        queue = self._queue
        chunk: list[bytes] = []
        size = 0
        while queue and (size < budget or not chunk):
            data, tally = queue.popleft()
            chunk.append(data)
            size += len(data)
            if tally is not None:
                tally.queued -= 1
        self._queued_bytes -= size
        self._write(chunk[0] if len(chunk) == 1 else b"".join(chunk))
        self.pulse.fire()

    def _write(self, data: bytes) -> bool:
        """Into the transport; False if it is already gone (the peer closed: the serve loop
        has not seen the EOF yet), and then the connection is closed."""
        try:
            self._transport.write(data)
            return True
        except (RuntimeError, ConnectionError, OSError):
            self._on_stuck("")
            return False

    async def until_empty(self) -> None:
        """Return once the queue is empty (or the connection closed); never drops anything."""
        while self._queue and not self.closed:
            await self.pulse.wait()

    def flush_to_transport(self) -> None:
        """Before a graceful close: hand everything queued to the transport."""
        if self._queue and not self.closed:
            self._move(self._queued_bytes)

    def close(self) -> None:
        """Stop: drop what is queued, stop the writer, wake every waiter."""
        if self.closed:
            return
        self.closed = True
        self._queue.clear()
        self._queued_bytes = 0
        self.replies.queued = 0
        task = self._task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        self._task = None
        self.pulse.fire()
