"""The event bus (qvirtd.events): sequence numbers, deferred delivery, filters, overflow, replay."""

from __future__ import annotations

import asyncio

import pytest

from qvirtd.events import Event, EventBus, ReplayGap, Subscription

UUID_A = "6f1f2bd2-5a55-4c6c-9d43-0b1f0e3d9a10"
UUID_B = "0e4b1a2c-3d4e-4f50-8a6b-7c8d9e0f1a2b"


async def flush() -> None:
    """Let the flush timer (a call_soon callback) run."""
    for _ in range(3):
        await asyncio.sleep(0)


def push(bus: EventBus, n: int = 1, name: str = "a", uuid: str = UUID_A,
         event: str = "lifecycle") -> list[Event]:
    return [bus.push(event, name, uuid, 1, type="started", detail="booted") for _ in range(n)]


def collector(bus: EventBus, **kwargs: object) -> tuple[Subscription, list[Event]]:
    got: list[Event] = []
    sub = bus.subscribe(callback=got.append, **kwargs)  # type: ignore[arg-type]
    return sub, got


def drain(sub: Subscription) -> list[Event]:
    out = list(sub.queue)
    sub.queue.clear()
    return out


async def test_seq_increases_by_one_without_gaps() -> None:
    bus = EventBus()
    events = push(bus, 5) + push(bus, 3, name="b", uuid=UUID_B, event="reboot")
    assert [e.seq for e in events] == list(range(1, 9))
    assert bus.last_seq == 8
    await flush()


async def test_event_wire_format() -> None:
    bus = EventBus()
    ev = bus.push("lifecycle", "a", UUID_A, 3, type="stopped", detail="destroyed")
    wire = ev.wire()
    assert wire["seq"] == 1
    assert wire["domain"] == {"name": "a", "uuid": UUID_A, "id": 3}
    assert wire["event"] == "lifecycle"
    assert (wire["type"], wire["detail"]) == ("stopped", "destroyed")
    assert "data" not in wire  # None fields are left out
    assert "T" in wire["time"]
    await flush()


async def test_delivery_happens_after_the_flush_not_inside_push() -> None:
    bus = EventBus()
    _, got = collector(bus)
    queued = bus.subscribe()
    push(bus, 2)
    assert got == []
    assert len(queued.queue) == 0
    await flush()
    assert [e.seq for e in got] == [1, 2]
    assert [e.seq for e in queued.queue] == [1, 2]
    assert bus.delivered == 4


async def test_flush_delay_defers_delivery() -> None:
    bus = EventBus(flush_delay_s=0.05)
    _, got = collector(bus)
    push(bus)
    await flush()
    assert got == []
    await asyncio.sleep(0.2)
    assert [e.seq for e in got] == [1]


async def test_order_is_preserved_across_flushes() -> None:
    bus = EventBus()
    _, got = collector(bus)
    push(bus, 10)
    await flush()
    push(bus, 5, name="b", uuid=UUID_B)
    await flush()
    push(bus, 1)
    await flush()
    assert [e.seq for e in got] == list(range(1, 17))


async def test_queue_subscriber_reads_in_order() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    push(bus, 3)
    results = [await asyncio.wait_for(sub.get(), 1.0) for _ in range(3)]
    assert [e.seq for e in results if e is not None] == [1, 2, 3]


async def test_get_waits_for_the_next_event() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    reader = asyncio.create_task(sub.get())
    await flush()
    assert not reader.done()
    push(bus)
    ev = await asyncio.wait_for(reader, 1.0)
    assert ev is not None and ev.seq == 1


async def test_closed_subscriber_gets_none_and_nothing_more() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    reader = asyncio.create_task(sub.get())
    await flush()
    sub.close()
    assert await asyncio.wait_for(reader, 1.0) is None
    push(bus)
    await flush()
    assert len(sub.queue) == 0
    assert bus.subscriber_count == 0


async def test_filter_by_domain_name_or_uuid() -> None:
    bus = EventBus()
    _, by_name = collector(bus, domains=["a"])
    _, by_uuid = collector(bus, domains=[UUID_B])
    _, both = collector(bus, domains=["a", UUID_B])
    _, every = collector(bus)
    push(bus, name="a", uuid=UUID_A)
    push(bus, name="b", uuid=UUID_B)
    push(bus, name="c", uuid="11111111-2222-4333-8444-555555555555")
    await flush()
    assert [e.seq for e in by_name] == [1]
    assert [e.seq for e in by_uuid] == [2]
    assert [e.seq for e in both] == [1, 2]
    assert [e.seq for e in every] == [1, 2, 3]


