"""The verb registry: every `qvirsh` command and JSON-RPC method, declared once.

A verb is one entry here: its name (the method and the command), a one-line summary (the
help), its params model (what the daemon validates), how it is spelled on the command line
(`Arg`s: positional or option, which param each fills), the daemon's handler, and how its
result reads for a person. From this one table:

* `rpc/methods.py` builds the daemon's JSON-RPC method table;
* `cli.py` builds the `qvirsh` parser and its help, and prints results;
* `tests/unit/test_verbs.py` checks `docs/protocol.md` names every verb with its params
  (and nothing else), so the documentation cannot drift from the code.

This module is imported by `qvirsh` too: the daemon's operations are reached only through
the `Services` object a handler is given, never imported here.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from . import text

if TYPE_CHECKING:
    from .ops.context import Context
    from .ops.devices import Devices
    from .ops.guest import Guest
    from .ops.lifecycle import Lifecycle
    from .ops.migration import Migration
    from .ops.saves import Saves
    from .ops.stats import Stats
    from .ops.volumes import Volumes
    from .rpc.server import Connection


class Params(BaseModel):
    """Every method's params: unknown names are an error, never silently ignored."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Caller:
    """Who sent a request (from SO_PEERCRED), for job diagnostics and logs."""

    pid: int | None
    uid: int | None
    peer: str | None = None  # a TLS client: its certificate's subject CN

    def owner(self, method: str) -> str:
        """Who asked, as jobs, errors and logs name it: "start (client pid 42 uid 0)"."""
        if self.peer is not None:
            return f"{method} (tls peer {self.peer})"
        return f"{method} (client pid {self.pid} uid {self.uid})" if self.pid else method


class Services:
    """What a handler may use in the daemon (set up by the daemon, typed for mypy)."""

    def __init__(self, ctx: Context, ops: Lifecycle, devices: Devices, guest: Guest,
                 volumes: Volumes, saves: Saves, migration: Migration, stats: Stats) -> None:
        self.ctx = ctx
        self.stats = stats
        self.saves = saves
        self.migration = migration
        self.ops = ops
        self.devices = devices
        self.guest = guest
        self.volumes = volumes


Handler = Callable[[Services, Any, "Connection"], Awaitable[Any]]
NowHandler = Callable[[Services, Any, "Connection"], Any]


class ArgKind(enum.Enum):
    TEXT = "text"            # a string (positional or --opt VALUE)
    PATH = "path"            # a file name: qvirsh makes it absolute (the daemon's cwd is
                             # not the user's)
    FLAG = "flag"            # --opt: true when given
    NUMBER = "number"        # --opt SECONDS (float)
    INT = "int"              # --opt N
    OPTIONAL_NUMBER = "optional-number"  # --opt [SECONDS]: absent false, bare true, or N
    JSON_FILE = "json-file"  # FILE, read and parsed as JSON by qvirsh
    JSON_TEXT = "json-text"  # a JSON document given on the command line
    APPEND = "append"        # --opt VALUE, repeatable: a list
    CONST = "const"          # --opt adds `const` to the param's set (several may share a
                             # param; `combine` turns the set into the value)


@dataclass(frozen=True)
class Arg:
    """How one param is spelled on the command line."""

    param: str                       # the JSON-RPC param it fills ("" = qvirsh only)
    flag: str | None = None          # "--paused"; None for a positional
    kind: ArgKind = ArgKind.TEXT
    help: str | None = None
    metavar: str | None = None
    default: Any = None
    const: Any = None
    optional: bool = False           # a positional that may be left out
    group: str | None = None         # mutually exclusive with the other args of the group
    required: bool = False           # one of the group's args must be given
    dest: str | None = None          # where argparse keeps it (default: the param)
    combine: Callable[[set[str]], str] | None = None  # CONST args of one param, together

    @property
    def key(self) -> str:
        return self.dest or self.param or (self.flag or "").lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class Verb:
    name: str
    summary: str
    params: type[Params]
    handler: Handler
    args: tuple[Arg, ...] = ()
    human: Callable[[Any], str] | None = None   # result -> text (None: JSON)
    stream: bool = False                         # the connection stays open (event, console)
    upgrade: bool = False                        # after the reply, raw bytes (console)
    # qvirsh's own steps for a verb that needs more than call-and-print (event, list, ...).
    cli: str | None = None
    # A read answered inline, without a task, when the locks it reads are free: a plain
    # function returning the result, or raising WouldWait (then `handler` answers).
    now: NowHandler | None = None


