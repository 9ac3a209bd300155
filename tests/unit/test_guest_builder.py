"""The test guest builder's pure parts: GPT writer, ELF reader, package closure, scripts.

No download and no QEMU here; tests/integration/test_guest_image.py checks a built guest.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import uuid
import zlib
from pathlib import Path

import build_guest as bg
import pytest

ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"


def read_gpt(disk: bytes, lba: int) -> dict[str, object]:
    """Parse one GPT header and its partition entries, checking both CRCs."""
    header = disk[lba * 512 : lba * 512 + 92]
    fields = struct.unpack("<8sIIIIQQQQ16sQIII", header)
    assert fields[0] == b"EFI PART"
    zeroed = header[:16] + b"\0\0\0\0" + header[20:]
    assert zlib.crc32(zeroed) == fields[3], "header CRC32"
    entries_lba, count, size, entries_crc = fields[10:14]
    entries = disk[entries_lba * 512 : entries_lba * 512 + count * size]
    assert zlib.crc32(entries) == entries_crc, "partition entries CRC32"
    type_guid, part_guid, first, last, _attrs, name = struct.unpack_from(
        "<16s16sQQQ72s", entries, 0
    )
    return {
        "my_lba": fields[5],
        "alternate_lba": fields[6],
        "first_usable": fields[7],
        "last_usable": fields[8],
        "disk_guid": uuid.UUID(bytes_le=fields[9]),
        "type": str(uuid.UUID(bytes_le=type_guid)).upper(),
        "part_guid": uuid.UUID(bytes_le=part_guid),
        "first": first,
        "last": last,
        "name": name.decode("utf-16-le").rstrip("\0"),
        "second_entry_empty": entries[size : 2 * size] == bytes(size),
    }


def test_gpt_disk_layout(tmp_path: Path) -> None:
    esp = tmp_path / "esp"
    esp.write_bytes(b"FAT!" + bytes(2 * 1024 * 1024 - 4))
    disk_path = tmp_path / "disk.img"
    info = bg._write_gpt_disk(esp, disk_path, "test")
    disk = disk_path.read_bytes()
    sectors = len(disk) // 512
    assert len(disk) == 1024 * 1024 + 2 * 1024 * 1024 + 1024 * 1024
    assert info["sectors"] == str(sectors)
    # Protective MBR: one 0xEE partition from LBA 1.
    assert disk[510:512] == b"\x55\xaa"
    assert disk[446 + 4] == 0xEE
    assert struct.unpack_from("<II", disk, 446 + 8) == (1, sectors - 1)
    primary = read_gpt(disk, 1)
    backup = read_gpt(disk, sectors - 1)
    assert primary["my_lba"] == 1 and primary["alternate_lba"] == sectors - 1
    assert backup["my_lba"] == sectors - 1 and backup["alternate_lba"] == 1
    for header in (primary, backup):
        assert header["type"] == ESP_TYPE
        assert header["first"] == 2048
        assert header["last"] == 2048 + 2 * 2048 - 1
        assert header["first_usable"] == 34 and header["last_usable"] == sectors - 34
        assert header["name"] == "EFI system partition"
        assert header["second_entry_empty"]
        assert str(header["disk_guid"]) == info["disk_guid"]
        assert str(header["part_guid"]) == info["esp_guid"]
    # The ESP's bytes are at 1 MiB, unchanged.
    assert disk[1024 * 1024 : 1024 * 1024 + 4] == b"FAT!"
    # Deterministic: the same inputs give the same bytes.
    again = tmp_path / "again.img"
    bg._write_gpt_disk(esp, again, "test")
    assert again.read_bytes() == disk


@pytest.mark.skipif(shutil.which("sfdisk", path="/usr/sbin:/sbin:/usr/bin") is None,
                    reason="no sfdisk (Debian's fdisk package)")
def test_gpt_disk_reads_back_with_sfdisk(tmp_path: Path) -> None:
    esp = tmp_path / "esp"
    esp.write_bytes(bytes(1024 * 1024))
    disk = tmp_path / "disk.img"
    bg._write_gpt_disk(esp, disk, "test")
    sfdisk = shutil.which("sfdisk", path="/usr/sbin:/sbin:/usr/bin")
    assert sfdisk is not None
    res = subprocess.run([sfdisk, "--json", str(disk)], capture_output=True, text=True,
                         check=True)
    table = json.loads(res.stdout)["partitiontable"]
    assert table["label"] == "gpt"
    (part,) = table["partitions"]
    assert part["start"] == 2048 and part["size"] == 2048
    assert part["type"] == ESP_TYPE
    assert "warn" not in res.stderr.lower()


def test_elf_info_of_the_python_binary() -> None:
    exe = Path(sys.executable).resolve()
    info = bg._elf_info(exe.read_bytes(), exe)
    assert info.interpreter is not None and "ld-linux" in info.interpreter
    assert "libc.so.6" in info.needed


def test_elf_info_rejects_non_elf() -> None:
    with pytest.raises(bg.GuestBuildError, match="not a 64-bit"):
        bg._elf_info(b"#!/bin/sh\n", "script")


class FakeApt:
    """Answers ``apt-cache show`` from canned records, like _Apt.run."""

    def __init__(self, records: dict[str, dict[str, str]]) -> None:
        self.records = records
        self.calls: list[list[str]] = []

    def run(self, cmd: list[str], cwd: Path | None = None) -> str:
        assert cmd[:3] == ["apt-cache", "show", "--no-all-versions"]
        self.calls.append(cmd[3:])
        out = []
        for name in cmd[3:]:
            if name in self.records:
                out.append("\n".join(f"{k}: {v}" for k, v in self.records[name].items()))
        return "\n\n".join(out) + "\n"


def rec(name: str, section: str = "libs", depends: str = "") -> dict[str, str]:
    record = {"Package": name, "Version": "1.0", "Section": section}
    if depends:
        record["Depends"] = depends
    return record


def test_library_closure_follows_library_packages_only() -> None:
    records = {
        r["Package"]: r
        for r in (
            rec("agent", "admin", "libc6 (>= 2.34), libglib2.0-0, init-system-helpers (>= 1.5)"),
            rec("libc6", depends="libgcc-s1"),
            rec("libgcc-s1", depends="gcc-12-base (= 1.0), libc6 (>= 2.35)"),
            rec("gcc-12-base"),
            rec("libglib2.0-0", depends="libffi-virtual | libffi8, zlib1g"),
            rec("libffi8"),
            rec("zlib1g"),
            rec("init-system-helpers", "admin", "usrmerge"),
            rec("usrmerge", "admin", "perl"),
        )
    }
    apt = FakeApt(records)
    closure = bg._library_closure(lambda names: bg._show_many(apt, names),  # type: ignore[arg-type]
                                  records["agent"])
    names = [name for name, _version in closure]
    assert names[0] == "agent"
    assert set(names) == {"agent", "libc6", "libgcc-s1", "gcc-12-base", "libglib2.0-0",
                          "libffi8", "zlib1g"}
    assert all(version == "1.0" for _name, version in closure)
    # One apt-cache call per level, and never for what a non-library package needs.
    assert not any("usrmerge" in call for call in apt.calls)


def test_library_closure_fails_on_a_missing_dependency() -> None:
    records = {"agent": rec("agent", "admin", "libgone1")}
    apt = FakeApt(records)
    with pytest.raises(bg.GuestBuildError, match="libgone1"):
        bg._library_closure(lambda names: bg._show_many(apt, names),  # type: ignore[arg-type]
                            records["agent"])


def packages(**changes: object) -> bg._Packages:
    fields: dict[str, object] = {
        "kernel_package": "linux-image-6.1.0-1-cloud-amd64",
        "kernel_version": "6.1.1-1",
        "busybox_version": "1:1.35.0-4",
        "agent": (("qemu-guest-agent", "1:7.2"), ("libc6", "2.36")),
        "boot": (("systemd-boot-efi", "252"),),
        "secure_boot": (("shim-signed", "1.51"), ("grub-efi-amd64-signed", "2.06")),
    }
    fields.update(changes)
    return bg._Packages(**fields)  # type: ignore[arg-type]


def test_cache_key_covers_every_package() -> None:
    base = bg._cache_key(packages())
    assert base.startswith("linux-image-6.1.0-1-cloud-amd64_6.1.1-1+busybox_1_1.35.0-4+p")
    assert base.endswith("+g" + bg._builder_digest())
    assert "/" not in base and ":" not in base
    assert bg._cache_key(packages()) == base
    others = [
        packages(agent=(("qemu-guest-agent", "1:7.2"), ("libc6", "2.37"))),
        packages(boot=(("systemd-boot-efi", "253"),)),
        packages(secure_boot=()),
        packages(kernel_version="6.1.1-2"),
    ]
    keys = {bg._cache_key(p) for p in others}
    assert base not in keys and len(keys) == len(others)


def test_init_script_is_filled_in_and_parses() -> None:
    script = bg._init_script([])
    assert "@" not in script.replace("$@", "")
    assert bg.AGENT_PORT_NAME in script and bg.GUEST_HOSTNAME in script
    assert f"PS1='{bg.SHELL_PROMPT}'" in script
    assert "user-data meta-data" in script
    sh = shutil.which("sh")
    assert sh is not None
    for text in (script, bg._POWER_BUTTON_SCRIPT, bg._SHUTDOWN_SCRIPT, bg._UDHCPC_SCRIPT):
        res = subprocess.run([sh, "-n"], input=text, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr


def test_default_cmdline_keeps_ttys0_primary() -> None:
    consoles = [word for word in bg.DEFAULT_CMDLINE.split() if word.startswith("console=")]
    assert consoles[-1] == "console=ttyS0"  # the last console= is /dev/console
    assert "console=tty0" in consoles
    assert bg.GuestImage.__dataclass_fields__["cmdline"].default == bg.DEFAULT_CMDLINE


def test_boot_loader_configs_carry_the_cmdline(tmp_path: Path) -> None:
    k, i, efi = tmp_path / "k", tmp_path / "i", tmp_path / "e"
    uefi = bg._uefi_disk_files(efi, k, i)
    entry = uefi["loader/entries/qvirtd.conf"]
    assert isinstance(entry, bytes) and f"options {bg.DEFAULT_CMDLINE}\n".encode() in entry
    assert uefi["EFI/BOOT/BOOTX64.EFI"] == efi
    assert b"timeout 0" in uefi["loader/loader.conf"]  # type: ignore[operator]
    sb = bg._secure_boot_disk_files(efi, efi, k, i)
    cfg = sb["EFI/debian/grub.cfg"]
    assert isinstance(cfg, bytes) and f"linux /vmlinuz {bg.DEFAULT_CMDLINE}\n".encode() in cfg
    assert "EFI/BOOT/fbx64.efi" not in sb  # shim would run the fallback and reset


def test_resolve_in_keeps_symlinks_inside_the_extracted_tree(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "lib/x86_64-linux-gnu").mkdir(parents=True)
    (root / "lib64").mkdir()
    real = root / "lib/x86_64-linux-gnu/libfoo.so.1.2"
    real.write_bytes(b"\x7fELF")
    (root / "lib/x86_64-linux-gnu/libfoo.so.1").symlink_to("libfoo.so.1.2")
    # An absolute target means the tree's file, not the host's.
    (root / "lib64/libfoo.so.1").symlink_to("/lib/x86_64-linux-gnu/libfoo.so.1")
    (root / "lib64/libc.so.6").symlink_to("/lib/x86_64-linux-gnu/libc.so.6")  # host only
    (root / "lib64/escape.so").symlink_to("../../outside.so")
    (tmp_path / "outside.so").write_bytes(b"x")
    assert bg._resolve_in(root, root / "lib/x86_64-linux-gnu/libfoo.so.1") == real
    assert bg._resolve_in(root, root / "lib64/libfoo.so.1") == real
    assert bg._resolve_in(root, root / "lib64/libc.so.6") is None
    assert bg._resolve_in(root, root / "lib64/escape.so") is None
