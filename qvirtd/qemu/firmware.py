"""UEFI firmware for a run: Debian's OVMF images and each domain's own NVRAM.

`firmware: "uefi"` boots with OVMF from Debian's `ovmf` package: the 4M code image as a
read-only pflash, and a per-domain copy of the variable store template as a writable pflash.
`secure_boot: true` uses the Secure Boot code image (`OVMF_CODE_4M.secboot.fd`, which needs
SMM) and a variable store that holds Microsoft's keys (`OVMF_VARS_4M.ms.fd`), so a signed
shim, grub and kernel boot and an unsigned bootloader is refused.

The NVRAM (`STATE/nvram/UUID_VARS.fd`, or `UUID_SECBOOT_VARS.fd`) is created from its template
the first time the domain starts, kept across runs (boot entries, Secure Boot state), named by
the domain's uuid so it is never shared (a domain defined again under the same name does not
inherit it), and removed by `undefine --nvram`. Copying it is file I/O: it runs in a worker
thread (rule L6).

Missing firmware files are a clear error at `define` and at `start`, before any QEMU runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidDefinitionError, StorageError
from ..model import DomainDef

CODE_NODE = "fw-code"
VARS_NODE = "fw-vars"
# Block nodes of the firmware: infrastructure, never a device of the JSON config.
FIRMWARE_NODES = frozenset({CODE_NODE, VARS_NODE, f"{CODE_NODE}-file", f"{VARS_NODE}-file"})


@dataclass(frozen=True)
class Ovmf:
    """Where the host's OVMF images are (settings, defaults from Debian's `ovmf`)."""

    code: Path
    vars_template: Path
    secboot_code: Path
    secboot_vars_template: Path

    def images(self, secure_boot: bool) -> tuple[Path, Path]:
        """(code, vars template) for a domain."""
        if secure_boot:
            return self.secboot_code, self.secboot_vars_template
        return self.code, self.vars_template


@dataclass(frozen=True)
class Firmware:
    """The firmware files of one run."""

    code: Path
    nvram: Path
    secure_boot: bool

    def blockdevs(self) -> list[dict[str, Any]]:
        return [
            {"driver": "file", "filename": str(self.code), "node-name": f"{CODE_NODE}-file",
             "read-only": True},
            {"driver": "raw", "node-name": CODE_NODE, "file": f"{CODE_NODE}-file",
             "read-only": True},
            {"driver": "file", "filename": str(self.nvram), "node-name": f"{VARS_NODE}-file"},
            {"driver": "raw", "node-name": VARS_NODE, "file": f"{VARS_NODE}-file"},
        ]


def nvram_path(nvram_dir: Path, definition: DomainDef) -> Path:
    kind = "SECBOOT_VARS" if definition.secure_boot else "VARS"
    return nvram_dir / f"{definition.uuid}_{kind}.fd"


def nvram_files(nvram_dir: Path, uuid: str) -> list[Path]:
    """Every NVRAM file a domain may have (`undefine --nvram` removes them)."""
    return [nvram_dir / f"{uuid}_VARS.fd", nvram_dir / f"{uuid}_SECBOOT_VARS.fd"]


def check_images(ovmf: Ovmf, definition: DomainDef) -> None:
    """Cheap (two stats): the firmware images a UEFI domain needs exist (define, start)."""
    if definition.firmware != "uefi":
        return
    for image in ovmf.images(definition.secure_boot):
        if not image.is_file():
            what = "Secure Boot " if definition.secure_boot else ""
            raise InvalidDefinitionError(
                f"firmware 'uefi' needs the {what}OVMF image {image}, which does not exist "
                "(install Debian's ovmf package, or set the ovmf_* settings)")


def _prepare(ovmf: Ovmf, nvram_dir: Path, definition: DomainDef) -> Firmware:
    """Blocking (worker thread): the run's firmware, creating its NVRAM from the template
    the first time (atomically: a half-copied variable store never boots)."""
    check_images(ovmf, definition)
    code, template = ovmf.images(definition.secure_boot)
    nvram = nvram_path(nvram_dir, definition)
    if not nvram.exists():
        try:
            nvram_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = nvram.with_name(f".{nvram.name}.tmp.{os.getpid()}")
            try:
                shutil.copyfile(template, tmp)
                os.chmod(tmp, 0o600)
                os.replace(tmp, nvram)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        except OSError as exc:
            raise StorageError(f"cannot create the NVRAM {nvram} from {template}: "
                               f"{exc.strerror or exc}") from exc
    return Firmware(code, nvram, definition.secure_boot)


async def prepare(ovmf: Ovmf, nvram_dir: Path, definition: DomainDef) -> Firmware | None:
    """The firmware of a run (None for BIOS), off the loop."""
    if definition.firmware != "uefi":
        return None
    return await asyncio.to_thread(_prepare, ovmf, nvram_dir, definition)
