"""Wait for freshly started guests to go quiet before a figure is measured (both daemons).

A no-OS guest's firmware spends its first seconds looking for a boot device, at up to 100 %
of a CPU (SeaBIOS; longer with more devices to scan: qvirtd's guests carry a virtio-scsi
controller and hot-plug ports, libvirt's bench guests none), then idles at about 1 %. A
figure taken while four of them scan measures the machine's scheduler, not the daemon. So
the events scenarios wait, for either daemon, until the guests' QEMUs are quiet. Standard
library only: libvirt_client.py runs under Debian's python3.
"""

from __future__ import annotations

import os
import time

from procfs import cpu_s


def _qemu_pids(names: list[str]) -> list[int]:
    wanted = [f"guest={name},".encode() for name in names]
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ") + b" "
        except OSError:
            continue
        if b"qemu-system" in cmdline and any(w in cmdline or w[:-1] + b" " in cmdline
                                             for w in wanted):
            found.append(int(entry))
    return found


def _cpu_or_none(pid: int) -> float:
    try:
        return cpu_s(pid)
    except OSError:  # gone meanwhile: it uses no CPU
        return 0.0


def wait_quiet(names: list[str], busy: float = 0.10, window_s: float = 0.5,
               timeout_s: float = 30.0) -> float:
    """Wait until every QEMU of the guests `names` used under `busy` of a CPU over the last
    `window_s` (or `timeout_s` passed): seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        pids = _qemu_pids(names)
        before = {pid: _cpu_or_none(pid) for pid in pids}
        time.sleep(window_s)
        if all((_cpu_or_none(pid) - cpu) / window_s < busy for pid, cpu in before.items()):
            break
    return time.monotonic() - start
