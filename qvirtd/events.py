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

Exactly once: `flushed_seq` is the last event handed to the subscribers of a flush; every
later one is still pending and goes to whoever is subscribed when the next flush runs. A
replay therefore covers the buffered events up to `flushed_seq` and the subscription joins
the live list in the same synchronous step (`open_stream` / `replay`), so each event comes
once, from the replay or from the flush, never from both and never from neither.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import itertools
import logging
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_json

from .locks import locks_held

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
            cached = to_json({"jsonrpc": "2.0", "method": "event",
                              "params": self.wire()}) + b"\n"
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
        after_seq: int = 0,
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
        # Events up to this seq never reach it (they were replayed, or came before it).
        self.after_seq = after_seq
        # While replaying (`EventBus.open_stream`): the last seq the replay has looked at.
        self.cursor = after_seq
        self.live = True

    def matches(self, event: Event) -> bool:
        if self.domains is not None and not (
            event.domain.name in self.domains or event.domain.uuid in self.domains
        ):
            return False
        return self.kinds is None or event.event in self.kinds

    def deliver(self, event: Event) -> None:
        """Called by the flush with no lock held; never blocks."""
        if self.deleted:  # dropped earlier in this delivery: nothing more, ever
            return
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

    def __init__(self, message: str, after_seq: int) -> None:
        super().__init__(message)
        self.after_seq = after_seq  # the events after this seq are lost


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
        # Every event up to this seq has been handed to the subscribers of its flush.
        self.flushed_seq = 0
        # Replaced, never changed in place: a flush walks the list it started with.
        self._subs: list[Subscription] = []
        self._replaying: set[Subscription] = set()
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

    def deliver_now(self) -> None:
        """Deliver what is queued at once, from a task that holds no lock (rule E1, checked
        here): the flush timer then finds nothing to do. The QMP event pump calls it right
        after it lets go of the domain lock, so that an event reaches its subscribers before
        the task that caused it, woken by the same read from QEMU, goes on (that had put
        0.3 ms between an event and its delivery). With a flush delay set, the timer
        batches instead."""
        if not self._pending or self.flush_delay_s > 0:
            return
        held = locks_held()
        assert not held, f"events delivered while holding {[lock.name for lock in held]}"
        if self._timer is not None:
            self._timer.cancel()
        self._flush()

    def _flush(self) -> None:
        """The flush timer: deliver queued events. A loop callback holds no lock (rule E1)."""
        self._timer = None
        batch, self._pending = self._pending, []
        if not batch:
            return
        self.flushed_seq = batch[-1].seq
        subs = self._subs  # who was subscribed when the flush began
        self._dispatching = True
        try:
            for ev in batch:
                seq = ev.seq
                for sub in subs:
                    if not sub.deleted and seq > sub.after_seq and sub.matches(ev):
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
        """Add a subscriber (in-process); with `since_seq`, first replay the buffered events
        after it, at once (a queue subscriber whose queue cannot hold them overflows)."""
        after = 0 if since_seq is None else min(since_seq, self.last_seq)
        sub = Subscription(self, domains, kinds, callback, self.queue_per_subscriber, after)
        if since_seq is not None and since_seq < self.last_seq:
            self._check_gap(since_seq)
            # Events after flushed_seq are pending: the next flush delivers them.
            for ev in self._buffered_after(since_seq):
                if ev.seq > self.flushed_seq:
                    break
                if sub.matches(ev):
                    sub.deliver(ev)
        self._subs = [*self._subs, sub]
        return sub

    def open_stream(self, domains: Iterable[str] | None, kinds: Iterable[str] | None,
                    callback: Callable[[Event], None],
                    since_seq: int | None = None) -> Subscription:
        """A subscription for a client, which takes its events at its own pace.

        Without `since_seq` it is live at once and gets exactly the events after `last_seq`
        (as it is now, what the client is told). With `since_seq`, the events after it are
        replayed first: the caller pulls them with `replay()` as the client has room, and
        the subscription goes live by itself when the replay has caught up. Raises
        `ReplayGap` if those events are no longer buffered."""
        if since_seq is None:
            sub = Subscription(self, domains, kinds, callback, self.queue_per_subscriber,
                               after_seq=self.last_seq)
            self._subs = [*self._subs, sub]
            return sub
        # A seq from an earlier daemon (higher than ours): everything from now on.
        cursor = min(since_seq, self.last_seq)
        sub = Subscription(self, domains, kinds, callback, self.queue_per_subscriber,
                           after_seq=cursor)
        if cursor < self.flushed_seq:
            self._check_gap(cursor)
            sub.live = False
            self._replaying.add(sub)
        else:
            self._subs = [*self._subs, sub]
        return sub

    def replay(self, sub: Subscription, max_events: int,
               max_bytes: int) -> tuple[list[Event], bool]:
        """The next buffered events of a replaying subscription, in order: at most
        `max_events` matching ones, stopping once they add up to `max_bytes` on the wire.

        Returns (events, live): `live` is True once the replay has reached every event
        already flushed; the subscription is then live, in this same synchronous step, and
        the next flush brings it the events still pending (so none is missed or repeated).
        Raises `ReplayGap` (and drops the subscription) if the buffer rolled past the
        replay's cursor while the client was reading (a very slow client)."""
        if sub.deleted or sub.live:
            return [], sub.live
        try:
            self._check_gap(sub.cursor)
        except ReplayGap:
            sub.overflowed = True
            self.unsubscribe(sub)
            raise
        out: list[Event] = []
        size = 0
        cursor = sub.cursor
        flushed = self.flushed_seq
        for ev in self._buffered_after(cursor):
            if ev.seq > flushed:
                break
            cursor = ev.seq
            if sub.matches(ev):
                out.append(ev)
                size += len(ev.notification())
                if len(out) >= max_events or size >= max_bytes:
                    break
        sub.cursor = cursor
        if cursor >= flushed:
            self._replaying.discard(sub)
            sub.after_seq = cursor
            sub.live = True
            self._subs = [*self._subs, sub]
        return out, sub.live

    def _check_gap(self, after_seq: int) -> None:
        """Raise ReplayGap unless every event after `after_seq` is still buffered."""
        if after_seq >= self.last_seq:
            return
        oldest = self._replay[0].seq if self._replay else self.last_seq + 1
        if oldest > after_seq + 1:
            raise ReplayGap(f"events after seq {after_seq} are no longer buffered "
                            f"(oldest is {oldest}); re-read state", after_seq)

    def _buffered_after(self, after_seq: int) -> Iterable[Event]:
        """The buffered events after `after_seq` (their seqs are consecutive)."""
        if not self._replay:
            return ()
        start = max(0, after_seq + 1 - self._replay[0].seq)
        return itertools.islice(self._replay, start, None)

    def unsubscribe(self, sub: Subscription) -> None:
        """Mark only; the list is purged at the next safe point (never mid-delivery)."""
        if sub.deleted:
            return
        sub.deleted = True
        self._replaying.discard(sub)
        if sub.overflowed:
            self.dropped_subscribers += 1
        sub.ready.set()
        if not self._dispatching:
            self._purge()

    @property
    def subscriber_count(self) -> int:
        """Live subscribers and those still replaying."""
        return sum(1 for s in self._subs if not s.deleted) + len(self._replaying)
