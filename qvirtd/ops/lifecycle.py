"""The lifecycle operations of the API: define, start, shutdown, destroy, and the rest.

Each public method is one API operation. The RPC layer runs each call as its own task, so a
client that goes away does not cancel an operation half-way. `owner` names the operation and
its client for job diagnostics ("suspend (client pid 42)").
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pydantic import ValidationError

from ..domain import Domain
from ..errors import (
    InvalidDefinitionError,
    InvalidOperationError,
    NoDomainError,
    QvirtError,
    describe_validation_error,
)
from ..job import JobKind
from ..model import DomainDef, DomainState, Reason
from .context import Context
from .runtime import Runtime

log = logging.getLogger(__name__)


class Lifecycle:
    def __init__(self, ctx: Context, runtime: Runtime) -> None:
        self.ctx = ctx
        self.runtime = runtime

    # --- definitions ---------------------------------------------------------------------

    async def define(self, raw: dict[str, Any], owner: str) -> dict[str, Any]:
        """Create or update a persistent definition. Nothing is stored if it is invalid."""
        ctx = self.ctx
        if not isinstance(raw, dict):
            raise InvalidDefinitionError("definition: must be a JSON object")
        try:
            definition = DomainDef.model_validate(raw)
        except ValidationError as exc:
            raise InvalidDefinitionError(
                f"invalid definition: {describe_validation_error(exc)}") from None
        uuid_given = "uuid" in raw
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
                dom = Domain(definition, persistent=True)
                ctx.table.add(dom)
        if created:
            try:
                async with dom.lock:  # L3: the file and the entry change together
                    ctx.store.save(definition)
                    ctx.emit(dom, "lifecycle", "defined", "added")
            except OSError as exc:
                async with ctx.table.lock:  # L1: undo the reservation
                    ctx.table.remove(dom)
                raise QvirtError(f"cannot store definition of '{dom.name}': {exc}") from exc
        else:
            async with ctx.job(dom, JobKind.MODIFY, owner):
                async with dom.lock:  # L3
                    ctx.store.save(definition)
                    dom.persistent_def = definition
                    ctx.emit(dom, "lifecycle", "defined", "updated")
        return {"name": dom.name, "uuid": dom.uuid, "created": created}

    async def undefine(self, ident: str, owner: str) -> dict[str, Any]:
        ctx = self.ctx
        dom = await ctx.lookup(ident)
        async with ctx.job(dom, JobKind.MODIFY, owner):
            async with dom.lock:  # L3
                if not dom.persistent:
                    raise InvalidOperationError(f"domain '{dom.name}' is not persistent")
                ctx.store.delete(dom.name)
                if dom.active:
                    # It keeps running as a transient domain; its live definition stays.
                    assert dom.live_def is not None
                dom.persistent_def = None
                dom.autostart = False
                ctx.emit(dom, "lifecycle", "undefined", "removed")
                remove_now = not dom.active
        if remove_now:
            async with ctx.table.lock:  # L1: removal last, with no domain lock held
                if dom.persistent_def is None and not dom.active:
                    ctx.table.remove(dom)
        return {"name": dom.name, "transient": not remove_now}

    async def set_autostart(self, ident: str, enabled: bool) -> dict[str, Any]:
        ctx = self.ctx
        dom = await ctx.lookup(ident)
        async with dom.lock:  # L3
            if not dom.persistent:
                raise InvalidOperationError(
                    f"domain '{dom.name}' is transient: only persistent domains autostart")
            ctx.store.set_autostart(dom.name, enabled)
            dom.autostart = enabled
        return {"name": dom.name, "autostart": enabled}

    # --- queries (domain lock only, no job: they never wait for QEMU) --------------------

    async def list(self, include_inactive: bool) -> list[dict[str, Any]]:
        ctx = self.ctx
        async with ctx.table.lock:  # L1: copy the table, then release
            doms = ctx.table.all()
        out = []
        for dom in doms:
            async with dom.lock:  # L3
                if include_inactive or dom.active:
                    out.append(dom.summary())
        out.sort(key=lambda d: (d["id"] is None, d["id"] or 0, d["name"]))
        return out

    async def dominfo(self, ident: str) -> dict[str, Any]:
        dom = await self.ctx.lookup(ident)
        async with dom.lock:  # L3
            return dom.info()

    async def dumpjson(self, ident: str, inactive: bool) -> dict[str, Any]:
        dom = await self.ctx.lookup(ident)
        async with dom.lock:  # L3
            if inactive:
                if dom.persistent_def is None:
                    raise InvalidOperationError(f"domain '{dom.name}' has no persistent "
                                                "definition (it is transient)")
                return dom.persistent_def.model_dump(mode="json")
            return dom.definition.model_dump(mode="json")

    async def console_log(self, ident: str, max_bytes: int) -> dict[str, Any]:
        dom = await self.ctx.lookup(ident)
        path = self.ctx.layout.domain_run_dir(dom.name) / "console.log"
        try:
            with open(path, "rb") as f:
                f.seek(0, 2)
                size = f.tell()
                f.seek(max(0, size - max_bytes))
                data = f.read()
        except FileNotFoundError:
            raise InvalidOperationError(f"domain '{dom.name}' has no console log yet "
                                        "(it has never run)") from None
        return {"name": dom.name, "size": size, "text": data.decode(errors="replace")}

    # --- start and stop ------------------------------------------------------------------

    async def start(self, ident: str, paused: bool, owner: str) -> dict[str, Any]:
        dom = await self.ctx.lookup(ident)
        await self.runtime.start(dom, paused, owner)
        return await self.dominfo(dom.uuid)

    async def destroy(self, ident: str, owner: str) -> dict[str, Any]:
        """Stop QEMU now. Takes no job first: it acts on the process, so it gets through any
        job in progress (whose QMP call then fails, and whose L5 re-check says why)."""
        ctx = self.ctx
        dom = await ctx.lookup(ident)
        async with dom.lock:  # L3
            if not dom.active:
                raise InvalidOperationError(f"domain '{dom.name}' is not running")
            generation = dom.generation
            dom.stop_reason = Reason.DESTROYED
            ctx.save_status(dom)  # a destroy interrupted by a daemon crash is finished after
        await self.runtime.kill(dom, generation)
        # Wait, bounded, for the job that was interrupted (if any) to let go, so that when
        # destroy returns nothing is still acting on the old run.
        try:
            async with ctx.job(dom, JobKind.DESTROY, owner):
                pass
        except (QvirtError, NoDomainError) as exc:
            log.warning("domain %s: destroyed, but: %s", dom.name, exc)
        return {"name": dom.name, "state": str(DomainState.SHUTOFF)}

    async def shutdown(self, ident: str, wait_s: float | None, owner: str) -> dict[str, Any]:
        """Press the ACPI power button; with `wait_s`, return once the domain is shut off."""
        ctx = self.ctx
        dom = await ctx.lookup(ident)
        async with ctx.job(dom, JobKind.MODIFY, owner):
            async with dom.lock:  # L3
                generation = ctx.running_generation(dom)
                dom.fake_reboot = False
                ended = dom.run_ended
            await ctx.qmp(dom, generation, "system_powerdown", what="shutdown")
        if wait_s is not None:
            try:
                await asyncio.wait_for(ended.wait(), wait_s)
            except TimeoutError:
                raise QvirtError(f"domain '{dom.name}' did not shut off within "
                                 f"{wait_s:g} s (the guest may ignore the power button)"
                                 ) from None
        return await self.dominfo(dom.uuid)

    async def reboot(self, ident: str, owner: str) -> dict[str, Any]:
        """Power button, then reset-and-continue in the same QEMU once the guest powers off."""
        ctx = self.ctx
        dom = await ctx.lookup(ident)
        async with ctx.job(dom, JobKind.MODIFY, owner):
            async with dom.lock:  # L3
                generation = ctx.running_generation(dom)
                dom.fake_reboot = True
                ctx.save_status(dom)
            await ctx.qmp(dom, generation, "system_powerdown", what="reboot")
        return await self.dominfo(dom.uuid)

    async def _simple(self, ident: str, owner: str, command: str,
                      after: tuple[DomainState, Reason, tuple[str, str]] | None
                      ) -> dict[str, Any]:
        """A MODIFY job around one QMP command, then the state it implies (if still ours)."""
        ctx = self.ctx
        dom = await ctx.lookup(ident)
        async with ctx.job(dom, JobKind.MODIFY, owner):
            async with dom.lock:  # L3
                generation = ctx.running_generation(dom)
                if command == "stop":
                    dom.pause_hint = Reason.USER  # the STOP event QEMU sends is ours
            await ctx.qmp(dom, generation, command, what=owner.split(" ")[0])
            async with dom.lock:  # L5
                ctx.ensure_current(dom, generation, command)
                if after is not None:
                    ctx.set_state(dom, after[0], after[1], after[2])
                return dom.info()

    async def suspend(self, ident: str, owner: str) -> dict[str, Any]:
        return await self._simple(ident, owner, "stop",
                                  (DomainState.PAUSED, Reason.USER, ("suspended", "paused")))

    async def resume(self, ident: str, owner: str) -> dict[str, Any]:
        return await self._simple(ident, owner, "cont",
                                  (DomainState.RUNNING, Reason.UNPAUSED, ("resumed", "unpaused")))

    async def reset(self, ident: str, owner: str) -> dict[str, Any]:
        return await self._simple(ident, owner, "system_reset", None)

    async def monitor_command(self, ident: str, message: dict[str, Any],
                              owner: str) -> Any:
        """One raw QMP command from the user, under a MODIFY job (it may change anything)."""
        ctx = self.ctx
        dom = await ctx.lookup(ident)
        if not isinstance(message.get("execute"), str):
            raise InvalidOperationError("command: needs an 'execute' member naming the command")
        if message["execute"] == "qmp_capabilities":
            raise InvalidOperationError("command: qmp_capabilities is done by the daemon")
        async with ctx.job(dom, JobKind.MODIFY, owner):
            async with dom.lock:  # L3
                ctx.running_generation(dom)
                monitor = dom.monitor
            assert monitor is not None
            return await monitor.execute_raw(message)
