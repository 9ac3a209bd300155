"""Domain events: created where they happen, queued, delivered by a timer with no lock held.

Following libvirt's thread-safe event design (seed 002): an event carries the triple
(id, name, uuid) rather than a reference to the domain, so it can be created inside the domain's
critical section (`push()` is synchronous and cheap) and delivered later, outside it. A flush
timer drains the queue; delivery runs in a plain loop callback, which by construction holds no
lock. Subscribers that unsubscribe during delivery are only marked, and purged once the
delivery loop is done (the "safe point").

Each subscriber has a bounded queue. A subscriber that falls behind is told it overflowed and
is dropped, so a stuck client can never make the daemon's memory grow or delay the others.
A bounded replay buffer lets a client that reconnects resume from the last `seq` it saw.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import itertools
import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import BaseModel

log = logging.getLogger(__name__)


class EventDomain(BaseModel):
    name: str
    uuid: str
    id: int | None


class Event(BaseModel):
    """One event as clients see it (the contract's event object)."""

    seq: int
    time: str
    domain: EventDomain
    event: str
    type: str | None = None
    detail: str | None = None
    data: dict[str, Any] | None = None
    # For events caused by a QMP event: when QEMU emitted it (ISO 8601), for latency figures.
    qemu_time: str | None = None

    def notification(self) -> bytes:
        """The `event` notification line, encoded once however many subscribers get it."""
        cached: bytes | None = self.__dict__.get("_notification")
        if cached is None:
            cached = json.dumps({"jsonrpc": "2.0", "method": "event", "params": self.wire()},
                                separators=(",", ":")).encode() + b"\n"
            self.__dict__["_notification"] = cached
        return cached

    def wire(self) -> dict[str, Any]:
        """The contract's event object: optional fields left out when empty, but the domain
        always carries name, uuid and id (null when the domain is not running)."""
        out = self.model_dump(mode="json", exclude_none=True)
        out["domain"] = self.domain.model_dump(mode="json")
        return out


class Subscription:
    """A subscriber: a filter plus either a callback or a bounded queue."""

    def __init__(
        self,
        bus: EventBus,
        domains: Iterable[str] | None,
        kinds: Iterable[str] | None,
        callback: Callable[[Event], None] | None,
        maxsize: int,
    ) -> None:
        self.bus = bus
        self.domains = frozenset(domains) if domains else None
        self.kinds = frozenset(kinds) if kinds else None
        self.callback = callback
        self.maxsize = maxsize
        self.queue: collections.deque[Event] = collections.deque()
        self.ready = asyncio.Event()
        self.deleted = False
        self.overflowed = False

    def matches(self, event: Event) -> bool:
        if self.domains is not None and not (
            event.domain.name in self.domains or event.domain.uuid in self.domains
        ):
            return False
        return self.kinds is None or event.event in self.kinds

    def deliver(self, event: Event) -> None:
        """Called by the flush with no lock held; never blocks."""
        if self.callback is not None:
            try:
                self.callback(event)
            except Exception:
                log.exception("event callback failed; dropping the subscription")
                self.bus.unsubscribe(self)
            return
        if len(self.queue) >= self.maxsize:
            self.overflowed = True
            self.queue.clear()
            self.bus.unsubscribe(self)
        else:
            self.queue.append(event)
        self.ready.set()

    async def get(self) -> Event | None:
        """Next event for a queue subscriber; None once it is dropped (see `overflowed`)."""
        while not self.queue:
            if self.deleted:
                return None
            self.ready.clear()
            await self.ready.wait()
        return self.queue.popleft()

    def take_ready(self) -> list[Event]:
        """Everything already queued, at once (a writer sends it in one go)."""
        ready = list(self.queue)
        self.queue.clear()
        return ready

    def close(self) -> None:
        self.bus.unsubscribe(self)


class ReplayGap(Exception):
    """The events after the requested `seq` are no longer buffered: re-read state."""


class EventBus:
    """The event queue, its flush timer and the subscribers."""

    def __init__(self, flush_delay_s: float = 0.0, queue_per_subscriber: int = 1000,
                 replay_size: int = 10000) -> None:
        self.flush_delay_s = flush_delay_s
        self.queue_per_subscriber = queue_per_subscriber
        self._seq = itertools.count(1)
        self.last_seq = 0
        self._pending: list[Event] = []
        self._replay: collections.deque[Event] = collections.deque(maxlen=replay_size)
        self._subs: list[Subscription] = []
        self._timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self._dispatching = False
        self.delivered = 0
        self.dropped_subscribers = 0

    def push(self, event: str, name: str, uuid: str, dom_id: int | None,
             type: str | None = None, detail: str | None = None,
             data: dict[str, Any] | None = None, qemu_time: float | None = None) -> Event:
        """Queue an event where it happens (under the domain lock is fine: no await, no I/O)."""
        seq = next(self._seq)
        self.last_seq = seq
        ev = Event(
            seq=seq,
            time=datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds"),
            domain=EventDomain(name=name, uuid=uuid, id=dom_id),
            event=event, type=type, detail=detail, data=data,
            qemu_time=None if qemu_time is None else datetime.datetime.fromtimestamp(
                qemu_time, datetime.UTC).isoformat(timespec="microseconds"),
        )
        self._pending.append(ev)
        self._replay.append(ev)
        self._arm()
        return ev

    def _arm(self) -> None:
        if self._timer is not None:
            return
        loop = asyncio.get_running_loop()
        if self.flush_delay_s > 0:
            self._timer = loop.call_later(self.flush_delay_s, self._flush)
        else:
            self._timer = loop.call_soon(self._flush)

    def _flush(self) -> None:
        """The flush timer: deliver queued events. A loop callback holds no lock (rule E1)."""
        self._timer = None
        batch, self._pending = self._pending, []
        self._dispatching = True
        try:
            for ev in batch:
                for sub in self._subs:
                    if not sub.deleted and sub.matches(ev):
                        sub.deliver(ev)
                        self.delivered += 1
        finally:
            self._dispatching = False
            self._purge()

    def _purge(self) -> None:
        """The safe point: drop subscriptions marked deleted during delivery."""
        if any(s.deleted for s in self._subs):
            self._subs = [s for s in self._subs if not s.deleted]

    def subscribe(self, domains: Iterable[str] | None = None, kinds: Iterable[str] | None = None,
                  callback: Callable[[Event], None] | None = None,
                  since_seq: int | None = None) -> Subscription:
        """Add a subscriber; with `since_seq`, first replay the buffered events after it."""
        sub = Subscription(self, domains, kinds, callback, self.queue_per_subscriber)
        if since_seq is not None and since_seq < self.last_seq:
            oldest = self._replay[0].seq if self._replay else self.last_seq + 1
            if oldest > since_seq + 1:
                raise ReplayGap(f"events after seq {since_seq} are no longer buffered "
                                f"(oldest is {oldest}); re-read state")
            # Events still pending will come through the flush; replay only delivered ones.
            pending = {e.seq for e in self._pending}
            for ev in self._replay:
                if ev.seq > since_seq and ev.seq not in pending and sub.matches(ev):
                    sub.deliver(ev)
        self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Mark only; the list is purged at the next safe point (never mid-delivery)."""
        if sub.deleted:
            return
        sub.deleted = True
        if sub.overflowed:
            self.dropped_subscribers += 1
        sub.ready.set()
        if not self._dispatching:
            self._purge()

    @property
    def subscriber_count(self) -> int:
        return sum(1 for s in self._subs if not s.deleted)
