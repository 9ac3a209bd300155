"""The on-disk and wire formats of a domain: its definition, devices, state and reason.

Every definition that enters the daemon (from a client or from disk) goes through these models,
so a name or path that reaches a file path or a QEMU option has already been checked here.
Extra fields are refused, sizes and counts are bounded, and the contract's examples
(`domain-minimal.json`, `domain-example.json`) are accepted verbatim.
"""

from __future__ import annotations

import enum
import re
import uuid as uuid_mod
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

# A domain or device name ends up in file names, QEMU ids and command-line options: keep it to a
# character set that is safe in all of them (no comma, no slash, no leading dot or dash).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$"
# QEMU limits block node names to 31 characters; ours are "file-<id>" and "fmt-<id>".
DEVICE_ID_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]{0,25}$"
MAC_PATTERN = r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$"

MAX_MEMORY_MIB = 1024 * 1024
MAX_VCPUS = 255
MAX_DEVICES_PER_KIND = 32
MAX_PATH_LEN = 4096
MAX_CMDLINE_LEN = 4096

DomainName = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
DeviceId = Annotated[str, StringConstraints(pattern=DEVICE_ID_PATTERN)]


def _check_host_path(value: str) -> str:
    """Host paths go to QEMU verbatim (escaped where needed); refuse what no path can contain."""
    if not value.startswith("/"):
        raise ValueError("must be an absolute path")
    if "\x00" in value or "\n" in value or "\r" in value:
        raise ValueError("must not contain NUL or line breaks")
    return value


HostPath = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_PATH_LEN), AfterValidator(_check_host_path)
]


def _check_cmdline(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL")
    return value


class StrictModel(BaseModel):
    """Base for every format: unknown fields are an error, never silently dropped."""

    model_config = ConfigDict(extra="forbid")


class Accel(enum.StrEnum):
    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


class LifecycleAction(enum.StrEnum):
    """What to do when the guest powers off, reboots or crashes (libvirt's on_* actions)."""

    DESTROY = "destroy"
    RESTART = "restart"
    PRESERVE = "preserve"


class BootDef(StrictModel):
    """Direct kernel boot. Without it the guest boots from firmware (no-OS guests spin there)."""

    kernel: HostPath | None = None
    initrd: HostPath | None = None
    cmdline: Annotated[str, StringConstraints(max_length=MAX_CMDLINE_LEN),
                       AfterValidator(_check_cmdline)] = ""

    @model_validator(mode="after")
    def _initrd_needs_kernel(self) -> BootDef:
        if self.kernel is None and (self.initrd is not None or self.cmdline):
            raise ValueError("initrd and cmdline need a kernel")
        return self


# Where a bootable device comes in the firmware's boot order (QEMU's bootindex, 1 first).
BootOrder = Annotated[int, Field(ge=1, le=99)]


class DiskDef(StrictModel):
    """A disk image file attached as virtio-blk (the device id is `id`)."""

    id: DeviceId
    path: HostPath
    format: Literal["raw", "qcow2"] = "raw"
    readonly: bool = False
    bus: Literal["virtio"] = "virtio"
    boot_order: BootOrder | None = None


class CdromDef(StrictModel):
    """A CD-ROM drive (scsi-cd on a virtio-scsi controller); `path` None: an empty tray."""

    id: DeviceId
    path: HostPath | None = None
    boot_order: BootOrder | None = None


class NicDef(StrictModel):
    """A virtio network card. `user` is QEMU's user-mode network; `tap`/`bridge` need the host."""

    id: DeviceId
    boot_order: BootOrder | None = None
    backend: Literal["user", "tap", "bridge"] = "user"
    mac: Annotated[str, StringConstraints(pattern=MAC_PATTERN)] | None = None
    ifname: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,15}$")] | None = None
    bridge: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,15}$")] | None = None

    @model_validator(mode="after")
    def _backend_fields(self) -> NicDef:
        if self.backend == "bridge" and self.bridge is None:
            raise ValueError("backend 'bridge' needs 'bridge'")
        if self.backend == "tap" and self.ifname is None:
            raise ValueError("backend 'tap' needs 'ifname'")
        return self


class GraphicsDef(StrictModel):
    """A screen: a VGA card and QEMU's VNC server, on a UNIX socket in the run directory
    (`unix`, the default) or on a loopback TCP port the daemon has QEMU pick (`tcp`)."""

    type: Literal["vnc"]
    listen: Literal["unix", "tcp"] = "unix"
    # VNC's own password scheme keeps 8 characters; refuse more rather than cut them.
    password: Annotated[str, StringConstraints(min_length=1, max_length=8,
                                               pattern=r"^[\x21-\x7e]+$")] | None = None


MAX_CLOUD_INIT_TEXT = 256 * 1024


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL")
    return value


CloudInitText = Annotated[str, StringConstraints(max_length=MAX_CLOUD_INIT_TEXT),
                          AfterValidator(_no_nul)]


class CloudInitDef(StrictModel):
    """A cloud-init NoCloud seed (cloudinit.py): built at each start as an ISO 9660 image
    labelled `cidata` and attached read-only as the CD-ROM `cidata`."""

    user_data: CloudInitText = ""
    meta_data: dict[str, Any] | CloudInitText | None = None
    network_config: dict[str, Any] | CloudInitText | None = None


