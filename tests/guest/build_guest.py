#!/usr/bin/env python3
"""Build (once) and cache a tiny, real Linux guest for qvirtd's integration tests.

Why this exists: qvirtd's tests must drive a *real* guest (ACPI power button,
PCI hot-plug, block and NIC discovery) to prove that the daemon's QMP logic
works end to end, but they must not depend on a downloaded cloud image, on
root-only tools (losetup, mknod, debootstrap) or on anything outside Debian's
own archive.  So the guest is assembled here from two Debian packages:

* ``linux-image-cloud-amd64`` -- resolved to the real ``linux-image-<ver>``
  package it depends on; we only take ``vmlinuz`` and a handful of modules
  (virtio, SCSI/ATA, ACPI button, evdev ...).  Nothing is installed on the host.
* ``busybox-static`` -- one static binary that provides ``sh``, ``insmod``,
  ``acpid``, ``poweroff`` and everything else the guest's ``/init`` needs.

The initramfs (a gzip'd ``newc`` cpio archive) is written in pure Python, so
building needs no root privileges and no ``cpio`` binary; device nodes are
provided at boot by ``devtmpfs``.

The guest prints machine-readable lines on its serial console
(``console=ttyS0``), all starting with ``QVIRTD-GUEST: `` -- see
``tests/guest/README.md`` and the constants below for the exact formats.

Results are cached (default ``~/.cache/qvirtd/test-guest``, overridable with
``$QVIRTD_GUEST_CACHE`` or ``--cache``) in one sub-directory per
(kernel package version, busybox version, builder revision) key, built in a
temporary directory and renamed into place, with a stamp file written last,
so an interrupted build is never mistaken for a usable one.

Usage::

    python tests/guest/build_guest.py [--cache DIR]   # prints JSON paths

    from build_guest import ensure_guest
    image = ensure_guest()    # GuestImage(kernel=..., initrd=..., cmdline=...)
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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "BLOCK_SIZE_UNIT",
    "DEFAULT_CMDLINE",
    "LINE_PREFIX",
    "POWER_BUTTON_LINE",
    "READY_LINE",
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

#: Kernel command line the guest is built for: serial console on ttyS0 (where
#: every ``QVIRTD-GUEST:`` line appears), ``quiet`` so kernel chatter does not
#: drown those lines (errors are still printed), and ``panic=-1`` so a kernel
#: panic reboots immediately instead of hanging a test until its timeout.
DEFAULT_CMDLINE = "console=ttyS0 quiet panic=-1"

#: Every machine-readable console line starts with this prefix.
LINE_PREFIX = "QVIRTD-GUEST: "
#: Printed once all modules are loaded, ``acpid`` has opened the input devices
#: (so the power button works from now on) and the initial block/net devices
#: have been reported.
READY_LINE = LINE_PREFIX + "ready"
#: Printed by the ACPI power-button handler right before ``poweroff -f``.
POWER_BUTTON_LINE = LINE_PREFIX + "power button"
#: Unit of the size in ``block add``/``block change`` lines: 512-byte sectors,
#: exactly as the kernel exposes it in ``/sys/block/<dev>/size``.
BLOCK_SIZE_UNIT = 512

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
    "virtio_console",
    "failover",
    "net_failover",
    "libata",
    "libahci",
    "ahci",
    "ata_piix",  # IDE/SATA of the i440fx "pc" machine (the cloud kernel lacks ahci)
    "cdrom",
    "sr_mod",
    "sd_mod",
    "pvpanic",
    "pvpanic_pci",
)

#: Busybox applets linked into /bin.  /init and the ACPI handler only use
#: these, and having them as real symlinks keeps boot fast and deterministic
#: (no ``busybox --install`` at boot).
APPLETS: tuple[str, ...] = (
    "[",
    "acpid",
    "ash",
    "cat",
    "dmesg",
    "echo",
    "halt",
    "insmod",
    "ip",
    "kill",
    "ls",
    "lsmod",
    "mkdir",
    "mount",
    "poweroff",
    "printf",
    "ps",
    "reboot",
    "rmmod",
    "run-parts",
    "sh",
    "sleep",
    "sync",
    "test",
    "umount",
    "uname",
)

_STAMP = "complete"
_KERNEL_NAME = "vmlinuz"
_INITRD_NAME = "initrd.img"
_MANIFEST_NAME = "manifest.json"
_BUILD_PREFIX = ".build-"

# /init.  Plain busybox sh; "@MODULES@" is replaced by the module load order.
# Kept deliberately free of command substitutions in the polling loop so each
# 0.5 s tick forks only `sleep` (cheap even under TCG).
_INIT_SCRIPT = r"""#!/bin/sh
# /init of the qvirtd test guest, generated by tests/guest/build_guest.py.
# PID 1: it must never exit, or the kernel panics.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# Re-open the console from devtmpfs in case the kernel could not give us one.
exec </dev/console >/dev/console 2>&1
# Firmware leaves terminal escapes without a newline; start our lines clean.
echo

