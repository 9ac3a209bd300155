"""Tracked locks and the lock-discipline check (qvirtd.locks)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from qvirtd.errors import LockDisciplineError
from qvirtd.locks import HoldStats, LockWatch, TrackedLock, check_no_locks, locks_held


@pytest.fixture(autouse=True)
def lock_watch() -> Iterator[None]:
    """Start every test from a clean LockWatch and put the process-wide state back after."""
    saved = (LockWatch.strict, LockWatch.violations, LockWatch.last_violation)
    LockWatch.strict = False
    LockWatch.violations = 0
    LockWatch.last_violation = ""
    try:
        yield
    finally:
        LockWatch.strict, LockWatch.violations, LockWatch.last_violation = saved


async def test_holder_is_tracked_per_task() -> None:
    lock = TrackedLock("driver")
    assert locks_held() == []
    assert not lock.held_by_current_task()
    async with lock:
        assert locks_held() == [lock]
        assert lock.held_by_current_task()
    assert locks_held() == []
    assert not lock.held_by_current_task()
    assert not lock.locked()


async def test_several_locks_are_tracked_in_order() -> None:
    driver, domain = TrackedLock("driver"), TrackedLock("domain vm")
    async with driver:
        async with domain:
            assert locks_held() == [driver, domain]
        assert locks_held() == [driver]
    assert locks_held() == []


async def test_another_tasks_lock_does_not_count_for_this_task() -> None:
    lock = TrackedLock("domain vm")
    holding = asyncio.Event()
    done = asyncio.Event()

    async def holder() -> None:
        async with lock:
            holding.set()
            await done.wait()

    task = asyncio.create_task(holder())
    await holding.wait()
    assert lock.locked()
    assert locks_held() == []
    assert not lock.held_by_current_task()
    check_no_locks("QMP command 'query-status' on vm")
    assert LockWatch.violations == 0

    async def peek() -> tuple[list[TrackedLock], bool]:
        return locks_held(), lock.held_by_current_task()

    assert await asyncio.create_task(peek()) == ([], False)
    done.set()
    await task
    assert not lock.locked()


async def test_check_no_locks_without_locks_is_fine() -> None:
    LockWatch.strict = True
    lock = TrackedLock("driver")
    async with lock:
        pass
    check_no_locks("exit of QEMU pid 1")
    assert LockWatch.violations == 0
    assert LockWatch.last_violation == ""


async def test_check_no_locks_counts_a_violation() -> None:
    lock = TrackedLock("domain vm")
    async with lock:
        check_no_locks("QMP command 'cont' on vm")
    assert LockWatch.violations == 1
    assert "QMP command 'cont' on vm" in LockWatch.last_violation
    assert "domain vm" in LockWatch.last_violation
    async with lock:
        check_no_locks("exit of QEMU pid 2")
    assert LockWatch.violations == 2
    assert "exit of QEMU pid 2" in LockWatch.last_violation


async def test_check_no_locks_names_every_held_lock() -> None:
    driver, domain = TrackedLock("driver"), TrackedLock("domain vm")
    async with driver, domain:
        check_no_locks("sleep")
    assert "driver" in LockWatch.last_violation
    assert "domain vm" in LockWatch.last_violation


async def test_strict_mode_raises() -> None:
    LockWatch.strict = True
    lock = TrackedLock("driver")
    async with lock:
        with pytest.raises(LockDisciplineError, match="QMP command 'stop'") as info:
            check_no_locks("QMP command 'stop' on vm")
    assert "driver" in str(info.value)
    assert info.value.kind == "lock-discipline"
    assert LockWatch.violations == 1
    assert not lock.locked()


async def test_released_from_another_task_forgets_the_holder() -> None:
    lock = TrackedLock("domain vm")
    await lock.acquire()
    assert locks_held() == [lock]

    async def release() -> None:
        lock.release()

    await asyncio.create_task(release())
    assert locks_held() == []
    assert not lock.locked()


async def test_tracking_survives_contention() -> None:
    lock = TrackedLock("driver")
    seen: list[bool] = []

    async def worker() -> None:
        for _ in range(20):
            async with lock:
                seen.append(locks_held() == [lock] and lock.held_by_current_task())
                await asyncio.sleep(0)
            seen.append(locks_held() == [])

    await asyncio.gather(*(worker() for _ in range(5)))
    assert len(seen) == 200 and all(seen)
    assert not lock.locked()


async def test_hold_stats_record_hold_times() -> None:
    stats = HoldStats()
    lock = TrackedLock("driver", stats=stats)
    async with lock:
        await asyncio.sleep(0.05)
    async with lock:
        pass
    summary = stats.summary()
    assert summary["count"] == 2
    assert 40 <= summary["max_ms"] < 5000
    assert summary["p50_ms"] <= summary["p99_ms"] <= summary["max_ms"]


def test_hold_stats_summary_and_window() -> None:
    stats = HoldStats(window=3)
    assert stats.summary() == {"count": 0, "p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
    for seconds in (0.5, 0.001, 0.002, 0.003, 0.004):
        stats.add(seconds)
    summary = stats.summary()
    assert summary["count"] == 5
    assert summary["max_ms"] == pytest.approx(500.0)  # max covers every sample ever
    assert len(stats.samples) == 3  # the window is bounded
    assert summary["p50_ms"] == pytest.approx(3.0)
    assert summary["p99_ms"] == pytest.approx(4.0)


async def test_acquire_now_takes_a_free_lock_and_never_jumps_the_queue() -> None:
    lock = TrackedLock("dom")
    assert lock.acquire_now()  # free: taken without an await, held by this task
    assert lock.locked() and locks_held() == [lock]
    assert not lock.acquire_now()  # held (by us): no
    order: list[str] = []

    async def waiter() -> None:
        async with lock:
            order.append("waiter")

    task = asyncio.create_task(waiter())
    await asyncio.sleep(0)  # the waiter queues for the lock
    lock.release()
    # Free again, but the woken waiter has not run yet: it goes first.
    assert not lock.locked() and not lock.acquire_now()
    await task
    assert order == ["waiter"] and locks_held() == []
    assert lock.acquire_now()
    lock.release()
    assert not lock.locked()
