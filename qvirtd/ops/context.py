"""What every operation shares: the table, settings, events, and the lock/job/monitor patterns.

The three patterns every operation follows (docs/design.md names them L1..L5):

* `lookup()`           L1: driver lock only around the table lookup.
* `job()`              L2: the job is taken under the domain lock by waiting on the job
                       condition; the domain lock is released as soon as the job is held.
* `qmp()`              L4/L5: "enter monitor": read what is needed under the domain lock,
                       release it, await QEMU, and on failure tell a stopped domain apart from a
                       failed command. The caller re-checks `is_current()` under the domain lock
                       before touching state (`ensure_current()`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from ..config import Layout, Settings
from ..domain import Domain
from ..driver import DomainTable
from ..errors import DomainGoneError, InvalidOperationError, MonitorClosedError, NoDomainError
from ..events import EventBus
from ..job import Job, JobKind
from ..model import DomainState, Reason
from ..status import DomainStatus, JobRecord, save_status
from ..store import DefinitionStore

log = logging.getLogger(__name__)


class Context:
    def __init__(self, settings: Settings, layout: Layout) -> None:
        self.settings = settings
        self.layout = layout
        self.table = DomainTable()
        self.bus = EventBus(settings.event_flush_delay_s, settings.event_queue_per_subscriber,
                            settings.event_replay_buffer)
        self.store = DefinitionStore(layout.definitions_dir, layout.autostart_dir)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._qemu_time: float | None = None
        found = shutil.which(settings.qemu_binary)
        # Resolved once: status files record it, and a restart checks a pid runs it.
        self.qemu_path = os.path.realpath(found) if found else settings.qemu_binary
        # QEMU processes that name our run directory but that no status file accounts for.
        self.orphans: list[dict[str, Any]] = []
        # Devices found in a QEMU but missing from its JSON config: a bug, reported.
        self.device_warnings: list[str] = []

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run `coro` as a task the daemon keeps a reference to (and logs if it fails)."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed: %s", task.get_name(), task.exception())

    @property
    def background_tasks(self) -> set[asyncio.Task[Any]]:
        return self._tasks

    async def lookup(self, ident: str) -> Domain:
        async with self.table.lock:  # L1: look up only
            return self.table.find(ident)

    @asynccontextmanager
    async def job(self, dom: Domain, kind: JobKind, owner: str) -> AsyncIterator[Job]:
        job = await self.begin_job(dom, kind, owner)
        try:
            yield job
        finally:
            await self.end_job(dom, job)

    async def begin_job(self, dom: Domain, kind: JobKind, owner: str) -> Job:
        """Take a job (prefer `job()`; this is for a job handed from one task to another)."""
        async with dom.lock:  # L2: take the job under the domain lock (the wait releases it)
            if dom.removed:
                raise NoDomainError(f"domain '{dom.name}' not found")
            return await dom.job.acquire(kind, owner, self.settings.job_wait_timeout_s)

    async def end_job(self, dom: Domain, job: Job) -> None:
        async with dom.lock:  # L2: end the job under the domain lock
            dom.job.release(job)

    def ensure_current(self, dom: Domain, generation: int, what: str) -> None:
        """L5, under the domain lock: the domain is still the run we started acting on."""
        if not dom.is_current(generation):
            how = {Reason.DESTROYED: "destroyed", Reason.CRASHED: "crashed"}.get(
                dom.reason, "stopped") if not dom.active else "restarted"
            raise DomainGoneError(f"domain '{dom.name}' was {how} while '{what}' was running")

    def running_generation(self, dom: Domain) -> int:
        """Under the domain lock: the current run, or an error if the domain is not running."""
        if not dom.active or dom.monitor is None:
            raise InvalidOperationError(f"domain '{dom.name}' is not running")
        return dom.generation

    async def qmp(self, dom: Domain, generation: int, command: str,
                  arguments: dict[str, Any] | None = None, timeout_s: float | None = None,
                  what: str | None = None) -> Any:
        """Enter monitor (L4): no lock is held while QEMU works on `command`."""
        async with dom.lock:  # L3: read the monitor handle only
            self.ensure_current(dom, generation, what or command)
            monitor = dom.monitor
        assert monitor is not None
        try:
            return await monitor.execute(command, arguments, timeout_s)
        except MonitorClosedError:
            # Exit monitor: if QEMU went away under us, say that rather than "monitor closed".
            await self.wait_stopped(dom, generation, 2.0)
            async with dom.lock:  # L5
                self.ensure_current(dom, generation, what or command)
            raise

    async def wait_stopped(self, dom: Domain, generation: int, timeout_s: float) -> bool:
        """Wait (no lock held) until the run `generation` has been cleaned up."""
        async with dom.lock:  # L3
            if not dom.is_current(generation):
                return True
            ended = dom.run_ended
        try:
            await asyncio.wait_for(ended.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

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
        A running domain's status file follows every change (shut off: the run's end
        removes it)."""
        changed = dom.state is not state
        dom.state = state
        dom.reason = reason
        if changed and event is not None:
            self.emit(dom, "lifecycle", event[0], event[1])
        if state is not DomainState.SHUTOFF:
            self.save_status(dom)

    def save_status(self, dom: Domain) -> None:
        """Under the domain lock (L3): write the run's status file (atomic, small)."""
        if dom.run_dir is None or dom.live_def is None or dom.id is None:
            return
        process = dom.process
        async_job = dom.job.async_job
        save_status(DomainStatus(
            name=dom.name, uuid=dom.uuid, generation=dom.generation,
            phase="starting" if dom.starting else "running",
            pid=process.pid if process is not None else None,
            start_time=process.start_time if process is not None else None,
            binary=self.qemu_path, run_dir=str(dom.run_dir),
            monitor_socket=str(dom.run_dir / "monitor.sock"), id=dom.id,
            state=dom.state, reason=dom.reason, persistent=dom.persistent,
            accel=dom.accel_in_use or "", definition=dom.live_def,
            stop_reason=dom.stop_reason, saw_shutdown=dom.saw_shutdown,
            fake_reboot=dom.fake_reboot, ports=dom.ports, root_ports=dom.root_ports,
            pending_detach=sorted(dom.pending_detach),
            async_job=JobRecord(kind=str(async_job.kind), owner=async_job.owner,
                                since=async_job.started_at) if async_job else None))
