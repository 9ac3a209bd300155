"""The patterns of ops/context.py: jobs re-check the table after their wait (L5), enter/exit
remote (seed 000's migration pattern), and QMP event listening (Monitor.listen)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from qemu.qmp.message import Message

from qvirtd.config import Layout, Settings
from qvirtd.domain import Domain
from qvirtd.errors import (
    DomainGoneError,
    LockDisciplineError,
    MonitorClosedError,
    MonitorError,
    NoDomainError,
)
from qvirtd.job import JobKind
from qvirtd.locks import LockWatch
from qvirtd.model import DomainDef
from qvirtd.ops.context import Context
from qvirtd.qemu.monitor import LISTEN_QUEUE, Monitor
from qvirtd.run import Run


@pytest.fixture
def ctx(tmp_path: Path) -> Context:
    return Context(Settings(job_wait_timeout_s=2.0), Layout.under_root(tmp_path))


async def running_domain(ctx: Context, tmp_path: Path) -> tuple[Domain, Run]:
    dom = Domain(DomainDef(name="vm"), persistent=True)
    async with ctx.table.lock:
        ctx.table.add(dom)
    run_dir = tmp_path / "run" / "domains" / "vm"
    run_dir.mkdir(parents=True)
    run = Run(dom.definition, run_dir, 1, "tcg")
    dom.run = run
    return dom, run


async def test_a_job_waiter_finds_the_domain_gone(ctx: Context, tmp_path: Path) -> None:
    """define racing undefine: the waiter must not act on a domain removed meanwhile."""
    dom, _ = await running_domain(ctx, tmp_path)
    holder = await ctx.begin_job(dom, JobKind.MODIFY, "undefine")
    waiter = asyncio.create_task(ctx.begin_job(dom, JobKind.MODIFY, "define"))
    await asyncio.sleep(0.05)
    async with ctx.table.lock:
        ctx.table.remove(dom)
    await ctx.end_job(dom, holder)
    with pytest.raises(NoDomainError, match="was undefined"):
        await asyncio.wait_for(waiter, 1.0)
    assert dom.job.sync_job is None  # the waiter took nothing


async def test_remote_rechecks_the_run_afterwards(ctx: Context, tmp_path: Path) -> None:
    dom, run = await running_domain(ctx, tmp_path)
    async with ctx.remote(dom, run, "prepare on the peer"):
        await asyncio.sleep(0)  # the peer answers; the run is still ours
    with pytest.raises(DomainGoneError, match="while 'prepare on the peer' was running"):
        async with ctx.remote(dom, run, "prepare on the peer"):
            async with dom.lock:  # meanwhile the guest was destroyed (its run ended)
                dom.run = None


async def test_remote_under_a_domain_lock_breaks_rule_l4(ctx: Context, tmp_path: Path) -> None:
    dom, run = await running_domain(ctx, tmp_path)
    saved = LockWatch.strict, LockWatch.violations
    LockWatch.strict = True
    try:
        with pytest.raises(LockDisciplineError, match="remote call 'confirm'"):
            async with dom.lock:
                async with ctx.remote(dom, run, "confirm"):
                    pass
    finally:
        LockWatch.strict, LockWatch.violations = saved


def event(name: str, **data: object) -> Message:
    return Message({"event": name, "data": data,
                    "timestamp": {"seconds": 1, "microseconds": 0}})


async def test_listen_gets_the_named_events_from_when_it_opens() -> None:
    pumped: list[str] = []
    monitor = Monitor("vm", lambda name, data, when: pumped.append(name), lambda: None, 1.0)
    forward = monitor._client._listeners[0]
    await forward.put(event("DEVICE_DELETED", device="early"))  # before listen: not seen
    with monitor.listen({"DEVICE_DELETED"}) as deleted:
        await forward.put(event("RESUME"))
        await forward.put(event("DEVICE_DELETED", path="/machine/peripheral/d0/virtio-backend"))
        await forward.put(event("DEVICE_DELETED", device="d0"))
        name, data = await deleted.wait_for(lambda n, d: d.get("device") == "d0", 1.0)
        assert (name, data) == ("DEVICE_DELETED", {"device": "d0"})
        with pytest.raises(TimeoutError):
            await deleted.get(0.05)
        for i in range(LISTEN_QUEUE + 5):  # bounded: the oldest go
            await forward.put(event("DEVICE_DELETED", device=f"x{i}"))
        assert deleted.overflowed
    assert pumped.count("DEVICE_DELETED") == LISTEN_QUEUE + 8  # the pump saw every event
    with monitor.listen({"DEVICE_DELETED"}) as later:
        await monitor.close()
        with pytest.raises(MonitorClosedError, match="closed while waiting"):
            await later.get(1.0)


async def test_process_scans_are_shared_but_never_older_than_the_question(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from qvirtd.qemu import process
    started: list[int] = []

    def slow_scan() -> list[tuple[int, bytes]]:
        started.append(len(started))
        import time
        time.sleep(0.1)
        return [(len(started), b"qemu-system-x86_64\0-uuid\0u\0")]

    monkeypatch.setattr(process, "qemu_processes", slow_scan)
    table = process.ProcessTable()
    first = asyncio.create_task(table.scan())
    await asyncio.sleep(0.03)  # the first scan is running: these must not share it
    later = [asyncio.create_task(table.scan()) for _ in range(20)]
    results = await asyncio.gather(first, *later)
    assert table.scans == 2  # 21 callers, two scans
    assert results[0] == [(1, b"qemu-system-x86_64\0-uuid\0u\0")]
    assert all(r == [(2, b"qemu-system-x86_64\0-uuid\0u\0")] for r in results[1:])
    assert await table.find([b"\0-uuid\0u\0"]) == [(3, b"qemu-system-x86_64\0-uuid\0u\0")]
    assert await table.find([b"\0-uuid\0other\0"]) == []


def test_a_run_directory_belongs_to_one_run_at_a_time() -> None:
    """Undefine and define again gives a new Domain object with the same name: its start
    must wait until the old run's teardown released the directory (recipe 13)."""
    from qvirtd.driver import DomainTable
    from qvirtd.errors import DomainBusyError
    table = DomainTable()
    old = Domain(DomainDef(name="vm"), persistent=True)
    table.claim_run_dir(old)
    with pytest.raises(DomainBusyError, match="still being cleaned up"):
        table.claim_run_dir(old)  # a second run of the same domain
    table.remove(old)
    new = Domain(DomainDef(name="vm"), persistent=True)
    table.add(new)
    with pytest.raises(DomainBusyError, match="previous run under this name"):
        table.claim_run_dir(new)
    table.release_run_dir(new)  # not the holder: changes nothing
    with pytest.raises(DomainBusyError):
        table.claim_run_dir(new)
    table.release_run_dir(old)  # the old run's teardown is complete
    table.claim_run_dir(new)


async def test_a_command_before_the_monitor_is_connected_does_not_break_it() -> None:
    """A QUERY job may run beside a start's connect (domstats did): its command is refused,
    and the monitor is not taken for closed (it was, and the start then failed)."""
    monitor = Monitor("vm", lambda name, data, when: None, lambda: None, 1.0)
    with pytest.raises(MonitorError, match="not connected yet"):
        await monitor.execute("query-blockstats")
    assert not monitor.closed