VERBS: dict[str, Verb] = {}


def verb(name: str, summary: str, params: type[Params], *args: Arg,
         human: Callable[[Any], str] | None = None, stream: bool = False,
         upgrade: bool = False, cli: str | None = None,
         now: NowHandler | None = None) -> Callable[[Handler], Handler]:
    """Register the decorated handler as verb `name`."""
    def register(handler: Handler) -> Handler:
        assert name not in VERBS, f"verb {name} declared twice"
        VERBS[name] = Verb(name, summary, params, handler, args, human, stream, upgrade, cli,
                           now)
        return handler
    return register


def name_arg(help: str = "the domain: its name, uuid, or id while it runs") -> Arg:
    return Arg("name", help=help, metavar="NAME")


# --- params ---------------------------------------------------------------------------------

DomainIdent = Annotated[str, Field(min_length=1, max_length=256)]
DeviceIdent = Annotated[str, Field(min_length=1, max_length=64)]


class NoParams(Params):
    pass


class NameParams(Params):
    name: DomainIdent


class ListParams(Params):
    all: bool = False
    info: bool = False


class DomstatsParams(Params):
    names: Annotated[list[DomainIdent], Field(max_length=10000)] = []


class DefineParams(Params):
    definition: dict[str, Any]


class UndefineParams(NameParams):
    nvram: bool = False
    keep_nvram: bool = False
    managed_save: bool = False


class StartParams(NameParams):
    paused: bool = False
    force_boot: bool = False


FilePath = Annotated[str, Field(min_length=1, max_length=4096)]


class SaveParams(NameParams):
    file: FilePath


class RestoreParams(Params):
    file: FilePath
    paused: bool = False


class MigrateParams(NameParams):
    dest: Annotated[str, Field(min_length=1, max_length=4096)]
    persistent: bool = False
    undefine_source: bool = False
    copy_storage: bool = False
    max_downtime: Annotated[int, Field(ge=1, le=3_600_000)] | None = None
    bandwidth: Annotated[float, Field(gt=0, le=1024 * 1024)] | None = None


Token = Annotated[str, Field(min_length=8, max_length=64, pattern=r"^[0-9a-f]+$")]


class MigratePrepareParams(Params):
    header: dict[str, Any]
    token: Token
    paused: bool = False
    persistent: bool = False
    definition: dict[str, Any] | None = None
    disks: dict[str, dict[str, Any]] | None = None
    transport: Literal["unix", "tls"] = "unix"


class MigrateFinishParams(NameParams):
    token: Token
    action: Literal["resume", "abort"]
    paused: bool = False


class GuestsStopParams(Params):
    mode: Literal["nothing", "shutdown", "managedsave"] | None = None


class ShutdownParams(NameParams):
    # `true` means "wait the default time"; a number is seconds; absent/false: do not wait.
    wait: bool | Annotated[float, Field(gt=0, le=86400)] = False
    mode: Literal["acpi", "agent"] = "acpi"


class DumpParams(NameParams):
    inactive: bool = False


class AutostartParams(NameParams):
    disable: bool = False


class MonitorCommandParams(NameParams):
    command: dict[str, Any]
    force: bool = False


class Target(enum.StrEnum):
    """Which definition a device change goes to, as virsh's --current/--live/--config/
    --persistent say it."""

    CURRENT = "current"        # the running domain if it runs, else its definition
    LIVE = "live"              # the running domain only
    CONFIG = "config"          # the persistent definition only
    PERSISTENT = "persistent"  # both (the definition only, when shut off)


class DeviceChangeParams(NameParams):
    mode: Target | None = None
    # The old spelling: `config: true` meant the running domain and its definition (now
    # mode "persistent"); kept for scripts, see docs/protocol.md.
    config: bool = False

    @property
    def target(self) -> Target:
        if self.mode is not None:
            return self.mode
        return Target.PERSISTENT if self.config else Target.CURRENT


class AttachParams(DeviceChangeParams):
    device: dict[str, Any]


class DetachParams(DeviceChangeParams):
    device: DeviceIdent
    wait: Annotated[float, Field(ge=0, le=3600)] = 5.0


class ChangeMediaParams(NameParams):
    device: DeviceIdent
    path: str | None = None
    eject: bool = False

    @model_validator(mode="after")
    def _one_of(self) -> ChangeMediaParams:
        if (self.path is None) == (not self.eject):
            raise ValueError("give either path or eject, not both and not neither")
        return self


