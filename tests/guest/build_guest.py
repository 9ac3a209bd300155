#!/usr/bin/env python3
"""Build (once) and cache a tiny, real Linux guest for qvirtd's integration tests.

Why this exists: qvirtd's tests must drive a *real* guest (ACPI power button,
PCI hot-plug, block and NIC discovery, the QEMU guest agent, UEFI firmware) to
prove that the daemon's QMP logic works end to end, but they must not depend on
a downloaded cloud image, on root-only tools (losetup, mknod, mount,
debootstrap) or on anything outside Debian's own archive.  So the guest is
assembled here from Debian packages:

* ``linux-image-cloud-amd64`` -- resolved to the real ``linux-image-<ver>``
  package it depends on; we only take ``vmlinuz`` and a handful of modules
  (virtio, SCSI/ATA, ISO 9660, ACPI button, evdev ...).  Nothing is installed
  on the host.
* ``busybox-static`` -- one static binary that provides ``sh``, ``insmod``,
  ``acpid``, ``udhcpc``, ``poweroff`` and everything else ``/init`` needs.
* ``qemu-guest-agent`` -- ``qemu-ga`` plus every shared library it needs
  (found by following ``DT_NEEDED`` through the library packages it depends
  on: ``libglib2.0-0``, ``libc6`` ...) and the dynamic loader.
* ``systemd-boot-efi`` -- the UEFI boot manager of :attr:`GuestImage.uefi_disk`.
* ``shim-signed`` and ``grub-efi-amd64-signed`` -- the signed boot chain of
  :attr:`GuestImage.secure_boot_disk` (the cloud kernel is signed too).

The initramfs (a gzip'd ``newc`` cpio archive) and the GPT partition tables
are written in pure Python; the FAT file system of the EFI system partition is
made with ``mkfs.fat`` (dosfstools) and filled with ``mcopy`` (mtools) on an
image file.  None of it needs root; device nodes are provided at boot by
``devtmpfs``.

The guest prints machine-readable lines on its serial console (ttyS0), all
starting with ``QVIRTD-GUEST: `` -- see ``tests/guest/README.md`` and the
constants below for the exact formats -- and mirrors them on the VGA or EFI
framebuffer console (tty0).  After ``ready`` it runs an interactive shell on
ttyS0.

Results are cached (default ``~/.cache/qvirtd/test-guest``, overridable with
``$QVIRTD_GUEST_CACHE`` or ``--cache``) in one sub-directory per key (kernel
package and version, busybox version, a hash of every other package version,
builder revision), built in a temporary directory and renamed into place, with
a stamp file written last, so an interrupted build is never mistaken for a
usable one.

Usage::

    python tests/guest/build_guest.py [--cache DIR]   # prints JSON paths

    from build_guest import ensure_guest
    image = ensure_guest()    # GuestImage(kernel=..., initrd=..., cmdline=..., uefi_disk=...)
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shlex
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path

__all__ = [
    "AGENT_PORT_NAME",
    "AGENT_STARTED_LINE",
    "BLOCK_SIZE_UNIT",
    "CIDATA_LINE_PREFIX",
    "DEFAULT_CMDLINE",
    "GUEST_HOSTNAME",
    "LINE_PREFIX",
    "NO_CIDATA_LINE",
    "OVMF_CODE",
    "OVMF_CODE_SECURE_BOOT",
    "OVMF_VARS",
    "OVMF_VARS_SECURE_BOOT",
    "POWER_BUTTON_LINE",
    "READY_LINE",
    "SECURE_BOOT_MEMORY_MIB",
    "SHELL_PROMPT",
    "GuestBuildError",
    "GuestImage",
    "default_cache_dir",
    "ensure_guest",
    "main",
]

#: Meta package that always points at Debian's current cloud kernel.  The cloud
#: flavour is small and boots fast, but note that it has *no* AHCI driver
#: (``CONFIG_SATA_AHCI`` is not set), so q35's built-in SATA controller is not
#: usable from this guest; use virtio-blk / virtio-scsi (or ``ata_piix`` on the
#: ``pc`` machine) instead.
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
#: The guest agent; its library packages are found by following ``Depends``.
AGENT_PACKAGE = "qemu-guest-agent"
#: UEFI boot manager for :attr:`GuestImage.uefi_disk`.
SYSTEMD_BOOT_PACKAGE = "systemd-boot-efi"
#: The Secure Boot chain of :attr:`GuestImage.secure_boot_disk`: shim, signed by
#: Microsoft's third-party UEFI CA, then GRUB and the kernel, signed by Debian.
SHIM_PACKAGE = "shim-signed"
GRUB_SIGNED_PACKAGE = "grub-efi-amd64-signed"

#: Kernel command line the guest is built for.  The *last* ``console=`` is the
#: one behind ``/dev/console``, so ttyS0 stays the primary console (where every
#: ``QVIRTD-GUEST:`` line and the shell are) while kernel messages also reach
#: tty0, the VGA text console (``vgacon``, BIOS) or the EFI framebuffer console
#: (``efifb`` + ``fbcon``, UEFI), all built into the cloud kernel.  ``quiet`` so
#: kernel chatter does not drown those lines (errors are still printed), and
#: ``panic=-1`` so a kernel panic reboots immediately instead of hanging a test
#: until its timeout.
DEFAULT_CMDLINE = "console=tty0 console=ttyS0 quiet panic=-1"

#: Every machine-readable console line starts with this prefix.
LINE_PREFIX = "QVIRTD-GUEST: "
#: Printed once all modules are loaded, ``acpid`` has opened the input devices
#: (so the power button works from now on), the initial block/net devices have
#: been reported, the cidata check has run and the agent (if it has a port)
#: has been started.  The serial shell starts right after it.
READY_LINE = LINE_PREFIX + "ready"
#: Printed by the ACPI power-button handler right before ``poweroff -f``.
POWER_BUTTON_LINE = LINE_PREFIX + "power button"
#: Printed when ``qemu-ga`` has been started on the virtio-serial port named
#: :data:`AGENT_PORT_NAME` (at boot, or later when the port is hot-plugged).
AGENT_STARTED_LINE = LINE_PREFIX + "agent started"
#: Name of the virtio-serial port the agent listens on (QEMU:
#: ``-device virtserialport,chardev=...,name=org.qemu.guest_agent.0``).
AGENT_PORT_NAME = "org.qemu.guest_agent.0"
#: ``QVIRTD-GUEST: cidata <file> <base64>``: one line per file of a cidata CD.
CIDATA_LINE_PREFIX = LINE_PREFIX + "cidata "
#: Printed (before ``ready``) when no CD-ROM labelled ``cidata`` is present.
NO_CIDATA_LINE = LINE_PREFIX + "no cidata"
#: Files of a cidata CD that are reported, in this order.
CIDATA_FILES: tuple[str, ...] = ("user-data", "meta-data", "vendor-data", "network-config")
#: Host name the guest sets (``guest-get-host-name`` returns it).
GUEST_HOSTNAME = "qvirtd-guest"
#: Prompt of the interactive shell on ttyS0.
SHELL_PROMPT = "guest# "
#: Unit of the size in ``block add``/``block change`` lines: 512-byte sectors,
#: exactly as the kernel exposes it in ``/sys/block/<dev>/size``.
BLOCK_SIZE_UNIT = 512

#: Debian's ``ovmf`` package (a host package, like QEMU): firmware for
#: :attr:`GuestImage.uefi_disk`.  Use ``OVMF_CODE`` read-only as pflash unit 0
#: and a writable *copy* of ``OVMF_VARS`` as unit 1.
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
#: Secure Boot firmware (needs ``-machine q35,smm=on`` and
#: ``-global driver=cfi.pflash01,property=secure,value=on``) and the variable
#: store template with Microsoft's keys enrolled and Secure Boot on.
OVMF_CODE_SECURE_BOOT = Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd")
OVMF_VARS_SECURE_BOOT = Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd")
#: Guest memory for :attr:`GuestImage.secure_boot_disk` under the SMM
#: firmware: GRUB has to place the kernel and initrd below 4 GiB and the
#: kernel's decompressor then needs room; with 256 MiB it resets in a loop,
#: 384 MiB works, 512 MiB leaves a margin.
SECURE_BOOT_MEMORY_MIB = 512

#: Modules we would like in the guest, best effort: each one that exists as a
#: loadable module is included together with its dependencies, the ones built
#: into the kernel (``modules.builtin``) or missing from this flavour (e.g.
#: ``ahci`` in the cloud kernel) are skipped and listed in ``manifest.json``.
WANTED_MODULES: tuple[str, ...] = (
    "evdev",  # /dev/input/event* for busybox acpid
    "pvpanic_mmio",  # QEMU's ISA pvpanic device (ACPI QEMU0001): guest panics reach QEMU
    "button",  # ACPI power button -> KEY_POWER input event
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_scsi",
    "virtio_console",  # virtio-serial: the guest agent's port (/dev/vportNpM)
    "failover",
    "net_failover",
    "libata",
    "libahci",
    "ahci",
    "ata_piix",  # IDE/SATA of the i440fx "pc" machine (the cloud kernel lacks ahci)
    "cdrom",
    "sr_mod",
    "sd_mod",
    "isofs",  # ISO 9660, to read a cidata CD
    "pvpanic",
    "pvpanic_pci",
)

#: Busybox applets linked into /bin.  /init, its helper scripts and the
#: interactive shell use these; having them as real symlinks keeps boot fast and
#: deterministic (no ``busybox --install`` at boot).
APPLETS: tuple[str, ...] = (
    "[",
    "[[",
    "acpid",
    "ash",
    "awk",
    "base64",
    "basename",
    "cat",
    "chmod",
    "clear",
    "cp",
    "cttyhack",
    "cut",
    "date",
    "dd",
    "df",
    "dirname",
    "dmesg",
    "du",
    "echo",
    "env",
    "expr",
    "false",
    "find",
    "free",
    "grep",
    "halt",
    "head",
    "hexdump",
    "hostname",
    "hwclock",
    "id",
    "insmod",
    "ip",
    "kill",
    "ln",
    "ls",
    "lsmod",
    "mkdir",
    "mknod",
    "mount",
    "mv",
    "od",
    "pidof",
    "poweroff",
    "printf",
    "ps",
    "pwd",
    "readlink",
    "reboot",
    "rm",
    "rmdir",
    "rmmod",
    "run-parts",
    "sed",
    "seq",
    "setsid",
    "sh",
    "sleep",
    "sort",
    "stat",
    "stty",
    "sync",
    "tail",
    "tee",
    "test",
    "timeout",
    "top",
    "touch",
    "tr",
    "true",
    "tty",
    "udhcpc",
    "umount",
    "uname",
    "uptime",
    "vi",
    "wc",
    "which",
    "xargs",
)

_STAMP = "complete"
_KERNEL_NAME = "vmlinuz"
_INITRD_NAME = "initrd.img"
_UEFI_DISK_NAME = "uefi-disk.img"
_SECURE_BOOT_DISK_NAME = "secure-boot-disk.img"
_MANIFEST_NAME = "manifest.json"
_BUILD_PREFIX = ".build-"
#: Where the agent and its libraries go in the initramfs (Debian's multiarch
#: directory, which Debian's dynamic loader searches without an ld.so.cache).
_LIB_DIR = "lib/x86_64-linux-gnu"
_AGENT_PATH = "usr/sbin/qemu-ga"
_VERSION_ID = "2"  # of the guest's /etc/os-release: bumped when the guest's features change

# /init.  Plain busybox sh; "@...@" words are replaced by _init_script().
# Kept deliberately free of command substitutions in the polling loop so each
# 0.5 s tick forks only `sleep` (cheap even under TCG).
_INIT_SCRIPT = r"""#!/bin/sh
# /init of the qvirtd test guest, generated by tests/guest/build_guest.py.
# PID 1: it must never exit, or the kernel panics.
export PATH=/bin:/sbin:/usr/sbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# Re-open the console from devtmpfs in case the kernel could not give us one.
exec </dev/console >/dev/console 2>&1
# Firmware leaves terminal escapes without a newline; start our lines clean.
echo

