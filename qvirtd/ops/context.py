"""What every operation shares: the table, settings, events, the writer, and the lock/job/
monitor/remote patterns (docs/design.md has them with copyable skeletons).

* `lookup()`            L1: driver lock only around the table lookup.
* `job()`/`async_job()` L2: the job is taken under the domain lock by waiting on the job
                        condition; after the wait the domain is checked to be still in the
                        table (L5), and the domain lock is released as soon as the job is held.
                        A nested job is taken with the async job's handle (`nested=`).
* `qmp()`               L4/L5 "enter/exit monitor": read the run's monitor under the domain
                        lock, release it, await QEMU, and on failure tell a stopped run apart
                        from a failed command. The caller re-checks `ensure_current()` under
                        the domain lock before touching state.
* `remote()`            L4/L5 "enter/exit remote": the same for a wait on a peer daemon
                        (migration): no lock held during it, the run re-checked after it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

from ..config import Layout, Settings
from ..domain import Domain
from ..driver import DomainTable
from ..errors import DomainGoneError, InvalidOperationError, MonitorClosedError, NoDomainError
from ..events import EventBus
from ..job import AsyncJob, AsyncJobKind, Job, JobCondition, JobKind
from ..locks import check_no_locks
from ..loopwatch import LoopWatch
from ..model import DomainState, Reason
from ..qemu.firmware import Ovmf
from ..qemu.process import ProcessTable
from ..run import Run
from ..store import DefinitionStore
from ..writer import FileWriter

log = logging.getLogger(__name__)

J = TypeVar("J", Job, AsyncJob)

# A status write that failed (full disk, EMFILE) is tried again after this long.
STATUS_RETRY_S = 1.0


class Context:
    def __init__(self, settings: Settings, layout: Layout) -> None:
        self.settings = settings
        self.layout = layout
        self.table = DomainTable()
        self.bus = EventBus(settings.event_flush_delay_s, settings.event_queue_per_subscriber,
                            settings.event_replay_buffer)
        self.writer = FileWriter()
        self.store = DefinitionStore(layout.definitions_dir, layout.autostart_dir, self.writer)
        self.processes = ProcessTable()
        self.ovmf = Ovmf(Path(settings.ovmf_code), Path(settings.ovmf_vars_template),
                         Path(settings.ovmf_secboot_code),
                         Path(settings.ovmf_secboot_vars_template))
        self.loop_watch: LoopWatch | None = None  # rule L6 (started by the daemon)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._qemu_time: float | None = None
        found = shutil.which(settings.qemu_binary)
        # Resolved once: status files record it, and a restart checks a pid runs it.
        self.qemu_path = os.path.realpath(found) if found else settings.qemu_binary
        # QEMU processes that name our run directory but that no status file accounts for.
        self.orphans: list[dict[str, Any]] = []
        # Things found at start or later that need a person: damaged files, stray devices.
        self.warnings: list[str] = []

    # --- tasks ------------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str,
              run: Run | None = None) -> asyncio.Task[Any]:
        """Run `coro` as a task the daemon keeps a reference to (and logs if it fails).
        With `run`, the run owns it too: its teardown cancels the task if still running."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        if run is not None:
            run.own(task)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed: %s", task.get_name(), task.exception())

    @property
    def background_tasks(self) -> set[asyncio.Task[Any]]:
        return self._tasks

    def warn(self, message: str) -> None:
        """Report something a person must look at (log and `daemon-warnings`), once."""
        log.error("%s", message)
        if message not in self.warnings:
            self.warnings.append(message)
            del self.warnings[:-200]

    # --- L1: the table ----------------------------------------------------------------------

    async def lookup(self, ident: str) -> Domain:
        async with self.table.lock:  # L1: look up only
            return self.table.find(ident)

    async def remove_if_unused(self, dom: Domain) -> None:
        """L1, at the very end of an operation and with no domain lock held (seed 003): drop
        a domain that has neither a definition nor a run."""
        async with self.table.lock:  # L1
            # No await between the check and the removal: nothing can redefine it meanwhile.
            if dom.persistent_def is None and not dom.active:
                self.table.remove(dom)

    # --- L2: jobs ---------------------------------------------------------------------------

    @staticmethod
    def ensure_in_table(dom: Domain) -> None:
        """Under the domain lock (L5): the domain was not removed while we waited."""
        if dom.removed:
            raise NoDomainError(f"domain '{dom.name}' not found (it was undefined)")

    async def _take(self, dom: Domain, cond: JobCondition,
                    acquire: Callable[[], Awaitable[J]]) -> J:
        """L2 for every job slot: `acquire` waits on `cond` under the domain lock (the wait
        releases it); a domain removed meanwhile gives the job back (L5)."""
        async with dom.lock:  # L2: take the job under the domain lock
            self.ensure_in_table(dom)
            job = await acquire()
            if dom.removed:  # L5: removed while we waited
                cond.release(job)
                self.ensure_in_table(dom)
            return job

    async def begin_job(self, dom: Domain, kind: JobKind, owner: str,
                        nested: AsyncJob | None = None, timeout_s: float | None = None) -> Job:
        """Take a sync job (prefer `job()`; this is for a job handed from task to task).
        `timeout_s`: how long to wait for it (default job_wait_timeout_s; 0: not at all)."""
        wait_s = self.settings.job_wait_timeout_s if timeout_s is None else timeout_s
        return await self._take(dom, dom.job, lambda: dom.job.acquire(
            kind, owner, wait_s, nested))

    async def end_job(self, dom: Domain, job: Job | AsyncJob) -> None:
        async with dom.lock:  # L2: end the job under the domain lock
            dom.job.release(job)
            if isinstance(job, AsyncJob) and dom.run is not None:
                self.save_status(dom, dom.run)  # the status no longer names the job

    @asynccontextmanager
    async def job(self, dom: Domain, kind: JobKind, owner: str,
                  nested: AsyncJob | None = None,
                  timeout_s: float | None = None) -> AsyncIterator[Job]:
        job = await self.begin_job(dom, kind, owner, nested, timeout_s)
        try:
            yield job
        finally:
            await self.end_job(dom, job)

    @asynccontextmanager
    async def agent_job(self, dom: Domain, kind: JobKind, owner: str) -> AsyncIterator[Job]:
        """The guest agent's own job (L2 on `dom.agent_job`): never waits for a monitor job."""
        job = await self._take(dom, dom.agent_job, lambda: dom.agent_job.acquire(
            kind, owner, self.settings.job_wait_timeout_s))
        try:
            yield job
        finally:
            async with dom.lock:  # L2
                dom.agent_job.release(job)

    @asynccontextmanager
    async def async_job(self, dom: Domain, kind: AsyncJobKind,
                        owner: str) -> AsyncIterator[AsyncJob]:
        job = await self._take(dom, dom.job, lambda: dom.job.acquire_async(
            kind, owner, self.settings.job_wait_timeout_s))
        try:
            yield job
        finally:
            await self.end_job(dom, job)

    # --- L5: after a wait -------------------------------------------------------------------

    def ensure_current(self, dom: Domain, run: Run, what: str) -> None:
        """L5, under the domain lock: still in the table and still on the run we acted on."""
        dom.assert_locked()
        if dom.run is not run or dom.removed:
            how = {Reason.DESTROYED: "destroyed", Reason.CRASHED: "crashed"}.get(
                dom.reason, "stopped") if dom.run is None else "restarted"
            raise DomainGoneError(f"domain '{dom.name}' was {how} while '{what}' was running")

    def running(self, dom: Domain) -> Run:
        """Under the domain lock: the current run, or an error if the domain is not running
        (or its monitor is not connected yet)."""
        dom.assert_locked()
        run = dom.run
        if run is None or run.monitor is None:
            raise InvalidOperationError(f"domain '{dom.name}' is not running")
        return run

    # --- L4: enter/exit monitor, enter/exit remote ------------------------------------------

    async def qmp(self, dom: Domain, run: Run, command: str,
                  arguments: dict[str, Any] | None = None, timeout_s: float | None = None,
                  what: str | None = None) -> Any:
        """Enter monitor (L4): no lock is held while QEMU works on `command`."""
        async with dom.lock:  # L3: read the monitor handle only
            self.ensure_current(dom, run, what or command)
            monitor = run.monitor
        if monitor is None:
            raise InvalidOperationError(f"domain '{dom.name}': the QEMU monitor is not "
                                        "connected")
        try:
            return await monitor.execute(command, arguments, timeout_s)
        except MonitorClosedError:
            await self.explain_closed(dom, run, what or command)
            raise

    async def explain_closed(self, dom: Domain, run: Run, what: str) -> None:
        """Exit monitor after the connection broke: if QEMU went away under us, raise
        DomainGoneError saying so ("destroyed while ..."), rather than "monitor closed"."""
        await self.wait_ended(run, 2.0)
        async with dom.lock:  # L5
            self.ensure_current(dom, run, what)

    @asynccontextmanager
    async def remote(self, dom: Domain, run: Run, what: str) -> AsyncIterator[None]:
        """Enter/exit remote (seed 000's migration pattern): the body talks to a peer daemon
        with no lock held (L4, checked on entry); afterwards the domain is re-checked (L5):
        it may have been destroyed, crashed or undefined while we talked."""
        check_no_locks(f"remote call '{what}' for {dom.name}")
        try:
            yield
        finally:
            async with dom.lock:  # L5: the guest may have gone while we talked to the peer
                self.ensure_current(dom, run, what)

    @staticmethod
    async def wait_ended(run: Run, timeout_s: float) -> bool:
        """Wait (no lock held) until `run` has been torn down."""
        try:
            async with asyncio.timeout(timeout_s):
                await run.ended.wait()
        except TimeoutError:
            return False
        return True

    # --- events (E1) ------------------------------------------------------------------------

    def emit(self, dom: Domain, event: str, type: str | None = None, detail: str | None = None,
             data: dict[str, Any] | None = None) -> None:
        """Queue an event (E1: pushed where it happens, under the domain lock)."""
        self.bus.push(event, dom.name, dom.uuid, dom.id, type, detail, data, self._qemu_time)

    @contextmanager
    def events_from_qemu(self, qemu_time: float | None) -> Iterator[None]:
        """Events emitted inside carry the QMP event's timestamp. Synchronous on purpose: no
        other task can emit between entry and exit, so the stamp cannot leak to them."""
        self._qemu_time = qemu_time
        try:
            yield
        finally:
            self._qemu_time = None

    def set_state(self, dom: Domain, state: DomainState, reason: Reason,
                  event: tuple[str, str] | None = None) -> None:
        """Under the domain lock: change state; emit the lifecycle event only on a change.
        A running domain's status file follows every change."""
        dom.assert_locked()
        changed = dom.state is not state
        dom.state = state
        dom.reason = reason
        if changed and event is not None:
            self.emit(dom, "lifecycle", event[0], event[1])
        if dom.run is not None and state is not DomainState.SHUTOFF:
            self.save_status(dom, dom.run)

    # --- the status file (through the writer: rule L6) --------------------------------------

    def save_status(self, dom: Domain, run: Run, with_job: bool = True) -> asyncio.Future[None]:
        """Under the domain lock (L3): queue the run's status file for writing (coalesced,
        off the loop). Await `status_barrier()` where it must be on disk before going on."""
        dom.assert_locked()
        data = run.to_status(dom, self.qemu_path, with_job).encode()
        fut = self.writer.write(run.status_file, data, durable=False,
                                retry_s=STATUS_RETRY_S)
        run.status_written = fut
        return fut

    @staticmethod
    async def status_barrier(run: Run) -> None:
        """With no lock held: wait until the run's latest status is on disk (StorageError if
        it could not be written)."""
        check_no_locks("status file write")
        if run.status_written is not None:
            await asyncio.shield(run.status_written)
