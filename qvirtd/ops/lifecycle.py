"""The lifecycle operations of the API: define, start, shutdown, destroy, and the rest.

Each public method is one API operation. The RPC layer runs each call as its own task, so a
client that goes away does not cancel an operation half-way. `owner` names the operation and
its client for job diagnostics and logs ("suspend (client pid 42 uid 0)"): every change to a
domain is logged with it.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import logging
import os
import resource
import secrets
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..domain import Domain
from ..errors import (
    InvalidDefinitionError,
    InvalidOperationError,
    NoDomainError,
    QvirtError,
    RawQmpRefusedError,
    StorageError,
    describe_validation_error,
)
from ..job import Job, JobKind
from ..locks import LockWatch
from ..model import DomainDef, DomainState, Reason
from ..qemu.argv import LaunchPaths
from ..qemu.console import ConsoleSession, Peer, read_tail
from ..qemu.firmware import check_images, nvram_files
from ..qemu.qmp_policy import TAINT_CUSTOM_MONITOR, check_raw_command, refused_reason
from ..run import CONSOLE_LOG, Run
from .context import Context
from .guest import Guest
from .runtime import DESTROY_RECORD_S, Runtime

log = logging.getLogger(__name__)


MAX_SCREENSHOT_BYTES = 32 * 1024 * 1024
VNC_BASE_PORT = 5900


def _read_bounded(path: Path, limit: int) -> bytes:
    """Blocking (worker thread): a file QEMU wrote, refused past `limit` bytes."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(data) > limit:
        raise QvirtError(f"the screenshot is larger than {limit} bytes")
    return data


def _rss_kib() -> int:
    try:
        with open(f"/proc/{os.getpid()}/status") as f:  # small, in /proc: never blocks
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class _Undefined(Exception):
    """define: the domain found was undefined while we waited for its job."""