class EventParams(Params):
    domain: DomainIdent | None = None
    events: list[Annotated[str, Field(max_length=64)]] | None = None
    since_seq: Annotated[int, Field(ge=0)] | None = None


class VolCreateParams(Params):
    path: Annotated[str, Field(min_length=1, max_length=4096)]
    size: Annotated[str, Field(min_length=1, max_length=32)]
    format: Literal["raw", "qcow2"] = "raw"
    backing: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    prealloc: Literal["off", "metadata", "falloc", "full"] = "off"


class BlkListParams(NameParams):
    inactive: bool = False


class ConsoleParams(NameParams):
    force: bool = False
    readonly: bool = False


class ConsoleLogParams(NameParams):
    max_bytes: Annotated[int, Field(ge=1, le=16 * 1024 * 1024)] = 64 * 1024


# --- how results read -----------------------------------------------------------------------

def _done(what: str) -> Callable[[Any], str]:
    return lambda r: f"Domain '{r['name']}' {what}"


def _device_change(r: dict[str, Any]) -> str:
    where = " and ".join(w for w, on in (("live", r["live"]), ("in the definition",
                                                               r["config"])) if on)
    return f"Device '{r['device']}' attached to '{r['name']}' ({where})"


def _detached(r: dict[str, Any]) -> str:
    if r["pending"]:
        return (f"Device '{r['device']}': removal from '{r['name']}' is pending (the guest has "
                "not released it yet; it completes when it does)")
    where = " and ".join(w for w, on in (("live", r["live"]), ("from the definition",
                                                               r["config"])) if on)
    return f"Device '{r['device']}' detached from '{r['name']}' ({where})"


# --- the verbs ------------------------------------------------------------------------------
# Each handler gets the Services, the validated params and the connection (its `caller`).

@verb("define", "create or update a persistent domain from a JSON definition", DefineParams,
      Arg("definition", kind=ArgKind.JSON_FILE, metavar="FILE",
          help="the definition (JSON, see docs/definitions.md)"),
      human=lambda r: f"Domain '{r['name']}' {'defined' if r['created'] else 'updated'} "
      f"({r['uuid']})")
async def _define(s: Services, p: DefineParams, c: Connection) -> Any:
    return await s.ops.define(p.definition, c.caller.owner("define"))


@verb("undefine", "remove a persistent definition (a running domain becomes transient)",
      UndefineParams, name_arg(),
      Arg("nvram", "--nvram", ArgKind.FLAG, help="also remove its UEFI NVRAM"),
      Arg("keep_nvram", "--keep-nvram", ArgKind.FLAG, help="keep its UEFI NVRAM"),
      Arg("managed_save", "--managed-save", ArgKind.FLAG,
          help="also remove its managed save image"),
      human=lambda r: f"Domain '{r['name']}' undefined"
      + (" (still running, now transient)" if r["transient"] else "")
      + (", NVRAM removed" if r.get("nvram_removed") else ""))
async def _undefine(s: Services, p: UndefineParams, c: Connection) -> Any:
    return await s.ops.undefine(p.name, c.caller.owner("undefine"), p.nvram, p.keep_nvram,
                                p.managed_save)


@verb("list", "list domains (running ones, or --all)", ListParams,
      Arg("all", "--all", ArgKind.FLAG, help="include shut-off domains"),
      Arg("info", "--info", ArgKind.FLAG,
          help="every domain's dominfo, in one call (the same fields)"),
      human=lambda r: text.table(r, [("id", "Id"), ("name", "Name"), ("state", "State")]
                                 + ([("reason", "Reason"), ("vcpus", "vCPUs"),
                                     ("memory_mib", "MiB"), ("pid", "Pid")]
                                    if r and "pid" in r[0] else [])),
      cli="list", now=lambda s, p, c: s.ops.list_now(p.all, p.info))
async def _list(s: Services, p: ListParams, c: Connection) -> Any:
    return await s.ops.list(p.all, p.info)


@verb("dominfo", "state and basic facts of one domain", NameParams, name_arg(),
      human=text.key_values, now=lambda s, p, c: s.ops.dominfo_now(p.name))
async def _dominfo(s: Services, p: NameParams, c: Connection) -> Any:
    return await s.ops.dominfo(p.name)


@verb("domstats", "state, CPU time, memory, block and network counters of every running "
      "domain (or those named), in one call; a QEMU that does not answer is never waited "
      "for: its counters come back marked stale", DomstatsParams,
      Arg("names", "--domain", ArgKind.APPEND, metavar="NAME",
          help="only this domain (repeatable); a named domain that is not running is "
          "listed with its state only"),
      human=text.domstats)
