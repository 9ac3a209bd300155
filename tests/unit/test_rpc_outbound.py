"""The per-connection outbound queue (qvirtd.rpc.outbound): bounded by bytes, one writer.

Also the in-memory transport and connection that test_rpc_streams.py uses."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from typing import Any

from qvirtd.rpc.outbound import HIGH_WATER, Counter, Outbound
from qvirtd.rpc.streams import EventStream


class FakeTransport:
    """What the daemon wrote and the client has not read yet is `buffer`; `read()` is the
    client reading (it wakes a drain once the buffer is down to the low-water mark)."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.received = bytearray()
        self.high = 64 * 1024
        self.low = self.high // 4
        self.aborted = False
        self.closed = False
        self._changed = asyncio.Event()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high = high if high is not None else self.high
        self.low = low if low is not None else self.high // 4

    def get_write_buffer_size(self) -> int:
        return len(self.buffer)

    def write(self, data: bytes) -> None:
        if self.closed:
            raise RuntimeError("transport closed")
        self.buffer += data

    def read(self, n: int | None = None) -> bytes:
        n = len(self.buffer) if n is None else n
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        self.received += data
        self._changed.set()
        return data

    def messages(self) -> list[dict[str, Any]]:
        """Everything the client has read, decoded."""
        return [json.loads(line) for line in self.received.splitlines() if line.strip()]

    def abort(self) -> None:
        self.aborted = self.closed = True
        self.buffer.clear()
        self._changed.set()

    def close(self) -> None:
        self.closed = True

    async def drain(self) -> None:
        while len(self.buffer) > self.low:
            if self.closed:
                raise ConnectionResetError("closed")
            self._changed.clear()
            await self._changed.wait()


class FakeWriter:
    def __init__(self, transport: FakeTransport) -> None:
        self.transport = transport

    async def drain(self) -> None:
        await self.transport.drain()


class FakeConnection:
    """The part of a connection that subscriptions use (StreamOwner)."""

    def __init__(self, max_bytes: int = 4 * 1024 * 1024, write_timeout_s: float = 10.0) -> None:
        self.transport = FakeTransport()
        self.stuck: list[str] = []
        self.outbound = Outbound(FakeWriter(self.transport), max_bytes,  # type: ignore[arg-type]
                                 write_timeout_s, self.stuck.append)
        self.streams: set[EventStream] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    def add_stream(self, stream: EventStream) -> None:
        if self.outbound.closed:
            stream.close()
        else:
            self.streams.add(stream)

    def forget_stream(self, stream: EventStream) -> None:
        self.streams.discard(stream)

    def start_task(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def close(self) -> None:
        for stream in list(self.streams):
            stream.close()
        self.streams.clear()
        self.outbound.close()
        self.transport.abort()

    def events(self) -> list[int]:
        return [m["params"]["seq"] for m in self.transport.messages()
                if m.get("method") == "event"]


# --- the queue ----------------------------------------------------------------------------



def line(n: int, fill: bytes = b"x") -> bytes:
    return fill * (n - 1) + b"\n"


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_client_that_keeps_up_gets_lines_straight_through() -> None:
    conn = FakeConnection()
    out = conn.outbound
    tally = Counter()
    for _ in range(10):
        assert out.offer(line(100), tally)
    assert conn.transport.get_write_buffer_size() == 1000
    assert not out.backlogged and tally.queued == 0
    assert out.size == 1000


async def test_lines_queue_behind_a_full_transport_in_order() -> None:
    conn = FakeConnection()
    out = conn.outbound
    tally = Counter()
    out.offer(line(HIGH_WATER + 1, b"a"))  # the transport is now over its high-water mark
    out.offer(line(10, b"b"), tally)
    out.offer(line(10, b"c"), tally)
    assert out.backlogged and tally.queued == 2
    assert out.size == HIGH_WATER + 21
    conn.transport.read()  # the client reads: the writer moves the queue on
    await settle()
    conn.transport.read()
    assert not out.backlogged and tally.queued == 0
    data = bytes(conn.transport.received)
    assert data == line(HIGH_WATER + 1, b"a") + line(10, b"b") + line(10, b"c")


async def test_the_bound_counts_queued_and_transport_bytes() -> None:
    conn = FakeConnection(max_bytes=256 * 1024)
    out = conn.outbound
    assert out.offer(line(100 * 1024))
    assert out.offer(line(100 * 1024))  # queued: 200 KiB in all
    assert out.size == 200 * 1024
    assert not out.offer(line(60 * 1024))  # 260 KiB > 256 KiB
    assert out.offer(line(50 * 1024))  # 250 KiB fits
    assert out.size == 250 * 1024


async def test_one_line_bigger_than_the_bound_goes_out_when_nothing_is_backed_up() -> None:
    conn = FakeConnection(max_bytes=128 * 1024)
    out = conn.outbound
    assert out.offer(line(1024 * 1024))  # a big console-log reply to a reading client
    assert not out.offer(line(10))  # but nothing more while it waits to be read
    conn.transport.read()
    await settle()
    assert out.offer(line(10))


async def test_max_queued_per_tally() -> None:
    conn = FakeConnection()
    out = conn.outbound
    sub = Counter()
    out.offer(line(HIGH_WATER + 1))
    assert all(out.offer(line(10), sub, 3) for _ in range(3))
    assert not out.offer(line(10), sub, 3)
    assert out.offer(line(10), Counter(), 3)  # another subscription is not affected


async def test_force_ignores_the_bound() -> None:
    conn = FakeConnection(max_bytes=64 * 1024)
    out = conn.outbound
    out.offer(line(HIGH_WATER + 1))
    assert not out.offer(line(100))
    out.force(line(100))
    assert out.backlogged


async def test_a_client_that_stops_reading_is_reported_stuck_after_the_timeout() -> None:
    conn = FakeConnection(write_timeout_s=0.1)
    conn.outbound.offer(line(HIGH_WATER + 1))
    conn.outbound.offer(line(10))
    await asyncio.sleep(0.3)
    assert len(conn.stuck) == 1 and "0.1 s" in conn.stuck[0], conn.stuck


async def test_until_empty_waits_for_the_client_and_returns_on_close() -> None:
    conn = FakeConnection()
    out = conn.outbound
    out.offer(line(HIGH_WATER + 1))
    out.offer(line(10))
    waiter = asyncio.create_task(out.until_empty())
    await settle()
    assert not waiter.done()
    conn.transport.read()
    await asyncio.wait_for(waiter, 1)
    out.offer(line(HIGH_WATER + 1))
    out.offer(line(10))
    waiter = asyncio.create_task(out.until_empty())
    await settle()
    out.close()
    await asyncio.wait_for(waiter, 1)


async def test_close_drops_the_queue_and_the_writer() -> None:
    conn = FakeConnection()
    out = conn.outbound
    tally = Counter()
    out.offer(line(HIGH_WATER + 1))
    for _ in range(100):
        out.offer(line(1000), tally)
    out.close()
    await settle()
    assert out.size == 0 and not out.backlogged
    assert out.offer(line(10))  # dropped quietly: the client is gone
    assert conn.transport.get_write_buffer_size() == HIGH_WATER + 1
    assert [t for t in asyncio.all_tasks() if t.get_name() == "client-writer"] == []


async def test_a_transport_the_peer_already_closed_closes_the_connection() -> None:
    conn = FakeConnection()
    conn.transport.closed = True  # writes now raise, as uvloop's do after the peer left
    assert conn.outbound.offer(line(10))
    assert conn.stuck == [""]