say() { echo "QVIRTD-GUEST: $*"; }

for m in @MODULES@; do
    insmod "/lib/modules/$m.ko" || say "module failed $m"
done

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

blk_old=
net_old=
scan_block; report block "$blk_old" "$blk_new"; blk_old=$blk_new
scan_net; report net "$net_old" "$net_new"; net_old=$net_new

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
    done
) &

while :; do
    sleep 3600
done
"""

# Run by acpid (cwd /etc/acpi, stdout/stderr = acpid's log, i.e. /dev/null),
# hence the explicit /dev/console.  `poweroff -f` skips init and calls
# reboot(RB_POWER_OFF) directly, which QEMU reports as a guest SHUTDOWN.
_POWER_BUTTON_SCRIPT = """#!/bin/sh
echo "QVIRTD-GUEST: power button" >/dev/console
exec poweroff -f
"""


class GuestBuildError(RuntimeError):
    """Building the test guest failed; the message says which step and why."""


@dataclass(frozen=True)
class GuestImage:
    """A ready-to-boot test guest: pass to QEMU as ``-kernel``/``-initrd``/``-append``."""

    kernel: Path
    """Debian cloud kernel (bzImage), for ``-kernel``."""
    initrd: Path
    """gzip'd newc initramfs with busybox, modules and /init, for ``-initrd``."""
    cmdline: str = DEFAULT_CMDLINE
    """Kernel command line for ``-append``: ``console=ttyS0 quiet panic=-1``
    (serial console on ttyS0, kernel messages below error level hidden,
    reboot at once on panic).  Extra options may be appended."""


@dataclass(frozen=True)
class _Packages:
    """The exact package versions a build uses; they form the cache key."""

    kernel_package: str
    kernel_version: str
    busybox_version: str


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


def _show(apt: _Apt, package: str) -> dict[str, str]:
    """Return the candidate version's control record of ``package``."""
    records = _parse_control(apt.run(["apt-cache", "show", "--no-all-versions", package]))
    for record in records:
        if record.get("Package") == package:
            return record
    raise GuestBuildError(f"apt-cache show {package}: no record for the candidate version")


_DEP_RE = re.compile(r"^(?P<name>[a-z0-9][a-z0-9+.-]*)(?:\s*\(\s*=\s*(?P<version>[^)\s]+)\s*\))?")


def _resolve_packages(apt: _Apt) -> _Packages:
    """Turn the kernel meta package into the real image package and pin versions.

    The meta package only carries ``Depends: linux-image-<abi>-cloud-amd64 (= ver)``;
    using that exact name and version as the cache key means a new kernel in
    the archive produces a new guest, while an unchanged archive reuses it.
    """
    meta = _show(apt, KERNEL_META_PACKAGE)
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
    busybox_version = _show(apt, BUSYBOX_PACKAGE)["Version"]
    return _Packages(name, version, busybox_version)


