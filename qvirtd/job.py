"""The job condition of one domain: who may change it, who waits, and for how long.

The shape is libvirt's (`qemu-threads.rst`, `virdomainjob.c`): two slots per domain.

* The **sync slot** holds one job at a time: QUERY (reads QEMU), MODIFY (changes the
  domain), SUSPEND (only pauses or resumes the vCPUs), DESTROY (the end of a destroy) or
  ABORT (asks the async job to stop).
* The **async slot** holds one long job (START today; save, restore and migration next).
  The async job declares a **mask**: the sync jobs other tasks may take beside it. The
  default mask is QUERY, DESTROY and ABORT; a migration will add SUSPEND. The mask may
  change with the job's phase (`AsyncJob.allow`).
* The holder of an async job takes sync jobs for its own steps through its **handle**
  (`nested=` the AsyncJob): a nested job ignores the mask and waits only for the sync slot.
  Nesting is handed on explicitly; nothing is recognised by `asyncio.current_task()`.
* An async job has a **phase** (persisted in the status file, read back by a restarted
  daemon), a `progress` dict for `domjobinfo`, and an **abort request**: `abortable()` races a
  wait of the job against `domjobabort`.

Every method is called with the domain lock held (asserted), and every wait ends after
`timeout` with a `JobTimeoutError` that names the job holding the domain, who asked for it
and for how long it has held it, so a stuck domain explains itself.
"""

from __future__ import annotations

import asyncio
import datetime
import enum
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import JobAbortedError, JobTimeoutError
from .locks import TrackedLock

T = TypeVar("T")


class JobKind(enum.StrEnum):
    """Sync jobs (one at a time per domain)."""

    QUERY = "query"      # reads from QEMU, changes nothing
    MODIFY = "modify"    # changes the domain (hotplug, reset, define update, ...)
    SUSPEND = "suspend"  # pauses or resumes the vCPUs, nothing else
    DESTROY = "destroy"  # the end of a destroy: waits for the interrupted job to let go
    ABORT = "abort"      # asks the async job to stop (domjobabort)


class AsyncJobKind(enum.StrEnum):
    """Long jobs (at most one per domain), during which some sync jobs may still run."""

    START = "start"        # a boot, or a restore (incoming state from a save file)
    SAVE = "save"          # the guest's state into a file, then QEMU stops
    MIGRATION_OUT = "migration-out"  # live migration to another daemon (the source side)


# The sync jobs other tasks may take beside an async job unless it says otherwise.
DEFAULT_MASK: frozenset[JobKind] = frozenset({JobKind.QUERY, JobKind.DESTROY, JobKind.ABORT})

# What each async job allows beside it, and its phases in order (persisted in status files).
ASYNC_JOBS: dict[AsyncJobKind, tuple[frozenset[JobKind], tuple[str, ...]]] = {
    # prepare: the status file says a start is under way; spawn: QEMU is being spawned;
    # connect: QEMU runs (pid recorded), the monitor is being connected; incoming: a restore
    # loads the saved state; loaded: it has (a managed save image is deleted from here on,
    # so a restarted daemon finishes such a start rather than roll it back); resume: `cont`.
    AsyncJobKind.START: (DEFAULT_MASK, ("prepare", "spawn", "connect", "incoming", "loaded",
                                        "resume")),
    # pause: the vCPUs are being stopped; save: QEMU writes its state to the file; finish:
    # the file is complete and on disk, QEMU is being stopped (reason `saved`).
    AsyncJobKind.SAVE: (DEFAULT_MASK, ("pause", "save", "finish")),
    # begin: recorded, nothing done; prepare: the destination starts its incoming QEMU;
    # perform: the stream runs (the guest runs here until QEMU switches over); finish: the
    # stream is complete, the destination is told to resume the guest; confirm: it did,
    # this QEMU stops (reason migrated). The destination's side is a START job (phases
    # incoming, loaded, resume) whose status records the migration's token.
    AsyncJobKind.MIGRATION_OUT: (DEFAULT_MASK, ("begin", "prepare", "perform", "finish",
                                                "confirm")),
}


def _now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


@dataclass
class Job:
    """One held sync job: what it is, who asked for it, since when."""

    kind: JobKind
    owner: str
    nested_in: AsyncJob | None = None
    label: str = "job"
    since: float = field(default_factory=time.monotonic)
    started_at: str = field(default_factory=_now_iso)

    def describe(self, now: float | None = None) -> str:
        held = (now if now is not None else time.monotonic()) - self.since
        return f"{self.label} '{self.kind}' for '{self.owner}' (held for {held:.1f} s)"

    def info(self) -> dict[str, Any]:
        return {"kind": str(self.kind), "owner": self.owner, "started": self.started_at,
                "elapsed_s": round(time.monotonic() - self.since, 3),
                "nested_in": str(self.nested_in.kind) if self.nested_in else None}


