"""The test guest itself, under plain QEMU (no daemon): what the built image holds, and quick
boots that check its features (serial shell, screen, guest agent, cidata, UEFI disks).

Each boot is a TCG guest of a few seconds; every QEMU started here is killed by pid.
"""

from __future__ import annotations

import base64
import gzip
import json
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import build_guest as bg
import pytest
from build_guest import GuestImage

OVMF_FILES = (bg.OVMF_CODE, bg.OVMF_VARS)


def read_cpio(data: bytes) -> dict[str, tuple[int, bytes]]:
    """newc archive -> {name: (mode, data)}."""
    entries: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        name_start = pos + 110
        name = data[name_start : name_start + namesize - 1].decode()
        data_start = name_start + namesize + (-(110 + namesize) % 4)
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, data[data_start : data_start + filesize])
        pos = data_start + filesize + (-filesize % 4)


def esp_file(disk: Path, name: str) -> bytes:
    """Read one file of a disk's EFI system partition (at 1 MiB) with mtools."""
    res = subprocess.run(["mtype", "-i", f"{disk}@@1M", f"::/{name}"], capture_output=True,
                         check=True, env={"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"})
    return res.stdout


def test_image_holds_the_agent_and_its_libraries(guest: GuestImage) -> None:
    files = read_cpio(gzip.decompress(guest.initrd.read_bytes()))
    for name in ("init", "bin/busybox", "bin/cttyhack", "bin/setsid", "bin/udhcpc",
                 "bin/base64", "sbin/shutdown", "etc/udhcpc.script", "etc/os-release",
                 "lib/modules/isofs.ko", "lib/modules/virtio_console.ko", bg._AGENT_PATH):
        assert name in files, name
    agent = bg._elf_info(files[bg._AGENT_PATH][1], "qemu-ga")
    assert agent.interpreter is not None
    mode, target = files[agent.interpreter.lstrip("/")]  # /lib64/ld-linux-x86-64.so.2
    assert mode & 0o170000 == 0o120000  # a symlink
    assert target.decode().lstrip("/") in files
    # Every DT_NEEDED of the agent and of each library it pulls in is in the archive.
    pending, seen = list(agent.needed), set()
    while pending:
        soname = pending.pop()
        if soname in seen:
            continue
        seen.add(soname)
        path = f"{bg._LIB_DIR}/{soname}"
        assert path in files, f"{soname} missing from the initramfs"
        pending += bg._elf_info(files[path][1], soname).needed
    assert {"libc.so.6", "libglib-2.0.so.0"} <= seen
    manifest = json.loads(guest.manifest.read_text())
    assert set(manifest["agent_libraries"]) >= seen
    assert manifest["packages"]["qemu-guest-agent"]
    assert manifest["cmdline"] == bg.DEFAULT_CMDLINE


@pytest.mark.skipif(shutil.which("mtype") is None, reason="no mtools")
def test_uefi_disks_hold_the_boot_chain(guest: GuestImage) -> None:
    entry = esp_file(guest.uefi_disk, "loader/entries/qvirtd.conf").decode()
    assert f"options {bg.DEFAULT_CMDLINE}\n" in entry
    assert esp_file(guest.uefi_disk, "EFI/BOOT/BOOTX64.EFI")[:2] == b"MZ"
    assert esp_file(guest.uefi_disk, "vmlinuz") == guest.kernel.read_bytes()
    assert esp_file(guest.uefi_disk, "initrd.img") == guest.initrd.read_bytes()
    if guest.secure_boot_disk is None:
        pytest.skip("no secure_boot_disk (the signed packages were not in the archive)")
    cfg = esp_file(guest.secure_boot_disk, "EFI/debian/grub.cfg").decode()
    assert f"linux /vmlinuz {bg.DEFAULT_CMDLINE}\n" in cfg
    for name in ("EFI/BOOT/BOOTX64.EFI", "EFI/BOOT/grubx64.efi"):
        assert esp_file(guest.secure_boot_disk, name)[:2] == b"MZ"


