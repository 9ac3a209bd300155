"""Coming back after a daemon restart or crash: find every run again, none lost, none twice.

At start, before the socket serves anyone, `adopt_all()` reads every status file (forgivingly,
status.py) and, for each, decides from facts alone, with the process table as the authority
on whether a QEMU lives:

* the file is damaged or unreadable: nothing in it is trusted for management, but the QEMU it
  names (by pid and start time, or any QEMU using that run directory) is looked for; if one
  lives it is reported (`daemon-warnings`) and never taken for "no QEMU": starting that
  domain is refused while it lives (runtime.check_no_qemu);
* the QEMU is gone (dead pid, or a reused pid with another start time or binary): the run
  ends (`end_run`): shut off, reason `crashed`, or the `stop_reason` of a stop that was under
  way, or `failed` for a start that was cut short (any QEMU naming the run directory is
  killed: it was spawned but not yet recorded);
* it is alive and ours: the run is attached (pidfd watcher, event pump, follow-up runner) and
  a MODIFY job named "reconnect" is taken for it, so operations queue behind the reconnect
  while queries answer.

Then each domain reconnects in its own task, in parallel, each bounded by the connect
timeout, so one hung QEMU holds up nobody: a start that was cut short is rolled back; an
interrupted shutdown or destroy is finished; otherwise the monitor and console are
reconnected, the state resynced from `query-status` (with events for what changed while we
were away), the JSON config compared with QEMU's devices, and the follow-ups recorded in the
status file done.

QEMU processes that name our run directory but that no status file accounts for are orphans:
reported (log, daemon-warnings, `qvirsh list`), never killed: they may be someone's guest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

from ..domain import Domain
from ..errors import QvirtError
from ..job import AsyncJobKind, Job, JobKind
from ..model import DomainState, Reason
from ..qemu.process import (
    QemuProcess,
    proc_start_time,
    proc_state,
    process_binary,
)
from ..run import Run
from ..status import DomainStatus, FoundStatus, JobRecord, scan_statuses
from . import qmp_events
from .context import Context
from .devices import reconcile
from .migration import Migration
from .runtime import Runtime, end_reason
from .saves import Saves

log = logging.getLogger(__name__)


def our_process(pid: int | None, start_time: int | None, binary: str | None) -> QemuProcess | None:
    """The QEMU a status names, if it is alive and really that one (pid reuse is caught by
    the start time and the binary)."""
    if pid is None or proc_state(pid) in (None, "Z"):
        return None
    if start_time is not None and proc_start_time(pid) != start_time:
        return None
    exe = process_binary(pid)
    if exe is not None and binary is not None and \
            os.path.realpath(exe) != os.path.realpath(binary):
        return None
    process = QemuProcess(pid, None)
    return process if process.alive else None


def _started(job: JobRecord | None) -> bool:
    """False when the status file records a start that did not finish."""
    return job is None or job.kind != AsyncJobKind.START


def _incoming(job: JobRecord | None) -> str | None:
    """"restore" or "migration" for a start that received a guest, else None."""
    if job is None or job.kind != AsyncJobKind.START:
        return None
    kind = job.data.get("incoming", "restore" if "restore" in job.data else None)
    return str(kind) if kind else None


def _incoming_loaded(job: JobRecord | None) -> bool:
    """A start whose QEMU had loaded a saved or migrated guest: never rolled back (the QEMU
    may hold the only copy of the guest: a managed image may be gone, the source may have
    stopped). A restore is finished; a migration waits for its source's word."""
    return _incoming(job) is not None and job is not None and \
        job.phase in ("loaded", "resume")


