"""Event subscriptions of a connection (qvirtd.rpc.streams), with a fake connection.

The replay-to-live switch is checked event by event: whatever the interleaving of pushes,
flushes and client reads, a subscriber gets every seq after `since_seq` exactly once, in
order, or a `replay-gap` notice after an unbroken prefix, never a silent skip."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from test_rpc_outbound import FakeConnection

from qvirtd.errors import ReplayGapError
from qvirtd.events import EventBus
from qvirtd.rpc.streams import subscribe_events

UUID = "6f1f2bd2-5a55-4c6c-9d43-0b1f0e3d9a10"
NEVER = 3600.0  # a flush delay the tests never reach: they flush by hand


def push(bus: EventBus, n: int = 1, pad: int = 0, name: str = "a") -> None:
    for _ in range(n):
        bus.push("lifecycle", name, UUID, 1, type="defined", detail="added",
                 data={"pad": "x" * pad} if pad else None)


def flush(bus: EventBus) -> None:
    bus._flush()


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def subscribe(bus: EventBus, conn: FakeConnection, since_seq: int | None = None,
                    domain: str | None = None) -> dict[str, Any]:
    return await subscribe_events(bus, conn, domain, None, since_seq)


def notices(conn: FakeConnection) -> list[dict[str, Any]]:
    return [m["params"] for m in conn.transport.messages() if m.get("method") == "event-overflow"]


async def test_switch_over_with_events_pending_at_the_switch() -> None:
    bus = EventBus(flush_delay_s=NEVER, queue_per_subscriber=10)
    conn = FakeConnection()
    push(bus, 20)
    flush(bus)
    reply = await subscribe(bus, conn, since_seq=0)
    assert reply == {"subscribed": True, "last_seq": 20}
    push(bus, 5)  # 21..25: pushed, not flushed when the replay catches up
    await settle()
    assert conn.tasks == set()  # the replay is over: the subscription is live
    conn.transport.read()
    assert conn.events() == list(range(1, 21))
    push(bus)  # 26
    flush(bus)  # 21..26 come from the flush, once
    conn.transport.read()
    assert conn.events() == list(range(1, 27))
    assert bus.subscriber_count == 1


async def test_switch_over_when_the_flush_runs_before_the_replay() -> None:
    bus = EventBus(flush_delay_s=NEVER, queue_per_subscriber=10)
    conn = FakeConnection()
    push(bus, 20)
    flush(bus)
    await subscribe(bus, conn, since_seq=3)
    push(bus, 5)
    flush(bus)  # 21..25 flushed while the subscription still replays: it is not live yet
    await settle()
    push(bus, 2)
    flush(bus)
    conn.transport.read()
    assert conn.events() == list(range(4, 28))


async def test_a_slow_client_is_replayed_at_its_pace_and_nothing_is_dropped() -> None:
    # Big events: a few fill the transport, so the replay has to wait for the client.
    bus = EventBus(flush_delay_s=NEVER, queue_per_subscriber=4, replay_size=10000)
    conn = FakeConnection(max_bytes=64 * 1024)
    push(bus, 300, pad=4000)  # 1.2 MB, far more than the queue's bound
    flush(bus)
    await subscribe(bus, conn, since_seq=0)
    await settle()
    assert conn.tasks  # still replaying: the client has not read
    assert conn.outbound.size < 200 * 1024  # paced, never queued all at once
    rounds = 0
    while conn.tasks:
        conn.transport.read(50_000)
        push(bus, 1, pad=4000)  # live events keep coming meanwhile
        if rounds % 3 == 0:
            flush(bus)
        await settle()
        rounds += 1
        assert rounds < 10_000
    flush(bus)
    await settle()
    while conn.transport.buffer or conn.outbound.backlogged:
        conn.transport.read()
        await settle()
    assert conn.events() == list(range(1, bus.last_seq + 1))
    assert notices(conn) == []


async def test_replay_longer_than_the_subscriber_queue_is_exact() -> None:
    # Recipe C, in memory: 1,400 buffered events, a queue of 100.
    bus = EventBus(flush_delay_s=NEVER, queue_per_subscriber=100, replay_size=10000)
    conn = FakeConnection()
    for _ in range(14):
        push(bus, 100, pad=200)
        flush(bus)
    await subscribe(bus, conn, since_seq=0)
    while conn.tasks:
        conn.transport.read()
        await settle()
    push(bus, 3)
    flush(bus)
    await settle()
    conn.transport.read()
    assert conn.events() == list(range(1, 1404))
    assert notices(conn) == []


async def test_the_buffer_rolling_past_a_slow_replay_ends_it_with_a_gap_notice() -> None:
    bus = EventBus(flush_delay_s=NEVER, queue_per_subscriber=4, replay_size=40)
    conn = FakeConnection(max_bytes=64 * 1024)
    push(bus, 40, pad=4000)
    flush(bus)
    await subscribe(bus, conn, since_seq=0)
    await settle()
    assert conn.tasks  # stuck behind a client that does not read
    push(bus, 100, pad=100)  # the buffer holds 40: the replay's cursor falls out of it
    flush(bus)
    conn.transport.read()
    await settle()
    conn.transport.read()
    assert conn.tasks == set()
    got = conn.events()
    assert got == list(range(1, len(got) + 1))  # an unbroken prefix, then the notice
    [gap] = notices(conn)
    assert gap["reason"] == "replay-gap" and gap["lost_after_seq"] == len(got)
    assert f"after seq {len(got)}" in gap["message"] and "re-read state" in gap["message"]
    assert conn.transport.messages()[-1]["method"] == "event-overflow"
    assert bus.subscriber_count == 0 and bus.dropped_subscribers == 1
    assert conn.streams == set() and not conn.outbound.closed  # the connection stays


async def test_a_gap_at_subscribe_time_is_an_error_reply() -> None:
    bus = EventBus(flush_delay_s=NEVER, replay_size=5)
    push(bus, 10)
    flush(bus)
    with pytest.raises(ReplayGapError, match="re-read state"):
        await subscribe(bus, FakeConnection(), since_seq=2)
    assert bus.subscriber_count == 0


async def test_live_subscription_starts_exactly_after_the_last_seq_it_is_told() -> None:
    bus = EventBus(flush_delay_s=NEVER)
    conn = FakeConnection()
    push(bus, 3)  # pending when the client subscribes: before its last_seq
    reply = await subscribe(bus, conn)
    assert reply["last_seq"] == 3
    push(bus, 2)
    flush(bus)
    conn.transport.read()
    assert conn.events() == [4, 5]


async def test_since_seq_from_an_earlier_daemon_means_from_now_on() -> None:
    bus = EventBus(flush_delay_s=NEVER)
    conn = FakeConnection()
    push(bus, 3)
    flush(bus)
    await subscribe(bus, conn, since_seq=500)
    push(bus, 2)
    flush(bus)
    conn.transport.read()
    assert conn.events() == [4, 5]


async def test_a_live_subscriber_that_stops_reading_gets_one_overflow_notice() -> None:
    bus = EventBus(flush_delay_s=NEVER, queue_per_subscriber=10)
    stalled, reading = FakeConnection(), FakeConnection()
    await subscribe(bus, stalled)
    await subscribe(bus, reading)
    for _ in range(50):
        push(bus, 20, pad=1000)  # each flush fits the transport of a client that reads
        flush(bus)
        reading.transport.read()
        await settle()
    assert reading.events() == list(range(1, 1001))
    # Read at last: what fitted, then the notice.
    while stalled.transport.buffer or stalled.outbound.backlogged:
        stalled.transport.read()
        await settle()
    got = stalled.events()
    assert got == list(range(1, len(got) + 1)) and len(got) < 1000
    [note] = notices(stalled)
    assert note["reason"] == "overflow" and note["lost_after_seq"] == len(got)
    assert "event_queue_per_subscriber" in note["message"]
    assert stalled.transport.messages()[-1]["method"] == "event-overflow"
    assert bus.subscriber_count == 1 and bus.dropped_subscribers == 1
    assert not stalled.outbound.closed  # only the subscription ended


async def test_closing_the_connection_ends_its_subscriptions_and_replays() -> None:
    bus = EventBus(flush_delay_s=NEVER, queue_per_subscriber=4)
    conn = FakeConnection(max_bytes=64 * 1024)
    push(bus, 50, pad=4000)
    flush(bus)
    await subscribe(bus, conn, since_seq=0)
    await subscribe(bus, conn, domain="nosuch")
    await settle()
    assert bus.subscriber_count == 2 and len(conn.tasks) == 1
    conn.close()
    await settle()
    assert bus.subscriber_count == 0 and conn.tasks == set()
    push(bus, 5)
    flush(bus)  # nothing reaches the closed connection, nothing fails
    assert bus.dropped_subscribers == 0


@pytest.mark.parametrize("seed", range(40))
async def test_random_interleavings_deliver_every_event_exactly_once(seed: int) -> None:
    rng = random.Random(seed)
    bus = EventBus(flush_delay_s=NEVER, queue_per_subscriber=rng.choice([2, 5, 50]),
                   replay_size=rng.choice([60, 100000]))
    conn = FakeConnection(max_bytes=64 * 1024)
    push(bus, rng.randrange(0, 80), pad=rng.choice([10, 3000]))
    if rng.random() < 0.7:
        flush(bus)
    push(bus, rng.randrange(0, 5))
    since = rng.randrange(0, bus.last_seq + 1)
    try:
        await subscribe(bus, conn, since_seq=since)
    except ReplayGapError:
        return
    for _ in range(rng.randrange(5, 60)):
        action = rng.random()
        if action < 0.4:
            push(bus, rng.randrange(1, 6), pad=rng.choice([10, 3000]))
        elif action < 0.6:
            flush(bus)
        elif action < 0.9:
            conn.transport.read(rng.randrange(1, 100_000))
        await asyncio.sleep(0) if rng.random() < 0.5 else await settle()
    flush(bus)
    for _ in range(1000):
        conn.transport.read()
        await settle()
        if not conn.tasks and not conn.outbound.backlogged and not conn.transport.buffer:
            break
    got = conn.events()
    gaps = notices(conn)
    if gaps:
        [gap] = gaps
        assert gap["reason"] in ("replay-gap", "overflow")
        assert got == list(range(since + 1, gap["lost_after_seq"] + 1))
    else:
        assert got == list(range(since + 1, bus.last_seq + 1)), (since, bus.last_seq)