# Lines go to /dev/console (the last console= of the command line, ttyS0 by
# default) and are mirrored on the screen (tty0: VGA text or EFI framebuffer)
# unless the screen is /dev/console itself.
screen=/dev/tty0
{ read -r active </sys/class/tty/console/active; } 2>/dev/null
case " ${active:-tty0} " in *" tty0 "|*" tty1 ") screen=/dev/null ;; esac
echo "screen=$screen" >/etc/qvirtd-guest.env
say() {
    echo "QVIRTD-GUEST: $*"
    echo "QVIRTD-GUEST: $*" >$screen 2>/dev/null
}

for m in @MODULES@; do
    insmod "/lib/modules/$m.ko" || say "module failed $m"
done

hostname @HOSTNAME@
ip link set lo up

# busybox acpid opens /dev/input/event0, event1, ... once at start-up, maps
# KEY_POWER to the action "PWRF/00000080" and runs /etc/acpi/PWRF/00000080.
# It writes its pid file only after opening the devices, so the pid file is
# our "power button armed" signal.
acpid -f -c /etc/acpi -l /dev/null -p /run/acpid.pid &
acpid_pid=$!
i=0
while [ ! -s /run/acpid.pid ] && [ $i -lt 200 ]; do
    kill -0 $acpid_pid 2>/dev/null || break
    sleep 0.05
    i=$((i + 1))
done

# Device tables are kept as " name=value" tokens in plain variables.
scan_block() {
    blk_new=
    for d in /sys/block/*; do
        n=${d##*/}
        case $n in loop*|ram*|zram*|'*') continue ;; esac
        { read -r s <"$d/size"; } 2>/dev/null || continue
        blk_new="$blk_new $n=$s"
    done
}
scan_net() {
    net_new=
    for d in /sys/class/net/*; do
        n=${d##*/}
        case $n in lo|'*') continue ;; esac
        { read -r a <"$d/address"; } 2>/dev/null || a=none
        net_new="$net_new $n=$a"
    done
}
# report KIND OLD NEW: print removals, then additions and value changes.
report() {
    for t in $2; do
        case " $3 " in *" ${t%%=*}="*) ;; *) say "$1 remove ${t%%=*}" ;; esac
    done
    for t in $3; do
        case " $2 " in
            *" $t "*) ;;
            *" ${t%%=*}="*) say "$1 change ${t%%=*} ${t#*=}" ;;
            *) say "$1 add ${t%%=*} ${t#*=}" ;;
        esac
    done
}

# The guest agent listens on the virtio-serial port named @AGENT_PORT@
# (/dev/vportNpM; there is no udev, so the /dev/virtio-ports link is made here).
# Sets agent=started once it is running.
agent=
start_agent() {
    for p in /sys/class/virtio-ports/*; do
        { read -r n <"$p/name"; } 2>/dev/null || continue
        [ "$n" = @AGENT_PORT@ ] || continue
        v=${p##*/}
        i=0
        while [ ! -c "/dev/$v" ] && [ $i -lt 40 ]; do sleep 0.05; i=$((i + 1)); done
        mkdir -p /dev/virtio-ports /run/qemu-ga
        ln -sf "../$v" "/dev/virtio-ports/$n"
        (
            qemu-ga -m virtio-serial -p "/dev/$v" -t /run/qemu-ga \
                -f /run/qemu-ga/qemu-ga.pid </dev/null
            say "agent exited $?"
        ) &
        agent=started
        say "agent started"
        return
    done
}

# A CD-ROM whose ISO 9660 volume label is cidata (cloud-init's NoCloud seed):
# print each file base64-encoded on one line.
check_cidata() {
    for b in /sys/block/sr*; do
        [ -e "$b" ] || continue
        d=/dev/${b##*/}
        # Primary volume descriptor: sector 16; "CD001" at byte 1, label at 40..71.
        dd if="$d" of=/tmp/pvd bs=2048 skip=16 count=1 2>/dev/null || continue
        magic=$(dd if=/tmp/pvd bs=1 skip=1 count=5 2>/dev/null)
        [ "$magic" = CD001 ] || continue
        label=$(dd if=/tmp/pvd bs=1 skip=40 count=32 2>/dev/null)
        set -- $label
        case $1 in cidata|CIDATA) ;; *) continue ;; esac
        mkdir -p /mnt/cidata
        if ! mount -t iso9660 -o ro "$d" /mnt/cidata; then
            say "cidata mount failed ${d#/dev/}"
            continue
        fi
        say "cidata found ${d#/dev/}"
        for f in @CIDATA_FILES@; do
            [ -f "/mnt/cidata/$f" ] || continue
            say "cidata $f $(base64 -w 0 "/mnt/cidata/$f")"
        done
        umount /mnt/cidata
        return
    done
    say "no cidata"
}