def _builder_digest() -> str:
    """Hash of this file: any change to the guest's recipe invalidates the cache."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def _cache_key(pkgs: _Packages) -> str:
    """Directory name for one build; only filename-safe characters."""
    raw = (
        f"{pkgs.kernel_package}_{pkgs.kernel_version}"
        f"+busybox_{pkgs.busybox_version}+g{_builder_digest()}"
    )
    return re.sub(r"[^A-Za-z0-9._+-]", "_", raw)


def _is_complete(entry: Path) -> bool:
    """A cache entry is usable only if its stamp (written last) exists."""
    return (
        (entry / _STAMP).is_file()
        and (entry / _KERNEL_NAME).is_file()
        and (entry / _INITRD_NAME).is_file()
    )


def _image(entry: Path) -> GuestImage:
    return GuestImage(kernel=entry / _KERNEL_NAME, initrd=entry / _INITRD_NAME)


@contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    """Serialize builders (e.g. pytest-xdist workers) so we download only once."""
    with open(cache_dir / ".lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _download(apt: _Apt, package: str, version: str, dest: Path) -> Path:
    """``apt-get download`` one exact package version into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    apt.run(["apt-get", "download", f"{package}={version}"], cwd=dest)
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if len(debs) != 1:
        raise GuestBuildError(f"expected one {package} .deb in {dest}, found {debs}")
    got = _run(["dpkg-deb", "-f", str(debs[0]), "Version"]).strip()
    if got != version:
        raise GuestBuildError(f"{debs[0].name}: version {got}, expected {version}")
    return debs[0]


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
    return _INIT_SCRIPT.replace("@MODULES@", " ".join(module.name for module in modules))


def _build_initramfs(busybox: Path, modules: Sequence[_Module]) -> bytes:
    """Assemble the initramfs and return it gzip-compressed (deterministically)."""
    cpio = _Cpio()
    for directory in ("bin", "dev", "etc/acpi/PWRF", "lib/modules", "proc", "run", "sys", "tmp"):
        cpio.directory(directory)
    # The kernel opens /dev/console for PID 1's stdio before /init can mount
    # devtmpfs, so provide the node in the archive itself.
    cpio.char_device("dev/console", 5, 1)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in APPLETS:
        cpio.symlink(f"bin/{applet}", "busybox")
    for module in modules:
        cpio.file(f"lib/modules/{module.name}.ko", _read_module(module.path))
    cpio.file("etc/acpi/PWRF/00000080", _POWER_BUTTON_SCRIPT.encode(), 0o755)
    cpio.file("init", _init_script(modules).encode(), 0o755)
    return gzip.compress(cpio.finish(), compresslevel=9, mtime=0)


def _build(apt: _Apt, pkgs: _Packages, work: Path, out: Path) -> None:
    """Download, extract and assemble everything into ``out`` (stamp last)."""
    _log(
        f"downloading {pkgs.kernel_package}={pkgs.kernel_version} and "
        f"{BUSYBOX_PACKAGE}={pkgs.busybox_version}"
    )
    kernel_deb = _download(apt, pkgs.kernel_package, pkgs.kernel_version, work / "debs")
    busybox_deb = _download(apt, BUSYBOX_PACKAGE, pkgs.busybox_version, work / "debs")
    kernel_root = _extract(kernel_deb, work / "kernel")
    busybox_root = _extract(busybox_deb, work / "busybox")

    vmlinuz = sorted((kernel_root / "boot").glob("vmlinuz-*"))
    if len(vmlinuz) != 1:
        raise GuestBuildError(f"expected one vmlinuz in {kernel_deb.name}, found {vmlinuz}")
    busybox = busybox_root / "bin" / "busybox"
    if not busybox.is_file():
        raise GuestBuildError(f"{busybox_deb.name} has no /bin/busybox")
    module_dir = _find_module_dir(kernel_root)
    modules, skipped = _select_modules(module_dir)

    out.mkdir()
    shutil.copyfile(vmlinuz[0], out / _KERNEL_NAME)
    (out / _INITRD_NAME).write_bytes(_build_initramfs(busybox, modules))
    manifest = {
        "kernel_package": pkgs.kernel_package,
        "kernel_version": pkgs.kernel_version,
        "kernel_release": module_dir.name,
        "busybox_version": pkgs.busybox_version,
        "builder": _builder_digest(),
        "cmdline": DEFAULT_CMDLINE,
        "modules": [module.name for module in modules],
        "skipped_modules": skipped,
    }
    (out / _MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    for name in (_KERNEL_NAME, _INITRD_NAME, _MANIFEST_NAME):
        with open(out / name, "rb") as handle:
            os.fsync(handle.fileno())
    (out / _STAMP).write_text(_cache_key(pkgs) + "\n")
    _log(f"modules: {' '.join(module.name for module in modules)}")
    if skipped:
        _log("skipped: " + ", ".join(f"{name} ({why})" for name, why in skipped.items()))


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


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: build if needed and print ``{"kernel", "initrd", "cmdline"}`` as JSON."""
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
    print(
        json.dumps(
            {"kernel": str(image.kernel), "initrd": str(image.initrd), "cmdline": image.cmdline}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
