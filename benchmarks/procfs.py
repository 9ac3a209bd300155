"""What /proc says about a process, for the benchmarks (standard library only:
libvirt_client.py runs under Debian's python3)."""

from __future__ import annotations

import os

_HZ = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """utime + stime of `pid`, in seconds (OSError if it is gone)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _HZ