blk_old=
net_old=
scan_block; report block "$blk_old" "$blk_new"; blk_old=$blk_new
scan_net; report net "$net_old" "$net_new"; net_old=$net_new

check_cidata
start_agent

# DHCP on eth0 in the background (QEMU's user network answers with
# 10.0.2.15); /etc/udhcpc.script configures the address and prints it.
if [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up
    (
        udhcpc -i eth0 -s /etc/udhcpc.script -f -q -n -t 10 -T 1 >/dev/null 2>&1 \
            || say "net dhcp failed eth0"
    ) &
fi

if [ -s /run/acpid.pid ] && kill -0 $acpid_pid 2>/dev/null; then
    say ready
else
    say "error acpid not running"
fi

(
    while :; do
        sleep 0.5
        scan_block
        [ "$blk_new" = "$blk_old" ] || report block "$blk_old" "$blk_new"
        blk_old=$blk_new
        scan_net
        [ "$net_new" = "$net_old" ] || report net "$net_old" "$net_new"
        net_old=$net_new
        [ -n "$agent" ] || start_agent
    done
) &

# An interactive shell on the console (ttyS0), respawned when it exits.
# setsid makes it a session leader, cttyhack opens the real console device
# (not /dev/console) and makes it the controlling tty, so Ctrl-C works.
export PS1='@PROMPT@' ENV=
while :; do
    setsid cttyhack sh
    sleep 1
done
"""

# Run by acpid (cwd /etc/acpi, stdout/stderr = acpid's log, i.e. /dev/null),
# hence the explicit /dev/console.  `poweroff -f` skips init and calls
# reboot(RB_POWER_OFF) directly, which QEMU reports as a guest SHUTDOWN.
_POWER_BUTTON_SCRIPT = """#!/bin/sh
echo "QVIRTD-GUEST: power button" >/dev/console
. /etc/qvirtd-guest.env
echo "QVIRTD-GUEST: power button" >$screen 2>/dev/null
exec poweroff -f
"""

# /sbin/shutdown, which qemu-ga runs for guest-shutdown as
# `shutdown -h -P|-H|-r +0 "hypervisor initiated shutdown"` (with stdio on /dev/null).
_SHUTDOWN_SCRIPT = """#!/bin/sh
mode=poweroff
for arg; do
    case $arg in -P) mode=poweroff ;; -H) mode=halt ;; -r) mode=reboot ;; esac
done
echo "QVIRTD-GUEST: agent shutdown $mode" >/dev/console
. /etc/qvirtd-guest.env
echo "QVIRTD-GUEST: agent shutdown $mode" >$screen 2>/dev/null
sync
exec $mode -f
"""

# udhcpc runs this with $1 = deconfig|bound|renew|leasefail|nak and the lease
# in the environment ($ip, $mask as a prefix length, $router, $dns).
_UDHCPC_SCRIPT = """#!/bin/sh
case $1 in
deconfig)
    ip addr flush dev "$interface"
    ip link set "$interface" up
    ;;
bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" ${broadcast:+broadcast "$broadcast"} dev "$interface"
    for r in $router; do
        ip route add default via "$r" dev "$interface"
        break
    done
    : >/etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
    echo "QVIRTD-GUEST: net address $interface $ip/${mask:-24}" >/dev/console
    . /etc/qvirtd-guest.env
    echo "QVIRTD-GUEST: net address $interface $ip/${mask:-24}" >$screen 2>/dev/null
    ;;
esac
exit 0
"""

_OS_RELEASE = f"""PRETTY_NAME="qvirtd test guest"
NAME="qvirtd test guest"
ID=qvirtd-test-guest
ID_LIKE=debian
VERSION_ID="{_VERSION_ID}"
VERSION="{_VERSION_ID}"
"""

# systemd-boot: no menu (timeout 0), one entry, nothing written to the ESP.
_LOADER_CONF = """timeout 0
default qvirtd.conf
editor no
auto-entries no
auto-firmware no
console-mode keep
"""

_LOADER_ENTRY = """title qvirtd test guest
linux /vmlinuz
initrd /initrd.img
options @CMDLINE@
"""

# Debian's signed GRUB has its prefix built in as /EFI/debian on the partition
# it was loaded from and reads grub.cfg there; it verifies the kernel through
# shim (Secure Boot on) and cannot load modules, so only built-in commands.
_GRUB_CFG = """set timeout=0
linux /vmlinuz @CMDLINE@
initrd /initrd.img
boot
"""


class GuestBuildError(RuntimeError):
    """Building the test guest failed; the message says which step and why."""


@dataclass(frozen=True)
class GuestImage:
    """A ready-to-boot test guest.

    Direct kernel boot: pass ``kernel``/``initrd``/``cmdline`` to QEMU as
    ``-kernel``/``-initrd``/``-append`` (SeaBIOS or OVMF).  Firmware boot: use
    ``uefi_disk`` (or ``secure_boot_disk``) as a disk under OVMF.  The disks are
    shared cache files: attach them with ``readonly=on`` (``snapshot=on`` for
    IDE, which cannot be read-only) or through a qcow2 overlay, never writable.
    """

    kernel: Path
    """Debian cloud kernel (bzImage, signed for Secure Boot), for ``-kernel``."""
    initrd: Path
    """gzip'd newc initramfs with busybox, modules, the guest agent and /init,
    for ``-initrd``."""
    cmdline: str = DEFAULT_CMDLINE
    """Kernel command line for ``-append``: ``console=tty0 console=ttyS0 quiet
    panic=-1`` (every line and the shell on ttyS0, which is /dev/console,
    kernel messages on the screen too, kernel messages below error level
    hidden, reboot at once on panic).  Extra options may be appended."""
    _: KW_ONLY
    uefi_disk: Path
    """Raw disk image: GPT with one EFI system partition (FAT32) holding
    systemd-boot as ``EFI/BOOT/BOOTX64.EFI`` (no menu, no timeout), the same
    kernel and initrd and an entry with :data:`DEFAULT_CMDLINE`.  Boots under
    OVMF (:data:`OVMF_CODE`/:data:`OVMF_VARS`, Secure Boot off) from
    virtio-blk, virtio-scsi or IDE (``-machine pc``); ``ready`` about 8 s after
    start under TCG, against about 4 s for a direct kernel boot."""
    secure_boot_disk: Path | None
    """Raw disk image like ``uefi_disk`` but with the signed chain shim ->
    GRUB -> kernel (``EFI/BOOT/BOOTX64.EFI`` is shim, ``EFI/BOOT/grubx64.efi``
    GRUB, ``EFI/debian/grub.cfg`` its configuration).  Boots with Secure Boot
    on (:data:`OVMF_CODE_SECURE_BOOT`, :data:`OVMF_VARS_SECURE_BOOT`, SMM,
    at least :data:`SECURE_BOOT_MEMORY_MIB`) and off.  ``None`` if the signed
    packages cannot be had from the archive."""
    manifest: Path
    """``manifest.json``: package versions, modules, agent libraries and the
    files of each EFI system partition."""


@dataclass(frozen=True)
class _Packages:
    """The exact package versions a build uses; they form the cache key."""

    kernel_package: str
    kernel_version: str
    busybox_version: str
    agent: tuple[tuple[str, str], ...]
    """``qemu-guest-agent`` first, then the library packages it depends on,
    directly or not, as (name, version)."""
    boot: tuple[tuple[str, str], ...]
    """``systemd-boot-efi``."""
    secure_boot: tuple[tuple[str, str], ...]
    """``shim-signed`` and ``grub-efi-amd64-signed``, or nothing if the archive
    lacks them."""

    def others(self) -> tuple[tuple[str, str], ...]:
        return self.agent + self.boot + self.secure_boot


@dataclass
class _Module:
    """One kernel module found in the extracted package."""

    name: str
    path: Path
    depends: list[str] = field(default_factory=list)


def default_cache_dir() -> Path:
    """Return ``$QVIRTD_GUEST_CACHE`` or ``~/.cache/qvirtd/test-guest``."""
    env = os.environ.get("QVIRTD_GUEST_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "qvirtd" / "test-guest"


def _log(message: str) -> None:
    """Progress goes to stderr so stdout stays clean JSON for the CLI."""
    print(f"build_guest: {message}", file=sys.stderr, flush=True)


def _run(cmd: Sequence[str], cwd: Path | None = None) -> str:
    """Run a command, returning stdout; raise with its stderr on failure."""
    env = dict(os.environ, LC_ALL="C")
    try:
        proc = subprocess.run(
            list(cmd), cwd=cwd, env=env, capture_output=True, text=True, check=False
        )
    except FileNotFoundError as exc:
        raise GuestBuildError(f"{cmd[0]} not found (is this a Debian host?)") from exc
    if proc.returncode != 0:
        raise GuestBuildError(
            f"`{shlex.join(cmd)}` failed with exit code {proc.returncode}:\n{proc.stderr.strip()}"
        )
    return proc.stdout


class _Apt:
    """Runs apt commands; on the first failure refreshes the lists once and retries.

    A fresh container often has no package lists (``apt-cache`` finds nothing)
    and an old one may have lists that point at superseded, deleted .debs
    (``apt-get download`` 404s).  One ``apt-get update`` fixes both.
    """

    def __init__(self) -> None:
        self._updated = False

    def run(self, cmd: Sequence[str], cwd: Path | None = None) -> str:
        try:
            return _run(cmd, cwd)
        except GuestBuildError as first:
            if self._updated:
                raise
            self._updated = True
            _log(f"{shlex.join(cmd)} failed; running `apt-get update` once and retrying")
            try:
                _run(["apt-get", "update"])
            except GuestBuildError as exc:
                raise GuestBuildError(f"{first}\n\nand `apt-get update` failed too: {exc}") from exc
            return _run(cmd, cwd)


def _parse_control(text: str) -> list[dict[str, str]]:
    """Parse deb822 records (``apt-cache show`` output) into dicts."""
    records: list[dict[str, str]] = []
    current: dict[str, str] = {}
    key = ""
    for line in text.splitlines():
        if not line.strip():
            if current:
                records.append(current)
            current, key = {}, ""
        elif line[0] in " \t" and key:
            current[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            current[key] = value.strip()
    if current:
        records.append(current)
    return records


def _show_many(apt: _Apt, packages: Sequence[str]) -> dict[str, dict[str, str]]:
    """Return the candidate version's control record of each package, in one call.

    Packages the archive does not have are missing from the result (apt-cache
    prints a notice for them, and fails only if it found none at all).
    """
    records = _parse_control(apt.run(["apt-cache", "show", "--no-all-versions", *packages]))
    return {record["Package"]: record for record in records if record.get("Package") in packages}


def _show(apt: _Apt, package: str) -> dict[str, str]:
    """Return the candidate version's control record of ``package``."""
    record = _show_many(apt, [package]).get(package)
    if record is None:
        raise GuestBuildError(f"apt-cache show {package}: no record for the candidate version")
    return record