async def _domstats(s: Services, p: DomstatsParams, c: Connection) -> Any:
    return await s.stats.domstats(p.names, c.caller.owner("domstats"))


@verb("domjobinfo", "the domain's current jobs: kind, phase, owner, elapsed", NameParams,
      name_arg(), human=text.job_info)
async def _domjobinfo(s: Services, p: NameParams, c: Connection) -> Any:
    return await s.ops.domjobinfo(p.name)


@verb("domjobabort", "abort the domain's async job (it rolls back)", NameParams, name_arg(),
      human=lambda r: f"Domain '{r['name']}': {r['aborted']['kind']} aborted (it was in phase "
      f"{r['aborted']['phase']})")
async def _domjobabort(s: Services, p: NameParams, c: Connection) -> Any:
    return await s.ops.domjobabort(p.name, c.caller.owner("domjobabort"))


@verb("dumpjson", "the live definition (or the persistent one: --inactive) as JSON",
      DumpParams, name_arg(),
      Arg("inactive", "--inactive", ArgKind.FLAG, help="the persistent definition"),
      human=text.pretty_json)
async def _dumpjson(s: Services, p: DumpParams, c: Connection) -> Any:
    return await s.ops.dumpjson(p.name, p.inactive)


@verb("start", "launch QEMU and run the guest", StartParams, name_arg(),
      Arg("paused", "--paused", ArgKind.FLAG, help="leave the vCPUs paused"),
      Arg("force_boot", "--force-boot", ArgKind.FLAG,
          help="boot afresh, deleting a managed save image (else it is resumed)"),
      human=lambda r: f"Domain '{r['name']}' started (id {r['id']}, pid {r['pid']})"
      + (" from its managed save" if r.get("reason") == "restored" else ""))
async def _start(s: Services, p: StartParams, c: Connection) -> Any:
    return await s.ops.start(p.name, p.paused, c.caller.owner("start"), p.force_boot)


def _saved(r: dict[str, Any]) -> str:
    return (f"Domain '{r['name']}' saved to {r['file']} ({r['bytes']} bytes)"
            + (" (managed: the next start resumes it)" if r["managed"] else ""))


@verb("save", "stop the guest into FILE (its state; restore brings it back)", SaveParams,
      name_arg(), Arg("file", kind=ArgKind.PATH, metavar="FILE",
                      help="the save file (created or replaced)"),
      human=_saved)
async def _save(s: Services, p: SaveParams, c: Connection) -> Any:
    return await s.saves.save(p.name, p.file, c.caller.owner("save"))


@verb("restore", "start a domain again from a save file", RestoreParams,
      Arg("file", kind=ArgKind.PATH, metavar="FILE", help="a file written by save"),
      Arg("paused", "--paused", ArgKind.FLAG, help="leave the vCPUs paused"),
      human=lambda r: f"Domain '{r['name']}' restored (id {r['id']}, {r['state']})")
async def _restore(s: Services, p: RestoreParams, c: Connection) -> Any:
    return await s.saves.restore(p.file, p.paused, c.caller.owner("restore"))


@verb("managedsave", "stop the guest into the state directory; the next start resumes it",
      NameParams, name_arg(), human=_saved)
async def _managedsave(s: Services, p: NameParams, c: Connection) -> Any:
    return await s.saves.save(p.name, None, c.caller.owner("managedsave"))


@verb("managedsave-remove", "delete the domain's managed save image (it boots afresh)",
      NameParams, name_arg(),
      human=lambda r: f"Managed save image of '{r['name']}' removed")
async def _managedsave_remove(s: Services, p: NameParams, c: Connection) -> Any:
    return await s.saves.managedsave_remove(p.name, c.caller.owner("managedsave-remove"))


def _guests(r: dict[str, Any]) -> str:
    lines = [f" {name}: {what}" for name, what in sorted(r["domains"].items())]
    head = f"mode {r['mode']}:" if "mode" in r else "started:"
    return "\n".join([head, *lines]) if lines else f"{head} no guests"


def _migrated(r: dict[str, Any]) -> str:
    extra = f", downtime {r['downtime_ms']} ms" if r.get("downtime_ms") is not None else ""
    return (f"Domain '{r['name']}' migrated to {r['dest']} in {r['elapsed_s']:.2f} s"
            f"{extra}")


