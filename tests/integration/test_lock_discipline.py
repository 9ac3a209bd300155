"""Rule L4, checked at run time: no QMP command or process wait under a driver/domain lock.

Every integration test runs its daemon with `lock_check = true`, and the fixture fails the
test if daemon-stats reports any violation. This file shows the instrumentation really
catches one, against a real QEMU monitor.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from qvirtd.errors import LockDisciplineError
from qvirtd.locks import LockWatch, TrackedLock
from qvirtd.qemu.monitor import Monitor
from qvirtd.qemu.process import QemuProcess


@pytest.fixture
async def monitor() -> AsyncIterator[tuple[Monitor, QemuProcess]]:
    tmp = Path(tempfile.mkdtemp(prefix="qv-lock-", dir="/tmp"))
    path = tmp / "mon.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)
    argv = ["qemu-system-x86_64", "-S", "-nodefaults", "-display", "none", "-machine",
            "q35,accel=tcg", "-m", "32", "-chardev",
            f"socket,id=m,fd={listener.fileno()},server=on,wait=off",
            "-mon", "chardev=m,mode=control"]
    proc = await QemuProcess.spawn(argv, [listener.fileno()], tmp / "qemu.log", tmp)
    listener.close()
    saved = (LockWatch.strict, LockWatch.violations)
    mon = Monitor("locktest", lambda *event: None, lambda: None, 5.0)
    try:  # whatever fails from here on, the QEMU we started is killed
        await mon.connect(path, 10.0)
        LockWatch.strict = True
        yield mon, proc
    finally:
        LockWatch.strict, LockWatch.violations = saved
        await mon.close()
        proc.signal(9)
        await proc.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)


async def test_qmp_under_a_domain_lock_fails(monitor: tuple[Monitor, QemuProcess]) -> None:
    mon, _ = monitor
    before = LockWatch.violations
    assert (await mon.execute("query-status"))["status"] == "prelaunch"  # no lock: fine
    lock = TrackedLock("domain:locktest")
    async with lock:
        with pytest.raises(LockDisciplineError, match="domain:locktest"):
            await mon.execute("query-status")
    assert LockWatch.violations == before + 1


async def test_process_wait_under_the_driver_lock_fails(
        monitor: tuple[Monitor, QemuProcess]) -> None:
    _, proc = monitor
    lock = TrackedLock("driver")
    async with lock:
        with pytest.raises(LockDisciplineError, match="driver"):
            await proc.wait(0.01)


async def test_a_lock_held_by_another_task_does_not_count(
        monitor: tuple[Monitor, QemuProcess]) -> None:
    mon, _ = monitor
    lock = TrackedLock("domain:other")
    held = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with lock:
            held.set()
            await release.wait()

    task = asyncio.create_task(holder())
    await held.wait()
    try:
        assert (await mon.execute("query-status"))["running"] is False
    finally:
        release.set()
        await task