class Reconnector:
    def __init__(self, ctx: Context, runtime: Runtime, saves: Saves,
                 migration: Migration) -> None:
        self.ctx = ctx
        self.runtime = runtime
        self.saves = saves
        self.migration = migration

    async def adopt_all(self) -> list[asyncio.Task[None]]:
        """Before serving: account for every status file; start the reconnect tasks."""
        ctx = self.ctx
        runs_dir = ctx.layout.domains_run_dir
        found, processes = await asyncio.gather(asyncio.to_thread(scan_statuses, runs_dir),
                                                ctx.processes.scan())
        accounted: set[int] = set()
        tasks: list[asyncio.Task[None]] = []
        for item in found:
            if item.status is None:
                self._damaged(item, processes, accounted)
                continue
            adopted = await self._adopt(item.run_dir, item.status, processes, accounted)
            if adopted is not None:
                dom, run, job = adopted
                tasks.append(ctx.spawn(self._reconnect(dom, run, item.status, job),
                                       f"reconnect-{dom.name}"))
        self._find_orphans(processes, accounted, {f.run_dir for f in found})
        return tasks

    @staticmethod
    def _using(run_dir: Path, processes: list[tuple[int, bytes]]) -> list[int]:
        needle = str(run_dir).encode() + b"/"
        return [pid for pid, cmdline in processes if needle in cmdline]

    def _damaged(self, item: FoundStatus, processes: list[tuple[int, bytes]],
                 accounted: set[int]) -> None:
        """A status file that cannot be used: report the QEMU it names, never take it for
        "no QEMU here". Starting the domain is refused while that QEMU lives."""
        pids = set(self._using(item.run_dir, processes))
        if our_process(item.pid, item.start_time, item.binary) is not None:
            assert item.pid is not None
            pids.add(item.pid)
        accounted.update(pids)
        what = f"QEMU pid {', '.join(map(str, sorted(pids)))} is running" if pids else \
            "no QEMU uses it now"
        self.ctx.warn(f"status file {item.run_dir / 'status.json'} {item.problem}; {what}: "
                      f"domain '{item.run_dir.name}' is not managed "
                      + ("and cannot be started until that QEMU is stopped" if pids else
                         "(the file is left for inspection)"))

    async def _entry_for(self, status: DomainStatus) -> Domain | None:
        """The table entry of the run's domain; a transient one is re-created."""
        ctx = self.ctx
        async with ctx.table.lock:  # L1: look up, or reserve the transient's slot
            dom = ctx.table.get_uuid(status.uuid)
            if dom is not None:
                if dom.name == status.name:
                    return dom
            elif ctx.table.get_name(status.name) is None:
                dom = Domain(status.definition, persistent=False)
                ctx.table.add(dom)
                return dom
        ctx.warn(f"status of domain '{status.name}' (uuid {status.uuid}) conflicts with the "
                 "definition that uses that name or uuid: its run is not adopted (its QEMU, "
                 "if alive, keeps running and blocks starts of that domain)")
        return None

    async def _adopt(self, run_dir: Path, status: DomainStatus,
                     processes: list[tuple[int, bytes]],
                     accounted: set[int]) -> tuple[Domain, Run, Job] | None:
        ctx = self.ctx
        dom = await self._entry_for(status)
        if dom is None:
            accounted.update(self._using(run_dir, processes))
            return None
        process = our_process(status.pid, status.start_time, status.binary)
        if process is not None:
            accounted.add(process.pid)
        run = Run.from_status(status, run_dir)
        async with ctx.table.lock:  # L1: the id it runs under, and its directory
            ctx.table.adopt_id(dom, status.id)
            ctx.table.claim_run_dir(dom)
        async with dom.lock:  # L3: restore the run as the status file describes it
            dom.state, dom.reason = status.state, status.reason
            dom.run = run
            if process is not None:
                self.runtime.attach(dom, run, process)
                if run.follow_ups:
                    run.follow_up_wake.set()
        if process is None:
            reason = end_reason(status.stop_reason, status.saw_shutdown)
            job_record = status.async_job
            if job_record is not None and job_record.kind == AsyncJobKind.SAVE and \
                    job_record.phase != "finish":
                # QEMU died while writing the file: it is not a whole save.
                partial = Path(str(job_record.data.get("path", "")))
                if partial.is_absolute() and job_record.data.get("created"):
                    log.warning("domain %s: removing the partial save file %s", dom.name,
                                partial)
                    await ctx.writer.remove(partial, durable=False)
            if not _started(job_record) and not _incoming_loaded(job_record):
                # Killed between writing the record and learning the pid, or during the
                # start: whatever QEMU names this run directory is that half-started run.
                for pid in self._using(run_dir, processes):
                    log.warning("domain %s: killing half-started QEMU pid %d", dom.name, pid)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    accounted.add(pid)
                reason = Reason.FAILED
            log.warning("domain %s: QEMU pid %s is gone (%s)", dom.name, status.pid, reason)
            await self.runtime.end_run(dom, run, reason)
            return None
        job = await ctx.begin_job(dom, JobKind.MODIFY, "reconnect")
        log.info("domain %s: QEMU pid %d is still running: reconnecting", dom.name,
                 process.pid)
        return dom, run, job

    def _find_orphans(self, processes: list[tuple[int, bytes]], accounted: set[int],
                      known_dirs: set[Path]) -> None:
        ctx = self.ctx
        runs = ctx.layout.domains_run_dir
        prefix = str(runs).encode() + b"/"
        for pid, cmdline in processes:
            if pid in accounted or prefix not in cmdline:
                continue
            text = cmdline.replace(b"\0", b" ").decode(errors="replace")
            start = text.index(str(runs) + "/") + len(str(runs)) + 1
            name = text[start:].split("/", 1)[0].split(" ", 1)[0]
            msg = (f"QEMU pid {pid} uses {runs / name} but no status file accounts for it: "
                   "not managed, not killed")
            log.warning("orphan: %s", msg)
            ctx.orphans.append({"pid": pid, "run_dir": str(runs / name), "message": msg})

    async def _reconnect(self, dom: Domain, run: Run, status: DomainStatus, job: Job) -> None:
        """Holding the "reconnect" job: finish, roll back or re-establish the run."""
        ctx = self.ctx
        try:
            record = status.async_job
            cut_short = not _started(record) and not _incoming_loaded(record)
            if cut_short or run.stop_reason is not None:
                async with dom.lock:  # L3
                    if dom.run is not run:
                        return
                    if cut_short:
                        run.stop_reason = Reason.FAILED  # a start cut short: roll it back
                    ctx.save_status(dom, run)
                log.info("domain %s: finishing the interrupted %s", dom.name,
                         "start (rolled back)" if cut_short else "stop")
                await self.runtime.kill(dom, run)
                return
            if not await self._establish(dom, run):
                ctx.spawn(self._keep_trying(dom, run), f"monitor-retry-{dom.name}", run)
                return
            await self._finish_job(dom, run)
        except QvirtError as exc:
            log.error("domain %s: reconnect failed: %s", dom.name, exc)
        finally:
            await ctx.end_job(dom, job)

    async def _finish_job(self, dom: Domain, run: Run) -> None:
        """Holding the reconnect job, the monitor connected: finish or undo the async job
        the previous daemon was doing (docs/design.md has the table). Its record stays in
        the status file (`run.pending_job`) until that is done, however many restarts and
        frozen QEMUs come between."""
        record = run.pending_job
        try:
            await self._finish(dom, run, record)
        finally:
            async with dom.lock:  # L3
                if dom.run is run and run.pending_job is record and record is not None:
                    run.pending_job = None
                    self.ctx.save_status(dom, run)

    async def _finish(self, dom: Domain, run: Run, record: JobRecord | None) -> None:
        if await self.migration.resume_source(dom, run, record):
            return
        if record is None:
            return
        if _incoming_loaded(record):
            kind = _incoming(record)
            paused = bool(record.data.get("paused"))
            if kind == "migration" and record.phase == "loaded":
                log.info("domain %s: the incoming migration was loaded: paused until its "
                         "source says (migrate-finish)", dom.name)
                async with dom.lock:  # L5
                    self.ctx.ensure_current(dom, run, "migration (reconnect)")
                    run.starting = False
                    self.ctx.set_state(dom, DomainState.PAUSED, Reason.MIGRATING)
                return
            log.info("domain %s: finishing the %s the previous daemon had loaded",
                     dom.name, kind)
            if record.data.get("managed"):
                await self.runtime.remove_managed_save(dom, "reconnect")
            if not paused:
                await self.ctx.qmp(dom, run, "cont", what=f"{kind} (reconnect)")
            async with dom.lock:  # L5
                self.ctx.ensure_current(dom, run, f"{kind} (reconnect)")
                run.starting = False
                self.runtime.announce_started(dom, paused, kind)
            return
        if await self.saves.resume_save(dom, run, record):
            return
        log.warning("domain %s: async job '%s' (phase %s) of the previous daemon is not "
                    "known here: the run is kept as it is", dom.name, record.kind,
                    record.phase)

    async def _establish(self, dom: Domain, run: Run) -> bool:
        """Connect the monitor and console and resync; False if QEMU does not answer."""
        ctx = self.ctx
        async with dom.lock:  # L3
            if dom.run is not run:
                return True
            monitor = self.runtime.new_monitor(dom, run)
        try:
            await monitor.connect(run.monitor_socket, ctx.settings.monitor_connect_timeout_s)
            qemu_status = await ctx.qmp(dom, run, "query-status", what="reconnect")
        except QvirtError as exc:
            log.error("domain %s: cannot reconnect to QEMU: %s", dom.name, exc)
            return False
        try:
            await self.runtime.connect_console(dom, run)
        except (QvirtError, OSError, TimeoutError) as exc:
            log.warning("domain %s: console not reconnected (its log misses output until "
                        "the next restart): %s", dom.name, exc)
        try:
            await self.runtime.connect_agent(dom, run)
        except (QvirtError, OSError, TimeoutError) as exc:
            log.warning("domain %s: guest agent channel not reconnected: %s", dom.name, exc)
        async with dom.lock:  # L5
            ctx.ensure_current(dom, run, "reconnect")
            follow_up = qmp_events.resync(ctx, dom, run, str(qemu_status.get("status")))
            if follow_up is not None:
                self.runtime.follow_up(dom, run, follow_up)
            ctx.save_status(dom, run)
        try:  # the JSON config against QEMU's own view of its devices
            await reconcile(ctx, dom, run)
        except QvirtError as exc:
            log.error("domain %s: comparing devices with QEMU failed: %s", dom.name, exc)
        log.info("domain %s: reconnected (%s)", dom.name, qemu_status.get("status"))
        return True

    async def _keep_trying(self, dom: Domain, run: Run) -> None:
        """A QEMU that did not answer at reconnect: try again now and then while it lives
        (the task belongs to the run, so it ends with it)."""
        while True:
            await asyncio.sleep(self.ctx.settings.monitor_reconnect_interval_s)
            try:
                async with self.ctx.job(dom, JobKind.MODIFY, "reconnect (retry)"):
                    async with dom.lock:  # L5
                        if dom.run is not run:
                            return
                    if await self._establish(dom, run):
                        await self._finish_job(dom, run)
                        return
            except QvirtError as exc:
                log.warning("domain %s: reconnect retry: %s", dom.name, exc)