@verb("migrate", "live-migrate the domain to another qvirtd (unix:// or tls://)",
      MigrateParams, name_arg(),
      Arg("dest", metavar="DEST",
          help="the destination daemon: unix:///PATH/qvirtd.sock or tls://HOST:PORT"),
      Arg("persistent", "--persistent", ArgKind.FLAG,
          help="define it on the destination too (its persistent definition)"),
      Arg("undefine_source", "--undefine-source", ArgKind.FLAG,
          help="undefine it here once it runs there"),
      Arg("copy_storage", "--copy-storage", ArgKind.FLAG,
          help="copy its disks while it runs (the destination may keep them elsewhere)"),
      Arg("max_downtime", "--max-downtime", ArgKind.INT, metavar="MS",
          help="the longest pause QEMU may take to switch over"),
      Arg("bandwidth", "--bandwidth", ArgKind.NUMBER, metavar="MIB_S",
          help="the stream's rate limit"),
      human=_migrated, cli="migrate")
async def _migrate(s: Services, p: MigrateParams, c: Connection) -> Any:
    def progress(state: dict[str, Any]) -> None:
        c.emit(json.dumps({"jsonrpc": "2.0", "method": "migrate-progress",
                           "params": state}).encode() + b"\n")
    return await s.migration.migrate(p.name, p.dest, c.caller.owner("migrate"), p.persistent,
                                     p.undefine_source, p.max_downtime, p.bandwidth, progress,
                                     p.copy_storage)


@verb("migrate-prepare", "(daemon to daemon) start an incoming QEMU for a migration",
      MigratePrepareParams, human=text.pretty_json)
async def _migrate_prepare(s: Services, p: MigratePrepareParams, c: Connection) -> Any:
    def on_close(callback: Callable[[], None]) -> None:
        async def watch() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                callback()
        c.start_task(watch(), "migrate-prepare-watch")
    return await s.migration.prepare(p.header, p.token, p.paused, p.persistent, p.definition,
                                     c.caller.owner("migrate-prepare"), on_close, p.disks,
                                     p.transport == "tls")


@verb("migrate-finish", "(daemon to daemon) resume or drop an incoming migration",
      MigrateFinishParams, name_arg(), human=text.pretty_json)
async def _migrate_finish(s: Services, p: MigrateFinishParams, c: Connection) -> Any:
    return await s.migration.finish(p.name, p.token, p.action,
                                    c.caller.owner("migrate-finish"), p.paused)


@verb("guests-stop", "host shutdown: stop every running guest as on_host_shutdown says",
      GuestsStopParams,
      Arg("mode", "--mode", metavar="nothing|shutdown|managedsave",
          help="instead of the on_host_shutdown setting"),
      human=_guests)
async def _guests_stop(s: Services, p: GuestsStopParams, c: Connection) -> Any:
    return await s.saves.guests_stop(p.mode, c.caller.owner("guests-stop"))


@verb("guests-start", "host boot: start the guests guests-stop stopped (resuming saves)",
      NoParams, human=_guests)
async def _guests_start(s: Services, p: NoParams, c: Connection) -> Any:
    return await s.saves.guests_start(c.caller.owner("guests-start"))


@verb("shutdown", "ask the guest to power off (ACPI power button)", ShutdownParams,
      name_arg(),
      Arg("wait", "--wait", ArgKind.OPTIONAL_NUMBER, metavar="SECONDS",
          help="return once it is shut off (or fail after SECONDS, default "
          "shutdown_wait_default_s)"),
      Arg("mode", "--mode", metavar="acpi|agent",
          help="how to ask: the ACPI power button (default) or the guest agent"),
      human=_done("is being shut down"), cli="shutdown")
async def _shutdown(s: Services, p: ShutdownParams, c: Connection) -> Any:
    if p.wait is True:
        wait: float | None = s.ctx.settings.shutdown_wait_default_s
    elif p.wait is False:
        wait = None
    else:
        wait = float(p.wait)
    return await s.ops.shutdown(p.name, wait, c.caller.owner("shutdown"), p.mode)


@verb("reboot", "reboot via ACPI, in the same QEMU", NameParams, name_arg(),
      human=_done("is being rebooted"))
async def _reboot(s: Services, p: NameParams, c: Connection) -> Any:
    return await s.ops.reboot(p.name, c.caller.owner("reboot"))


@verb("reset", "hard reset", NameParams, name_arg(), human=_done("was reset"))
async def _reset(s: Services, p: NameParams, c: Connection) -> Any:
    return await s.ops.reset(p.name, c.caller.owner("reset"))


