"""Definition -> QEMU command line.

Devices, backends and block nodes are passed as JSON (`-device {...}`, `-netdev {...}`,
`-blockdev {...}`), which QEMU parses without QemuOpts' comma rules, so a value can never add an
option. The options that only take QemuOpts syntax (`-machine`, `-chardev`, `-name`, `-mon`)
have every comma inside a value doubled by `opt()`, which is how QemuOpts escapes a comma; a
test checks that a hostile value cannot inject a key.

Every device gets a stable QEMU id (the definition's `id`) and sits on its own PCIe root port,
so it can be unplugged later; `hotplug_ports` extra ports are left free for hotplug.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidDefinitionError
from ..model import CdromDef, DiskDef, DomainDef, NicDef
from .firmware import CODE_NODE, VARS_NODE, Firmware
from .unixpath import SUN_PATH_MAX

MONITOR_FD_ID = "qmp"
SERIAL_ID = "serial0"
SCSI_ID = "scsi0"
VIDEO_ID = "video0"
VSERIAL_ID = "vser0"       # the virtio-serial controller of the guest agent's channel
AGENT_ID = "qga0"          # the agent's port (and its chardev)
AGENT_PORT_NAME = "org.qemu.guest_agent.0"
# QEMU devices that are ours, not the user's: never compared with the definition's devices.
INFRASTRUCTURE_IDS = frozenset({SERIAL_ID, SCSI_ID, "pvpanic0", VIDEO_ID, VSERIAL_ID,
                                AGENT_ID})
# A TCP VNC server takes the first free display from 0 (port 5900) to this one.
VNC_LAST_DISPLAY = 99


def opt(value: str) -> str:
    """Escape a QemuOpts value: a literal comma is written as two commas."""
    return value.replace(",", ",,")


def opts(first: str, **keys: str) -> str:
    """`first,key=value,...` with every value escaped (keys are ours, never user input)."""
    parts = [opt(first)] if first else []
    parts.extend(f"{k.replace('_', '-')}={opt(v)}" for k, v in keys.items())
    return ",".join(parts)


def jarg(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"))


def default_mac(domain_uuid: str, device_id: str) -> str:
    """A stable locally administered MAC (QEMU's 52:54:00 prefix) from the uuid and device id."""
    digest = hashlib.sha256(f"{domain_uuid}/{device_id}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def port_plan(definition: DomainDef) -> dict[str, int]:
    """Which root port each PCI device of a starting domain sits on: the SCSI controller,
    then disks, then NICs; the `hotplug_ports` after them are free for hotplug."""
    plan = {SCSI_ID: 0}
    if definition.guest_agent:
        plan[VSERIAL_ID] = len(plan)
    for dev_id in [d.id for d in definition.disks] + [n.id for n in definition.nics]:
        plan[dev_id] = len(plan)
    return plan


def total_ports(definition: DomainDef) -> int:
    return len(port_plan(definition)) + definition.hotplug_ports


def root_port_id(index: int) -> str:
    return f"rp{index}"


FIRST_ROOT_PORT_SLOT = 2  # pcie.0 slot 0 is the host bridge; keep 1 free (display)


def root_port_device(index: int) -> dict[str, Any]:
    """Root port `index` as one function of a multifunction slot on pcie.0, 8 per slot (as
    libvirt does): pcie.0 has only ~30 free slots, so one slot per port would run out."""
    slot = FIRST_ROOT_PORT_SLOT + index // 8
    function = index % 8
    dev: dict[str, Any] = {"driver": "pcie-root-port", "id": root_port_id(index),
                           "bus": "pcie.0", "chassis": index + 1, "port": index + 1,
                           "addr": f"{slot:#x}.{function}"}
    if function == 0:
        dev["multifunction"] = True
    return dev


def disk_blockdevs(disk: DiskDef) -> list[dict[str, Any]]:
    """The protocol node and the format node of a disk (both read-only when the disk is)."""
    file_node = {"driver": "file", "filename": disk.path, "node-name": f"file-{disk.id}",
                 "read-only": disk.readonly, "discard": "unmap"}
    fmt_node = {"driver": disk.format, "node-name": f"fmt-{disk.id}", "file": f"file-{disk.id}",
                "read-only": disk.readonly}
    return [file_node, fmt_node]


def _boot(dev: dict[str, Any], boot_order: int | None) -> dict[str, Any]:
    """The device's place in the firmware's boot order (QEMU's bootindex), if it has one."""
    if boot_order is not None:
        dev["bootindex"] = boot_order
    return dev


def disk_device(disk: DiskDef, bus: str) -> dict[str, Any]:
    return _boot({"driver": "virtio-blk-pci", "id": disk.id, "drive": f"fmt-{disk.id}",
                  "bus": bus}, disk.boot_order)


def cdrom_blockdevs(cdrom: CdromDef) -> list[dict[str, Any]]:
    if cdrom.path is None:
        return []
    return [{"driver": "file", "filename": cdrom.path, "node-name": f"file-{cdrom.id}",
             "read-only": True},
            {"driver": "raw", "node-name": f"fmt-{cdrom.id}", "file": f"file-{cdrom.id}",
             "read-only": True}]


def cdrom_device(cdrom: CdromDef) -> dict[str, Any]:
    """A CD-ROM on the virtio-scsi controller: hot-pluggable, and visible to guests whose
    kernel has no AHCI driver; QEMU picks the SCSI target."""
    dev: dict[str, Any] = {"driver": "scsi-cd", "id": cdrom.id, "bus": f"{SCSI_ID}.0"}
    if cdrom.path is not None:
        dev["drive"] = f"fmt-{cdrom.id}"
    return _boot(dev, cdrom.boot_order)


def nic_netdev(nic: NicDef) -> dict[str, Any]:
    netdev_id = f"net-{nic.id}"
    if nic.backend == "tap":
        return {"type": "tap", "id": netdev_id, "ifname": nic.ifname, "script": "no",
                "downscript": "no"}
    if nic.backend == "bridge":
        return {"type": "bridge", "id": netdev_id, "br": nic.bridge}
    return {"type": "user", "id": netdev_id}


def nic_device(nic: NicDef, domain_uuid: str, bus: str) -> dict[str, Any]:
    dev: dict[str, Any] = {"driver": "virtio-net-pci", "id": nic.id, "netdev": f"net-{nic.id}",
                           "mac": nic.mac or default_mac(domain_uuid, nic.id), "bus": bus}
    if nic.boot_order is None:
        # No option ROM: nothing boots from this NIC, and none need be installed.
        dev["romfile"] = ""
    return _boot(dev, nic.boot_order)


@dataclass(frozen=True)
class LaunchPaths:
    """Files of one run of a domain (in its runtime directory). The pid file also puts the
    run directory into QEMU's command line, which is how a QEMU whose status file is missing
    or unreadable is still recognised (and QEMU's lock on it refuses a second QEMU there)."""

    run_dir: Path

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "qemu.pid"

    @property
    def vnc_socket(self) -> Path:
        return self.run_dir / "vnc.sock"


def vnc_option(definition: DomainDef, paths: LaunchPaths) -> str:
    """`-vnc` for the definition's screen: a UNIX socket in the run directory, or the first
    free loopback port from 5900 (QEMU picks it; `query-vnc` says which)."""
    graphics = definition.graphics
    assert graphics is not None
    extra = {"password": "on"} if graphics.password else {}
    if graphics.listen == "tcp":
        return opts("127.0.0.1:0", to=str(VNC_LAST_DISPLAY), **extra)
    if len(str(paths.vnc_socket).encode()) > SUN_PATH_MAX:  # QEMU binds it itself
        raise InvalidDefinitionError(
            f"graphics: the VNC socket {paths.vnc_socket} is longer than a UNIX socket path "
            f"may be ({SUN_PATH_MAX} bytes): use \"listen\": \"tcp\", or a shorter root")
    return opts(f"unix:{paths.vnc_socket}", **extra)


def build_argv(definition: DomainDef, accel: str, qemu_binary: str, monitor_fd: int,
               paths: LaunchPaths, cpu: str | None = None,
               console_fd: int | None = None, firmware: Firmware | None = None,
               agent_fd: int | None = None, ports: dict[str, str] | None = None,
               root_ports: int | None = None, incoming: bool = False) -> list[str]:
    """The full command line for `definition`, started paused (-S), its monitor and serial
    console served by QEMU on listening sockets passed as fds (the daemon connects to both).
    `cpu` is the `-cpu` model (qemu/accel.py picks it; None: QEMU's default); without
    `console_fd` the serial port has no backend (benchmarks). `firmware`: OVMF as two pflash
    devices (qemu/firmware.py); None for SeaBIOS. A QEMU that will receive a saved or
    migrated guest (`incoming`: `-incoming defer`) must have the sender's device layout:
    `ports` and `root_ports` are then the sender's (which root port each PCI device sat on,
    hot-plugged ones included), not the plan of a fresh start."""
    d = definition
    uuid = str(d.uuid)
    machine = {"accel": accel, "usb": "off", "dump_guest_core": "off"}
    if firmware is not None:
        machine.update(pflash0=CODE_NODE, pflash1=VARS_NODE)
        if firmware.secure_boot:
            machine["smm"] = "on"
    argv = [
        qemu_binary,
        "-name", opts("", guest=d.name, debug_threads="on"),
        "-uuid", uuid,
        "-S", "-no-shutdown", "-nodefaults", "-no-user-config",
        "-machine", opts("q35", **machine),
        "-m", f"{d.memory_mib}M",
        "-smp", str(d.vcpus),
        "-display", "none",  # no local window; a screen, if any, is served over VNC
        "-chardev", opts("socket", id=MONITOR_FD_ID, fd=str(monitor_fd), server="on",
                         wait="off"),
        "-mon", opts("", chardev=MONITOR_FD_ID, mode="control"),
        "-pidfile", str(paths.pidfile),
        "-chardev", (opts("socket", id=SERIAL_ID, fd=str(console_fd), server="on", wait="off")
                     if console_fd is not None else opts("null", id=SERIAL_ID)),
        "-device", jarg({"driver": "isa-serial", "chardev": SERIAL_ID, "id": SERIAL_ID}),
        "-device", jarg({"driver": "pvpanic", "id": "pvpanic0"}),
        # A guest panic pauses the vCPUs (GUEST_PANICKED); on_crash then decides.
        "-action", "panic=pause",
    ]
    if cpu is not None:
        argv += ["-cpu", cpu]
    if d.graphics is not None:
        argv += ["-vnc", vnc_option(d, paths),
                 "-device", jarg({"driver": "VGA", "id": VIDEO_ID, "bus": "pcie.0"})]
    if firmware is not None:
        for node in firmware.blockdevs():
            argv += ["-blockdev", jarg(node)]
        if firmware.secure_boot:  # only SMM code may write the variable store
            argv += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    if d.on_reboot is not d.on_reboot.RESTART:
        # Let a guest reboot stop QEMU (SHUTDOWN reason guest-reset) so on_reboot can act.
        argv += ["-no-reboot"]
    if d.boot is not None and d.boot.kernel is not None:
        argv += ["-kernel", d.boot.kernel]
        if d.boot.initrd is not None:
            argv += ["-initrd", d.boot.initrd]
        if d.boot.cmdline:
            argv += ["-append", d.boot.cmdline]
    if incoming:
        argv += ["-incoming", "defer"]
    plan = {dev: root_port_id(i) for dev, i in port_plan(d).items()}
    if ports:
        plan.update(ports)
    count = root_ports if root_ports else total_ports(d)
    devices: list[dict[str, Any]] = [root_port_device(i) for i in range(count)]
    devices.append({"driver": "virtio-scsi-pci", "id": SCSI_ID, "bus": plan[SCSI_ID]})
    if d.guest_agent:
        if agent_fd is None:
            raise ValueError("guest_agent needs the agent channel's listening socket")
        argv += ["-chardev", opts("socket", id=AGENT_ID, fd=str(agent_fd), server="on",
                                  wait="off")]
        devices.append({"driver": "virtio-serial-pci", "id": VSERIAL_ID,
                        "bus": plan[VSERIAL_ID]})
        devices.append({"driver": "virtserialport", "id": AGENT_ID, "bus": f"{VSERIAL_ID}.0",
                        "chardev": AGENT_ID, "name": AGENT_PORT_NAME})
    for disk in d.disks:
        for node in disk_blockdevs(disk):
            argv += ["-blockdev", jarg(node)]
        devices.append(disk_device(disk, plan[disk.id]))
    for cdrom in d.cdroms:
        for node in cdrom_blockdevs(cdrom):
            argv += ["-blockdev", jarg(node)]
        devices.append(cdrom_device(cdrom))
    for nic in d.nics:
        argv += ["-netdev", jarg(nic_netdev(nic))]
        devices.append(nic_device(nic, uuid, plan[nic.id]))
    # In order: root ports before what plugs into them, the SCSI controller before its CDs.
    for dev in devices:
        argv += ["-device", jarg(dev)]
    return argv