class Qemu:
    """One plain QEMU with its serial port on a socket we read (and type into) and QMP."""

    def __init__(self, tmp: Path, args: list[str]) -> None:
        self.dir = tmp
        serial, self.qmp_path = tmp / "serial.sock", tmp / "qmp.sock"
        self.proc = subprocess.Popen(
            ["qemu-system-x86_64", "-nodefaults", "-display", "none",
             "-chardev", f"socket,id=ser0,path={serial},server=on,wait=on",
             "-device", "isa-serial,chardev=ser0",
             "-qmp", f"unix:{self.qmp_path},server=on,wait=off", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not serial.exists():
            assert self.proc.poll() is None, self.proc.communicate()[0]
            assert time.monotonic() < deadline, "no serial socket"
            time.sleep(0.02)
        self.serial = socket.socket(socket.AF_UNIX)
        self.serial.connect(str(serial))
        self.output = b""
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                chunk = self.serial.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            with self.lock:
                self.output += chunk

    def text(self) -> str:
        with self.lock:
            return self.output.decode(errors="replace").replace("\r", "")

    def wait_for(self, needle: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while needle not in (text := self.text()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"no {needle!r} on the serial console:\n{text[-3000:]}")
            time.sleep(0.05)
        return text

    def line_value(self, prefix: str) -> str:
        """The rest of the first console line that starts with ``prefix``."""
        for line in self.text().splitlines():
            if line.startswith(prefix):
                return line[len(prefix) :]
        raise AssertionError(f"no line {prefix!r}")

    def type(self, keys: str) -> None:
        self.serial.sendall(keys.encode())

    def qmp(self, command: str, **arguments: object) -> object:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(self.qmp_path))
            stream = sock.makefile("rw")
            stream.readline()
            for request in ({"execute": "qmp_capabilities"},
                            {"execute": command, "arguments": arguments}):
                stream.write(json.dumps(request) + "\n")
                stream.flush()
                while "event" in (reply := json.loads(stream.readline())):
                    pass
            assert "return" in reply, reply
            return reply["return"]

    def wait_exit(self, timeout: float = 20) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.serial.close()


StartQemu = Callable[[list[str]], "Qemu"]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory for unix sockets: their paths must stay short, and tmp_path can be long."""
    path = Path(tempfile.mkdtemp(prefix="qvg-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def qemu_factory(short_dir: Path) -> Iterator[StartQemu]:
    started: list[Qemu] = []

    def start(args: list[str]) -> Qemu:
        vm_dir = short_dir / f"vm{len(started)}"
        vm_dir.mkdir()
        vm = Qemu(vm_dir, args)
        started.append(vm)
        return vm

    yield start
    for vm in started:
        vm.kill()


def qga(path: Path, *commands: dict[str, object], timeout: float = 15) -> list[object]:
    """Send guest agent commands (after a guest-sync-delimited) and return their results."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(path))
        sock.settimeout(timeout)
        stream = sock.makefile("rwb")
        stream.write(b'\xff{"execute":"guest-sync-delimited","arguments":{"id":90210}}\n')
        stream.flush()
        while b"90210" not in stream.readline():
            pass
        results = []
        for command in commands:
            stream.write(json.dumps(command).encode() + b"\n")
            stream.flush()
            reply = json.loads(stream.readline())
            assert "return" in reply, reply
            results.append(reply["return"])
        return results


def lit_pixels(ppm: Path) -> int:
    """How many pixels of a binary PPM screendump are not black."""
    magic, size, _maxval, pixels = ppm.read_bytes().split(b"\n", 3)
    assert magic == b"P6"
    width, height = map(int, size.split())
    return sum(1 for i in range(0, width * height * 3, 3) if pixels[i : i + 3] != b"\0\0\0")


@pytest.mark.skipif(shutil.which("genisoimage") is None, reason="no genisoimage")
def test_bios_guest_shell_screen_agent_cidata(guest: GuestImage, tmp_path: Path, short_dir: Path,
                                             qemu_factory: StartQemu) -> None:
    seed = tmp_path / "seed"
    seed.mkdir()
    user_data = b"#cloud-config\nhostname: from-cidata\nruncmd:\n  - [echo, 'two words']\n"
    meta_data = b"instance-id: iid-qvirtd-1\nlocal-hostname: seed\n"
    (seed / "user-data").write_bytes(user_data)
    (seed / "meta-data").write_bytes(meta_data)
    iso = tmp_path / "seed.iso"
    subprocess.run(["genisoimage", "-quiet", "-output", str(iso), "-volid", "cidata", "-joliet",
                    "-rock", str(seed / "user-data"), str(seed / "meta-data")], check=True)
    qga_sock = short_dir / "qga.sock"
    vm = qemu_factory([
        "-machine", "q35,accel=tcg", "-m", "256", "-device", "VGA",
        "-kernel", str(guest.kernel), "-initrd", str(guest.initrd), "-append", guest.cmdline,
        "-device", "virtio-serial-pci",
        "-chardev", f"socket,id=qga0,path={qga_sock},server=on,wait=off",
        "-device", f"virtserialport,chardev=qga0,name={bg.AGENT_PORT_NAME}",
        "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0",
        "-device", "virtio-scsi-pci,id=scsi0",
        "-drive", f"if=none,id=cd0,media=cdrom,readonly=on,file={iso}",
        "-device", "scsi-cd,drive=cd0,bus=scsi0.0",
    ])
    text = vm.wait_for(bg.READY_LINE + "\n")
    assert bg.AGENT_STARTED_LINE + "\n" in text
    assert bg.NO_CIDATA_LINE not in text
    assert base64.b64decode(vm.line_value(bg.CIDATA_LINE_PREFIX + "user-data ")) == user_data
    assert base64.b64decode(vm.line_value(bg.CIDATA_LINE_PREFIX + "meta-data ")) == meta_data
    vm.wait_for(bg.LINE_PREFIX + "net address eth0 10.0.2.15/24")

    # The shell on ttyS0.
    vm.wait_for(bg.SHELL_PROMPT)
    vm.type("echo hel''lo\r")
    vm.wait_for("\nhello\n", timeout=10)

    # The guest agent.
    ping, host, osinfo, interfaces = qga(
        qga_sock,
        {"execute": "guest-ping"},
        {"execute": "guest-get-host-name"},
        {"execute": "guest-get-osinfo"},
        {"execute": "guest-network-get-interfaces"},
    )
    assert ping == {}
    assert host == {"host-name": bg.GUEST_HOSTNAME}
    assert isinstance(osinfo, dict) and osinfo["id"] == "qvirtd-test-guest"
    assert isinstance(interfaces, list)
    addresses = {a["ip-address"] for i in interfaces for a in i.get("ip-addresses", [])}
    assert {"127.0.0.1", "10.0.2.15"} <= addresses

    # The screen (VGA text mode under SeaBIOS) shows the lines.
    vm.qmp("screendump", filename=str(tmp_path / "screen.ppm"))
    assert lit_pixels(tmp_path / "screen.ppm") > 2000

    # guest-shutdown powers the guest off (no reply by design).
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(qga_sock))
        sock.sendall(b'{"execute":"guest-shutdown"}\n')
        assert vm.wait_exit() == 0
    assert "QVIRTD-GUEST: agent shutdown poweroff" in vm.text()


def ovmf_args(tmp_path: Path) -> list[str]:
    code, template = OVMF_FILES
    variables = tmp_path / "OVMF_VARS.fd"
    shutil.copyfile(template, variables)
    return ["-machine", "q35,accel=tcg",
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
            "-drive", f"if=pflash,format=raw,unit=1,file={variables}"]


@pytest.mark.skipif(not all(p.is_file() for p in OVMF_FILES), reason="no OVMF (ovmf package)")
def test_uefi_disk_boots_and_powers_off(guest: GuestImage, tmp_path: Path,
                                        qemu_factory: StartQemu) -> None:
    vm = qemu_factory([
        *ovmf_args(tmp_path), "-m", "256",
        "-drive", f"if=none,id=d0,format=raw,readonly=on,file={guest.uefi_disk}",
        "-device", "virtio-blk-pci,drive=d0",
    ])
    vm.wait_for(bg.READY_LINE + "\n", timeout=90)
    vm.wait_for(bg.SHELL_PROMPT)
    vm.type("cat /sys/firmware/efi/fw_platform_size /proc/cmdline\r")
    vm.wait_for("\n64\n", timeout=10)
    vm.wait_for(bg.DEFAULT_CMDLINE, timeout=10)
    vm.qmp("system_powerdown")
    assert vm.wait_exit() == 0
    assert bg.POWER_BUTTON_LINE in vm.text()


# Booting the signed disk with Secure Boot on (lockdown, 'Secure boot enabled' in dmesg) is
# tested through the daemon: test_everyday_guest.test_secure_boot_from_a_signed_disk.
