"""Coming back after a daemon restart or crash: find every run again, none lost, none twice.

At start, before the socket serves anyone, `adopt_all()` reads every status file and, for
each, decides from facts alone (no waiting):

* the QEMU is gone (dead pid, or a reused pid with another start time or binary): the domain
  is shut off, reason `crashed`, or the `stop_reason` of a stop that was under way, with an
  event; its status file and socket are removed;
* it is alive and ours: the run is attached (pidfd watcher, event pump) and a job named
  "reconnect" is taken for it, so operations queue behind the reconnect while queries answer.

Then each domain reconnects in its own task, in parallel, each bounded by the connect
timeout, so one hung QEMU holds up nobody: a start that was cut short ("starting") is killed;
an interrupted shutdown or destroy is finished; otherwise the monitor is reconnected and the
state resynced from `query-status` (with events for what changed while we were away, and the
action of a guest power-off or panic that was decided but not done).

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
from ..job import Job, JobKind
from ..model import DomainState, Reason
from ..qemu.process import QemuProcess, proc_start_time, proc_state, qemu_pids_mentioning
from ..status import DomainStatus, process_binary, remove_status, scan_statuses
from . import qmp_events
from .context import Context
from .devices import reconcile
from .runtime import STOP_DETAIL, Runtime, end_reason

log = logging.getLogger(__name__)

MONITOR_RETRY_S = 5.0


def our_process(status: DomainStatus) -> QemuProcess | None:
    """The run's QEMU if it is alive and really ours (pid reuse is caught by start time)."""
    pid = status.pid
    if pid is None or proc_state(pid) in (None, "Z"):
        return None
    if status.start_time is not None and proc_start_time(pid) != status.start_time:
        return None
    exe = process_binary(pid)
    if exe is not None and os.path.realpath(exe) != os.path.realpath(status.binary):
        return None
    process = QemuProcess(pid, None)
    return process if process.alive else None


