"""The life of one QEMU run: launch, watch, react to QMP events, clean up when it ends.

Who notices what:
* the process watcher (pidfd) is the authority on "QEMU is gone": it lets the monitor read
  QEMU's last events, drains the event pump, then marks the domain shut off under the domain
  lock only. It takes no job, so it can never be blocked by a stuck job: a job holder that was
  waiting on QEMU notices at its next re-check (L5) and fails cleanly.
* the event pump applies QMP events to the domain's state under the domain lock, queues our
  events there, and hands anything that needs the monitor (fake reboot, on_poweroff, on_crash)
  to a new task that takes a job: an event handler never talks to QEMU itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from functools import partial
from pathlib import Path
from typing import Any

from ..domain import Domain
from ..errors import InvalidOperationError, NoDomainError, QvirtError
from ..job import JobKind
from ..model import DomainDef, DomainState, LifecycleAction, Reason
from ..qemu.accel import cpu_model, resolve_accel
from ..qemu.argv import LaunchPaths, build_argv, port_plan, root_port_id, total_ports
from ..qemu.monitor import Monitor
from ..qemu.process import QemuProcess, describe_status
from ..qemu.unixpath import short_path
from ..status import remove_status
from . import qmp_events
from .context import Context
from .devices import finish_detach
from .qmp_events import FollowUpKind

log = logging.getLogger(__name__)

_BARRIER = "__qvirtd_barrier__"

# One run's QMP events on their way to the pump: (name, data, QEMU's timestamp).
QmpQueue = asyncio.Queue[tuple[str, dict[str, Any], float | None]]


def _log_tail(path: Path, offset: int, limit: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return ""
    text = data.decode(errors="replace").strip()
    return text[-limit:]


STOP_DETAIL = {
    Reason.SHUTDOWN: "shutdown",
    Reason.DESTROYED: "destroyed",
    Reason.CRASHED: "crashed",
    Reason.FAILED: "failed",
}


def end_reason(stop_reason: Reason | None, saw_shutdown: bool) -> Reason:
    """Why a run ended: the daemon's own stop if it was stopping QEMU, else "shutdown" if
    QEMU said SHUTDOWN first, else it crashed. The one place this is decided (also used by
    a restarted daemon for runs that ended while it was away)."""
    if stop_reason is not None:
        return stop_reason
    return Reason.SHUTDOWN if saw_shutdown else Reason.CRASHED


class Runtime:
    """Launching and watching QEMU runs; reacting to what QEMU says."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    # --- launch --------------------------------------------------------------------------

    async def start(self, dom: Domain, paused: bool, owner: str) -> None:
        """Start a new run of `dom` under an async job (queries and destroy may go on)."""
        ctx = self.ctx
        async with ctx.job(dom, JobKind.ASYNC, owner):
            async with dom.lock:  # L3
                if dom.active:
                    raise InvalidOperationError(f"domain '{dom.name}' is already running")
                if dom.persistent_def is None:
                    raise NoDomainError(f"domain '{dom.name}' is no longer defined")
                definition = dom.persistent_def
                dom.generation += 1
                generation = dom.generation
                dom.starting = True
            try:
                await self.launch(dom, generation, definition, paused)
            finally:
                async with dom.lock:  # L3
                    dom.starting = False

    async def launch(self, dom: Domain, generation: int, definition: DomainDef,
                     paused: bool) -> None:
        """Start QEMU for `dom` (caller holds the async job) and bring it to running/paused."""
        ctx = self.ctx
        settings = ctx.settings
        accel = resolve_accel(definition.accel)
        cpu = await cpu_model(accel, settings.qemu_binary)
        async with ctx.table.lock:  # L1: index the new id, nothing else
            dom_id = ctx.table.assign_id(dom)
        run_dir = ctx.layout.domain_run_dir(dom.name)
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(run_dir, 0o700)
        paths = LaunchPaths(run_dir, run_dir / "monitor.sock", run_dir / "console.log")
        log_path = ctx.layout.domain_log(dom.name)
        log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            paths.monitor_socket.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with short_path(paths.monitor_socket) as where:
                listener.bind(where)
            listener.listen(8)
            argv = build_argv(definition, accel, settings.qemu_binary, listener.fileno(), paths,
                              cpu)
            with open(log_path, "ab") as logf:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                logf.write(f"{stamp} starting domain {dom.name}: {argv!r}\n".encode())
                log_offset = logf.tell()
            async with dom.lock:  # L3: publish the new run atomically (spawn is not awaited)
                dom.id = dom_id
                dom.live_def = definition
                dom.run_dir = run_dir
                dom.accel_in_use = accel
                dom.stop_reason = None
                dom.saw_shutdown = False
                dom.fake_reboot = False
                dom.ports = {dev: root_port_id(i) for dev, i in port_plan(definition).items()}
                dom.root_ports = total_ports(definition)
                dom.pending_detach = set()
                # Recorded before QEMU exists: a daemon killed between here and the next
                # status write still knows a start was under way in this run directory.
                ctx.save_status(dom)
                try:
                    process = QemuProcess.spawn(argv, [listener.fileno()], log_path, run_dir)
                except QvirtError:
                    dom.id = None
                    dom.live_def = None
                    remove_status(run_dir)
                    raise
                monitor = self.attach(dom, generation, process)
                ctx.set_state(dom, DomainState.PAUSED, Reason.STARTING_UP)
        except BaseException:
            async with ctx.table.lock:  # L1: the id was never used
                ctx.table.release_id(dom, dom_id)
            raise
        finally:
            listener.close()
        log.info("domain %s: QEMU pid %d started (accel %s)", dom.name, process.pid, accel)
        try:
            await monitor.connect(paths.monitor_socket, settings.monitor_connect_timeout_s)
            if not paused:
                await ctx.qmp(dom, generation, "cont", what="start")
            async with dom.lock:  # L5: still our run?
                ctx.ensure_current(dom, generation, "start")
                dom.starting = False  # the status written next says "running"
                if paused:
                    ctx.set_state(dom, DomainState.PAUSED, Reason.USER)
                    ctx.emit(dom, "lifecycle", "started", "booted")
                    ctx.emit(dom, "lifecycle", "suspended", "paused")
                else:
                    ctx.set_state(dom, DomainState.RUNNING, Reason.BOOTED)
                    ctx.emit(dom, "lifecycle", "started", "booted")
        except BaseException as exc:
            async with dom.lock:  # L3
                if dom.is_current(generation) and dom.stop_reason is None:
                    dom.stop_reason = Reason.FAILED
                    ctx.save_status(dom)
            await self.kill(dom, generation)
            said = _log_tail(log_path, log_offset)
            if isinstance(exc, QvirtError | OSError):
                msg = f"domain '{dom.name}' failed to start: {exc}"
                if said:
                    msg += f"; QEMU said: {said}"
                raise QvirtError(msg) from exc
            raise

    def attach(self, dom: Domain, generation: int, process: QemuProcess) -> Monitor:
        """Under the domain lock: make `process` the domain's run, with a (not yet connected)
        monitor, its event pump and its exit watcher. Used by launch and by reconnect."""
        ctx = self.ctx
        queue: QmpQueue = asyncio.Queue()
        dom.process = process
        dom.run_ended = asyncio.Event()
        dom.qmp_queue = queue
        monitor = self.new_monitor(dom, generation)
        dom.event_pump = ctx.spawn(self._pump(dom, generation, queue), f"qmp-events-{dom.name}")
        ctx.spawn(self._watch_process(dom, generation, process, queue),
                  f"watch-{dom.name}")
        return monitor

    def new_monitor(self, dom: Domain, generation: int) -> Monitor:
        """Under the domain lock: a fresh monitor for the run, feeding its event pump."""
        assert dom.qmp_queue is not None
        dom.monitor = Monitor(dom.name, partial(self._queue_qmp_event, dom.qmp_queue),
                              partial(self._monitor_lost, dom, generation),
                              self.ctx.settings.monitor_timeout_s)
        return dom.monitor

    # --- stopping ------------------------------------------------------------------------

    async def kill(self, dom: Domain, generation: int) -> None:
        """Terminate the run's QEMU (no lock held, L4) and wait until it is cleaned up."""
        settings = self.ctx.settings
        async with dom.lock:  # L3
            if not dom.is_current(generation):
                return
            process = dom.process
            ended = dom.run_ended
        assert process is not None
        await process.terminate(settings.destroy_grace_s, settings.process_exit_timeout_s)
        try:
            await asyncio.wait_for(ended.wait(), settings.process_exit_timeout_s)
        except TimeoutError:
            log.error("domain %s: QEMU exited but the run was not cleaned up in time", dom.name)

    async def _watch_process(self, dom: Domain, generation: int, process: QemuProcess,
                             queue: QmpQueue) -> None:
        """Wait for QEMU to exit, let its last events be handled, then shut the domain off."""
        status = await process.exited
        log.info("domain %s: QEMU pid %d %s", dom.name, process.pid, describe_status(status))
        # QEMU's SHUTDOWN event may still sit unread in the monitor socket: read it first.
        async with dom.lock:  # L3
            monitor = dom.monitor if dom.is_current(generation) else None
        if monitor is not None:
            await monitor.wait_lost(1.0)
        barrier: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.put_nowait((_BARRIER, {"future": barrier}, None))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(barrier), 1.0)
        await self.stopped(dom, generation)

    async def stopped(self, dom: Domain, generation: int) -> None:
        """QEMU of run `generation` is gone: shut the domain off and clean up (idempotent)."""
        ctx = self.ctx
        async with dom.lock:  # L3: state only; nothing awaited
            if not dom.is_current(generation):
                return
            reason = end_reason(dom.stop_reason, dom.saw_shutdown)
            old_id = dom.id
            monitor, pump, process = dom.monitor, dom.event_pump, dom.process
            restart = (reason is Reason.CRASHED and dom.persistent
                       and dom.definition.on_crash is LifecycleAction.RESTART)
            ctx.set_state(dom, DomainState.SHUTOFF, reason,
                          ("stopped", STOP_DETAIL.get(reason, "shutdown")))
            dom.process = None
            dom.monitor = None
            dom.event_pump = None
            dom.id = None
            dom.live_def = None
            dom.accel_in_use = None
            dom.fake_reboot = False
            if dom.run_dir is not None:
                remove_status(dom.run_dir)
                with contextlib.suppress(FileNotFoundError):
                    (dom.run_dir / "monitor.sock").unlink()
            dom.qmp_queue = None
            # Wake every detach waiting for the guest: it re-checks the run (L5) and fails.
            for waiter in dom.device_waiters.values():
                if not waiter.done():
                    waiter.set_result(None)
            dom.device_waiters.clear()
            dom.pending_detach.clear()
            dom.run_ended.set()
        if process is not None:
            process.close()
        if pump is not None and pump is not asyncio.current_task():
            pump.cancel()
        if monitor is not None:
            await monitor.close()
        async with ctx.table.lock:  # L1: only at the very end (seed 003)
            if old_id is not None:
                ctx.table.release_id(dom, old_id)
            # No await between the check and the removal: nothing can redefine it meanwhile.
            if dom.persistent_def is None and not dom.active:
                ctx.table.remove(dom)
        if restart:
            log.warning("domain %s: QEMU crashed; on_crash is restart: starting it again",
                        dom.name)
            ctx.spawn(self._restart_after_crash(dom), f"on-crash-restart-{dom.name}")

    async def _restart_after_crash(self, dom: Domain) -> None:
        try:
            await self.start(dom, False, "on_crash restart")
        except QvirtError as exc:
            log.error("domain %s: restart after crash failed: %s", dom.name, exc)

    def _monitor_lost(self, dom: Domain, generation: int) -> None:
        """Monitor EOF. Normally QEMU is exiting; if it lingers without a monitor, kill it."""
        self.ctx.spawn(self._reap_lingering(dom, generation), f"monitor-lost-{dom.name}")

    async def _reap_lingering(self, dom: Domain, generation: int) -> None:
        async with dom.lock:  # L3
            if not dom.is_current(generation) or dom.process is None:
                return
            process = dom.process
        if await process.wait(self.ctx.settings.destroy_grace_s + 2.0):
            return
        log.warning("domain %s: QEMU closed its monitor but did not exit: killing it", dom.name)
        async with dom.lock:  # L3
            if not dom.is_current(generation):
                return
            self.ctx.emit(dom, "control-error", data={"error": "QEMU closed its monitor"})
        await self.kill(dom, generation)

    # --- QMP events ----------------------------------------------------------------------

    @staticmethod
    def _queue_qmp_event(queue: QmpQueue, name: str, data: dict[str, Any],
                         qemu_time: float | None) -> None:
        queue.put_nowait((name, data, qemu_time))

    async def _pump(self, dom: Domain, generation: int, queue: QmpQueue) -> None:
        """Apply this run's QMP events in order, one at a time."""
        while True:
            name, data, qemu_time = await queue.get()
            if name == _BARRIER:
                data["future"].set_result(None)
                continue
            try:
                await self._on_qmp_event(dom, generation, name, data, qemu_time)
            except Exception:
                log.exception("domain %s: handling QMP event %s failed", dom.name, name)

    async def _on_qmp_event(self, dom: Domain, generation: int, name: str,
                            data: dict[str, Any], qemu_time: float | None) -> None:
        ctx = self.ctx
        async with dom.lock:  # L3: state and events only; monitor work goes to a job task
            if not dom.is_current(generation):
                return
            log.debug("domain %s: QMP event %s %s", dom.name, name, data)
            with ctx.events_from_qemu(qemu_time):
                follow_up = qmp_events.apply(ctx, dom, name, data)
            if follow_up is not None:
                ctx.save_status(dom)  # a stop_reason or pending action to survive a restart
        if follow_up is None:
            return
        self.run_follow_up(dom, generation, follow_up)

    def run_follow_up(self, dom: Domain, generation: int, follow_up: qmp_events.FollowUp) -> None:
        """Start the task that does what an event (or a resync) asked for, under a job."""
        ctx = self.ctx
        if follow_up.kind is FollowUpKind.KILL:
            ctx.spawn(self.kill(dom, generation), f"{follow_up.why}-{dom.name}")
        elif follow_up.kind is FollowUpKind.FINISH_DETACH:
            assert follow_up.device is not None
            ctx.spawn(self._finish_detach(dom, generation, follow_up.device),
                      f"{follow_up.why}-{dom.name}")
        else:
            ctx.spawn(self._restart_in_place(dom, generation, follow_up.why),
                      f"{follow_up.why}-{dom.name}")

    async def _finish_detach(self, dom: Domain, generation: int, device_id: str) -> None:
        """The guest released a device after its detach stopped waiting: take the slow lock
        and finish the removal (backends, then the JSON entry)."""
        try:
            async with self.ctx.job(dom, JobKind.MODIFY, f"detach {device_id} (released)"):
                await finish_detach(self.ctx, dom, generation, device_id)
        except QvirtError as exc:
            log.warning("domain %s: finishing the removal of %s: %s", dom.name, device_id, exc)

    async def _restart_in_place(self, dom: Domain, generation: int, why: str) -> None:
        """Reset and continue in the same QEMU (libvirt's fake reboot), as a job."""
        ctx = self.ctx
        try:
            async with ctx.job(dom, JobKind.MODIFY, why):
                async with dom.lock:  # L5
                    ctx.ensure_current(dom, generation, why)
                    dom.fake_reboot = False
                await ctx.qmp(dom, generation, "system_reset", what=why)
                await ctx.qmp(dom, generation, "cont", what=why)
                async with dom.lock:  # L5
                    ctx.ensure_current(dom, generation, why)
                    # As libvirt's fake reboot: running again, announced as resumed/unpaused.
                    ctx.set_state(dom, DomainState.RUNNING, Reason.BOOTED,
                                  ("resumed", "unpaused"))
        except QvirtError as exc:
            log.warning("domain %s: %s failed: %s", dom.name, why, exc)
