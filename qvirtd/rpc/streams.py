"""The `event` method: a connection's subscriptions, fed straight into its outbound queue.

Live events reach a subscription through a bus callback (run by the flush, no lock held, no
task): the notification is offered to the connection's `Outbound`. If this subscription has
`event_queue_per_subscriber` events still queued, or the queue is at
`client_outbound_max_bytes`, the subscription ends with one `event-overflow` notice and the
connection carries on.

A replay (`since_seq`) is one task per subscription: it copies buffered events from the
bus's replay buffer into the queue in batches, waiting for the queue to empty between
batches (never dropping one), and the bus makes the subscription live in the same step that
hands out the last buffered event (see `EventBus.replay`), so nothing is lost or repeated
across the switch. If the buffer rolls past the replay's cursor first, the subscription ends
with an `event-overflow` notice whose `reason` is `replay-gap`.

Everything here belongs to the connection: when it closes, its subscriptions are dropped
and their replay tasks cancelled.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from typing import Any, Protocol

from ..errors import ReplayGapError
from ..events import Event, EventBus, ReplayGap, Subscription
from .outbound import Outbound


class StreamOwner(Protocol):
    """What a subscription needs from its connection (a fake one in the unit tests)."""

    @property
    def outbound(self) -> Outbound: ...

    def add_stream(self, stream: EventStream) -> None: ...

    def forget_stream(self, stream: EventStream) -> None: ...

    def start_task(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]: ...


def notice(bus: EventBus, reason: str, lost_after_seq: int, message: str) -> bytes:
    """The `event-overflow` notification that ends a subscription."""
    return json.dumps({"jsonrpc": "2.0", "method": "event-overflow",
                       "params": {"last_seq": bus.last_seq, "reason": reason,
                                  "lost_after_seq": lost_after_seq, "message": message}},
                      separators=(",", ":")).encode() + b"\n"


class EventStream:
    """One `event` subscription of one connection."""

    def __init__(self, owner: StreamOwner, bus: EventBus) -> None:
        self.owner = owner
        self.bus = bus
        self.sub: Subscription | None = None
        self.queued = 0  # its notifications still in the outbound queue (a Tally)
        self.task: asyncio.Task[None] | None = None
        self.closed = False

    def deliver(self, ev: Event) -> None:
        """The bus callback for live events: offer, or end the subscription."""
        if self.closed:
            return
        out = self.owner.outbound
        limit = self.bus.queue_per_subscriber
        if out.offer(ev.notification(), self, limit):
            return
        if self.queued >= limit:
            why = (f"it had {self.queued} events waiting to be read "
                   f"(event_queue_per_subscriber)")
        else:
            why = (f"its connection had {out.size} bytes waiting to be read "
                   f"(client_outbound_max_bytes {out.max_bytes})")
        self.end("overflow", ev.seq - 1,
                 f"event stream overflowed: {why}; events after seq {ev.seq - 1} were not "
                 "delivered; re-read state")

    async def replay(self) -> None:
        """Stream the buffered events at the client's pace, then leave it live."""
        sub = self.sub
        assert sub is not None
        out = self.owner.outbound
        batch = max(1, self.bus.queue_per_subscriber // 2)
        try:
            while not self.closed and not out.closed:
                await out.until_empty()
                if self.closed or out.closed or sub.deleted:
                    return
                try:
                    events, live = self.bus.replay(sub, batch, out.max_bytes // 2)
                except ReplayGap as gap:
                    self.end("replay-gap", gap.after_seq,
                             f"event replay fell behind: events after seq {gap.after_seq} "
                             "left the replay buffer (event_replay_buffer) before this "
                             "client read them; re-read state")
                    return
                for ev in events:
                    out.force(ev.notification(), self)
                if live:
                    return
        finally:
            self.task = None

    def end(self, reason: str, lost_after_seq: int, message: str) -> None:
        """End the subscription with a notice (the connection stays)."""
        if self.closed:
            return
        self.owner.outbound.force(notice(self.bus, reason, lost_after_seq, message))
        if self.sub is not None:
            self.sub.overflowed = True
        self.close()
        self.owner.forget_stream(self)

    def close(self) -> None:
        """Drop the subscription and stop its replay (the connection closes, or `end`)."""
        if self.closed:
            return
        self.closed = True
        if self.sub is not None:
            self.bus.unsubscribe(self.sub)
        task = self.task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        self.task = None


async def subscribe_events(bus: EventBus, owner: StreamOwner, domain: str | None,
                           kinds: list[str] | None, since_seq: int | None) -> dict[str, Any]:
    """The `event` method: subscribe this connection; replay first with `since_seq`."""
    stream = EventStream(owner, bus)
    try:
        sub = bus.open_stream([domain] if domain else None, kinds, stream.deliver, since_seq)
    except ReplayGap as exc:
        raise ReplayGapError(str(exc)) from None
    stream.sub = sub
    owner.add_stream(stream)  # a connection already closed drops it at once
    if not sub.live and not stream.closed:
        stream.task = owner.start_task(stream.replay(), "event-replay")
    return {"subscribed": True, "last_seq": bus.last_seq}
