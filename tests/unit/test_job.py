"""The per-domain job condition (qvirtd.job): sync and async slots, masks, nested jobs through
the async job's handle, phases and abort. Every acquire/release happens under the lock."""

from __future__ import annotations

import asyncio
import time

import pytest

from qvirtd.errors import JobAbortedError, JobTimeoutError
from qvirtd.job import DEFAULT_MASK, AsyncJob, AsyncJobKind, Job, JobCondition, JobKind
from qvirtd.locks import TrackedLock, locks_held

TIMEOUT = 0.2


@pytest.fixture
def lock() -> TrackedLock:
    return TrackedLock("domain vm")


@pytest.fixture
def cond(lock: TrackedLock) -> JobCondition:
    return JobCondition(lock, "vm")


async def take(cond: JobCondition, lock: asyncio.Lock, kind: JobKind, owner: str,
               timeout_s: float = TIMEOUT, nested: AsyncJob | None = None) -> Job:
    async with lock:
        return await cond.acquire(kind, owner, timeout_s, nested)


async def take_async(cond: JobCondition, lock: asyncio.Lock, owner: str = "start",
                     timeout_s: float = TIMEOUT) -> AsyncJob:
    async with lock:
        return await cond.acquire_async(AsyncJobKind.START, owner, timeout_s)


async def give(cond: JobCondition, lock: asyncio.Lock, job: Job | AsyncJob) -> None:
    async with lock:
        cond.release(job)


async def in_task(coro: object) -> object:
    """Run `coro` in a task of its own (another client), and return its result."""
    return await asyncio.create_task(coro)  # type: ignore[arg-type]


async def test_modify_excludes_modify_and_timeout_names_the_holder(
        cond: JobCondition, lock: asyncio.Lock) -> None:
    holder = await take(cond, lock, JobKind.MODIFY, "suspend (client pid 4242)")
    assert cond.sync_job is holder

    started = time.monotonic()
    with pytest.raises(JobTimeoutError) as info:
        await in_task(take(cond, lock, JobKind.MODIFY, "reset (client pid 77)"))
    elapsed = time.monotonic() - started

    assert 0.9 * TIMEOUT <= elapsed <= 3 * TIMEOUT
    message = str(info.value)
    assert "'modify'" in message
    assert "suspend (client pid 4242)" in message
    assert "held for" in message
    assert "reset (client pid 77)" in message
    assert "'vm'" in message
    assert info.value.kind == "job-timeout"
    # The holder still has its job; the failed waiter took nothing.
    assert cond.sync_job is holder
    assert not lock.locked()


async def test_timeout_is_raised_with_the_lock_held(cond: JobCondition,
                                                    lock: asyncio.Lock) -> None:
    await take(cond, lock, JobKind.MODIFY, "a")

    async def waiter() -> bool:
        async with lock:
            try:
                await cond.acquire(JobKind.MODIFY, "b", TIMEOUT)
            except JobTimeoutError:
                return lock.locked()
        return False

    assert await in_task(waiter()) is True
    assert not lock.locked()


async def test_the_lock_is_free_while_a_waiter_waits(cond: JobCondition,
                                                     lock: asyncio.Lock) -> None:
    holder = await take(cond, lock, JobKind.MODIFY, "a")
    waiter = asyncio.create_task(take(cond, lock, JobKind.QUERY, "b", 5.0))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    # Another task can take the domain lock meanwhile (the wait released it).
    await asyncio.wait_for(lock.acquire(), 1.0)
    lock.release()
    await give(cond, lock, holder)
    job = await asyncio.wait_for(waiter, 2.0)
    assert job.kind is JobKind.QUERY


async def test_release_wakes_a_waiter(cond: JobCondition, lock: asyncio.Lock) -> None:
    holder = await take(cond, lock, JobKind.MODIFY, "a")
    waiter = asyncio.create_task(take(cond, lock, JobKind.MODIFY, "b", 5.0))
    await asyncio.sleep(0.05)
    assert not waiter.done()

    released = time.monotonic()
    await give(cond, lock, holder)
    job = await asyncio.wait_for(waiter, 2.0)
    assert time.monotonic() - released < 1.0
    assert job.owner == "b" and job.kind is JobKind.MODIFY
    assert cond.sync_job is job