class Reconnector:
    def __init__(self, ctx: Context, runtime: Runtime) -> None:
        self.ctx = ctx
        self.runtime = runtime

    async def adopt_all(self) -> list[asyncio.Task[None]]:
        """Before serving: account for every status file; start the reconnect tasks."""
        ctx = self.ctx
        accounted: set[int] = set()
        known_dirs: set[Path] = set()
        tasks: list[asyncio.Task[None]] = []
        for run_dir, status in scan_statuses(ctx.layout.domains_run_dir):
            known_dirs.add(run_dir)
            if status is None:
                continue  # unreadable: its QEMU, if any, is reported as an orphan below
            adopted = await self._adopt(run_dir, status, accounted)
            if adopted is not None:
                dom, job = adopted
                task = ctx.spawn(self._reconnect(dom, dom.generation, status, job),
                                 f"reconnect-{dom.name}")
                job.task = task
                tasks.append(task)
        self._find_orphans(accounted, known_dirs)
        return tasks

    async def _entry_for(self, status: DomainStatus) -> Domain | None:
        """The table entry of the run's domain; a transient one is re-created."""
        ctx = self.ctx
        async with ctx.table.lock:  # L1: look up, or reserve the transient's slot
            dom = ctx.table.get_uuid(status.uuid)
            if dom is not None:
                return dom
            if ctx.table.get_name(status.name) is not None:
                log.error("status of domain %s (uuid %s) conflicts with the definition of "
                          "that name: not adopted", status.name, status.uuid)
                return None
            dom = Domain(status.definition, persistent=False)
            ctx.table.add(dom)
            return dom

    async def _adopt(self, run_dir: Path, status: DomainStatus,
                     accounted: set[int]) -> tuple[Domain, Job] | None:
        ctx = self.ctx
        dom = await self._entry_for(status)
        if dom is None:
            return None
        process = our_process(status)
        if process is not None:
            accounted.add(process.pid)
        async with dom.lock:  # L3: restore the run as the status file describes it
            dom.generation = status.generation
            dom.live_def = status.definition
            dom.run_dir = run_dir
            dom.accel_in_use = status.accel
            dom.state, dom.reason = status.state, status.reason
            dom.stop_reason = status.stop_reason
            dom.saw_shutdown = status.saw_shutdown
            dom.fake_reboot = status.fake_reboot
            dom.ports = dict(status.ports)
            dom.root_ports = status.root_ports
            dom.pending_detach = set(status.pending_detach)
            dom.id = status.id
            if process is None:
                accounted.update(self._gone(dom, run_dir, status))
                remove = not dom.persistent
            else:
                self.runtime.attach(dom, status.generation, process)
        if process is None:
            if remove:
                async with ctx.table.lock:  # L1: removal last, no domain lock held
                    ctx.table.remove(dom)
            return None
        async with ctx.table.lock:  # L1: index the id it runs under
            ctx.table.adopt_id(dom, status.id)
        job = await ctx.begin_job(dom, JobKind.MODIFY, "reconnect")
        log.info("domain %s: QEMU pid %d is still running: reconnecting", dom.name,
                 process.pid)
        return dom, job

    def _gone(self, dom: Domain, run_dir: Path, status: DomainStatus) -> list[int]:
        """Under the domain lock: the run's QEMU is not there any more; end the run.
        Returns the pids of half-started QEMUs it killed."""
        ctx = self.ctx
        killed: list[int] = []
        if status.phase == "starting":
            # Killed between writing "starting" and learning the pid, or during the start:
            # whatever QEMU names this run directory is that half-started run.
            for pid in qemu_pids_mentioning(str(run_dir) + "/"):
                log.warning("domain %s: killing half-started QEMU pid %d", dom.name, pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            reason = Reason.FAILED
        else:
            reason = end_reason(status.stop_reason, status.saw_shutdown)
        log.warning("domain %s: QEMU pid %s is gone (%s)", dom.name, status.pid, reason)
        ctx.set_state(dom, DomainState.SHUTOFF, reason,
                      ("stopped", STOP_DETAIL.get(reason, "shutdown")))
        dom.id = None
        dom.live_def = None
        dom.accel_in_use = None
        dom.stop_reason = None
        remove_status(run_dir)
        with contextlib.suppress(FileNotFoundError):
            (run_dir / "monitor.sock").unlink()
        return killed

    def _find_orphans(self, accounted: set[int], known_dirs: set[Path]) -> None:
        ctx = self.ctx
        runs = ctx.layout.domains_run_dir
        named: set[Path] = set()
        for pid in qemu_pids_mentioning(str(runs) + "/"):
            if pid in accounted:
                continue
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            text = cmdline.decode(errors="replace")
            run_dir = next((d for d in (runs.iterdir() if runs.is_dir() else [])
                            if str(d) + "/" in text), None)
            if run_dir is not None:
                named.add(run_dir)
            msg = (f"QEMU pid {pid} uses {run_dir or runs} but no status file accounts for "
                   "it: not managed, not killed")
            log.warning("orphan: %s", msg)
            ctx.orphans.append({"pid": pid, "run_dir": str(run_dir) if run_dir else None,
                                "message": msg})
        # Stale sockets: a run directory with no status and no QEMU using it.
        if runs.is_dir():
            for run_dir in runs.iterdir():
                if run_dir not in known_dirs and run_dir not in named:
                    with contextlib.suppress(FileNotFoundError):
                        (run_dir / "monitor.sock").unlink()

    async def _reconnect(self, dom: Domain, generation: int, status: DomainStatus,
                         job: Job) -> None:
        """Holding the "reconnect" job: finish, roll back or re-establish the run."""
        ctx = self.ctx
        try:
            if status.phase == "starting" or status.stop_reason is not None:
                async with dom.lock:  # L3
                    if status.phase == "starting":
                        dom.stop_reason = Reason.FAILED  # a start cut short: roll it back
                    ctx.save_status(dom)
                log.info("domain %s: finishing the interrupted %s", dom.name,
                         "start (rolled back)" if status.phase == "starting" else "stop")
                await self.runtime.kill(dom, generation)
                return
            if not await self._establish(dom, generation):
                ctx.spawn(self._keep_trying(dom, generation), f"monitor-retry-{dom.name}")
        except QvirtError as exc:
            log.error("domain %s: reconnect failed: %s", dom.name, exc)
        finally:
            await ctx.end_job(dom, job)

    async def _establish(self, dom: Domain, generation: int) -> bool:
        """Connect the monitor and resync; False if QEMU does not answer (it may be hung)."""
        ctx = self.ctx
        async with dom.lock:  # L3
            if not dom.is_current(generation):
                return True
            monitor = self.runtime.new_monitor(dom, generation)
            socket_path = dom.run_dir / "monitor.sock" if dom.run_dir else None
        assert socket_path is not None
        try:
            await monitor.connect(socket_path, ctx.settings.monitor_connect_timeout_s)
            qemu_status = await ctx.qmp(dom, generation, "query-status", what="reconnect")
        except QvirtError as exc:
            log.error("domain %s: cannot reconnect to QEMU: %s", dom.name, exc)
            return False
        async with dom.lock:  # L5
            ctx.ensure_current(dom, generation, "reconnect")
            follow_up = qmp_events.resync(ctx, dom, str(qemu_status.get("status")))
            ctx.save_status(dom)
        try:  # the JSON config against QEMU's own view of its devices
            await reconcile(ctx, dom, generation)
        except QvirtError as exc:
            log.error("domain %s: comparing devices with QEMU failed: %s", dom.name, exc)
        if follow_up is not None:
            self.runtime.run_follow_up(dom, generation, follow_up)
        log.info("domain %s: reconnected (%s)", dom.name, qemu_status.get("status"))
        return True

    async def _keep_trying(self, dom: Domain, generation: int) -> None:
        """A QEMU that did not answer at reconnect: try again now and then while it lives."""
        while True:
            await asyncio.sleep(MONITOR_RETRY_S)
            async with dom.lock:  # L3
                if not dom.is_current(generation):
                    return
            try:
                async with self.ctx.job(dom, JobKind.MODIFY, "reconnect (retry)"):
                    if await self._establish(dom, generation):
                        return
            except QvirtError as exc:
                log.warning("domain %s: reconnect retry: %s", dom.name, exc)