@verb("suspend", "pause the vCPUs", NameParams, name_arg(), human=_done("suspended"))
async def _suspend(s: Services, p: NameParams, c: Connection) -> Any:
    return await s.ops.suspend(p.name, c.caller.owner("suspend"))


@verb("resume", "continue the vCPUs", NameParams, name_arg(), human=_done("resumed"))
async def _resume(s: Services, p: NameParams, c: Connection) -> Any:
    return await s.ops.resume(p.name, c.caller.owner("resume"))


@verb("destroy", "stop QEMU now, however stuck it is", NameParams, name_arg(),
      human=_done("destroyed"))
async def _destroy(s: Services, p: NameParams, c: Connection) -> Any:
    return await s.ops.destroy(p.name, c.caller.owner("destroy"))


@verb("autostart", "start the domain whenever the daemon starts (or --disable)",
      AutostartParams, name_arg(), Arg("disable", "--disable", ArgKind.FLAG),
      human=lambda r: f"Domain '{r['name']}' autostart "
      + ("enabled" if r["autostart"] else "disabled"))
async def _autostart(s: Services, p: AutostartParams, c: Connection) -> Any:
    return await s.ops.set_autostart(p.name, not p.disable, c.caller.owner("autostart"))


@verb("qemu-monitor-command", "pass one raw QMP command to QEMU", MonitorCommandParams,
      name_arg(),
      Arg("command", kind=ArgKind.JSON_TEXT, metavar="JSON",
          help='e.g. \'{"execute": "query-status"}\''),
      Arg("force", "--force", ArgKind.FLAG,
          help="send a command that could change QEMU behind the domain's JSON config (the "
          "domain is then marked tainted)"),
      human=text.compact_json)
async def _monitor_command(s: Services, p: MonitorCommandParams, c: Connection) -> Any:
    return await s.ops.monitor_command(p.name, p.command, p.force,
                                       c.caller.owner("qemu-monitor-command"))


def combine_target(flags: set[str]) -> str:
    """virsh's spellings of a device change's target: one flag, or --live with --config
    (the same as --persistent)."""
    if flags == {"live", "config"}:
        return "persistent"
    if len(flags) > 1:
        raise ValueError(" and ".join(f"--{f}" for f in sorted(flags))
                         + " cannot be given together")
    return next(iter(flags))


# Where a device change goes, as virsh spells it (the four share the param "mode").
TARGET_ARGS = (
    Arg("mode", "--current", ArgKind.CONST, const="current", combine=combine_target,
        help="the running domain if it runs, else its definition (the default)"),
    Arg("mode", "--live", ArgKind.CONST, const="live", combine=combine_target,
        help="the running domain only (with --config: both)"),
    Arg("mode", "--config", ArgKind.CONST, const="config", combine=combine_target,
        help="the persistent definition only, as in virsh (with --live: both)"),
    Arg("mode", "--persistent", ArgKind.CONST, const="persistent", combine=combine_target,
        help="the running domain and its persistent definition"),
)


@verb("attach-device", "hotplug a device described in a JSON file", AttachParams,
      name_arg(),
      Arg("device", kind=ArgKind.JSON_FILE, metavar="FILE",
          help='{"kind": "disk"|"cdrom"|"nic", "id": ..., ...}'),
      *TARGET_ARGS, human=_device_change, cli="device-change")
async def _attach(s: Services, p: AttachParams, c: Connection) -> Any:
    return await s.devices.attach(p.name, p.device, p.target, c.caller.owner("attach-device"))


@verb("detach-device", "hot-unplug a device", DetachParams, name_arg(),
      Arg("device", metavar="DEVICE_ID", help="the device's id"),
      Arg("wait", "--wait", ArgKind.NUMBER, metavar="SECONDS", default=5.0,
          help="wait this long for the guest to release it (default 5)"),
      *TARGET_ARGS, human=_detached, cli="device-change")
async def _detach(s: Services, p: DetachParams, c: Connection) -> Any:
    return await s.devices.detach(p.name, p.device, p.wait, p.target,
                                  c.caller.owner("detach-device"))


@verb("change-media", "insert, change or eject a CD-ROM medium", ChangeMediaParams,
      name_arg(), Arg("device", metavar="CDROM_ID", help="the CD-ROM's id"),
      Arg("path", metavar="PATH", optional=True, group="medium", required=True,
          help="the medium (an image file)"),
      Arg("eject", "--eject", ArgKind.FLAG, group="medium", required=True),
      human=lambda r: f"CD-ROM '{r['device']}' of '{r['name']}': "
      + (f"medium {r['medium']}" if r["medium"] else "ejected"))