_DEP_RE = re.compile(r"^(?P<name>[a-z0-9][a-z0-9+.-]*)(?:\s*\(\s*=\s*(?P<version>[^)\s]+)\s*\))?")


def _depends(record: Mapping[str, str]) -> list[list[str]]:
    """``Pre-Depends`` and ``Depends`` as clauses of alternative package names."""
    clauses = []
    for key in ("Pre-Depends", "Depends"):
        for clause in record.get(key, "").split(","):
            names = []
            for alternative in clause.split("|"):
                match = _DEP_RE.match(alternative.strip())
                if match:
                    names.append(match["name"])
            if names:
                clauses.append(names)
    return clauses


def _is_library_package(record: Mapping[str, str]) -> bool:
    """Debian files shared-library packages under the ``libs`` section."""
    return record.get("Section", "").rsplit("/", 1)[-1] in ("libs", "oldlibs")


def _library_closure(
    show: Callable[[Sequence[str]], Mapping[str, Mapping[str, str]]], root: Mapping[str, str]
) -> list[tuple[str, str]]:
    """``root`` and the library packages it depends on, directly or not, as (name, version).

    Follows ``Pre-Depends`` and ``Depends`` (the first alternative the archive
    has) level by level, ``show`` giving the control records of a level, into
    packages of the ``libs`` section only: for ``qemu-guest-agent`` that is
    ``libglib2.0-0``, ``libc6``, ``libgcc-s1`` ... but not
    ``init-system-helpers`` (and through it perl and dpkg).  Which files are
    actually needed is decided later, from ``DT_NEEDED``; a library outside
    this set makes the build fail loudly.
    """
    found: dict[str, Mapping[str, str]] = {root["Package"]: root}
    ignored: set[str] = set()
    level = [root]
    while level:
        seen = found.keys() | ignored
        wanted = [c for record in level for c in _depends(record) if not set(c) & seen]
        names = sorted({name for clause in wanted for name in clause})
        if not names:
            break
        records = show(names)
        level = []
        for clause in wanted:
            if set(clause) & (found.keys() | ignored):
                continue
            name = next((name for name in clause if name in records), None)
            if name is None:
                raise GuestBuildError(f"none of {' | '.join(clause)} is in the archive")
            if not _is_library_package(records[name]):
                ignored.add(name)
                continue
            found[name] = records[name]
            level.append(records[name])
    return [(name, found[name]["Version"]) for name in found]


def _recursive_depends(apt: _Apt, package: str) -> list[str]:
    """Every package name ``package`` may pull in through (Pre-)Depends, in one call.

    ``apt-cache depends --recurse`` over-approximates (it follows every
    alternative and non-library packages too), which is fine: it only decides
    which records to fetch in the same ``apt-cache show`` as the rest, since
    each apt-cache run re-reads the package lists (about 0.7 s here).
    """
    out = apt.run([
        "apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests",
        "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances", package,
    ])
    names = set()
    for line in out.splitlines():
        word = line.split(":", 1)[-1].strip() if line[:1].isspace() else line.strip()
        word = word.split(":", 1)[0]  # an architecture qualifier
        if word and not word.startswith("<"):
            names.add(word)
    return sorted(names)


def _resolve_packages(apt: _Apt) -> _Packages:
    """Turn the kernel meta package into the real image package and pin versions.

    The meta package only carries ``Depends: linux-image-<abi>-cloud-amd64 (= ver)``;
    using that exact name and version as the cache key means a new kernel in
    the archive produces a new guest, while an unchanged archive reuses it.
    The same goes for every other package (hashed into the key).
    """
    wanted = [KERNEL_META_PACKAGE, BUSYBOX_PACKAGE, AGENT_PACKAGE, SYSTEMD_BOOT_PACKAGE]
    agent_depends = _recursive_depends(apt, AGENT_PACKAGE)
    records = _show_many(apt, [*wanted, SHIM_PACKAGE, GRUB_SIGNED_PACKAGE, *agent_depends])

    def show(names: Sequence[str]) -> Mapping[str, Mapping[str, str]]:
        missing = [name for name in names if name not in records]
        if missing:  # not expected: _recursive_depends saw every name already
            records.update(_show_many(apt, missing))
        return {name: records[name] for name in names if name in records}

    for package in wanted:
        if package not in records:
            raise GuestBuildError(f"apt-cache show {package}: no record for the candidate version")
    meta = records[KERNEL_META_PACKAGE]
    real: tuple[str, str | None] | None = None
    for clause in meta.get("Depends", "").split(","):
        for alternative in clause.split("|"):
            match = _DEP_RE.match(alternative.strip())
            if match and match["name"].startswith("linux-image-"):
                real = (match["name"], match["version"])
                break
        if real:
            break
    if real is None:
        raise GuestBuildError(
            f"{KERNEL_META_PACKAGE} does not depend on a linux-image-* package: "
            f"{meta.get('Depends')!r}"
        )
    name, version = real
    if version is None:
        version = _show(apt, name)["Version"]
    secure_boot: tuple[tuple[str, str], ...] = ()
    if SHIM_PACKAGE in records and GRUB_SIGNED_PACKAGE in records:
        secure_boot = tuple(
            (package, records[package]["Version"])
            for package in (SHIM_PACKAGE, GRUB_SIGNED_PACKAGE)
        )
    return _Packages(
        kernel_package=name,
        kernel_version=version,
        busybox_version=records[BUSYBOX_PACKAGE]["Version"],
        agent=tuple(_library_closure(show, records[AGENT_PACKAGE])),
        boot=((SYSTEMD_BOOT_PACKAGE, records[SYSTEMD_BOOT_PACKAGE]["Version"]),),
        secure_boot=secure_boot,
    )


