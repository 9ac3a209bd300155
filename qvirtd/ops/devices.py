"""Hotplug that never lets the JSON config and QEMU disagree (seed 004).

The invariant: nothing exists in a live QEMU without an entry in that domain's JSON config
(the live definition in its status file, written atomically). The locks, as the seed lays
them out:

* the fast lock is the domain lock: every read or edit of the JSON happens under it, and it is
  never held across a QMP exchange (L4);
* the slow lock is the domain's job: a QMP exchange that adds or removes a device happens
  under it, and it is held continuously
  - for an attach: from the moment the JSON describes the device until QEMU has answered, so
    the device never exists in QEMU before its entry;
  - for a detach: from the moment QEMU confirms the device is gone (DEVICE_DELETED for that
    exact id, then its absence in /machine/peripheral) until the entry is removed, so the
    entry never leaves while the device may still exist.

The JSON config is on disk before QEMU gets a device: an attach waits for the status file
write (a barrier through the FileWriter) before `device_add`, and so does a medium change
before `blockdev-insert-medium`.

Unplug needs the guest. `detach` listens for DEVICE_DELETED (`Monitor.listen`) while it waits
(bounded); when time runs out the removal stays pending (recorded in the status file). The
event, whenever it comes, records a follow-up on the run that finishes the removal under a
job (and is retried until done). A destroy racing any of this needs neither lock: it kills
QEMU, and the run's JSON goes with the run (see docs/design.md, "Hotplug").
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import TypeAdapter, ValidationError

from ..domain import Domain
from ..errors import (
    InvalidDefinitionError,
    InvalidOperationError,
    MonitorClosedError,
    MonitorError,
    MonitorTimeoutError,
    QvirtError,
    StorageError,
    describe_validation_error,
)
from ..job import JobKind
from ..model import (
    CdromDef,
    Device,
    DeviceSpec,
    DiskDef,
    NicDef,
    all_devices,
    device_def,
    device_kind,
    find_device,
    with_device,
    with_medium,
    without_device,
)
from ..qemu.argv import (
    INFRASTRUCTURE_IDS,
    cdrom_blockdevs,
    cdrom_device,
    disk_blockdevs,
    disk_device,
    nic_device,
    nic_netdev,
)
from ..run import Run
from ..verbs import Target
from .context import Context

log = logging.getLogger(__name__)

_SPEC = TypeAdapter(DeviceSpec)


def parse_device(raw: Any) -> Device:
    try:
        return device_def(_SPEC.validate_python(raw))
    except ValidationError as exc:
        raise InvalidDefinitionError(
            f"invalid device: {describe_validation_error(exc)}") from None


def _backend_nodes(device: Device) -> list[str]:
    if isinstance(device, DiskDef):
        return [n["node-name"] for n in reversed(disk_blockdevs(device))]
    if isinstance(device, CdromDef):
        return [f"fmt-{device.id}", f"file-{device.id}"]
    return []


async def _ignore_missing(ctx: Context, dom: Domain, run: Run, command: str,
                          args: dict[str, Any]) -> None:
    """A cleanup command whose target may already be gone (that is fine)."""
    try:
        await ctx.qmp(dom, run, command, args)
    except MonitorError as exc:
        missing = exc.qmp_class == "DeviceNotFound" or (
            exc.qmp_class == "GenericError"
            and any(s in str(exc) for s in ("not found", "Failed to find", "Cannot find")))
        if not missing:
            raise


async def peripherals(ctx: Context, dom: Domain, run: Run) -> set[str]:
    """The user devices QEMU has right now (its /machine/peripheral, less our own)."""
    listing = await ctx.qmp(dom, run, "qom-list", {"path": "/machine/peripheral"})
    # Children only: the container also lists its own properties (such as "type").
    return {p["name"] for p in listing if str(p.get("type", "")).startswith("child<")
            and p["name"] not in INFRASTRUCTURE_IDS and not p["name"].startswith("rp")}


async def finish_detach(ctx: Context, dom: Domain, run: Run, device_id: str) -> bool:
    """Under the slow lock (the caller holds the job): if QEMU confirms `device_id` is gone,
    delete its backends and only then drop its JSON entry. False if it is still there."""
    async with dom.lock:  # fast lock: read the entry
        ctx.ensure_current(dom, run, "detach")
        device = find_device(run.definition, device_id)
        if device is None:  # already finished (the detach that waited, or a reconnect)
            run.pending_detach.discard(device_id)
            return True
    if device_id in await peripherals(ctx, dom, run):
        return False
    for node in _backend_nodes(device):
        await _ignore_missing(ctx, dom, run, "blockdev-del", {"node-name": node})
    if isinstance(device, NicDef):
        await _ignore_missing(ctx, dom, run, "netdev_del", {"id": f"net-{device.id}"})
    async with dom.lock:  # fast lock: QEMU has none of it now; the entry may go
        ctx.ensure_current(dom, run, "detach")
        run.definition = without_device(run.definition, device_id)
        run.ports.pop(device_id, None)
        run.pending_detach.discard(device_id)
        ctx.save_status(dom, run)
    log.info("domain %s: device %s removed", dom.name, device_id)
    return True


async def reconcile(ctx: Context, dom: Domain, run: Run) -> None:
    """After a reconnect (the caller holds the job): compare QEMU's devices with the JSON.
    An entry QEMU lacks is cleaned (an attach or detach cut short); a device QEMU has but the
    JSON lacks is a bug: logged and reported, never silently adopted."""
    present = await peripherals(ctx, dom, run)
    blocks = await ctx.qmp(dom, run, "query-block")
    media = {b.get("qdev", "").rsplit("/", 1)[-1]: (b.get("inserted") or {}).get("file")
             for b in blocks}
    async with dom.lock:  # fast lock
        ctx.ensure_current(dom, run, "reconnect")
        known = {d.id: d for d in all_devices(run.definition)}
    for device_id in sorted(set(known) - present):
        log.warning("domain %s: device %s is in the JSON config but not in QEMU: cleaning "
                    "the entry (an attach or detach was cut short)", dom.name, device_id)
        await finish_detach(ctx, dom, run, device_id)
    for device_id in sorted(present - set(known)):
        ctx.warn(f"domain '{dom.name}': device '{device_id}' exists in QEMU but not in its "
                 "JSON config: this is a qvirtd bug, please report it")
    async with dom.lock:  # fast lock: CD-ROM entries against QEMU's drives
        ctx.ensure_current(dom, run, "reconnect")
        cdroms = list(run.definition.cdroms)
    for cd in cdroms:
        inserted = media.get(cd.id)
        if cd.path is not None and inserted is None:
            # A medium change cut short: the medium left the drive, maybe not yet its nodes.
            # Delete those first (slow lock held), then the stale entry (fast lock).
            log.warning("domain %s: %s has no medium in QEMU: clearing the stale entry",
                        dom.name, cd.id)
            for node in _backend_nodes(cd):
                await _ignore_missing(ctx, dom, run, "blockdev-del", {"node-name": node})
            async with dom.lock:  # fast lock
                ctx.ensure_current(dom, run, "reconnect")
                run.definition = with_medium(run.definition, cd.id, None)
                ctx.save_status(dom, run)
        elif inserted is not None and cd.path != inserted:
            ctx.warn(f"domain '{dom.name}': CD-ROM '{cd.id}' holds {inserted} in QEMU but "
                     f"{cd.path} in its JSON config: this is a qvirtd bug")


class Devices:
    """attach-device, detach-device and change-media."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    @staticmethod
    def _targets(dom: Domain, target: Target) -> tuple[bool, bool]:
        """Under the fast lock: (the running domain?, its persistent definition?) for a
        device change, as virsh's --current/--live/--config/--persistent mean them."""
        running = dom.active
        if target is Target.LIVE and not running:
            raise InvalidOperationError(
                f"domain '{dom.name}' is not running: --live changes only a running domain "
                "(use --config for its definition)")
        live = running and target is not Target.CONFIG
        config = target in (Target.CONFIG, Target.PERSISTENT) or (
            target is Target.CURRENT and not running)
        if config and dom.persistent_def is None:
            raise InvalidOperationError(f"domain '{dom.name}' is transient: it has no "
                                        "persistent definition to change")
        return live, config

    async def attach(self, ident: str, raw: Any, target: Target,
                     owner: str) -> dict[str, Any]:
        ctx = self.ctx
        device = parse_device(raw)
        dom = await ctx.lookup(ident)
        async with ctx.job(dom, JobKind.MODIFY, owner):  # the slow lock
            async with dom.lock:  # fast lock: check, then describe the device in the JSON
                live, config = self._targets(dom, target)
                running = dom.active
                if config:
                    assert dom.persistent_def is not None
                    self._check_free_id(dom, dom.run, dom.persistent_def, device.id)
                    new_persistent = self._added(dom.persistent_def, device)
                if live:
                    run = ctx.running(dom)
                    self._check_free_id(dom, run, run.definition, device.id)
                    port = self._free_port(dom, run) if not isinstance(device, CdromDef) \
                        else None
                    run.definition = self._added(run.definition, device)
                    if port is not None:
                        run.ports[device.id] = port
                    ctx.save_status(dom, run)
            if live:
                await self._described(dom, run, device.id)  # the JSON is on disk first
                await self._plug(dom, run, device, port)
                async with dom.lock:  # fast lock
                    ctx.emit(dom, "device-added", data={"device": device.id,
                                                        "kind": device_kind(device)})
            if config:
                await ctx.store.save(new_persistent)  # on disk, then in memory (no lock held)
                async with dom.lock:  # fast lock
                    dom.persistent_def = new_persistent
                    ctx.emit(dom, "lifecycle", "defined", "updated")
        log.info("domain %s: device %s attached (%s) by %s", dom.name, device.id,
                 "live" if not config else "config" if not live else "live and config", owner)
        return {"name": dom.name, "device": device.id, "live": live, "config": config,
                "running": running}

    async def _described(self, dom: Domain, run: Run, device_id: str) -> None:
        """Barrier: the status file naming the new device is on disk. If it cannot be
        written, QEMU gets nothing and the entry goes again."""
        try:
            await self.ctx.status_barrier(run)
        except StorageError:
            async with dom.lock:  # fast lock
                if dom.run is run:
                    run.definition = without_device(run.definition, device_id)
                    run.ports.pop(device_id, None)
                    self.ctx.save_status(dom, run)
            raise

    @staticmethod
    def _check_free_id(dom: Domain, run: Run | None, definition: Any, device_id: str) -> None:
        if run is not None and device_id in run.pending_detach:
            raise InvalidOperationError(
                f"device '{device_id}' of domain '{dom.name}' is still being removed (the "
                "guest has not released it): attach it again once it is gone")
        if find_device(definition, device_id) is not None:
            raise InvalidOperationError(
                f"domain '{dom.name}' already has a device '{device_id}'")

    @staticmethod
    def _added(definition: Any, device: Device) -> Any:
        try:
            return with_device(definition, device)
        except ValidationError as exc:
            raise InvalidDefinitionError(
                f"cannot add device '{device.id}': {describe_validation_error(exc)}") from None

    @staticmethod
    def _free_port(dom: Domain, run: Run) -> str:
        used = set(run.ports.values())
        for i in range(run.root_ports):
            if f"rp{i}" not in used:
                return f"rp{i}"
        raise InvalidOperationError(
            f"domain '{dom.name}' has no free PCIe port for hotplug (it started with "
            f"{run.root_ports} root ports, all in use): raise hotplug_ports and restart it")

    async def _plug(self, dom: Domain, run: Run, device: Device,
                    port: str | None) -> None:
        """The QMP exchange of an attach (slow lock held). On a refusal, undo what QEMU has
        and only then drop the JSON entry; on an unknown outcome (timeout), keep it."""
        ctx = self.ctx
        added: list[tuple[str, dict[str, Any]]] = []
        try:
            if isinstance(device, DiskDef):
                for node in disk_blockdevs(device):
                    await ctx.qmp(dom, run, "blockdev-add", node)
                    added.append(("blockdev-del", {"node-name": node["node-name"]}))
                assert port is not None
                await ctx.qmp(dom, run, "device_add", disk_device(device, port))
            elif isinstance(device, CdromDef):
                for node in cdrom_blockdevs(device):
                    await ctx.qmp(dom, run, "blockdev-add", node)
                    added.append(("blockdev-del", {"node-name": node["node-name"]}))
                await ctx.qmp(dom, run, "device_add", cdrom_device(device))
            else:
                await ctx.qmp(dom, run, "netdev_add", nic_netdev(device))
                added.append(("netdev_del", {"id": f"net-{device.id}"}))
                assert port is not None
                await ctx.qmp(dom, run, "device_add", nic_device(device, dom.uuid, port))
        except MonitorTimeoutError as exc:
            raise QvirtError(f"{exc}; whether QEMU added device '{device.id}' is unknown, so "
                             "its entry stays in the JSON config (the next reconnect or "
                             "detach settles it)") from exc
        except MonitorError:
            for command, args in reversed(added):
                await _ignore_missing(ctx, dom, run, command, args)
            async with dom.lock:  # fast lock: QEMU has none of it; the entry may go
                if dom.run is run:
                    run.definition = without_device(run.definition, device.id)
                    run.ports.pop(device.id, None)
                    ctx.save_status(dom, run)
            raise

    async def detach(self, ident: str, device_id: str, wait_s: float, target: Target,
                     owner: str) -> dict[str, Any]:
        ctx = self.ctx
        dom = await ctx.lookup(ident)
        removed = False
        async with ctx.job(dom, JobKind.MODIFY, owner):  # the slow lock
            async with dom.lock:  # fast lock
                want_live, config = self._targets(dom, target)
                running = dom.active
                run = dom.run
                live = want_live and run is not None and \
                    find_device(run.definition, device_id) is not None
                in_config = config and dom.persistent_def is not None and \
                    find_device(dom.persistent_def, device_id) is not None
                # --persistent removes it from wherever it is; the others, from their target.
                missing = (not live and not in_config) if target is Target.PERSISTENT else (
                    (want_live and not live) or (config and not in_config))
                if missing:
                    where = ("the running domain" if want_live and not live else
                             "its persistent definition")
                    raise InvalidOperationError(
                        f"domain '{dom.name}' has no device '{device_id}' in {where}")
                if live:
                    run = ctx.running(dom)
                    if device_id in run.pending_detach:
                        raise InvalidOperationError(
                            f"removal of device '{device_id}' from domain '{dom.name}' is "
                            "already pending: the guest has not released it yet")
                    run.pending_detach.add(device_id)
                    ctx.save_status(dom, run)
                    monitor = run.monitor
            if live:
                assert run is not None and monitor is not None
                with monitor.listen({"DEVICE_DELETED"}) as deleted:
                    try:
                        await _ignore_missing(ctx, dom, run, "device_del", {"id": device_id})
                    except MonitorError as exc:
                        if not isinstance(exc, MonitorTimeoutError):  # refused: not pending
                            async with dom.lock:  # fast lock
                                if dom.run is run:
                                    run.pending_detach.discard(device_id)
                                    ctx.save_status(dom, run)
                        raise
                    # QEMU also sends DEVICE_DELETED for the device's parts (a virtio
                    # backend, with only a QOM path): only the one naming the id counts.
                    try:
                        await deleted.wait_for(
                            lambda _name, data: data.get("device") == device_id, wait_s)
                    except TimeoutError:
                        pass  # still pending: the event, when it comes, finishes it
                    except MonitorClosedError:
                        await ctx.explain_closed(dom, run, "detach")
                        raise
                removed = await finish_detach(ctx, dom, run, device_id)
            if in_config:
                async with dom.lock:  # fast lock
                    assert dom.persistent_def is not None
                    new_persistent = without_device(dom.persistent_def, device_id)
                await ctx.store.save(new_persistent)  # on disk, then in memory
                async with dom.lock:  # fast lock
                    dom.persistent_def = new_persistent
                    ctx.emit(dom, "lifecycle", "defined", "updated")
        log.info("domain %s: device %s detach by %s: %s", dom.name, device_id, owner,
                 "removed" if removed else "pending" if live else "from the definition")
        return {"name": dom.name, "device": device_id, "live": live,
                "removed": removed if live else None, "pending": live and not removed,
                "config": in_config, "running": running}

    async def blklist(self, ident: str, inactive: bool) -> dict[str, Any]:
        """`domblklist`: the disks and CD-ROMs of the live (or persistent) definition."""
        dom = await self.ctx.lookup(ident)
        async with dom.lock:  # L3
            if inactive and dom.persistent_def is None:
                raise InvalidOperationError(f"domain '{dom.name}' is transient: it has no "
                                            "persistent definition")
            definition = dom.persistent_def if inactive else dom.definition
            assert definition is not None
        rows: list[dict[str, Any]] = [
            {"target": d.id, "source": d.path, "kind": "disk", "format": d.format,
             "readonly": d.readonly, "boot_order": d.boot_order} for d in definition.disks]
        rows += [{"target": c.id, "source": c.path, "kind": "cdrom", "format": "raw",
                  "readonly": True, "boot_order": c.boot_order} for c in definition.cdroms]
        return {"name": dom.name, "devices": rows}

    async def change_media(self, ident: str, cdrom_id: str, path: str | None,
                           owner: str) -> dict[str, Any]:
        """Insert, eject or change a CD-ROM medium. QEMU's own view decides what is in the
        drive, so a stale JSON entry (the guest ejected it) never blocks a new medium."""
        ctx = self.ctx
        if path is not None:
            try:
                path = CdromDef(id="cd", path=path).path
            except ValidationError as exc:
                raise InvalidDefinitionError(
                    f"invalid medium: {describe_validation_error(exc)}") from None
        dom = await ctx.lookup(ident)
        async with ctx.job(dom, JobKind.MODIFY, owner):  # the slow lock
            async with dom.lock:  # fast lock
                run = ctx.running(dom)
                cd = find_device(run.definition, cdrom_id)
                if not isinstance(cd, CdromDef):
                    raise InvalidOperationError(
                        f"domain '{dom.name}' has no CD-ROM '{cdrom_id}'")
            blocks = await ctx.qmp(dom, run, "query-block")
            inserted = any(b.get("qdev", "").rsplit("/", 1)[-1] == cdrom_id
                           and b.get("inserted") for b in blocks)
            await ctx.qmp(dom, run, "blockdev-open-tray", {"id": cdrom_id, "force": True})
            if inserted:
                await ctx.qmp(dom, run, "blockdev-remove-medium", {"id": cdrom_id})
            for node in _backend_nodes(cd):
                await _ignore_missing(ctx, dom, run, "blockdev-del", {"node-name": node})
            async with dom.lock:  # fast lock: the old medium is out of QEMU; describe the new
                ctx.ensure_current(dom, run, "change-media")
                run.definition = with_medium(run.definition, cdrom_id, path)
                ctx.save_status(dom, run)
            if path is not None:
                await ctx.status_barrier(run)  # the JSON names the medium before QEMU has it
                new = CdromDef(id=cdrom_id, path=path)
                for spec in cdrom_blockdevs(new):
                    await ctx.qmp(dom, run, "blockdev-add", spec)
                await ctx.qmp(dom, run, "blockdev-insert-medium",
                              {"id": cdrom_id, "node-name": f"fmt-{cdrom_id}"})
            await ctx.qmp(dom, run, "blockdev-close-tray", {"id": cdrom_id})
            async with dom.lock:  # fast lock
                ctx.emit(dom, "tray-change", data={"device": cdrom_id, "medium": path})
        log.info("domain %s: CD-ROM %s medium %s by %s", dom.name, cdrom_id, path or "ejected",
                 owner)
        return {"name": dom.name, "device": cdrom_id, "medium": path}