async def _change_media(s: Services, p: ChangeMediaParams, c: Connection) -> Any:
    return await s.devices.change_media(p.name, p.device, p.path,
                                        c.caller.owner("change-media"))


@verb("console-log", "the tail of the serial console log", ConsoleLogParams, name_arg(),
      Arg("max_bytes", "--bytes", ArgKind.INT, metavar="N", default=64 * 1024,
          help="at most this many bytes (the tail)"),
      human=lambda r: r["text"].rstrip("\n"))
async def _console_log(s: Services, p: ConsoleLogParams, c: Connection) -> Any:
    return await s.ops.console_log(p.name, p.max_bytes)


@verb("console", "attach the terminal to the guest's serial console (Ctrl-] detaches)",
      ConsoleParams, name_arg(),
      Arg("force", "--force", ArgKind.FLAG, help="take over from another attached writer"),
      Arg("readonly", "--readonly", ArgKind.FLAG,
          help="watch only: keystrokes do not go to the guest (beside a writer)"),
      stream=True, upgrade=True, cli="console")
async def _console(s: Services, p: ConsoleParams, c: Connection) -> Any:
    session = await s.ops.console(p.name, p.force, p.readonly, c, c.who())
    c.upgrade(session)
    return {"name": p.name, "readonly": p.readonly}


@verb("domdisplay", "how to reach the domain's screen (a VNC URI)", NameParams, name_arg(),
      human=lambda r: r["uri"])
async def _domdisplay(s: Services, p: NameParams, c: Connection) -> Any:
    return await s.ops.domdisplay(p.name, c.caller.owner("domdisplay"))


@verb("screenshot", "save the domain's screen as a PNG file", NameParams, name_arg(),
      Arg("", metavar="FILE", dest="file", help="where qvirsh writes the PNG"),
      cli="screenshot")
async def _screenshot(s: Services, p: NameParams, c: Connection) -> Any:
    return await s.ops.screenshot(p.name, c.caller.owner("screenshot"))


def _addresses(r: dict[str, Any]) -> str:
    rows = [{"name": i["name"], "mac": i["mac"], "type": a["type"],
             "address": f"{a['address']}/{a['prefix']}"}
            for i in r["interfaces"] for a in i["addresses"] or [{"type": None,
                                                                   "address": "-",
                                                                   "prefix": ""}]]
    return text.table(rows, [("name", "Name"), ("mac", "MAC address"), ("type", "Protocol"),
                             ("address", "Address")])


@verb("domifaddr", "the guest's network addresses, from its agent", NameParams, name_arg(),
      human=_addresses)
async def _domifaddr(s: Services, p: NameParams, c: Connection) -> Any:
    return await s.guest.interfaces(p.name, c.caller.owner("domifaddr"))


@verb("guestinfo", "OS, hostname, users and file systems, from the guest agent", NameParams,
      name_arg(), human=text.pretty_json)
async def _guestinfo(s: Services, p: NameParams, c: Connection) -> Any:
    return await s.guest.info(p.name, c.caller.owner("guestinfo"))


@verb("domfsfreeze", "freeze the guest's file systems (through its agent)", NameParams,
      name_arg(), human=lambda r: f"Froze {r['frozen']} file system(s) of '{r['name']}'")
async def _domfsfreeze(s: Services, p: NameParams, c: Connection) -> Any:
    return await s.guest.fsfreeze(p.name, True, c.caller.owner("domfsfreeze"))


@verb("domfsthaw", "thaw the guest's file systems (through its agent)", NameParams,
      name_arg(), human=lambda r: f"Thawed {r['thawed']} file system(s) of '{r['name']}'")
async def _domfsthaw(s: Services, p: NameParams, c: Connection) -> Any:
    return await s.guest.fsfreeze(p.name, False, c.caller.owner("domfsthaw"))


@verb("vol-create", "create a disk image (an overlay with --backing) with qemu-img",
      VolCreateParams,
      Arg("path", metavar="PATH", help="the new image (absolute; never overwritten)"),
      Arg("size", metavar="SIZE", help="e.g. 10G, 512M, 1048576"),
      Arg("format", "--format", metavar="raw|qcow2", help="the image format (default raw)"),
      Arg("backing", "--backing", metavar="BASE",
          help="a base image this qcow2 overlay reads from (its format is detected)"),
      Arg("prealloc", "--prealloc", metavar="off|metadata|falloc|full",
          help="allocate the space now (full: writes it, with a progress line)"),
      human=lambda r: f"Volume {r['path']} created ({r['format']}, {r['size']} bytes"
      + (f", backing {r['backing']} ({r['backing_format']})" if r["backing"] else "") + ")",
      cli="vol-create")