def _builder_digest() -> str:
    """Hash of this file: any change to the guest's recipe invalidates the cache."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def _cache_key(pkgs: _Packages) -> str:
    """Directory name for one build; only filename-safe characters.

    The kernel and busybox are named; every other package version (the agent
    and its libraries, the boot loaders) is hashed, to keep the name short.
    """
    others = "\n".join(f"{name}={version}" for name, version in sorted(pkgs.others()))
    raw = (
        f"{pkgs.kernel_package}_{pkgs.kernel_version}"
        f"+busybox_{pkgs.busybox_version}"
        f"+p{hashlib.sha256(others.encode()).hexdigest()[:10]}+g{_builder_digest()}"
    )
    return re.sub(r"[^A-Za-z0-9._+-]", "_", raw)


_REQUIRED_FILES = (_KERNEL_NAME, _INITRD_NAME, _UEFI_DISK_NAME, _MANIFEST_NAME)


def _is_complete(entry: Path) -> bool:
    """A cache entry is usable only if its stamp (written last) exists."""
    return (entry / _STAMP).is_file() and all((entry / name).is_file() for name in _REQUIRED_FILES)


def _image(entry: Path) -> GuestImage:
    secure_boot_disk = entry / _SECURE_BOOT_DISK_NAME
    return GuestImage(
        kernel=entry / _KERNEL_NAME,
        initrd=entry / _INITRD_NAME,
        uefi_disk=entry / _UEFI_DISK_NAME,
        secure_boot_disk=secure_boot_disk if secure_boot_disk.is_file() else None,
        manifest=entry / _MANIFEST_NAME,
    )


@contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    """Serialize builders (e.g. pytest-xdist workers) so we download only once."""
    with open(cache_dir / ".lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _download(apt: _Apt, packages: Sequence[tuple[str, str]], dest: Path) -> dict[str, Path]:
    """``apt-get download`` exact package versions into ``dest``, in one call."""
    dest.mkdir(parents=True, exist_ok=True)
    apt.run(["apt-get", "download", *(f"{name}={version}" for name, version in packages)], cwd=dest)
    debs = {}
    for package, version in packages:
        found = sorted(dest.glob(f"{package}_*.deb"))
        if len(found) != 1:
            raise GuestBuildError(f"expected one {package} .deb in {dest}, found {found}")
        got = _run(["dpkg-deb", "-f", str(found[0]), "Version"]).strip()
        if got != version:
            raise GuestBuildError(f"{found[0].name}: version {got}, expected {version}")
        debs[package] = found[0]
    return debs


def _extract(deb: Path, dest: Path) -> Path:
    """Unpack a .deb's files (not its maintainer scripts) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    _run(["dpkg-deb", "-x", str(deb), str(dest)])
    return dest


def _module_name(path: Path) -> str:
    """Kernel module name: file name without .ko[.xz|.zst|.gz], '-' as '_'."""
    return path.name.split(".ko", 1)[0].replace("-", "_")


def _read_module(path: Path) -> bytes:
    """Return the plain ELF of a module, decompressing it if needed.

    Debian 12 ships uncompressed .ko files (CONFIG_MODULE_COMPRESS_NONE), but
    later releases compress them; busybox insmod only loads plain ELF.
    """
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        # Python 3.11 has no zstd module; the zstd CLI is in Debian's zstd package.
        if shutil.which("zstd") is None:
            raise GuestBuildError(f"{path.name} is zstd-compressed; install the zstd package")
        out = subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=False)
        if out.returncode != 0:
            raise GuestBuildError(f"zstd -dc {path} failed: {out.stderr.decode(errors='replace')}")
        return out.stdout
    if path.name.endswith(".ko"):
        return data
    raise GuestBuildError(f"unknown module format: {path}")