async def test_filter_by_event_kind() -> None:
    bus = EventBus()
    _, lifecycle = collector(bus, kinds=["lifecycle"])
    _, removed = collector(bus, kinds=["device-removed", "reboot"])
    _, combined = collector(bus, domains=["b"], kinds=["reboot"])
    push(bus, event="lifecycle")
    push(bus, event="reboot")
    push(bus, event="device-removed")
    push(bus, name="b", uuid=UUID_B, event="reboot")
    await flush()
    assert [e.seq for e in lifecycle] == [1]
    assert [e.seq for e in removed] == [2, 3, 4]
    assert [e.seq for e in combined] == [4]


async def test_unsubscribe_inside_a_delivery_callback_is_safe() -> None:
    bus = EventBus()
    _, first = collector(bus)
    quitter_got: list[Event] = []

    def quitter(ev: Event) -> None:
        quitter_got.append(ev)
        quitter_sub.close()

    quitter_sub = bus.subscribe(callback=quitter)
    _, last = collector(bus)

    push(bus, 3)  # one batch: the quitter leaves during the first event
    await flush()
    push(bus, 2)
    await flush()

    assert [e.seq for e in quitter_got] == [1]
    assert [e.seq for e in first] == [1, 2, 3, 4, 5]
    assert [e.seq for e in last] == [1, 2, 3, 4, 5]
    assert quitter_sub.deleted
    assert bus.subscriber_count == 2


async def test_unsubscribing_another_subscriber_during_delivery() -> None:
    bus = EventBus()
    victim_got: list[Event] = []

    def killer(ev: Event) -> None:
        victim.close()

    bus.subscribe(callback=killer)
    victim = bus.subscribe(callback=victim_got.append)
    _, survivor = collector(bus)
    push(bus, 2)
    await flush()
    assert victim_got == []
    assert [e.seq for e in survivor] == [1, 2]
    assert bus.subscriber_count == 2


async def test_push_from_inside_a_delivery_callback_is_delivered_later() -> None:
    bus = EventBus()

    def echo(ev: Event) -> None:
        if ev.event == "lifecycle":
            bus.push("reboot", ev.domain.name, ev.domain.uuid, ev.domain.id)

    bus.subscribe(callback=echo)
    _, got = collector(bus)
    push(bus, 2)
    await flush()
    await flush()
    assert [(e.seq, e.event) for e in got] == [
        (1, "lifecycle"), (2, "lifecycle"), (3, "reboot"), (4, "reboot")]


async def test_a_failing_callback_is_dropped_and_others_continue() -> None:
    bus = EventBus()

    def broken(ev: Event) -> None:
        raise RuntimeError("client went away")

    broken_sub = bus.subscribe(callback=broken)
    _, good = collector(bus)
    push(bus, 3)
    await flush()
    assert broken_sub.deleted
    assert [e.seq for e in good] == [1, 2, 3]
    assert bus.subscriber_count == 1


async def test_slow_subscriber_overflows_and_is_dropped() -> None:
    bus = EventBus(queue_per_subscriber=5)
    slow = bus.subscribe()
    _, fast = collector(bus)

    push(bus, 5)
    await flush()
    assert len(slow.queue) == 5 and not slow.overflowed

    push(bus, 1)  # the sixth event does not fit
    await flush()
    assert slow.overflowed
    assert slow.deleted
    assert len(slow.queue) == 0  # its memory is given back
    assert bus.dropped_subscribers == 1
    assert bus.subscriber_count == 1

    push(bus, 100)
    await flush()
    assert len(slow.queue) == 0
    assert await asyncio.wait_for(slow.get(), 1.0) is None
    assert [e.seq for e in fast] == list(range(1, 107))


async def test_overflow_within_one_batch_is_bounded() -> None:
    bus = EventBus(queue_per_subscriber=3)
    slow = bus.subscribe()
    other = bus.subscribe()
    push(bus, 50)
    await flush()
    assert slow.overflowed and other.overflowed
    assert len(slow.queue) == 0 and len(other.queue) == 0
    assert bus.dropped_subscribers == 2
    assert bus.subscriber_count == 0


async def test_a_reader_that_keeps_up_does_not_overflow() -> None:
    bus = EventBus(queue_per_subscriber=2)
    sub = bus.subscribe()
    seen: list[int] = []
    for _ in range(10):
        push(bus, 2)
        await flush()
        for _ in range(2):
            ev = await asyncio.wait_for(sub.get(), 1.0)
            assert ev is not None
            seen.append(ev.seq)
    assert seen == list(range(1, 21))
    assert not sub.overflowed


# --- replay --------------------------------------------------------------------------------

async def test_replay_since_seq() -> None:
    bus = EventBus(replay_size=100)
    push(bus, 5)
    await flush()
    sub = bus.subscribe(since_seq=2)
    assert [e.seq for e in drain(sub)] == [3, 4, 5]
    push(bus)
    await flush()
    assert [e.seq for e in drain(sub)] == [6]


async def test_replay_since_last_seq_gives_nothing() -> None:
    bus = EventBus(replay_size=100)
    push(bus, 5)
    await flush()
    assert drain(bus.subscribe(since_seq=5)) == []


