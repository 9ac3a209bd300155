"""Save and restore: a running guest into a file and back, managed saves, host shutdown.

`save` is an async job (SAVE; queries, destroy and domjobabort may run beside it) with three
phases, each recorded in the status file before it starts:

* `pause`: the vCPUs stop (state paused, reason `saving`);
* `save`: the daemon creates the file and writes the header (savefile.py), hands the fd to
  QEMU (`getfd`) and QEMU writes its migration stream into it (`migrate fd:`), watched
  through its MIGRATION events and `query-migrate` (qemu_migration.py);
* `finish`: the file is complete and fsynced; `stop_reason` `saved` is recorded, then
  QEMU is stopped and the domain shuts off with reason `saved`.

Any failure or abort before `finish` is undone: the stream is cancelled, the guest resumed
if it was running, the partial file removed. A daemon killed during a save finds the phase
in the status file (ops/reconnect.py): before `finish` it undoes the save the same way; at
`finish` it stops QEMU (the file is whole): the guest lives in exactly one place, the QEMU
or the file, never neither.

`restore` reads the header, then starts the domain from it (runtime.launch with
`Incoming`): a QEMU with the saved device layout, `-incoming defer`, `migrate-incoming
fd:N` on the inherited file. A managed save (`managedsave`, kept in the state directory) is
restored by the next `start`, and deleted once QEMU has loaded it (phase `loaded`: from there
a restarted daemon finishes that start rather than roll it back).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from functools import partial
from pathlib import Path
from typing import Any

from .. import savefile
from ..cloudinit import run_files
from ..domain import Domain
from ..errors import InvalidOperationError, QvirtError, StorageError
from ..job import AsyncJob, AsyncJobKind
from ..model import DomainState, Reason
from ..offloop import make_owned
from ..run import Run
from ..savefile import SaveHeader
from ..status import JobRecord
from . import qemu_migration
from .context import Context
from .lifecycle import Lifecycle
from .runtime import Incoming, Runtime

log = logging.getLogger(__name__)

SAVE_FD = "qvirtd-save"
GUESTS_STOPPED = "guests-stopped.json"


def _check_target(path: Path) -> None:
    if not path.is_absolute():
        raise InvalidOperationError(f"save file {str(path)!r}: give an absolute path")


async def domain_for(ctx: Context, header: SaveHeader) -> tuple[Domain, bool]:
    """The table entry a saved or migrated guest comes back into: its domain if defined
    here (same name and uuid; it must not run), else a new transient one. (entry, created)"""
    async with ctx.table.lock:  # L1
        by_uuid = ctx.table.get_uuid(header.uuid)
        by_name = ctx.table.get_name(header.name)
        if by_uuid is not None and by_uuid is by_name:
            return by_uuid, False
        if by_uuid is None and by_name is None:
            dom = Domain(header.definition, persistent=False)
            ctx.table.add(dom)
            return dom, True
    other = by_uuid or by_name
    assert other is not None
    raise InvalidOperationError(
        f"the guest is domain '{header.name}' ({header.uuid}), but domain '{other.name}' "
        f"({other.uuid}) has that {'uuid' if by_uuid else 'name'} here")


class Saves:
    def __init__(self, ctx: Context, runtime: Runtime, ops: Lifecycle) -> None:
        self.ctx = ctx
        self.runtime = runtime
        self.ops = ops

    # --- save ----------------------------------------------------------------------------

    async def save(self, ident: str, path: str | None, owner: str) -> dict[str, Any]:
        """`save NAME FILE`, or with `path` None `managedsave NAME`."""
        ctx = self.ctx
        dom = await ctx.lookup(ident)
        managed = path is None
        target = ctx.layout.managed_save(dom.name) if path is None else Path(path)
        _check_target(target)
        async with ctx.async_job(dom, AsyncJobKind.SAVE, owner) as job:
            async with dom.lock:  # L3
                run = ctx.running(dom)
                if run.starting:
                    raise InvalidOperationError(f"domain '{dom.name}' is still starting")
                if managed and not dom.persistent:
                    raise InvalidOperationError(f"domain '{dom.name}' is transient: a managed "
                                                "save needs a persistent definition (use save "
                                                "FILE)")
                was_running = dom.state is DomainState.RUNNING
                job.data = {"path": str(target), "managed": managed,
                            "was_running": was_running}
                job.set_phase("pause")
                ctx.save_status(dom, run)
                header = SaveHeader(name=dom.name, uuid=dom.uuid, definition=run.definition,
                                    ports=dict(run.ports), root_ports=run.root_ports,
                                    accel=run.accel, was_running=was_running,
                                    saved_at=savefile.now_iso(), saved_by=owner)
            await ctx.status_barrier(run)
            log.info("domain %s: %s to %s asked by %s", dom.name,
                     "managedsave" if managed else "save", target, owner)
            try:
                size = await self._save(dom, run, job, target, header, was_running)
            except BaseException as exc:
                await asyncio.shield(self._undo(dom, run, target, was_running,
                                                bool(job.data.get("created")),
                                                f"the save failed: {exc}"))
                raise
            async with dom.lock:  # L5, then "finish": the file is whole, QEMU may go
                ctx.ensure_current(dom, run, "save")
                run.stop_reason = Reason.SAVED
                job.set_phase("finish")
                ctx.save_status(dom, run)
                if managed:
                    dom.managed_save = True
            await ctx.status_barrier(run)
            # Still holding the job: nothing may resume the guest (its disks must stay as
            # the file has them) before QEMU is gone and the run has ended (reason saved).
            await self.runtime.kill(dom, run)
        log.info("domain %s: saved to %s (%d bytes)", dom.name, target, size)
        return {"name": dom.name, "file": str(target), "bytes": size, "managed": managed,
                "progress": job.progress}

    async def _save(self, dom: Domain, run: Run, job: AsyncJob, target: Path,
                    header: SaveHeader, was_running: bool) -> int:
        ctx = self.ctx
        # The file first: a path that cannot be written fails before the guest is touched.
        header.files = savefile.encode_files(
            await asyncio.to_thread(run_files, run.run_dir, run.definition))
        fd = await make_owned(partial(savefile.create, target, header), os.close)
        job.data["created"] = True  # ours to remove if the save does not finish
        try:
            if was_running:
                async with dom.lock:  # L3: the STOP QEMU sends is ours
                    run.pause_hint = Reason.SAVING
                await job.abortable(ctx.qmp(dom, run, "stop", what="save"))
                async with dom.lock:  # L5
                    ctx.ensure_current(dom, run, "save")
                    ctx.set_state(dom, DomainState.PAUSED, Reason.SAVING,
                                  ("suspended", "paused"))
            await self.runtime.enter_phase(dom, run, job, "save")
            async with dom.lock:  # L3
                ctx.ensure_current(dom, run, "save")
                monitor = run.monitor
            if monitor is None:
                raise InvalidOperationError(f"domain '{dom.name}': the QEMU monitor is not "
                                            "connected")
            await qemu_migration.set_capabilities(ctx, dom, run, {"events": True}, "save")
            await qemu_migration.set_bandwidth(ctx, dom, run,
                                               ctx.settings.save_max_bandwidth_mib_s, "save")
            await monitor.send_fd(SAVE_FD, fd)
            await ctx.qmp(dom, run, "migrate", {"uri": f"fd:{SAVE_FD}"}, what="save")
            await qemu_migration.wait_done(ctx, dom, run, job, "save")
        except BaseException:
            await asyncio.to_thread(os.close, fd)  # L6: a close may flush or free blocks
            raise
        return await asyncio.to_thread(savefile.finish, fd, target)

    async def _undo(self, dom: Domain, run: Run, target: Path, was_running: bool,
                    created: bool, why: str) -> None:
        """A save that did not finish: stop the stream, resume the guest if it ran, remove
        the partial file. Also used by a restarted daemon (resume_save)."""
        ctx = self.ctx
        log.warning("domain %s: undoing the save to %s (%s)", dom.name, target, why)
        async with dom.lock:  # L3
            current = dom.run is run and run.monitor is not None
            paused_by_us = dom.state is DomainState.PAUSED and was_running
        if current:
            await qemu_migration.cancel(ctx, dom, run, "save (undo)")
            if paused_by_us:
                await qemu_migration.resume_guest(ctx, dom, run, "save (undo)",
                                                  Reason.UNPAUSED, "unpaused")
        if not created:
            return
        try:
            await ctx.writer.remove(target, durable=False)
        except StorageError as exc:
            log.error("domain %s: the partial save file %s was not removed: %s", dom.name,
                      target, exc)

    async def resume_save(self, dom: Domain, run: Run, record: JobRecord) -> bool:
        """Reconnect (holding its job): a save of the previous daemon was cut short before
        `finish`: undo it. True if it was a save to undo."""
        if record.kind != AsyncJobKind.SAVE or run.stop_reason is not None:
            return False
        target = Path(str(record.data.get("path", "")))
        was_running = bool(record.data.get("was_running", True))
        if target.is_absolute():
            await self._undo(dom, run, target, was_running, bool(record.data.get("created")),
                             f"the daemon stopped during its phase '{record.phase}'")
        return True

    # --- restore -------------------------------------------------------------------------

    async def restore(self, path: str, paused: bool, owner: str) -> dict[str, Any]:
        """`restore FILE`: start the saved domain from it (the file stays)."""
        ctx = self.ctx
        source = Path(path)
        _check_target(source)
        header, offset = await asyncio.to_thread(savefile.read, source)
        dom, created = await domain_for(ctx, header)
        try:
            async with ctx.async_job(dom, AsyncJobKind.START, owner) as job:
                fd = await make_owned(partial(savefile.open_stream, source, offset), os.close)
                try:
                    managed = source == ctx.layout.managed_save(dom.name)
                    await self.runtime.launch(dom, job, paused,
                                              Incoming(header, fd=fd, path=source,
                                                       managed=managed))
                finally:
                    await asyncio.to_thread(os.close, fd)  # L6: see Runtime.start
        finally:
            if created:
                await ctx.remove_if_unused(dom)
        log.info("domain %s: restored from %s by %s", dom.name, source, owner)
        async with dom.lock:  # L3
            return dom.info()

    async def managedsave_remove(self, ident: str, owner: str) -> dict[str, Any]:
        dom = await self.ctx.lookup(ident)
        async with self.ctx.async_job(dom, AsyncJobKind.START, owner):
            removed = await self.runtime.remove_managed_save(dom, owner)
        if not removed:
            raise InvalidOperationError(f"domain '{dom.name}' has no managed save image")
        return {"name": dom.name, "removed": True}

    # --- host shutdown (the libvirt-guests behaviour) ------------------------------------

    async def guests_stop(self, mode: str | None, owner: str) -> dict[str, Any]:
        """Stop every running guest as `on_host_shutdown` (or `mode`) says, all at once,
        within `host_shutdown_timeout_s`; remember which were running, for guests-start."""
        ctx = self.ctx
        mode = mode or ctx.settings.on_host_shutdown
        async with ctx.table.lock:  # L1
            doms = ctx.table.all()
        running = []
        for dom in doms:
            async with dom.lock:  # L3
                if dom.active:
                    running.append((dom, dom.persistent))
        results: dict[str, str] = {}
        if mode != "nothing":
            outcomes = await asyncio.gather(
                *(self._stop_one(dom, mode if persistent else "shutdown", owner)
                  for dom, persistent in running), return_exceptions=True)
            for (dom, _), outcome in zip(running, outcomes, strict=True):
                results[dom.name] = (str(outcome) if isinstance(outcome, BaseException)
                                     else outcome)
        names = [dom.name for dom, persistent in running if persistent]
        if mode != "nothing" and names:
            await ctx.writer.write(ctx.layout.state_dir / GUESTS_STOPPED,
                                   json.dumps({"domains": names, "mode": mode}).encode(),
                                   durable=True)
        log.info("guests-stop (%s) by %s: %s", mode, owner, results or "nothing running")
        return {"mode": mode, "domains": results}

    async def _stop_one(self, dom: Domain, mode: str, owner: str) -> str:
        timeout = self.ctx.settings.host_shutdown_timeout_s
        try:
            async with asyncio.timeout(timeout):
                if mode == "managedsave":
                    await self.save(dom.uuid, None, owner)
                    return "saved"
                await self.ops.shutdown(dom.uuid, timeout, owner)
                return "shut off"
        except TimeoutError:
            return f"still running after {timeout:g} s"
        except QvirtError as exc:
            return str(exc)

    async def guests_start(self, owner: str) -> dict[str, Any]:
        """Start the guests guests-stop stopped (a managed save is resumed), then forget them."""
        ctx = self.ctx
        record = ctx.layout.state_dir / GUESTS_STOPPED
        try:
            data = json.loads(await asyncio.to_thread(record.read_bytes))
            names = [str(n) for n in data.get("domains", [])]
        except FileNotFoundError:
            return {"domains": {}}
        except (OSError, ValueError, AttributeError) as exc:
            ctx.warn(f"{record} cannot be read ({exc}): guests-start starts nothing")
            return {"domains": {}}
        results: dict[str, str] = {}

        async def one(name: str) -> None:
            try:
                dom = await ctx.lookup(name)
                await self.runtime.start(dom, False, owner)
                results[name] = "started"
            except QvirtError as exc:
                results[name] = str(exc)

        await asyncio.gather(*(one(n) for n in names))
        await ctx.writer.remove(record, durable=True)
        log.info("guests-start by %s: %s", owner, results)
        return {"domains": results}

