"""The job condition of one domain: who may change it, who waits, and for how long.

A job is taken while holding the domain lock by waiting on the job condition (the wait releases
the domain lock, rule L2); once held, the domain lock is dropped around every QMP call or other
wait. Two slots, as in libvirt's QEMU driver:

* the sync slot holds one QUERY, MODIFY or DESTROY job at a time;
* the async slot holds one ASYNC job (a long operation such as start). While an async job runs,
  other tasks may still take QUERY and DESTROY jobs in the sync slot, and the async job's own
  task may take any sync job (nested), so queries keep answering during long operations.

Every wait ends after `timeout` with a `JobTimeoutError` that names the job holding the domain,
what asked for it and for how long it has held it, so a stuck domain explains itself.
"""

from __future__ import annotations

import asyncio
import datetime
import enum
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import JobTimeoutError


class JobKind(enum.StrEnum):
    QUERY = "query"      # reads from QEMU, changes nothing
    MODIFY = "modify"    # changes the domain (suspend, reset, hotplug, ...)
    DESTROY = "destroy"  # tears the domain down; allowed beside an async job
    ASYNC = "async"      # long operation; QUERY and DESTROY may run beside it


# Sync jobs another task may start while an async job runs.
_ALLOWED_BESIDE_ASYNC = frozenset({JobKind.QUERY, JobKind.DESTROY})


@dataclass
class Job:
    """One held job: what it is, who asked for it, since when."""

    kind: JobKind
    owner: str
    task: asyncio.Task[Any] | None = field(default_factory=asyncio.current_task)
    since: float = field(default_factory=time.monotonic)
    started_at: str = field(default_factory=lambda: datetime.datetime.now(
        datetime.UTC).isoformat(timespec="seconds"))

    def describe(self, now: float | None = None) -> str:
        held = (now if now is not None else time.monotonic()) - self.since
        return f"job '{self.kind}' for '{self.owner}' (held for {held:.1f} s)"


class JobCondition:
    """The per-domain job slots. Every method must be called with the domain lock held."""

    def __init__(self, lock: asyncio.Lock, domain_name: str) -> None:
        self._cond = asyncio.Condition(lock)
        self.domain_name = domain_name
        self.sync_job: Job | None = None
        self.async_job: Job | None = None

    def _can_start(self, kind: JobKind) -> bool:
        if kind is JobKind.ASYNC:
            return self.async_job is None and self.sync_job is None
        if self.sync_job is not None:
            return False
        if self.async_job is None:
            return True
        nested = self.async_job.task is not None and self.async_job.task is asyncio.current_task()
        return nested or kind in _ALLOWED_BESIDE_ASYNC

    def _blocker(self, kind: JobKind) -> Job | None:
        if self.sync_job is not None:
            return self.sync_job
        return self.async_job

    async def acquire(self, kind: JobKind, owner: str, timeout_s: float) -> Job:
        """Wait (releasing the domain lock meanwhile) until `kind` may start, then hold it.

        Waits at most `timeout_s`; then JobTimeoutError names the holder.
        """
        started = time.monotonic()
        deadline = started + timeout_s
        while not self._can_start(kind):
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                # asyncio.timeout, not wait_for: on 3.11 wait_for runs the wait in a helper
                # task, which would re-acquire the domain lock there and leave the lock
                # recorded against the wrong task (breaking the L4 check).
                async with asyncio.timeout(remaining):
                    await self._cond.wait()
            except TimeoutError:
                blocker = self._blocker(kind)
                holder = blocker.describe() if blocker else "another job"
                raise JobTimeoutError(
                    f"cannot start job '{kind}' for '{owner}' on domain '{self.domain_name}' "
                    f"after waiting {time.monotonic() - started:.1f} s: it is held by {holder}"
                ) from None
        job = Job(kind, owner)
        if kind is JobKind.ASYNC:
            self.async_job = job
        else:
            self.sync_job = job
        return job

    def release(self, job: Job) -> None:
        """End `job` and wake the waiters."""
        if job is self.async_job:
            self.async_job = None
        elif job is self.sync_job:
            self.sync_job = None
        self._cond.notify_all()

    def describe(self) -> dict[str, str | None]:
        return {
            "job": self.sync_job.describe() if self.sync_job else None,
            "async_job": self.async_job.describe() if self.async_job else None,
        }
