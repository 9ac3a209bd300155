"""Shared benchmark plumbing: a private qvirtd, percentiles, and the JSON + Markdown output.

Benchmarks print figures; they assert no timing. Every run records the machine, the date and
the command, so a figure in docs/performance.md can be traced to how it was made.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qvirtd.qemu.process import qemu_pids_mentioning

REPO = Path(__file__).resolve().parents[1]


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                          text=True).stdout.splitlines()
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_kib / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "qemu": qemu[0] if qemu else "unknown", "kvm": os.access("/dev/kvm", os.W_OK)}


def header(name: str) -> dict[str, Any]:
    return {"benchmark": name,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "machine": machine()}


def emit(result: dict[str, Any], table: list[tuple[str, str]]) -> None:
    """Print the JSON document, then a Markdown table of the headline figures."""
    print(json.dumps(result, indent=2))
    print()
    print(f"| {result['benchmark']} | value |")
    print("|---|---|")
    for label, value in table:
        print(f"| {label} | {value} |")
    print(f"\n{result['date']}, {result['machine']['cpu']} ({result['machine']['cores']} cores), "
          f"{result['machine']['qemu']}; `{result['command']}`")


class Qvirtd:
    """A private daemon under a temporary --root; stop() kills every QEMU it started."""

    def __init__(self, settings: dict[str, Any] | None = None) -> None:
        # The daemon's root on tmpfs, as /run (its status files) is in production. On ext4
        # (QVIRTD_BENCH_DIR=/tmp) a status write replaces the file by rename, and ext4 then
        # forces the new data out: start-50 took 2 to 3x the floor there, 1.3 to 1.6x on
        # tmpfs (issue 12).
        where = os.environ.get("QVIRTD_BENCH_DIR", "/dev/shm")
        self.root = Path(tempfile.mkdtemp(prefix="qvb-", dir=where))
        self.socket = self.root / "run" / "qvirtd.sock"
        lines = [f"{k} = {json.dumps(v)}" for k, v in (settings or {}).items()]
        (self.root / "qvirtd.toml").write_text("\n".join(lines) + "\n")
        self.log = open(self.root / "daemon.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "qvirtd", "--root", str(self.root)],
                                     stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 15
        while True:
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(str(self.socket))
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("qvirtd did not start: "
                                     + (self.root / "daemon.log").read_text()) from None
                time.sleep(0.05)
            finally:
                s.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        kill_qemus_mentioning(str(self.root))
        self.log.close()
        shutil.rmtree(self.root, ignore_errors=True)


def kill_qemus_mentioning(text: str) -> None:
    for pid in qemu_pids_mentioning(text):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_main(doc: str, main_async: Callable[..., Coroutine[Any, Any, None]],
             libvirt: bool = False) -> None:
    """The command line every benchmark shares: `--quick` for CI's it-still-works run;
    `libvirt`: the benchmark also takes `--libvirt` (main_async(quick, with_libvirt))."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small run: checks it works")
    if libvirt:
        parser.add_argument("--libvirt", action="store_true",
                            help="also measure Debian's libvirt in the same run")
        args = parser.parse_args()
        asyncio.run(main_async(args.quick, args.libvirt))
    else:
        asyncio.run(main_async(parser.parse_args().quick))