async def _vol_create(s: Services, p: VolCreateParams, c: Connection) -> Any:
    def progress(state: dict[str, Any]) -> None:
        c.emit(json.dumps({"jsonrpc": "2.0", "method": "vol-progress",
                           "params": state}).encode() + b"\n")
    return await s.volumes.create(p.path, p.size, p.format, p.backing, p.prealloc,
                                  c.caller.owner("vol-create"), progress)


@verb("domblklist", "the domain's disks and CD-ROMs: id, source, kind", BlkListParams,
      name_arg(), Arg("inactive", "--inactive", ArgKind.FLAG,
                      help="from the persistent definition"),
      human=lambda r: text.table(r["devices"], [("target", "Target"), ("source", "Source"),
                                                ("kind", "Kind"), ("format", "Format")]))
async def _domblklist(s: Services, p: BlkListParams, c: Connection) -> Any:
    return await s.devices.blklist(p.name, p.inactive)


@verb("daemon-stats", "daemon counters and lock statistics", NoParams,
      human=text.pretty_json)
async def _daemon_stats(s: Services, p: NoParams, c: Connection) -> Any:
    return s.ops.daemon_stats()


@verb("daemon-warnings", "what needs a person: QEMUs not managed, files not loaded, ...",
      NoParams, human=lambda r: "\n".join(f"warning: {w}" for w in r) or "no warnings")
async def _daemon_warnings(s: Services, p: NoParams, c: Connection) -> Any:
    return s.ops.daemon_warnings()


@verb("event", "stream domain events", EventParams,
      Arg("domain", "--domain", metavar="NAME", help="only this domain's events"),
      Arg("events", "--event", ArgKind.APPEND, metavar="KIND",
          help="only events of this kind (lifecycle, reboot, device-removed, ...); repeatable"),
      Arg("since_seq", "--since", ArgKind.INT, metavar="SEQ",
          help="first replay the buffered events after this sequence number"),
      Arg("", "--loop", ArgKind.FLAG, help="keep going after the first event"),
      Arg("", "--timeout", ArgKind.NUMBER, metavar="SECONDS",
          help="stop after this many seconds"),
      stream=True, cli="event")
async def _event(s: Services, p: EventParams, c: Connection) -> Any:
    from .rpc.streams import subscribe_events  # daemon side only
    return await subscribe_events(s.ctx.bus, c, p.domain, p.events, p.since_seq)


def register_arguments(parser: argparse.ArgumentParser, v: Verb) -> None:
    """Add verb `v`'s arguments to its qvirsh sub-parser."""
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for a in v.args:
        target: Any = parser
        if a.group is not None:
            if a.group not in groups:
                required = any(x.group == a.group and x.required for x in v.args)
                groups[a.group] = parser.add_mutually_exclusive_group(required=required)
            target = groups[a.group]
        kw: dict[str, Any] = {"help": a.help}
        if a.flag is None:  # positional
            if a.optional:
                kw["nargs"] = "?"
            kw["metavar"] = a.metavar
            target.add_argument(a.key, **kw)
            continue
        kw["dest"] = a.key
        if a.kind is ArgKind.FLAG:
            kw["action"] = "store_true"
        elif a.kind is ArgKind.CONST:
            kw.update(action="append_const", const=a.const)
        elif a.kind is ArgKind.APPEND:
            kw.update(action="append", metavar=a.metavar)
        elif a.kind is ArgKind.OPTIONAL_NUMBER:
            kw.update(nargs="?", const=True, default=False, type=_optional_number,
                      metavar=a.metavar)
        else:
            kw.update(metavar=a.metavar, default=a.default,
                      type={ArgKind.NUMBER: float, ArgKind.INT: int}.get(a.kind, str))
        target.add_argument(a.flag, **kw)


def _optional_number(value: str) -> float | bool:
    if value == "":
        return True
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None


def optional_number_flags() -> set[str]:
    """Options that take an optional number ("--wait" or "--wait 10"): qvirsh rewrites a
    bare one to "--wait=" so that "shutdown --wait NAME" parses (NAME is not its value)."""
    return {a.flag for v in VERBS.values() for a in v.args
            if a.kind is ArgKind.OPTIONAL_NUMBER and a.flag is not None}
