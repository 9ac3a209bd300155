"""The method table: JSON-RPC method name -> params model -> operation.

Method and param names are the `qvirsh` command and option names (the contract). Params are
validated by pydantic before any operation runs; an error names every offending field.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..locks import LockWatch
from ..ops.context import Context
from ..ops.devices import Devices
from ..ops.lifecycle import Lifecycle


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NoParams(Params):
    pass


class NameParams(Params):
    name: Annotated[str, Field(min_length=1, max_length=256)]


class ListParams(Params):
    all: bool = False


class DefineParams(Params):
    definition: dict[str, Any]


class StartParams(NameParams):
    paused: bool = False


class ShutdownParams(NameParams):
    # `true` means "wait the default time"; a number is seconds; absent/false: do not wait.
    wait: bool | Annotated[float, Field(gt=0, le=86400)] = False


class DumpParams(NameParams):
    inactive: bool = False


class AutostartParams(NameParams):
    disable: bool = False


class MonitorCommandParams(NameParams):
    command: dict[str, Any]
    force: bool = False


class AttachParams(NameParams):
    device: dict[str, Any]
    config: bool = False


class DetachParams(NameParams):
    device: Annotated[str, Field(min_length=1, max_length=64)]
    wait: Annotated[float, Field(ge=0, le=3600)] = 5.0
    config: bool = False


class ChangeMediaParams(NameParams):
    device: Annotated[str, Field(min_length=1, max_length=64)]
    path: str | None = None
    eject: bool = False

    @model_validator(mode="after")
    def _one_of(self) -> ChangeMediaParams:
        if (self.path is None) == (not self.eject):
            raise ValueError("give either path or eject, not both and not neither")
        return self


class EventParams(Params):
    domain: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    events: list[Annotated[str, Field(max_length=64)]] | None = None
    since_seq: Annotated[int, Field(ge=0)] | None = None


class ConsoleParams(NameParams):
    max_bytes: Annotated[int, Field(ge=1, le=16 * 1024 * 1024)] = 64 * 1024


@dataclass(frozen=True)
class Caller:
    """Who sent a request (from SO_PEERCRED), for job diagnostics and logs."""

    pid: int | None
    uid: int | None

    def owner(self, method: str) -> str:
        """Who asked, as jobs, errors and logs name it: "start (client pid 42 uid 0)"."""
        return f"{method} (client pid {self.pid} uid {self.uid})" if self.pid else method


Handler = Callable[[Any, Caller], Awaitable[Any]]


@dataclass(frozen=True)
class Method:
    params: type[Params]
    handler: Handler
    doc: str


def _rss_kib() -> int:
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def build_methods(ctx: Context, ops: Lifecycle, devices: Devices) -> dict[str, Method]:
    s = ctx.settings

    async def attach_device(p: AttachParams, c: Caller) -> Any:
        return await devices.attach(p.name, p.device, p.config, c.owner("attach-device"))

    async def detach_device(p: DetachParams, c: Caller) -> Any:
        return await devices.detach(p.name, p.device, p.wait, p.config,
                                    c.owner("detach-device"))

    async def change_media(p: ChangeMediaParams, c: Caller) -> Any:
        return await devices.change_media(p.name, p.device, p.path, c.owner("change-media"))

    async def define(p: DefineParams, c: Caller) -> Any:
        return await ops.define(p.definition, c.owner("define"))

    async def undefine(p: NameParams, c: Caller) -> Any:
        return await ops.undefine(p.name, c.owner("undefine"))

    async def list_(p: ListParams, c: Caller) -> Any:
        return await ops.list(p.all)

    async def dominfo(p: NameParams, c: Caller) -> Any:
        return await ops.dominfo(p.name)

    async def dumpjson(p: DumpParams, c: Caller) -> Any:
        return await ops.dumpjson(p.name, p.inactive)

    async def start(p: StartParams, c: Caller) -> Any:
        return await ops.start(p.name, p.paused, c.owner("start"))

    async def shutdown(p: ShutdownParams, c: Caller) -> Any:
        wait: float | None
        if p.wait is True:
            wait = s.shutdown_wait_default_s
        elif p.wait is False:
            wait = None
        else:
            wait = float(p.wait)
        return await ops.shutdown(p.name, wait, c.owner("shutdown"))

    async def reboot(p: NameParams, c: Caller) -> Any:
        return await ops.reboot(p.name, c.owner("reboot"))

    async def reset(p: NameParams, c: Caller) -> Any:
        return await ops.reset(p.name, c.owner("reset"))

    async def suspend(p: NameParams, c: Caller) -> Any:
        return await ops.suspend(p.name, c.owner("suspend"))

    async def resume(p: NameParams, c: Caller) -> Any:
        return await ops.resume(p.name, c.owner("resume"))

    async def destroy(p: NameParams, c: Caller) -> Any:
        return await ops.destroy(p.name, c.owner("destroy"))

    async def autostart(p: AutostartParams, c: Caller) -> Any:
        return await ops.set_autostart(p.name, not p.disable, c.owner("autostart"))

    async def monitor_command(p: MonitorCommandParams, c: Caller) -> Any:
        return await ops.monitor_command(p.name, p.command, p.force,
                                         c.owner("qemu-monitor-command"))

    async def domjobinfo(p: NameParams, c: Caller) -> Any:
        return await ops.domjobinfo(p.name)

    async def domjobabort(p: NameParams, c: Caller) -> Any:
        return await ops.domjobabort(p.name, c.owner("domjobabort"))

    async def console_log(p: ConsoleParams, c: Caller) -> Any:
        return await ops.console_log(p.name, p.max_bytes)

    async def daemon_stats(p: NoParams, c: Caller) -> Any:
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

    async def daemon_warnings(p: NoParams, c: Caller) -> Any:
        return ([o["message"] for o in ctx.orphans] + ctx.warnings
                + [f"status file not written, retrying: {e}" for e in ctx.writer.failing.values()])

    table: dict[str, tuple[type[Params], Handler, str]] = {
        "define": (DefineParams, define, "create or update a persistent domain"),
        "undefine": (NameParams, undefine, "remove a persistent definition"),
        "list": (ListParams, list_, "list domains"),
        "dominfo": (NameParams, dominfo, "state and basic facts of one domain"),
        "dumpjson": (DumpParams, dumpjson, "the live (or persistent) definition"),
        "start": (StartParams, start, "launch QEMU and run the guest"),
        "shutdown": (ShutdownParams, shutdown, "ACPI power button, optionally wait"),
        "reboot": (NameParams, reboot, "ACPI reboot in the same QEMU"),
        "reset": (NameParams, reset, "hard reset"),
        "suspend": (NameParams, suspend, "pause the vCPUs"),
        "resume": (NameParams, resume, "continue the vCPUs"),
        "destroy": (NameParams, destroy, "stop QEMU now"),
        "autostart": (AutostartParams, autostart, "set or clear the autostart flag"),
        "qemu-monitor-command": (MonitorCommandParams, monitor_command, "one raw QMP command"),
        "domjobinfo": (NameParams, domjobinfo, "the domain's current jobs"),
        "domjobabort": (NameParams, domjobabort, "abort the domain's async job"),
        "attach-device": (AttachParams, attach_device, "hotplug a device (and/or --config)"),
        "detach-device": (DetachParams, detach_device, "hot-unplug a device"),
        "change-media": (ChangeMediaParams, change_media, "insert or eject a CD-ROM medium"),
        "console-log": (ConsoleParams, console_log, "the tail of the serial console log"),
        "daemon-stats": (NoParams, daemon_stats, "daemon counters and lock statistics"),
        "daemon-warnings": (NoParams, daemon_warnings,
                            "things the daemon found but does not manage (orphan QEMUs)"),
    }
    return {name: Method(params, handler, doc) for name, (params, handler, doc) in table.items()}
