"""Which accelerator and which CPU model a QEMU run gets.

* KVM when /dev/kvm opens read-write and answers the stable API version (12), else TCG.
* With KVM the CPU model is `host`. Some hosts reject an MSR that QEMU 7.2 sets for `host`
  (IA32_ARCH_CAPABILITIES, 0x10a: seen under nested KVM on AMD EPYC), and QEMU aborts at
  start ("failed to set MSR 0x10a"). So the first KVM start probes `-cpu host` once (a QEMU
  that starts paused, answers QMP and quits) and, if it dies, uses
  `host,arch-capabilities=off`, which such hosts accept. The answer is kept for the daemon's
  life. The probe runs in a worker thread (rule L6), once: the first KVM start begins it, and
  starts that come meanwhile wait for that one probe (50 concurrent first starts used to
  probe 50 times at once). It is not begun at daemon start: a daemon that runs only TCG
  guests, or none, would pay two QEMU spawns for nothing.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import shutil
import subprocess

from ..errors import QvirtError
from ..model import Accel

log = logging.getLogger(__name__)

KVM_GET_API_VERSION = 0xAE00
CPU_HOST = "host"
CPU_HOST_NO_ARCH_CAPS = "host,arch-capabilities=off"
PROBE_TIMEOUT_S = 20.0

_cpu_models: dict[str, str] = {}
# The probe under way per binary, shared by whoever asks meanwhile (it ends by itself, within
# 2 x PROBE_TIMEOUT_S; a caller that is cancelled leaves it to the others).
_probing: dict[str, asyncio.Future[str]] = {}


def kvm_usable() -> bool:
    """/dev/kvm opens read-write and answers the stable API version (12)."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, KVM_GET_API_VERSION) == 12
    except OSError:
        return False
    finally:
        os.close(fd)


def resolve_accel(accel: Accel) -> str:
    if accel is Accel.AUTO:
        return "kvm" if kvm_usable() else "tcg"
    if accel is Accel.KVM and not kvm_usable():
        raise QvirtError("accel 'kvm' was asked for but /dev/kvm is not usable")
    return str(accel)


def _starts_with(qemu_binary: str, cpu: str) -> bool:
    """Blocking: does a paused KVM QEMU with `-cpu cpu` start and quit cleanly?
    Run under coreutils' `timeout`: QEMU does not quit when its QMP stdin closes, so a probe
    whose daemon was killed meanwhile would otherwise run for ever."""
    argv = [qemu_binary, "-machine", "q35,accel=kvm", "-cpu", cpu, "-m", "16", "-S",
            "-nodefaults", "-no-user-config", "-display", "none", "-qmp", "stdio"]
    limit = shutil.which("timeout")
    if limit is not None:
        argv = [limit, "--kill-after=2", f"{PROBE_TIMEOUT_S:g}", *argv]
    try:
        res = subprocess.run(argv, input=b'{"execute":"qmp_capabilities"}\n'
                             b'{"execute":"quit"}\n', capture_output=True,
                             timeout=PROBE_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("probing -cpu %s failed: %s", cpu, exc)
        return False
    if res.returncode != 0:
        log.warning("QEMU with KVM and -cpu %s does not start here: %s", cpu,
                    res.stderr.decode(errors="replace").strip()[-300:])
    return res.returncode == 0


def probe_kvm_cpu(qemu_binary: str) -> str:
    """Blocking: the CPU model KVM guests get on this host (see the module docstring)."""
    if _starts_with(qemu_binary, CPU_HOST):
        return CPU_HOST
    if _starts_with(qemu_binary, CPU_HOST_NO_ARCH_CAPS):
        log.warning("using -cpu %s: this host rejects QEMU's default for -cpu host",
                    CPU_HOST_NO_ARCH_CAPS)
        return CPU_HOST_NO_ARCH_CAPS
    return CPU_HOST  # neither starts: the start itself will fail with QEMU's own words


async def kvm_cpu_model(qemu_binary: str) -> str:
    """The CPU model for KVM runs of `qemu_binary`, probed once (off the loop)."""
    cached = _cpu_models.get(qemu_binary)
    if cached is not None:
        return cached
    probe = _probing.get(qemu_binary)
    if probe is None:
        probe = asyncio.ensure_future(asyncio.to_thread(probe_kvm_cpu, qemu_binary))
        _probing[qemu_binary] = probe

        def done(fut: asyncio.Future[str]) -> None:
            _probing.pop(qemu_binary, None)
            if not fut.cancelled() and fut.exception() is None:
                _cpu_models[qemu_binary] = fut.result()
        probe.add_done_callback(done)
    return await asyncio.shield(probe)


async def cpu_model(accel: str, qemu_binary: str) -> str | None:
    """`-cpu` for a run: None (QEMU's default) under TCG."""
    return await kvm_cpu_model(qemu_binary) if accel == "kvm" else None