async def test_replay_since_zero_gives_everything_buffered() -> None:
    bus = EventBus(replay_size=100)
    push(bus, 4)
    await flush()
    assert [e.seq for e in drain(bus.subscribe(since_seq=0))] == [1, 2, 3, 4]


async def test_replay_respects_filters() -> None:
    bus = EventBus(replay_size=100)
    push(bus, 2, name="a", uuid=UUID_A)
    push(bus, 2, name="b", uuid=UUID_B)
    await flush()
    _, got = collector(bus, since_seq=0, domains=["b"])
    assert [e.seq for e in got] == [3, 4]


async def test_replay_with_pending_events_delivers_each_once() -> None:
    bus = EventBus(replay_size=100)
    push(bus, 3)
    await flush()
    push(bus, 2)  # not flushed yet
    _, got = collector(bus, since_seq=1)
    await flush()
    assert [e.seq for e in got] == [2, 3, 4, 5]


async def test_replay_gap() -> None:
    bus = EventBus(replay_size=3)
    push(bus, 10)
    await flush()
    with pytest.raises(ReplayGap, match="2"):
        bus.subscribe(since_seq=2)
    with pytest.raises(ReplayGap):
        bus.subscribe(since_seq=6)  # seq 7 is gone
    assert [e.seq for e in drain(bus.subscribe(since_seq=7))] == [8, 9, 10]
    # A refused subscription is not left behind.
    assert bus.subscriber_count == 1


async def test_replay_gap_without_replay_buffer() -> None:
    bus = EventBus(replay_size=0)
    push(bus, 2)
    await flush()
    with pytest.raises(ReplayGap):
        bus.subscribe(since_seq=1)
    assert drain(bus.subscribe(since_seq=2)) == []


async def test_a_replay_longer_than_the_queue_overflows_visibly_not_silently() -> None:
    # Once dropped, a queue subscriber gets nothing more: no later events after a hole.
    bus = EventBus(queue_per_subscriber=10, replay_size=100)
    push(bus, 50)
    await flush()
    sub = bus.subscribe(since_seq=0)
    assert sub.overflowed and sub.deleted
    assert len(sub.queue) == 0
    assert bus.dropped_subscribers == 1


async def test_flushed_seq_follows_the_flush() -> None:
    bus = EventBus()
    push(bus, 3)
    assert bus.flushed_seq == 0
    await flush()
    assert bus.flushed_seq == 3


async def test_open_stream_replays_then_goes_live_in_the_same_step() -> None:
    bus = EventBus(replay_size=100)
    got: list[Event] = []
    push(bus, 10)
    await flush()
    push(bus, 2)  # pending
    sub = bus.open_stream(None, None, got.append, since_seq=4)
    assert not sub.live and bus.subscriber_count == 1
    events, live = bus.replay(sub, max_events=3, max_bytes=1 << 20)
    assert [e.seq for e in events] == [5, 6, 7] and not live
    events, live = bus.replay(sub, max_events=100, max_bytes=1 << 20)
    assert [e.seq for e in events] == [8, 9, 10] and live  # 11, 12 are still pending
    await flush()
    assert [e.seq for e in got] == [11, 12]


async def test_replay_stops_at_max_bytes() -> None:
    bus = EventBus(replay_size=100)
    push(bus, 10)
    await flush()
    sub = bus.open_stream(None, None, lambda ev: None, since_seq=0)
    one = len(bus._replay[0].notification())
    events, live = bus.replay(sub, max_events=100, max_bytes=2 * one)
    assert len(events) == 2 and not live


async def test_replay_that_falls_out_of_the_buffer_raises_and_drops_the_subscription() -> None:
    bus = EventBus(replay_size=5)
    push(bus, 5)
    await flush()
    sub = bus.open_stream(None, None, lambda ev: None, since_seq=0)
    bus.replay(sub, max_events=2, max_bytes=1 << 20)  # cursor at 2
    push(bus, 5)
    await flush()  # seq 3 is gone
    with pytest.raises(ReplayGap) as gap:
        bus.replay(sub, max_events=2, max_bytes=1 << 20)
    assert gap.value.after_seq == 2
    assert sub.deleted and bus.subscriber_count == 0 and bus.dropped_subscribers == 1


async def test_subscribing_during_a_flush_gets_each_event_once() -> None:
    bus = EventBus(replay_size=100)
    late: list[Event] = []

    def subscribe_on_first(ev: Event) -> None:
        if ev.seq == 1:
            bus.subscribe(callback=late.append, since_seq=0)

    bus.subscribe(callback=subscribe_on_first)
    push(bus, 3)  # one batch: the late subscriber joins while it is being delivered
    await flush()
    push(bus)
    await flush()
    assert [e.seq for e in late] == [1, 2, 3, 4]