class AsyncJob:
    """The handle of a held async job (see the module docstring)."""

    def __init__(self, cond: JobCondition, kind: AsyncJobKind, owner: str) -> None:
        mask, phases = ASYNC_JOBS[kind]
        self._cond = cond
        self.kind = kind
        self.owner = owner
        self.mask = mask
        self.phases = phases
        self.phase = phases[0]
        self.progress: dict[str, Any] | None = None
        # What a restarted daemon needs to finish or undo the job (persisted with the phase).
        self.data: dict[str, Any] = {}
        self.since = time.monotonic()
        self.started_at = _now_iso()
        self.abort_requested: str | None = None  # who asked
        self._abort = asyncio.Event()
        self.done = asyncio.Event()

    def set_phase(self, phase: str) -> None:
        """Under the domain lock: enter `phase` (the caller then writes the status file)."""
        self._cond.assert_locked()
        if phase not in self.phases:
            raise ValueError(f"{self.kind} has no phase {phase!r}")
        self.phase = phase

    def allow(self, kinds: Iterable[JobKind]) -> None:
        """Under the domain lock: change which sync jobs may run beside this one."""
        self._cond.assert_locked()
        self.mask = frozenset(kinds)
        self._cond.wake()

    def request_abort(self, who: str) -> None:
        """Under the domain lock: ask the job to stop at its next abortable wait."""
        self._cond.assert_locked()
        if self.abort_requested is None:
            self.abort_requested = who
        self._abort.set()

    def check_abort(self) -> None:
        if self.abort_requested is not None:
            raise JobAbortedError(f"{self.kind} of domain '{self._cond.domain_name}' was "
                                  f"aborted by {self.abort_requested}")

    async def abortable(self, awaitable: Awaitable[T]) -> T:
        """Await `awaitable` unless an abort is requested first (then it is cancelled and
        JobAbortedError raised). No lock may be held (it is a wait like any other)."""
        if self.abort_requested is not None:
            if asyncio.iscoroutine(awaitable):
                awaitable.close()
            self.check_abort()
        work = asyncio.ensure_future(awaitable)
        aborted = asyncio.ensure_future(self._abort.wait())
        try:
            await asyncio.wait({work, aborted}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            aborted.cancel()
            if not work.done():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
        if work.cancelled():
            self.check_abort()
        return work.result()

    def describe(self, now: float | None = None) -> str:
        held = (now if now is not None else time.monotonic()) - self.since
        return (f"async job '{self.kind}' (phase {self.phase}) for '{self.owner}' "
                f"(held for {held:.1f} s)")

    def info(self) -> dict[str, Any]:
        return {"kind": str(self.kind), "phase": self.phase, "owner": self.owner,
                "started": self.started_at,
                "elapsed_s": round(time.monotonic() - self.since, 3),
                "allowed": sorted(str(k) for k in self.mask), "progress": self.progress,
                "abort_requested": self.abort_requested}


class JobCondition:
    """The per-domain job slots. Every method must be called with the domain lock held."""

    def __init__(self, lock: TrackedLock, domain_name: str, label: str = "job") -> None:
        self._lock = lock
        self._cond = asyncio.Condition(lock)
        self.domain_name = domain_name
        self.label = label  # "job", or "agent job" for the guest agent's own condition
        self.sync_job: Job | None = None
        self.async_job: AsyncJob | None = None

    def assert_locked(self) -> None:
        assert self._lock.held_by_current_task(), \
            f"{self._lock.name}: job slots touched without the domain lock"

    def wake(self) -> None:
        self._cond.notify_all()

    def _can_start(self, kind: JobKind, nested: AsyncJob | None) -> bool:
        if self.sync_job is not None:
            return False
        if self.async_job is None:
            return True
        if nested is not None:
            return nested is self.async_job
        return kind in self.async_job.mask

    def can_start_now(self, kind: JobKind) -> bool:
        """Whether a `kind` job could start at once (a guess, no lock needed: the job is then
        taken, under the lock, with a zero wait)."""
        return self._can_start(kind, None)

    def holder(self) -> str:
        """The job that holds the domain, described (for errors: who, since when)."""
        blocker = self.sync_job if self.sync_job is not None else self.async_job
        return blocker.describe() if blocker is not None else "another job"

    async def _wait_until(self, ready: Any, what: str, timeout_s: float) -> None:
        started = time.monotonic()
        deadline = started + timeout_s
        while not ready():
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
                holder = self.holder()
                raise JobTimeoutError(
                    f"cannot start {what} on domain '{self.domain_name}' after waiting "
                    f"{time.monotonic() - started:.1f} s: it is held by {holder}") from None

    async def acquire(self, kind: JobKind, owner: str, timeout_s: float,
                      nested: AsyncJob | None = None) -> Job:
        """Wait (releasing the domain lock meanwhile) until `kind` may start, then hold it.
        `nested`: the caller's own async job, whose steps these are (the mask is skipped)."""
        self.assert_locked()
        if nested is not None and nested is not self.async_job:
            raise RuntimeError(f"{nested.describe()} is not the async job of domain "
                               f"'{self.domain_name}'")
        await self._wait_until(lambda: self._can_start(kind, nested),
                               f"{self.label} '{kind}' for '{owner}'", timeout_s)
        self.sync_job = Job(kind, owner, nested, self.label)
        return self.sync_job

    async def acquire_async(self, kind: AsyncJobKind, owner: str,
                            timeout_s: float) -> AsyncJob:
        """Wait until both slots are free, then hold the async slot."""
        self.assert_locked()
        await self._wait_until(lambda: self.async_job is None and self.sync_job is None,
                               f"async job '{kind}' for '{owner}'", timeout_s)
        self.async_job = AsyncJob(self, kind, owner)
        return self.async_job

    def release(self, job: Job | AsyncJob) -> None:
        """End `job` and wake the waiters."""
        self.assert_locked()
        if job is self.async_job:
            self.async_job = None
            job.done.set()
        elif job is self.sync_job:
            self.sync_job = None
        self._cond.notify_all()

    def describe(self) -> dict[str, str | None]:
        return {
            "job": self.sync_job.describe() if self.sync_job else None,
            "async_job": self.async_job.describe() if self.async_job else None,
        }

    def info(self) -> dict[str, Any]:
        return {"job": self.sync_job.info() if self.sync_job else None,
                "async_job": self.async_job.info() if self.async_job else None}