async def test_two_waiters_get_the_job_one_after_the_other(cond: JobCondition,
                                                           lock: asyncio.Lock) -> None:
    holder = await take(cond, lock, JobKind.MODIFY, "a")
    w1 = asyncio.create_task(take(cond, lock, JobKind.MODIFY, "b", 5.0))
    w2 = asyncio.create_task(take(cond, lock, JobKind.MODIFY, "c", 5.0))
    await asyncio.sleep(0.05)
    await give(cond, lock, holder)

    done, pending = await asyncio.wait({w1, w2}, timeout=1.0,
                                       return_when=asyncio.FIRST_COMPLETED)
    assert len(done) == 1 and len(pending) == 1
    first = done.pop().result()
    await asyncio.sleep(0.05)
    assert not pending.pop().done(), "both waiters got the sync slot"
    await give(cond, lock, first)
    second = await asyncio.wait_for(w2 if first.owner == "b" else w1, 2.0)
    assert {first.owner, second.owner} == {"b", "c"}


SYNC_KINDS = (JobKind.QUERY, JobKind.MODIFY, JobKind.SUSPEND, JobKind.DESTROY, JobKind.ABORT)


async def test_sync_kinds_exclude_each_other(cond: JobCondition, lock: asyncio.Lock) -> None:
    for held in SYNC_KINDS:
        job = await take(cond, lock, held, "holder")
        for wanted in SYNC_KINDS:
            with pytest.raises(JobTimeoutError, match=f"'{held}'"):
                await in_task(take(cond, lock, wanted, "other", 0.05))
        with pytest.raises(JobTimeoutError, match=f"'{held}'"):
            await in_task(take_async(cond, lock, "another start", 0.05))
        await give(cond, lock, job)
    assert cond.sync_job is None and cond.async_job is None


async def test_the_mask_of_an_async_job_decides_who_runs_beside_it(
        cond: JobCondition, lock: asyncio.Lock) -> None:
    start = await take_async(cond, lock, "start (client pid 1)")
    assert cond.async_job is start and start.mask == DEFAULT_MASK
    for kind in (JobKind.QUERY, JobKind.DESTROY, JobKind.ABORT):
        job = await in_task(take(cond, lock, kind, str(kind)))
        assert isinstance(job, Job) and cond.sync_job is job
        await give(cond, lock, job)
    for kind in (JobKind.MODIFY, JobKind.SUSPEND):
        started = time.monotonic()
        with pytest.raises(JobTimeoutError) as info:
            await in_task(take(cond, lock, kind, "suspend"))
        assert time.monotonic() - started >= 0.9 * TIMEOUT
        assert "async job 'start' (phase prepare)" in str(info.value)
        assert "start (client pid 1)" in str(info.value)
    with pytest.raises(JobTimeoutError):
        await in_task(take_async(cond, lock, "another start"))
    # A migration-like phase change: suspend/resume become allowed beside it.
    async with lock:
        start.allow(DEFAULT_MASK | {JobKind.SUSPEND})
    job = await in_task(take(cond, lock, JobKind.SUSPEND, "suspend"))
    assert isinstance(job, Job)
    await give(cond, lock, job)
    assert cond.async_job is start


async def test_a_waiter_is_woken_when_the_mask_allows_it(cond: JobCondition,
                                                         lock: asyncio.Lock) -> None:
    start = await take_async(cond, lock)
    waiter = asyncio.create_task(take(cond, lock, JobKind.SUSPEND, "resume", 5.0))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    async with lock:
        start.allow(DEFAULT_MASK | {JobKind.SUSPEND})
    job = await asyncio.wait_for(waiter, 1.0)
    assert job.kind is JobKind.SUSPEND


async def test_nested_jobs_go_through_the_handle(cond: JobCondition,
                                                 lock: asyncio.Lock) -> None:
    start = await take_async(cond, lock, "start")
    # Another task handed the handle may take a nested MODIFY (not in the mask)...
    nested = await in_task(take(cond, lock, JobKind.MODIFY, "start: cont", 0.05, start))
    assert isinstance(nested, Job) and cond.sync_job is nested and nested.nested_in is start
    # ...and while it runs, other tasks wait even for queries,
    with pytest.raises(JobTimeoutError, match="start: cont"):
        await in_task(take(cond, lock, JobKind.QUERY, "dominfo", 0.05))
    await give(cond, lock, nested)
    # while being the async job's own task is not enough without the handle.
    with pytest.raises(JobTimeoutError):
        await take(cond, lock, JobKind.MODIFY, "not nested", 0.05)
    await give(cond, lock, start)
    # A stale handle is refused outright.
    with pytest.raises(RuntimeError, match="not the async job"):
        await take(cond, lock, JobKind.MODIFY, "stale", 0.05, start)
    assert cond.sync_job is None and cond.async_job is None