class DomainDef(StrictModel):
    """A domain definition: the persistent one on disk, or the live one of a running domain."""

    name: DomainName
    uuid: uuid_mod.UUID = Field(default_factory=uuid_mod.uuid4)
    memory_mib: int = Field(default=128, ge=16, le=MAX_MEMORY_MIB)
    vcpus: int = Field(default=1, ge=1, le=MAX_VCPUS)
    accel: Accel = Accel.AUTO
    machine: Literal["q35"] = "q35"
    firmware: Literal["bios", "uefi"] = "bios"
    secure_boot: bool = False
    graphics: GraphicsDef | None = None
    cloud_init: CloudInitDef | None = None
    guest_agent: bool = False
    boot: BootDef | None = None
    disks: list[DiskDef] = Field(default_factory=list, max_length=MAX_DEVICES_PER_KIND)
    cdroms: list[CdromDef] = Field(default_factory=list, max_length=MAX_DEVICES_PER_KIND)
    nics: list[NicDef] = Field(default_factory=list, max_length=MAX_DEVICES_PER_KIND)
    hotplug_ports: int = Field(default=4, ge=0, le=MAX_DEVICES_PER_KIND)
    on_poweroff: LifecycleAction = LifecycleAction.DESTROY
    on_reboot: LifecycleAction = LifecycleAction.RESTART
    on_crash: LifecycleAction = LifecycleAction.DESTROY

    @model_validator(mode="after")
    def _unique_device_ids(self) -> DomainDef:
        seen: set[str] = set()
        orders: dict[int, str] = {}
        for dev in all_devices(self):
            if dev.id in seen:
                raise ValueError(f"device id {dev.id!r} is used twice")
            seen.add(dev.id)
            if dev.boot_order is not None:
                if dev.boot_order in orders:
                    raise ValueError(f"boot_order {dev.boot_order} is used by both "
                                     f"{orders[dev.boot_order]!r} and {dev.id!r}")
                orders[dev.boot_order] = dev.id
        return self

    @model_validator(mode="after")
    def _cidata_is_reserved(self) -> DomainDef:
        # At start the seed becomes the CD-ROM `cidata` of the live definition (which then
        # has no `cloud_init`: the CD-ROM is what QEMU has).
        if self.cloud_init is not None and any(d.id == "cidata" for d in all_devices(self)):
            raise ValueError("device id 'cidata' is taken by the cloud-init seed's CD-ROM")
        return self

    @model_validator(mode="after")
    def _secure_boot_needs_uefi(self) -> DomainDef:
        if self.secure_boot and self.firmware != "uefi":
            raise ValueError("secure_boot needs firmware 'uefi'")
        return self


class DiskDevice(DiskDef):
    kind: Literal["disk"]


class CdromDevice(CdromDef):
    kind: Literal["cdrom"]


class NicDevice(NicDef):
    kind: Literal["nic"]


# A device FILE of `attach-device`: one object, `kind` says which list it would be in.
DeviceSpec = Annotated[DiskDevice | CdromDevice | NicDevice, Field(discriminator="kind")]
Device = DiskDef | CdromDef | NicDef


def device_def(spec: DiskDevice | CdromDevice | NicDevice) -> Device:
    """The definition entry a device spec stands for (the same fields without `kind`)."""
    fields = spec.model_dump(exclude={"kind"})
    if isinstance(spec, DiskDevice):
        return DiskDef.model_validate(fields)
    if isinstance(spec, CdromDevice):
        return CdromDef.model_validate(fields)
    return NicDef.model_validate(fields)


def device_kind(device: Device) -> str:
    return {DiskDef: "disk", CdromDef: "cdrom", NicDef: "nic"}[type(device)]


def all_devices(definition: DomainDef) -> list[Device]:
    devices: list[Device] = [*definition.disks, *definition.cdroms, *definition.nics]
    return devices


def find_device(definition: DomainDef, device_id: str) -> Device | None:
    return next((d for d in all_devices(definition) if d.id == device_id), None)


def with_device(definition: DomainDef, device: Device) -> DomainDef:
    """A copy of `definition` with `device` added (validated: ids stay unique)."""
    key = {"disk": "disks", "cdrom": "cdroms", "nic": "nics"}[device_kind(device)]
    raw = definition.model_dump(mode="json")
    raw[key].append(device.model_dump(mode="json"))
    return DomainDef.model_validate(raw)


def without_device(definition: DomainDef, device_id: str) -> DomainDef:
    return definition.model_copy(update={
        "disks": [d for d in definition.disks if d.id != device_id],
        "cdroms": [c for c in definition.cdroms if c.id != device_id],
        "nics": [n for n in definition.nics if n.id != device_id]})


def with_medium(definition: DomainDef, cdrom_id: str, path: str | None) -> DomainDef:
    return definition.model_copy(update={"cdroms": [
        c.model_copy(update={"path": path}) if c.id == cdrom_id else c
        for c in definition.cdroms]})


class DomainState(enum.StrEnum):
    """The contract's domain states (libvirt's, in lower case)."""

    RUNNING = "running"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    PMSUSPENDED = "pmsuspended"


class Reason(enum.StrEnum):
    """Why a domain is in its state. One vocabulary for all states, as virsh prints them."""

    UNKNOWN = "unknown"
    BOOTED = "booted"
    UNPAUSED = "unpaused"
    USER = "user"
    STARTING_UP = "starting up"
    SHUTDOWN = "shutdown"
    DESTROYED = "destroyed"
    CRASHED = "crashed"
    FAILED = "failed"
    PANICKED = "panicked"
    IOERROR = "ioerror"
    WATCHDOG = "watchdog"
    WAKEUP = "wakeup"
    SAVING = "saving"          # paused: its state is being saved
    SAVED = "saved"            # shut off: its state is in a save file
    RESTORED = "restored"      # running: started from a save file
    MIGRATING = "migrating"    # paused: at the end of an outgoing migration
    MIGRATED = "migrated"      # shut off: it runs on another daemon now; or running: it came
                               # from one


_ID_RE = re.compile(r"^[0-9]+$")


def looks_like_id(ident: str) -> bool:
    """A bare number names a running domain by id, as in virsh."""
    return bool(_ID_RE.match(ident))