class Lifecycle:
    def __init__(self, ctx: Context, runtime: Runtime, guest: Guest) -> None:
        self.ctx = ctx
        self.runtime = runtime
        self.guest = guest

    # --- definitions ---------------------------------------------------------------------

    async def define(self, raw: dict[str, Any], owner: str) -> dict[str, Any]:
        """Create or update a persistent definition. Nothing is stored if it is invalid, and
        nothing changes in memory unless the file was written."""
        if not isinstance(raw, dict):
            raise InvalidDefinitionError("definition: must be a JSON object")
        try:
            definition = DomainDef.model_validate(raw)
        except ValidationError as exc:
            raise InvalidDefinitionError(
                f"invalid definition: {describe_validation_error(exc)}") from None
        except RecursionError:
            raise InvalidDefinitionError("definition: nested too deeply") from None
        check_images(self.ctx.ovmf, definition)  # firmware files: a clear error now
        while True:
            try:
                return await self._define(definition, "uuid" in raw, owner)
            except _Undefined:
                continue  # it was undefined while we waited for its job: define it anew

    async def _define(self, definition: DomainDef, uuid_given: bool,
                      owner: str) -> dict[str, Any]:
        ctx = self.ctx
        async with ctx.table.lock:  # L1: look up, and reserve a new slot
            dom = ctx.table.get_name(definition.name)
            if dom is not None and not uuid_given:
                definition = definition.model_copy(update={"uuid": dom.definition.uuid})
            uuid = str(definition.uuid)
            other = ctx.table.get_uuid(uuid)
            if dom is not None and dom.uuid != uuid:
                raise InvalidDefinitionError(
                    f"domain '{definition.name}' already exists with uuid {dom.uuid}")
            if other is not None and other.name != definition.name:
                raise InvalidDefinitionError(f"uuid {uuid} is already used by domain "
                                             f"'{other.name}'")
            created = dom is None
            if dom is None:
                # A new entry is born holding its MODIFY job (nobody else can see it yet):
                # whoever finds it before its file is written waits, then re-checks.
                dom = Domain(definition, persistent=True)
                dom.job.sync_job = Job(JobKind.MODIFY, owner)
                ctx.table.add(dom)
        if created:
            try:
                await ctx.store.save(definition)
            except BaseException:
                async with ctx.table.lock:  # L1: undo the reservation
                    ctx.table.remove(dom)
                raise
            finally:
                async with dom.lock:  # L2: end the job it was born with
                    assert dom.job.sync_job is not None
                    dom.job.release(dom.job.sync_job)
            async with dom.lock:  # L3
                ctx.emit(dom, "lifecycle", "defined", "added")
            log.info("domain %s defined by %s", dom.name, owner)
            return {"name": dom.name, "uuid": dom.uuid, "created": True}
        try:
            job = await ctx.begin_job(dom, JobKind.MODIFY, owner)
        except NoDomainError:
            raise _Undefined() from None
        try:
            await ctx.store.save(definition)  # on disk first (no lock held), then in memory
            async with dom.lock:  # L3
                dom.persistent_def = definition
                ctx.emit(dom, "lifecycle", "defined", "updated")
        finally:
            await ctx.end_job(dom, job)
        log.info("domain %s updated by %s", dom.name, owner)
        return {"name": dom.name, "uuid": dom.uuid, "created": False}

    async def undefine(self, ident: str, owner: str, nvram: bool = False,
                       keep_nvram: bool = False, managed_save: bool = False
                       ) -> dict[str, Any]:
        """Remove the persistent definition (and its autostart mark). A domain with an
        NVRAM (UEFI variables) needs `nvram` (remove it too) or `keep_nvram`, and one with
        a managed save image `managed_save` (remove it too), as in virsh."""
        ctx = self.ctx
        dom = await ctx.lookup(ident)
        async with ctx.job(dom, JobKind.MODIFY, owner):
            async with dom.lock:  # L3
                if not dom.persistent:
                    raise InvalidOperationError(f"domain '{dom.name}' is not persistent")
                had_mark = dom.autostart
                has_image = dom.managed_save
            if has_image and not managed_save:
                raise InvalidOperationError(
                    f"domain '{dom.name}' has a managed save image: undefine it with "
                    "--managed-save to remove that too (or start it first)")
            nvram_found = [p for p in nvram_files(ctx.layout.nvram_dir, dom.uuid)
                           if await asyncio.to_thread(p.exists)]
            if nvram_found and not (nvram or keep_nvram):
                raise InvalidOperationError(
                    f"domain '{dom.name}' has an NVRAM ({nvram_found[0]}): undefine it with "
                    "--nvram to remove that too, or --keep-nvram to keep it")
            # The files go first (no lock held); if they cannot, nothing changes. The mark
            # goes before the definition: a mark left behind without its definition would
            # autostart the next domain defined under this name.
            if has_image:
                await self.runtime.remove_managed_save(dom, owner)
            await ctx.store.set_autostart(dom.name, False)
            try:
                await ctx.store.delete(dom.name)
            except StorageError as exc:
                if had_mark:
                    await self._restore_mark(dom, exc)
                raise
            if nvram:  # a running QEMU keeps its open file until it exits
                for path in nvram_found:
                    await ctx.writer.remove(path, durable=True)
            async with dom.lock:  # L3
                dom.persistent_def = None
                dom.autostart = False
                ctx.emit(dom, "lifecycle", "undefined", "removed")
                transient = dom.active  # it keeps running; its live definition stays
        await ctx.remove_if_unused(dom)  # L1: removal last, with no domain lock held
        log.info("domain %s undefined by %s%s", dom.name, owner,
                 " (NVRAM removed)" if nvram and nvram_found else "")
        return {"name": dom.name, "transient": transient,
                "nvram_removed": bool(nvram and nvram_found),
                "managed_save_removed": has_image}

    async def _restore_mark(self, dom: Domain, exc: StorageError) -> None:
        """undefine removed the autostart mark but not the definition: put the mark back.
        If that fails too, autostart is off (as on disk) and the error says so."""
        try:
            await self.ctx.store.set_autostart(dom.name, True)
        except StorageError as again:
            async with dom.lock:  # L3: memory follows the disk
                dom.autostart = False
            raise StorageError(f"{exc}; its autostart mark was removed and cannot be put "
                               f"back ({again}): autostart is now off") from exc

    async def set_autostart(self, ident: str, enabled: bool, owner: str) -> dict[str, Any]:
        ctx = self.ctx
        dom = await ctx.lookup(ident)
        async with ctx.job(dom, JobKind.MODIFY, owner):
            async with dom.lock:  # L3
                if not dom.persistent:
                    raise InvalidOperationError(
                        f"domain '{dom.name}' is transient: only persistent domains autostart")
            await ctx.store.set_autostart(dom.name, enabled)
            async with dom.lock:  # L3
                dom.autostart = enabled
        log.info("domain %s autostart %s by %s", dom.name, "on" if enabled else "off", owner)
        return {"name": dom.name, "autostart": enabled}

    # --- queries (domain lock only, no job: they never wait for QEMU) --------------------

    # Queries answer inline when the locks they read are free (`*_now`, no task, no await:
    # WouldWait sends the request down the task path, the plain async method below).

    async def list(self, include_inactive: bool, info: bool = False) -> list[dict[str, Any]]:
        ctx = self.ctx
        async with ctx.table.lock:  # L1: copy the table, then release
            doms = ctx.table.all()
        out = []
        for dom in doms:
            async with dom.lock:  # L3
                if include_inactive or dom.active:
                    out.append(dom.info() if info else dom.summary())
        return _listed(out)

    def list_now(self, include_inactive: bool,
                 info: bool = False) -> builtins.list[dict[str, Any]]:
        table = self.ctx.table
        table.lock.read_now()  # L1, inline
        out = []
        for dom in table.all():
            dom.lock.read_now()  # L3, inline
            if include_inactive or dom.active:
                out.append(dom.info() if info else dom.summary())
        return _listed(out)

    async def dominfo(self, ident: str) -> dict[str, Any]:
        dom = await self.ctx.lookup(ident)
        async with dom.lock:  # L3
            return dom.info()

    def dominfo_now(self, ident: str) -> dict[str, Any]:
        table = self.ctx.table
        table.lock.read_now()  # L1, inline
        dom = table.find(ident)
        dom.lock.read_now()  # L3, inline
        return dom.info()

    def daemon_stats(self) -> dict[str, Any]:
        """Counters of the daemon itself (the RPC server adds its own `rpc` part)."""
        ctx = self.ctx
        return {
            "pid": os.getpid(),
            "rss_kib": _rss_kib(),
            "domains": len(ctx.table),
            "driver_lock": ctx.table.hold_stats.summary(),
            "lock_violations": LockWatch.violations,
            "last_lock_violation": LockWatch.last_violation or None,
            "events": {"last_seq": ctx.bus.last_seq, "delivered": ctx.bus.delivered,
                       "subscribers": ctx.bus.subscriber_count,
                       "dropped_subscribers": ctx.bus.dropped_subscribers},
            "background_tasks": len(ctx.background_tasks),
            "orphans": ctx.orphans,
            "writer": ctx.writer.stats(),
            "loop_watch": ctx.loop_watch.summary() if ctx.loop_watch is not None else None,
        }

    def daemon_warnings(self) -> builtins.list[str]:
        """What needs a person (see docs/protocol.md)."""
        ctx = self.ctx
        return ([o["message"] for o in ctx.orphans] + ctx.warnings
                + [f"status file not written, retrying: {e}"
                   for e in ctx.writer.failing.values()])

    async def domjobinfo(self, ident: str) -> dict[str, Any]:
        dom = await self.ctx.lookup(ident)
        async with dom.lock:  # L3
            return {"name": dom.name, **dom.job.info()}

    async def domjobabort(self, ident: str, owner: str) -> dict[str, Any]:
        """Ask the domain's async job to stop (an ABORT job, allowed beside async jobs), then
        wait, bounded, until it has: it rolls back what it had done."""
        ctx = self.ctx
        dom = await ctx.lookup(ident)
        async with ctx.job(dom, JobKind.ABORT, owner):
            async with dom.lock:  # L3
                job = dom.job.async_job
                if job is None:
                    raise InvalidOperationError(f"domain '{dom.name}' has no job to abort")
                job.request_abort(owner)
                info = job.info()
        log.info("domain %s: %s (phase %s) abort asked by %s", dom.name, job.kind, job.phase,
                 owner)
        try:
            async with asyncio.timeout(ctx.settings.job_wait_timeout_s):
                await job.done.wait()
        except TimeoutError:
            raise QvirtError(f"domain '{dom.name}': {job.kind} was asked to abort but has not "
                             f"stopped within {ctx.settings.job_wait_timeout_s:g} s") from None
        return {"name": dom.name, "aborted": info}

    async def dumpjson(self, ident: str, inactive: bool) -> dict[str, Any]:
        dom = await self.ctx.lookup(ident)
        async with dom.lock:  # L3
            if inactive:
                if dom.persistent_def is None:
                    raise InvalidOperationError(f"domain '{dom.name}' has no persistent "
                                                "definition (it is transient)")
                return dom.persistent_def.model_dump(mode="json")
            return dom.definition.model_dump(mode="json")

    async def console(self, ident: str, force: bool, readonly: bool, peer: Peer,
                      who: str) -> ConsoleSession:
        """Attach `peer` to the domain's serial console: as its writer (one at a time;
        `force` takes over) or read-only."""
        dom = await self.ctx.lookup(ident)
        async with dom.lock:  # L3
            run = dom.run
            console = run.console if run is not None else None
            if run is None or console is None or console.closed:
                raise InvalidOperationError(f"domain '{dom.name}' is not running" if run is None
                                            else f"domain '{dom.name}': its console is not "
                                            "connected (yet)")
            session = ConsoleSession(console, peer, writer=not readonly, who=who)
            console.attach(session, force)
        return session

    async def domdisplay(self, ident: str, owner: str) -> dict[str, Any]:
        """How to reach the domain's screen: its VNC socket, or the port QEMU picked."""
        ctx = self.ctx
        dom = await ctx.lookup(ident)
        async with dom.lock:  # L3
            run = ctx.running(dom)
            graphics = run.definition.graphics
            if graphics is None:
                raise InvalidOperationError(f"domain '{dom.name}' has no graphics (add "
                                            "\"graphics\": {\"type\": \"vnc\"} to it)")
        out: dict[str, Any] = {"name": dom.name, "type": graphics.type,
                               "listen": graphics.listen,
                               "password": graphics.password is not None}
        if graphics.listen == "unix":
            socket_path = LaunchPaths(run.run_dir).vnc_socket
            out.update(socket=str(socket_path), uri=f"vnc+unix://{socket_path}")
            return out
        async with ctx.job(dom, JobKind.QUERY, owner):
            vnc = await ctx.qmp(dom, run, "query-vnc", what="domdisplay")
        port = int(vnc.get("service", 0))
        out.update(host=vnc.get("host"), port=port,
                   uri=f"vnc://{vnc.get('host')}:{port - VNC_BASE_PORT}")
        return out

    async def screenshot(self, ident: str, owner: str) -> dict[str, Any]:
        """The domain's screen now, as PNG (QMP screendump into the run directory, read
        back off the loop, returned to the client: the daemon never writes where a client
        says)."""
        ctx = self.ctx
        dom = await ctx.lookup(ident)
        async with ctx.job(dom, JobKind.QUERY, owner):
            async with dom.lock:  # L3
                run = ctx.running(dom)
                if run.definition.graphics is None:
                    raise InvalidOperationError(f"domain '{dom.name}' has no graphics: "
                                                "nothing to take a screenshot of")
                path = run.run_dir / f"screenshot-{secrets.token_hex(6)}.png"
            try:
                await ctx.qmp(dom, run, "screendump", {"filename": str(path),
                                                       "format": "png"}, what="screenshot")
                data = await asyncio.to_thread(_read_bounded, path, MAX_SCREENSHOT_BYTES)
            finally:
                await ctx.writer.remove(path, durable=False)
        log.info("domain %s: screenshot (%d bytes) for %s", dom.name, len(data), owner)
        return {"name": dom.name, "format": "png", "bytes": len(data),
                "data": base64.b64encode(data).decode()}

    async def console_log(self, ident: str, max_bytes: int) -> dict[str, Any]:
        dom = await self.ctx.lookup(ident)
        path = self.ctx.layout.domain_run_dir(dom.name) / CONSOLE_LOG
        try:
            size, data = await asyncio.to_thread(read_tail, path, max_bytes)  # L6
        except FileNotFoundError:
            raise InvalidOperationError(f"domain '{dom.name}' has no console log yet "
                                        "(it has never run)") from None
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror}") from exc
        return {"name": dom.name, "size": size, "text": data.decode(errors="replace")}

    # --- start and stop ------------------------------------------------------------------

    async def start(self, ident: str, paused: bool, owner: str,
                    force_boot: bool = False) -> dict[str, Any]:
        dom = await self.ctx.lookup(ident)
        await self.runtime.start(dom, paused, owner, force_boot)
        return await self.dominfo(dom.uuid)

    async def destroy(self, ident: str, owner: str) -> dict[str, Any]:
        """Stop QEMU now. Takes no job first: it acts on the process, so it gets through any
        job in progress (whose QMP call then fails, and whose L5 re-check says why)."""
        ctx = self.ctx
        dom = await ctx.lookup(ident)
        async with dom.lock:  # L3
            run = dom.run
            if run is None:
                raise InvalidOperationError(f"domain '{dom.name}' is not running")
            run.stop_reason = Reason.DESTROYED
            ctx.save_status(dom, run)
        log.info("domain %s: destroy asked by %s", dom.name, owner)
        # Barrier, bounded: a daemon that dies after the kill still knows it was a destroy;
        # but a sick disk must never keep a destroy from killing QEMU.
        try:
            async with asyncio.timeout(DESTROY_RECORD_S):
                await ctx.status_barrier(run)
        except (TimeoutError, StorageError) as exc:
            log.warning("domain %s: destroying without the record on disk: %s", dom.name,
                        exc or "the write did not finish in time")
        await self.runtime.kill(dom, run)
        # Wait, bounded, for the job that was interrupted (if any) to let go, so that when
        # destroy returns nothing is still acting on the old run.
        try:
            async with ctx.job(dom, JobKind.DESTROY, owner):
                pass
        except QvirtError as exc:
            log.warning("domain %s: destroyed, but: %s", dom.name, exc)
        return {"name": dom.name, "state": str(DomainState.SHUTOFF)}

    async def shutdown(self, ident: str, wait_s: float | None, owner: str,
                       mode: str = "acpi") -> dict[str, Any]:
        """Ask the guest to power off: the ACPI power button, or (`mode` "agent") its guest
        agent; with `wait_s`, return once the domain is shut off."""
        ctx = self.ctx
        dom = await ctx.lookup(ident)
        if mode == "agent":
            run = await self.guest.shutdown(dom, owner)
        else:
            run = await self._power_button(dom, owner, reboot=False)
        log.info("domain %s: shutdown (%s) asked by %s", dom.name, mode, owner)
        if wait_s is not None and not await ctx.wait_ended(run, wait_s):
            raise QvirtError(f"domain '{dom.name}' did not shut off within {wait_s:g} s (the "
                             "guest may ignore the power button)")
        return await self.dominfo(dom.uuid)

    async def reboot(self, ident: str, owner: str) -> dict[str, Any]:
        """Power button, then reset-and-continue in the same QEMU once the guest powers off."""
        dom = await self.ctx.lookup(ident)
        await self._power_button(dom, owner, reboot=True)
        log.info("domain %s: reboot asked by %s", dom.name, owner)
        return await self.dominfo(dom.uuid)

    async def _power_button(self, dom: Domain, owner: str, reboot: bool) -> Run:
        """The ACPI power button under a MODIFY job; `reboot`: when the guest powers off, it
        is reset and continued (recorded in the status file before the button)."""
        ctx = self.ctx
        async with ctx.job(dom, JobKind.MODIFY, owner):
            async with dom.lock:  # L3
                run = ctx.running(dom)
                run.fake_reboot = reboot
                ctx.save_status(dom, run)
            await ctx.qmp(dom, run, "system_powerdown", what="reboot" if reboot else "shutdown")
        return run

    async def _simple(self, ident: str, owner: str, kind: JobKind, command: str,
                      after: tuple[DomainState, Reason, tuple[str, str]] | None
                      ) -> dict[str, Any]:
        """A job around one QMP command, then the state it implies (if still ours)."""
        ctx = self.ctx
        dom = await ctx.lookup(ident)
        async with ctx.job(dom, kind, owner):
            async with dom.lock:  # L3
                run = ctx.running(dom)
                if command == "stop":
                    run.pause_hint = Reason.USER  # the STOP event QEMU sends is ours
            await ctx.qmp(dom, run, command, what=owner.split(" ")[0])
            async with dom.lock:  # L5
                ctx.ensure_current(dom, run, command)
                # Mostly QEMU's event (STOP, RESUME) has set it already, status file and all.
                if after is not None and (dom.state, dom.reason) != after[:2]:
                    ctx.set_state(dom, after[0], after[1], after[2])
                log.info("domain %s: %s by %s", dom.name, command, owner)
                return dom.info()

    async def suspend(self, ident: str, owner: str) -> dict[str, Any]:
        return await self._simple(ident, owner, JobKind.SUSPEND, "stop",
                                  (DomainState.PAUSED, Reason.USER, ("suspended", "paused")))

    async def resume(self, ident: str, owner: str) -> dict[str, Any]:
        return await self._simple(ident, owner, JobKind.SUSPEND, "cont",
                                  (DomainState.RUNNING, Reason.UNPAUSED, ("resumed", "unpaused")))

    async def reset(self, ident: str, owner: str) -> dict[str, Any]:
        return await self._simple(ident, owner, JobKind.MODIFY, "system_reset", None)

    async def monitor_command(self, ident: str, message: dict[str, Any], force: bool,
                              owner: str) -> Any:
        """One raw QMP command from the user, under a MODIFY job (it may change anything).
        Commands that could put something in QEMU that no JSON config lists are refused
        unless `force`, which taints the run (qemu/qmp_policy.py)."""
        ctx = self.ctx
        dom = await ctx.lookup(ident)
        command = check_raw_command(message)
        refusal = refused_reason(command)
        if refusal is not None and not force:
            raise RawQmpRefusedError(
                f"'{command}' is refused on domain '{dom.name}': {refusal}. Pass --force to "
                "send it anyway; the domain is then marked tainted (custom-monitor)")
        async with ctx.job(dom, JobKind.MODIFY, owner):
            async with dom.lock:  # L3
                run = ctx.running(dom)
                monitor = run.monitor
                if refusal is not None and TAINT_CUSTOM_MONITOR not in run.tainted:
                    run.tainted.append(TAINT_CUSTOM_MONITOR)
                    ctx.save_status(dom, run)
            if refusal is not None:
                log.warning("domain %s: tainted (%s): '%s' forced by %s", dom.name,
                            TAINT_CUSTOM_MONITOR, command, owner)
            else:
                log.info("domain %s: raw QMP '%s' by %s", dom.name, command, owner)
            assert monitor is not None
            return await monitor.execute_raw(message)


def _listed(out: builtins.list[dict[str, Any]]) -> builtins.list[dict[str, Any]]:
    """Running domains by id, then the others by name (as `virsh list`)."""
    out.sort(key=lambda d: (d["id"] is None, d["id"] or 0, d["name"]))
    return out