def _modinfo_depends(image: bytes, origin: Path) -> list[str]:
    """Read ``depends=`` from a module's ELF ``.modinfo`` section.

    Debian's kernel package has no ``modules.dep`` (depmod runs in postinst,
    which we deliberately never execute), and the host may lack kmod, so we
    read the dependency list straight from the module like depmod does.
    """
    if image[:4] != b"\x7fELF" or image[4] != 2 or image[5] != 1:
        raise GuestBuildError(f"{origin}: not a 64-bit little-endian ELF module")
    (shoff,) = struct.unpack_from("<Q", image, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", image, 0x3A)
    headers = [
        struct.unpack_from("<IIQQQQ", image, shoff + index * shentsize) for index in range(shnum)
    ]
    if shstrndx >= len(headers):
        raise GuestBuildError(f"{origin}: bad section header string table index")
    strtab_offset = headers[shstrndx][4]
    for name_offset, _type, _flags, _addr, offset, size in headers:
        start = strtab_offset + name_offset
        name = image[start : image.index(b"\0", start)]
        if name != b".modinfo":
            continue
        for entry in image[offset : offset + size].split(b"\0"):
            if entry.startswith(b"depends="):
                return [dep for dep in entry[len("depends=") :].decode().split(",") if dep]
        return []
    raise GuestBuildError(f"{origin}: no .modinfo section")


def _find_module_dir(root: Path) -> Path:
    """Locate ``lib/modules/<kver>`` (or the merged-/usr variant) in the tree."""
    candidates = [
        path
        for base in (root / "lib" / "modules", root / "usr" / "lib" / "modules")
        if base.is_dir()
        for path in base.iterdir()
        if path.is_dir()
    ]
    if len(candidates) != 1:
        raise GuestBuildError(f"expected one modules directory under {root}, found {candidates}")
    return candidates[0]


def _index_modules(module_dir: Path) -> dict[str, _Module]:
    """Map module name -> file and dependencies (from modules.dep if present)."""
    index: dict[str, _Module] = {}
    for path in sorted(module_dir.rglob("*.ko*")):
        if path.is_file() and re.search(r"\.ko(\.xz|\.gz|\.zst)?$", path.name):
            index[_module_name(path)] = _Module(_module_name(path), path)
    dep_file = module_dir / "modules.dep"
    if dep_file.is_file():
        for line in dep_file.read_text().splitlines():
            target, _, deps = line.partition(":")
            name = _module_name(Path(target))
            if name in index:
                index[name].depends = [_module_name(Path(dep)) for dep in deps.split()]
    return index


def _builtin_modules(module_dir: Path) -> set[str]:
    """Names of drivers compiled into the kernel (nothing to load for them)."""
    builtin = module_dir / "modules.builtin"
    if not builtin.is_file():
        return set()
    return {_module_name(Path(line)) for line in builtin.read_text().split()}


def _select_modules(module_dir: Path) -> tuple[list[_Module], dict[str, str]]:
    """Return the wanted modules plus dependencies in load order, and the skips.

    Load order is a depth-first post-order over ``depends``, which is exactly
    what insmod (unlike modprobe) needs: every module after its dependencies.
    """
    index = _index_modules(module_dir)
    have_dep_file = (module_dir / "modules.dep").is_file()
    builtin = _builtin_modules(module_dir)
    order: list[_Module] = []
    done: set[str] = set()
    skipped: dict[str, str] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in done:
            return
        if name in chain:
            raise GuestBuildError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        module = index[name]
        if not have_dep_file:
            module.depends = _modinfo_depends(_read_module(module.path), module.path)
        for dep in module.depends:
            if dep in index:
                visit(dep, (*chain, name))
            elif dep not in builtin:
                raise GuestBuildError(f"{name} depends on {dep}, which is nowhere to be found")
        done.add(name)
        order.append(module)

    for wanted in WANTED_MODULES:
        if wanted in index:
            visit(wanted, ())
        elif wanted in builtin:
            skipped[wanted] = "built into the kernel"
        else:
            skipped[wanted] = "not available in this kernel flavour"
    return order, skipped


class _Cpio:
    """Minimal writer for the ``newc`` cpio format the kernel unpacks as initramfs.

    Each entry is a 110-byte ASCII header ("070701" + 13 eight-digit hex fields),
    the NUL-terminated name padded to 4 bytes, then the data padded to 4 bytes;
    a "TRAILER!!!" entry ends the archive.  Owners are root and mtimes zero so
    the same inputs always give the same bytes.  Device nodes are just header
    fields here, which is why no root privileges are needed to create them.
    """

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._inode = 0
        self._dirs: set[str] = set()

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        self._inode += 1
        encoded = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        # ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        fields = [self._inode, mode, 0, 0, nlink, 0, len(data), 0, 0, *rdev, len(encoded), 0]
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        self._chunks.append(header + encoded)
        self._chunks.append(b"\0" * (-(len(header) + len(encoded)) % 4))
        self._chunks.append(data)
        self._chunks.append(b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        """Add ``name`` and any missing parents (parents must come first)."""
        parts = name.strip("/").split("/")
        for depth in range(1, len(parts) + 1):
            path = "/".join(parts[:depth])
            if path not in self._dirs:
                self._dirs.add(path)
                self._entry(path, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = name.strip("/")
        if "/" in name:
            self.directory(name.rsplit("/", 1)[0])
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        name = name.strip("/")
        if "/" in name:
            self.directory(name.rsplit("/", 1)[0])
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        name = name.strip("/")
        if "/" in name:
            self.directory(name.rsplit("/", 1)[0])
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self._chunks)


def _init_script(modules: Sequence[_Module]) -> str:
    replacements = {
        "@MODULES@": " ".join(module.name for module in modules),
        "@HOSTNAME@": GUEST_HOSTNAME,
        "@AGENT_PORT@": AGENT_PORT_NAME,
        "@CIDATA_FILES@": " ".join(CIDATA_FILES),
        "@PROMPT@": SHELL_PROMPT,
    }
    script = _INIT_SCRIPT
    for word, value in replacements.items():
        script = script.replace(word, value)
    return script


@dataclass(frozen=True)
class _ElfInfo:
    """What the dynamic loader needs to know about an ELF file."""

    interpreter: str | None
    """``PT_INTERP``, e.g. ``/lib64/ld-linux-x86-64.so.2``."""
    needed: tuple[str, ...]
    """``DT_NEEDED`` sonames, in order."""


def _elf_info(image: bytes, origin: Path | str) -> _ElfInfo:
    """Read ``PT_INTERP`` and ``DT_NEEDED`` from a 64-bit little-endian ELF.

    Uses the program headers only (as the loader does), so stripped files are
    fine: ``PT_DYNAMIC`` gives the dynamic entries, whose ``DT_STRTAB`` is a
    virtual address that the ``PT_LOAD`` segments map back to a file offset.
    """
    if image[:4] != b"\x7fELF" or image[4] != 2 or image[5] != 1:
        raise GuestBuildError(f"{origin}: not a 64-bit little-endian ELF file")
    (phoff,) = struct.unpack_from("<Q", image, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", image, 0x36)
    interpreter = None
    dynamic: tuple[int, int] | None = None
    loads: list[tuple[int, int, int]] = []  # (vaddr, offset, filesz)
    for index in range(phnum):
        p_type, _flags, offset, vaddr, _paddr, filesz, _memsz, _align = struct.unpack_from(
            "<IIQQQQQQ", image, phoff + index * phentsize
        )
        if p_type == 1:  # PT_LOAD
            loads.append((vaddr, offset, filesz))
        elif p_type == 2:  # PT_DYNAMIC
            dynamic = (offset, filesz)
        elif p_type == 3:  # PT_INTERP
            interpreter = image[offset : offset + filesz].rstrip(b"\0").decode()
    if dynamic is None:
        return _ElfInfo(interpreter, ())
    needed_offsets: list[int] = []
    strtab = None
    offset, size = dynamic
    for position in range(offset, offset + size, 16):
        tag, value = struct.unpack_from("<qQ", image, position)
        if tag == 0:  # DT_NULL
            break
        if tag == 1:  # DT_NEEDED
            needed_offsets.append(value)
        elif tag == 5:  # DT_STRTAB
            strtab = value
    if not needed_offsets:
        return _ElfInfo(interpreter, ())
    if strtab is None:
        raise GuestBuildError(f"{origin}: DT_NEEDED without DT_STRTAB")
    for vaddr, file_offset, filesz in loads:
        if vaddr <= strtab < vaddr + filesz:
            strtab_offset = strtab - vaddr + file_offset
            break
    else:
        raise GuestBuildError(f"{origin}: DT_STRTAB {strtab:#x} is in no PT_LOAD segment")
    needed = tuple(
        image[strtab_offset + name : image.index(b"\0", strtab_offset + name)].decode()
        for name in needed_offsets
    )
    return _ElfInfo(interpreter, needed)


#: Directories of an extracted library package that may hold shared libraries.
_LIBRARY_DIRS = (
    "lib/x86_64-linux-gnu",
    "usr/lib/x86_64-linux-gnu",
    "lib64",
    "lib",
    "usr/lib",
)


def _resolve_in(root: Path, path: Path) -> Path | None:
    """Follow ``path``'s symlinks inside the extracted tree ``root`` (an absolute
    target means ``root``/target, never the host's file); None if it leads to
    no regular file inside ``root``."""
    for _hop in range(40):
        if not path.is_symlink():
            return path if path.is_file() else None
        target = os.readlink(path)
        joined = root / target.lstrip("/") if target.startswith("/") else path.parent / target
        path = Path(os.path.normpath(joined))
        if not path.is_relative_to(root):
            return None
    return None


def _agent_files(
    roots: Mapping[str, Path],
) -> tuple[dict[str, bytes], dict[str, str], dict[str, str]]:
    """Collect ``qemu-ga`` and everything its loader will need, for the initramfs.

    ``roots`` maps each package of the agent's dependency closure to its
    extracted tree.  Returns (initramfs path -> bytes, symlinks as path ->
    target, soname -> package it came from).  Every ``DT_NEEDED`` is followed
    recursively; a soname that no package ships is an error, not a guest that
    fails at boot.  Libraries are copied as plain files named by their soname
    into the multiarch directory, which the loader searches by default.
    """
    agent_root = roots[AGENT_PACKAGE]
    binary = agent_root / _AGENT_PATH
    if not binary.is_file():
        raise GuestBuildError(f"{AGENT_PACKAGE} has no /{_AGENT_PATH}")
    available: dict[str, tuple[str, Path]] = {}
    for package, root in roots.items():
        for directory in _LIBRARY_DIRS:
            base = root / directory
            if not base.is_dir() or base.is_symlink():
                continue
            for path in sorted(base.iterdir()):
                if ".so" not in path.name or path.name in available:
                    continue
                real = _resolve_in(root, path)
                if real is not None:
                    available[path.name] = (package, real)

    data = binary.read_bytes()
    info = _elf_info(data, binary)
    if info.interpreter is None:
        raise GuestBuildError(f"{binary}: no PT_INTERP")
    files: dict[str, bytes] = {_AGENT_PATH: data}
    symlinks: dict[str, str] = {}
    origins: dict[str, str] = {}
    loader = Path(info.interpreter).name
    if loader not in available:
        raise GuestBuildError(f"the loader {info.interpreter} is in no package of the agent")
    pending = [loader, *info.needed]
    while pending:
        soname = pending.pop(0)
        if soname in origins:
            continue
        if soname not in available:
            raise GuestBuildError(
                f"{soname}, needed by the guest agent, is in none of {', '.join(sorted(roots))}"
            )
        package, path = available[soname]
        library = path.read_bytes()
        files[f"{_LIB_DIR}/{soname}"] = library
        origins[soname] = package
        pending += _elf_info(library, path).needed
    target = f"/{_LIB_DIR}/{loader}"
    if info.interpreter != target:
        symlinks[info.interpreter.lstrip("/")] = target
    return files, symlinks, origins


def _build_initramfs(
    busybox: Path,
    modules: Sequence[_Module],
    extra_files: Mapping[str, bytes],
    extra_symlinks: Mapping[str, str],
) -> bytes:
    """Assemble the initramfs and return it gzip-compressed (deterministically)."""
    cpio = _Cpio()
    for directory in (
        "bin",
        "dev",
        "etc/acpi/PWRF",
        "lib/modules",
        "mnt",
        "proc",
        "root",
        "run",
        "sbin",
        "sys",
        "tmp",
        "usr/sbin",
        "var",
    ):
        cpio.directory(directory)
    cpio.symlink("var/run", "/run")
    # The kernel opens /dev/console for PID 1's stdio before /init can mount
    # devtmpfs, so provide the node in the archive itself.
    cpio.char_device("dev/console", 5, 1)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in APPLETS:
        cpio.symlink(f"bin/{applet}", "busybox")
    cpio.symlink("sbin/hwclock", "/bin/busybox")  # qemu-ga's guest-set-time runs /sbin/hwclock
    for module in modules:
        cpio.file(f"lib/modules/{module.name}.ko", _read_module(module.path))
    for name, data in sorted(extra_files.items()):
        cpio.file(name, data, 0o755 if name == _AGENT_PATH or "/ld-linux" in name else 0o644)
    for name, target in sorted(extra_symlinks.items()):
        cpio.symlink(name, target)
    cpio.file("etc/acpi/PWRF/00000080", _POWER_BUTTON_SCRIPT.encode(), 0o755)
    cpio.file("sbin/shutdown", _SHUTDOWN_SCRIPT.encode(), 0o755)
    cpio.file("etc/udhcpc.script", _UDHCPC_SCRIPT.encode(), 0o755)
    cpio.file("etc/os-release", _OS_RELEASE.encode())
    cpio.file("etc/hostname", f"{GUEST_HOSTNAME}\n".encode())
    cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    cpio.file("etc/group", b"root:x:0:\n")
    cpio.file("init", _init_script(modules).encode(), 0o755)
    return gzip.compress(cpio.finish(), compresslevel=9, mtime=0)


_SECTOR = 512
_MIB = 1024 * 1024
#: The EFI system partition starts at 1 MiB; 1 MiB is left free at the end too
#: (the backup GPT needs 33 sectors).
_ESP_START = _MIB
#: mkfs.fat makes FAT32 with 512-byte clusters only from 65525 clusters up.
_ESP_MIN_SIZE = 40 * _MIB
_ESP_TYPE = uuid.UUID("C12A7328-F81F-11D2-BA4B-00A0C93EC93B")
_GUID_NAMESPACE = uuid.UUID("9b3c4a1e-5d0f-4f5e-8a51-0c7ad1f7e2a1")


def _tool_env() -> dict[str, str]:
    # Fixed timestamps (mtools honours SOURCE_DATE_EPOCH), and no mtools
    # geometry check on an image file that has no real geometry.
    return dict(os.environ, LC_ALL="C", SOURCE_DATE_EPOCH="1262304000", MTOOLS_SKIP_CHECK="1")


def _run_tool(cmd: Sequence[str], package: str) -> None:
    """Run a host tool from Debian's ``package`` (looked up in /usr/sbin too)."""
    path = os.environ.get("PATH", os.defpath) + os.pathsep + "/usr/sbin:/sbin"
    tool = shutil.which(cmd[0], path=path)
    if tool is None:
        raise GuestBuildError(
            f"{cmd[0]} not found: install Debian's {package} package "
            "(scripts/install-host-deps.sh does)"
        )
    proc = subprocess.run(
        [tool, *cmd[1:]], env=_tool_env(), capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise GuestBuildError(
            f"`{shlex.join(cmd)}` failed with exit code {proc.returncode}:\n"
            f"{(proc.stderr or proc.stdout).strip()}"
        )


def _build_esp(files: Mapping[str, Path | bytes], image: Path, volume_id: int) -> None:
    """Make a FAT32 file system image holding ``files`` (path on the ESP -> content).

    ``mkfs.fat -C`` creates the image file and ``mcopy -i`` writes into it, so
    nothing is mounted and no root is needed.  Names keep their case (mtools
    writes VFAT long names where needed).  A fixed volume id, ``--invariant``
    and ``SOURCE_DATE_EPOCH`` (for mtools) make the same files give the same
    image bytes.
    """
    stage = image.with_name(image.name + ".d")
    total = 0
    for name, content in files.items():
        path = stage / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, path)
        else:
            path.write_bytes(content)
        total += path.stat().st_size
    size = max(_ESP_MIN_SIZE, -(-(total + total // 10 + 4 * _MIB) // _MIB) * _MIB)
    _run_tool(
        [
            "mkfs.fat",
            "-C",
            "--invariant",  # no time-based values (the label's timestamp)
            "-F",
            "32",
            "-S",
            str(_SECTOR),
            "-s",
            "1",
            "-n",
            "QVIRTD-ESP",
            "-i",
            f"{volume_id:08X}",
            str(image),
            str(size // 1024),
        ],
        "dosfstools",
    )
    tops = sorted(stage.iterdir())
    _run_tool(["mcopy", "-s", "-Q", "-i", str(image), *map(str, tops), "::/"], "mtools")
    shutil.rmtree(stage)


def _gpt_header(
    disk_guid: uuid.UUID,
    my_lba: int,
    alternate_lba: int,
    entries_lba: int,
    last_lba: int,
    entries_crc: int,
) -> bytes:
    """One GPT header (92 bytes, padded to a sector), with its CRC32 filled in."""
    fields = [
        b"EFI PART",
        0x00010000,  # revision 1.0
        92,  # header size
        0,  # header CRC32, computed below
        0,  # reserved
        my_lba,
        alternate_lba,
        34,  # first usable LBA
        last_lba - 33,  # last usable LBA
        disk_guid.bytes_le,
        entries_lba,
        128,  # number of partition entries
        128,  # size of one entry
        entries_crc,
    ]
    layout = "<8sIIIIQQQQ16sQIII"
    header = struct.pack(layout, *fields)
    fields[3] = zlib.crc32(header)
    return struct.pack(layout, *fields).ljust(_SECTOR, b"\0")


def _write_gpt_disk(esp: Path, disk: Path, name: str) -> dict[str, str]:
    """Write a raw disk image: GPT, one EFI system partition holding ``esp``.

    Pure Python, deterministic (the GUIDs derive from ``name``) and sparse
    where the ESP is empty.  Layout: protective MBR, primary GPT (LBA 1-33),
    the ESP from 1 MiB, 1 MiB free, backup GPT in the last 33 sectors.
    """
    esp_size = esp.stat().st_size
    if esp_size % _MIB:
        raise GuestBuildError(f"{esp}: size {esp_size} is not a whole number of MiB")
    total = (_ESP_START + esp_size + _MIB) // _SECTOR
    last_lba = total - 1
    disk_guid = uuid.uuid5(_GUID_NAMESPACE, f"{name} disk")
    part_guid = uuid.uuid5(_GUID_NAMESPACE, f"{name} esp")
    first = _ESP_START // _SECTOR
    entry = struct.pack(
        "<16s16sQQQ72s",
        _ESP_TYPE.bytes_le,
        part_guid.bytes_le,
        first,
        first + esp_size // _SECTOR - 1,
        0,  # attributes
        "EFI system partition".encode("utf-16-le"),
    )
    entries = entry.ljust(128 * 128, b"\0")
    entries_crc = zlib.crc32(entries)
    # Protective MBR: one partition of type 0xEE covering the disk.
    mbr = bytearray(_SECTOR)
    mbr[446:462] = struct.pack(
        "<B3sB3sII", 0, b"\x00\x02\x00", 0xEE, b"\xff\xff\xff", 1, min(total - 1, 0xFFFFFFFF)
    )
    mbr[510:512] = b"\x55\xaa"
    primary = _gpt_header(disk_guid, 1, last_lba, 2, last_lba, entries_crc)
    backup = _gpt_header(disk_guid, last_lba, 1, last_lba - 32, last_lba, entries_crc)
    with open(disk, "wb") as out:
        out.write(bytes(mbr) + primary + entries)
        out.seek(_ESP_START)
        with open(esp, "rb") as source:
            while chunk := source.read(_MIB):
                if chunk.count(0) == len(chunk):
                    out.seek(len(chunk), os.SEEK_CUR)  # keep the image sparse
                else:
                    out.write(chunk)
        out.seek((last_lba - 32) * _SECTOR)
        out.write(entries + backup)
    return {"disk_guid": str(disk_guid), "esp_guid": str(part_guid), "sectors": str(total)}


def _uefi_disk_files(
    systemd_boot: Path, kernel: Path, initrd: Path
) -> dict[str, Path | bytes]:
    return {
        "EFI/BOOT/BOOTX64.EFI": systemd_boot,
        "loader/loader.conf": _LOADER_CONF.encode(),
        "loader/entries/qvirtd.conf": _LOADER_ENTRY.replace("@CMDLINE@", DEFAULT_CMDLINE).encode(),
        "vmlinuz": kernel,
        "initrd.img": initrd,
    }


def _secure_boot_disk_files(
    shim: Path, grub: Path, kernel: Path, initrd: Path
) -> dict[str, Path | bytes]:
    # No fbx64.efi next to shim: with it, shim would run the fallback, which
    # writes boot entries and resets.  No mmx64.efi: nothing asks for MokManager.
    return {
        "EFI/BOOT/BOOTX64.EFI": shim,
        "EFI/BOOT/grubx64.efi": grub,
        "EFI/debian/grub.cfg": _GRUB_CFG.replace("@CMDLINE@", DEFAULT_CMDLINE).encode(),
        "vmlinuz": kernel,
        "initrd.img": initrd,
    }


def _make_disk(
    files: Mapping[str, Path | bytes], work: Path, disk: Path, name: str, volume_id: int
) -> dict[str, object]:
    esp = work / f"{name}.esp"
    _build_esp(files, esp, volume_id)
    info: dict[str, object] = dict(_write_gpt_disk(esp, disk, name))
    esp.unlink()
    info["esp_files"] = sorted(files)
    return info


def _one_file(root: Path, pattern: str, package: str) -> Path:
    found = sorted(root.glob(pattern))
    if len(found) != 1:
        raise GuestBuildError(f"expected one {pattern} in {package}, found {found}")
    return found[0]


def _build(apt: _Apt, pkgs: _Packages, work: Path, out: Path) -> None:
    """Download, extract and assemble everything into ``out`` (stamp last)."""
    packages = [
        (pkgs.kernel_package, pkgs.kernel_version),
        (BUSYBOX_PACKAGE, pkgs.busybox_version),
        *pkgs.others(),
    ]
    _log("downloading " + " ".join(f"{name}={version}" for name, version in packages))
    debs = _download(apt, packages, work / "debs")
    roots = {name: _extract(deb, work / "x" / name) for name, deb in debs.items()}
    kernel_root = roots[pkgs.kernel_package]
    busybox_root = roots[BUSYBOX_PACKAGE]

    vmlinuz = _one_file(kernel_root, "boot/vmlinuz-*", pkgs.kernel_package)
    busybox = busybox_root / "bin" / "busybox"
    if not busybox.is_file():
        raise GuestBuildError(f"{debs[BUSYBOX_PACKAGE].name} has no /bin/busybox")
    module_dir = _find_module_dir(kernel_root)
    modules, skipped = _select_modules(module_dir)
    agent_files, agent_links, agent_libs = _agent_files(
        {name: roots[name] for name, _version in pkgs.agent}
    )

    out.mkdir()
    kernel = out / _KERNEL_NAME
    initrd = out / _INITRD_NAME
    shutil.copyfile(vmlinuz, kernel)
    initrd.write_bytes(_build_initramfs(busybox, modules, agent_files, agent_links))

    systemd_boot = _one_file(
        roots[SYSTEMD_BOOT_PACKAGE], "usr/lib/systemd/boot/efi/systemd-bootx64.efi",
        SYSTEMD_BOOT_PACKAGE,
    )
    disks = {
        "uefi_disk": _make_disk(
            _uefi_disk_files(systemd_boot, kernel, initrd),
            work, out / _UEFI_DISK_NAME, "uefi", 0x51E1D000,
        )
    }
    if pkgs.secure_boot:
        shim = _one_file(roots[SHIM_PACKAGE], "usr/lib/shim/shimx64.efi.signed", SHIM_PACKAGE)
        grub = _one_file(
            roots[GRUB_SIGNED_PACKAGE], "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed",
            GRUB_SIGNED_PACKAGE,
        )
        disks["secure_boot_disk"] = _make_disk(
            _secure_boot_disk_files(shim, grub, kernel, initrd),
            work, out / _SECURE_BOOT_DISK_NAME, "secure-boot", 0x51E1D5B0,
        )

    manifest = {
        "kernel_package": pkgs.kernel_package,
        "kernel_version": pkgs.kernel_version,
        "kernel_release": module_dir.name,
        "busybox_version": pkgs.busybox_version,
        "packages": dict(packages),
        "builder": _builder_digest(),
        "cmdline": DEFAULT_CMDLINE,
        "modules": [module.name for module in modules],
        "skipped_modules": skipped,
        "agent_libraries": agent_libs,
        "disks": disks,
        "download_bytes": sum(deb.stat().st_size for deb in debs.values()),
    }
    (out / _MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    for path in out.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    (out / _STAMP).write_text(_cache_key(pkgs) + "\n")
    _log(f"modules: {' '.join(module.name for module in modules)}")
    if skipped:
        _log("skipped: " + ", ".join(f"{name} ({why})" for name, why in skipped.items()))
    _log(f"agent libraries: {' '.join(agent_libs)}")
    if not pkgs.secure_boot:
        _log(f"no secure_boot_disk: {SHIM_PACKAGE} or {GRUB_SIGNED_PACKAGE} is not in the archive")


def _newest_complete(cache_dir: Path) -> Path | None:
    """Most recent usable entry built by this very builder (offline fallback)."""
    suffix = f"+g{_builder_digest()}"
    entries = [
        entry for entry in cache_dir.glob(f"*{suffix}") if entry.is_dir() and _is_complete(entry)
    ]
    return max(entries, key=lambda entry: (entry / _STAMP).stat().st_mtime, default=None)


def ensure_guest(cache_dir: Path | None = None) -> GuestImage:
    """Return the cached test guest, building it first if needed.

    ``cache_dir`` defaults to :func:`default_cache_dir`.  When the current
    package versions cannot be resolved (no network, no package lists) but a
    guest built by this same builder is cached, that one is used instead so
    offline test runs keep working.  Raises :class:`GuestBuildError`.
    """
    cache_dir = (cache_dir if cache_dir is not None else default_cache_dir()).expanduser()
    cache_dir = cache_dir.absolute()
    cache_dir.mkdir(parents=True, exist_ok=True)
    apt = _Apt()
    try:
        pkgs = _resolve_packages(apt)
    except GuestBuildError as exc:
        fallback = _newest_complete(cache_dir)
        if fallback is None:
            raise
        _log(f"cannot resolve package versions, using cached {fallback.name}: {exc}")
        return _image(fallback)

    entry = cache_dir / _cache_key(pkgs)
    if _is_complete(entry):
        return _image(entry)

    with _locked(cache_dir):
        if _is_complete(entry):  # another process built it while we waited
            return _image(entry)
        # Holding the lock, any leftover build directory belongs to a dead builder.
        for stale in cache_dir.glob(_BUILD_PREFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)
        if entry.exists():  # not complete: never produced by us, do not trust it
            shutil.rmtree(entry)
        work = Path(tempfile.mkdtemp(prefix=_BUILD_PREFIX, dir=cache_dir))
        try:
            _build(apt, pkgs, work, work / "out")
            os.rename(work / "out", entry)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    _log(f"built {entry}")
    return _image(entry)


def _image_json(image: GuestImage) -> dict[str, str | None]:
    return {
        "kernel": str(image.kernel),
        "initrd": str(image.initrd),
        "cmdline": image.cmdline,
        "uefi_disk": str(image.uefi_disk),
        "secure_boot_disk": None if image.secure_boot_disk is None else str(image.secure_boot_disk),
        "manifest": str(image.manifest),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: build if needed and print the :class:`GuestImage` paths as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        metavar="DIR",
        help="cache directory (default: $QVIRTD_GUEST_CACHE or ~/.cache/qvirtd/test-guest)",
    )
    args = parser.parse_args(argv)
    try:
        image = ensure_guest(args.cache)
    except GuestBuildError as exc:
        print(f"build_guest: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(_image_json(image)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
