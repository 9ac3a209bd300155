"""UEFI firmware against real QEMU and Debian's OVMF: the domain's own NVRAM (created at the
first start, kept across runs, never shared, removed by `undefine --nvram`), Secure Boot's
SMM and flash, and missing firmware refused before any QEMU runs. Booting a real guest from
a disk under UEFI is in test_uefi_boot.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from harness import Daemon, tiny_definition

OVMF = Path("/usr/share/OVMF")


def nvram(daemon: Daemon, uuid: str, secure: bool = False) -> Path:
    return daemon.root / "state" / "nvram" / f"{uuid}_{'SECBOOT_' if secure else ''}VARS.fd"


def cmdline(daemon: Daemon, name: str) -> list[str]:
    pid = daemon.json("dominfo", name)["pid"]
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def test_each_uefi_domain_has_its_own_nvram(daemon: Daemon) -> None:
    for name in ("u1", "u2"):
        daemon.define(tiny_definition(name, firmware="uefi"))
    daemon.qvirsh("start", "u1")
    daemon.qvirsh("start", "u2")
    uuids = {n: daemon.json("dominfo", n)["uuid"] for n in ("u1", "u2")}
    for name, uuid in uuids.items():
        path = nvram(daemon, uuid)
        assert path.stat().st_size == (OVMF / "OVMF_VARS_4M.fd").stat().st_size
        argv = cmdline(daemon, name)
        assert any(str(path) in a for a in argv), argv
        assert any("OVMF_CODE_4M.fd" in a and '"read-only":true' in a for a in argv)
    # The firmware writes its variables: the store persists across runs (same file).
    daemon.qvirsh("destroy", "u1")
    before = nvram(daemon, uuids["u1"]).stat().st_ino
    daemon.qvirsh("start", "u1")
    assert nvram(daemon, uuids["u1"]).stat().st_ino == before
    daemon.qvirsh("destroy", "u1")
    # undefine: refused without a decision about the NVRAM, as in virsh.
    res = daemon.qvirsh("undefine", "u1", check=False)
    assert res.returncode == 1 and "--nvram" in res.stderr and "--keep-nvram" in res.stderr
    assert "u1" in {d["name"] for d in daemon.json("list", "--all")}
    out = daemon.qvirsh("undefine", "u1", "--nvram").stdout
    assert "NVRAM removed" in out and not nvram(daemon, uuids["u1"]).exists()
    # Defined again under the same name (a new uuid): a fresh NVRAM, never the old one.
    daemon.define(tiny_definition("u1", firmware="uefi"))
    new_uuid = daemon.json("dominfo", "u1")["uuid"]
    assert new_uuid != uuids["u1"]
    daemon.qvirsh("start", "u1")
    assert nvram(daemon, new_uuid).exists()
    daemon.qvirsh("destroy", "u1")
    daemon.qvirsh("destroy", "u2")
    daemon.qvirsh("undefine", "u2", "--keep-nvram")
    assert nvram(daemon, uuids["u2"]).exists()


def test_secure_boot_runs_with_smm_and_a_secure_flash(daemon: Daemon) -> None:
    # TCG: nested KVM here has no SMM ("System Management Mode not supported by this
    # hypervisor", which a KVM start quotes from QEMU).
    daemon.define(tiny_definition("sb", firmware="uefi", secure_boot=True, accel="tcg"))
    daemon.qvirsh("start", "sb")
    argv = cmdline(daemon, "sb")
    machine = argv[argv.index("-machine") + 1]
    assert "smm=on" in machine and "pflash0=fw-code" in machine
    assert "driver=cfi.pflash01,property=secure,value=on" in argv
    assert any("OVMF_CODE_4M.secboot.fd" in a for a in argv)
    uuid = daemon.json("dominfo", "sb")["uuid"]
    assert nvram(daemon, uuid, secure=True).stat().st_size == \
        (OVMF / "OVMF_VARS_4M.ms.fd").stat().st_size
    assert daemon.state("sb")[0] == "running"
    daemon.qvirsh("destroy", "sb")


def test_missing_firmware_is_refused_before_any_qemu(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    code = Path("/tmp") / f"qv-ovmf-{id(daemon_factory)}.fd"
    shutil.copyfile(OVMF / "OVMF_CODE_4M.fd", code)
    try:
        daemon: Daemon = daemon_factory({"ovmf_code": str(code)})
        daemon.define(tiny_definition("fw", firmware="uefi"))
        code.unlink()  # the firmware went away after the domain was defined
        res = daemon.qvirsh("start", "fw", check=False)
        assert res.returncode == 1 and str(code) in res.stderr and "ovmf" in res.stderr, \
            res.stderr
        assert daemon.qemu_pids() == [] and daemon.state("fw")[0] == "shutoff"
        # And a new definition is refused at once, nothing stored.
        path = daemon.root / "new.json"
        path.write_text(json.dumps(tiny_definition("fw2", firmware="uefi")))
        res = daemon.qvirsh("define", str(path), check=False)
        assert res.returncode == 1 and str(code) in res.stderr
        assert not (daemon.root / "state" / "domains" / "fw2.json").exists()
    finally:
        code.unlink(missing_ok=True)
