"""Locks that know who holds them, so the lock rules can be checked while the daemon runs.

asyncio locks are cheap, but an `await` under one stalls everything queued behind it. Our rule
(docs/design.md, L4) is that no QMP command, process wait or sleep is awaited while the current
task holds the driver lock or a domain lock. `TrackedLock` records, per task, the locks it holds;
`check_no_locks()` is called at every such wait and counts (or, with `lock_check`, raises on)
violations. The driver lock also records how long it was held, for `daemon-stats`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any, Literal

from .errors import LockDisciplineError

log = logging.getLogger(__name__)

_held: dict[asyncio.Task[Any], list[TrackedLock]] = {}


class WouldWait(Exception):
    """A synchronous read found a lock it needs held: it is answered by a task instead,
    which waits for the lock as usual."""


class LockWatch:
    """Process-wide switch and counters for lock-discipline checking."""

    strict = False
    violations = 0
    last_violation = ""


class HoldStats:
    """Hold times of one lock: count, max and a bounded window of recent samples."""

    def __init__(self, window: int = 20000) -> None:
        self.count = 0
        self.max_s = 0.0
        self.samples: collections.deque[float] = collections.deque(maxlen=window)

    def add(self, seconds: float) -> None:
        self.count += 1
        self.max_s = max(self.max_s, seconds)
        self.samples.append(seconds)

    def summary(self) -> dict[str, float | int]:
        ordered = sorted(self.samples)

        def pct(p: float) -> float:
            if not ordered:
                return 0.0
            return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

        return {
            "count": self.count,
            "p50_ms": pct(0.50) * 1e3,
            "p99_ms": pct(0.99) * 1e3,
            "max_ms": self.max_s * 1e3,
        }


class TrackedLock(asyncio.Lock):
    """An asyncio.Lock that records its holder task (and, optionally, hold times)."""

    def __init__(self, name: str, stats: HoldStats | None = None) -> None:
        super().__init__()
        self.name = name
        self.stats = stats
        self._owner: asyncio.Task[Any] | None = None
        self._since = 0.0

    async def acquire(self) -> Literal[True]:
        await super().acquire()
        self._took()
        return True

    def acquire_now(self) -> bool:
        """Take the lock without awaiting if nobody holds it or waits for it, for a
        synchronous section that releases it before any await; False otherwise (take it
        the ordinary way). Taken, it is as if `acquire()` had returned at once: the lock is
        free and nobody queues for it, so asyncio.Lock's acquire returns without suspending
        (driven here by hand; a suspension cannot happen and is undone if it does)."""
        if self.locked():
            return False
        taking = super().acquire()
        try:
            taking.send(None)
        except StopIteration:
            self._took()
            return True
        taking.close()  # it would have waited (a waiter was woken, not yet run): give way
        return False

    def _took(self) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._owner = task
            _held.setdefault(task, []).append(self)
        self._since = time.perf_counter()

    def release(self) -> None:
        if self.stats is not None:
            self.stats.add(time.perf_counter() - self._since)
        owner = self._owner
        if owner is not None:
            held = _held.get(owner)
            if held is not None:
                try:
                    held.remove(self)
                except ValueError:
                    pass
                if not held:
                    del _held[owner]
            self._owner = None
        super().release()

    def read_now(self) -> None:
        """Before a synchronous read of what this lock guards, with no await until the read
        is done: raises WouldWait if some task holds the lock (it may be half-way through a
        change). Otherwise the read is as if made under the lock: nobody holds it, and
        nothing else runs on the loop until the reader returns. (rule L1/L3's inline
        reads, docs/design.md)"""
        if self.locked():
            raise WouldWait(self.name)

    def held_by_current_task(self) -> bool:
        return self._owner is not None and self._owner is asyncio.current_task()


def locks_held() -> list[TrackedLock]:
    """The tracked locks the current task holds right now."""
    task = asyncio.current_task()
    if task is None:
        return []
    return list(_held.get(task, ()))


def check_no_locks(what: str) -> None:
    """Called before awaiting `what` (a QMP command, a process exit): rule L4."""
    held = locks_held()
    if not held:
        return
    names = ", ".join(lock.name for lock in held)
    LockWatch.violations += 1
    LockWatch.last_violation = f"{what} awaited while holding {names}"
    log.error("lock rule L4 broken: %s", LockWatch.last_violation)
    if LockWatch.strict:
        raise LockDisciplineError(f"lock rule L4 broken: {LockWatch.last_violation}")
