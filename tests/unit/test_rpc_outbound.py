"""The per-connection outbound queue (qvirtd.rpc.outbound): bounded by bytes, one writer."""

from __future__ import annotations

import asyncio

from rpc_fakes import FakeConnection

from qvirtd.rpc.outbound import HIGH_WATER, Counter


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