async def test_async_waits_for_a_sync_job(cond: JobCondition, lock: asyncio.Lock) -> None:
    query = await take(cond, lock, JobKind.QUERY, "dominfo")
    with pytest.raises(JobTimeoutError, match="'query'"):
        await in_task(take_async(cond, lock))
    waiter = asyncio.create_task(take_async(cond, lock, "start", 5.0))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await give(cond, lock, query)
    start = await asyncio.wait_for(waiter, 2.0)
    assert cond.async_job is start


async def test_releasing_async_wakes_a_modify_and_sets_done(cond: JobCondition,
                                                            lock: asyncio.Lock) -> None:
    start = await take_async(cond, lock)
    waiter = asyncio.create_task(take(cond, lock, JobKind.MODIFY, "suspend", 5.0))
    await asyncio.sleep(0.05)
    assert not waiter.done() and not start.done.is_set()
    await give(cond, lock, start)
    job = await asyncio.wait_for(waiter, 2.0)
    assert job.owner == "suspend" and start.done.is_set()


async def test_phases(cond: JobCondition, lock: asyncio.Lock) -> None:
    start = await take_async(cond, lock)
    assert start.phase == "prepare"
    with pytest.raises(AssertionError, match="without the domain lock"):
        start.set_phase("spawn")
    async with lock:
        start.set_phase("connect")
        with pytest.raises(ValueError, match="no phase 'migrate'"):
            start.set_phase("migrate")
    info = start.info()
    assert (info["kind"], info["phase"], info["owner"]) == ("start", "connect", "start")
    assert info["allowed"] == ["abort", "destroy", "query"]


async def test_abort_stops_an_abortable_wait(cond: JobCondition, lock: asyncio.Lock) -> None:
    start = await take_async(cond, lock)
    assert await start.abortable(asyncio.sleep(0.01, "done")) == "done"
    cancelled = asyncio.Event()

    async def long_wait() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    task = asyncio.create_task(start.abortable(long_wait()))
    await asyncio.sleep(0.05)
    async with lock:
        start.request_abort("domjobabort (client pid 7)")
    with pytest.raises(JobAbortedError, match="aborted by domjobabort \\(client pid 7\\)"):
        await asyncio.wait_for(task, 1.0)
    assert cancelled.is_set()
    # Once asked, every later abortable wait fails at once.
    with pytest.raises(JobAbortedError):
        await start.abortable(asyncio.sleep(0))
    assert start.info()["abort_requested"] == "domjobabort (client pid 7)"


def test_job_describe_names_kind_owner_and_duration() -> None:
    job = Job(JobKind.MODIFY, "reset (client pid 9)", since=100.0)
    assert job.describe(now=102.5) == "job 'modify' for 'reset (client pid 9)' (held for 2.5 s)"


async def test_condition_describe(cond: JobCondition, lock: asyncio.Lock) -> None:
    assert cond.describe() == {"job": None, "async_job": None}
    start = await take_async(cond, lock)
    info = cond.describe()
    assert info["job"] is None
    assert info["async_job"] is not None and "'start'" in info["async_job"]
    await give(cond, lock, start)


async def test_lock_stays_tracked_to_the_waiter_after_a_job_wait() -> None:
    lock = TrackedLock("domain vm")
    cond = JobCondition(lock, "vm")
    holder = await take(cond, lock, JobKind.MODIFY, "a")

    async def waiter() -> tuple[bool, list[TrackedLock]]:
        async with lock:
            job = await cond.acquire(JobKind.MODIFY, "b", 5.0)
            seen = (lock.held_by_current_task(), locks_held())
            cond.release(job)
        return seen

    task = asyncio.create_task(waiter())
    await asyncio.sleep(0.05)
    await give(cond, lock, holder)
    held_by_me, held = await asyncio.wait_for(task, 2.0)
    assert held_by_me
    assert held == [lock]
