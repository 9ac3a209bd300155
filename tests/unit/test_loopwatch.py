"""The event-loop watch (qvirtd.loopwatch, rule L6), on a real uvloop loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest
import uvloop

from qvirtd.loopwatch import LoopWatch, counts_as_blocked

THRESHOLD = 0.02

Watched = tuple[asyncio.AbstractEventLoop, LoopWatch]


@pytest.fixture
def watched() -> Iterator[Watched]:
    loop = uvloop.new_event_loop()
    watch = LoopWatch(THRESHOLD)
    watch.start(loop)
    try:
        yield loop, watch
    finally:
        watch.stop()
        loop.close()


def _step(x: int) -> int:
    return x * 3 + 1


def spin_cpu(seconds: float) -> None:
    """Pure-Python CPU work: `seconds` of this thread's CPU time, in many short calls (the
    innermost frame keeps changing, as in real code)."""
    end = time.thread_time() + seconds
    x = 0
    while time.thread_time() < end:
        x = _step(x) & 0xFFFF


def stat_cpu(seconds: float) -> None:
    """`seconds` of CPU time in short system calls, each releasing the GIL."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        os.stat("/")


def spin_wall(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def innermost(watch: LoopWatch) -> str:
    return str(watch.reports[0]["stack"][-1])


def test_sleep_in_a_callback_is_reported_as_blocked(watched: Watched) -> None:
    loop, watch = watched

    def sleep_60ms_in_callback() -> None:
        time.sleep(0.06)

    async def scenario() -> None:
        await asyncio.sleep(0.03)
        loop.call_soon(sleep_60ms_in_callback)
        await asyncio.sleep(0.1)

    loop.run_until_complete(scenario())
    assert watch.stalls == 1, watch.reports
    report = watch.reports[0]
    assert report["kind"] == "blocked", report
    assert report["blocked_ms"] >= THRESHOLD * 1e3
    assert report["cpu_ms"] < 10
    assert report["ended"]
    assert "in sleep_60ms_in_callback: time.sleep(0.06)" in innermost(watch)
    # The frame that ran the loop, innermost last: the test function itself.
    assert "in test_sleep_in_a_callback_is_reported_as_blocked:" in report["stack"][0]
    json.dumps(watch.summary())


def test_cpu_burn_in_a_callback_is_reported_as_cpu(watched: Watched) -> None:
    loop, watch = watched

    def burn_60ms_of_cpu() -> None:
        spin_cpu(0.06)

    async def scenario() -> None:
        await asyncio.sleep(0.03)
        loop.call_soon(burn_60ms_of_cpu)
        await asyncio.sleep(0.05)

    loop.run_until_complete(scenario())
    assert watch.stalls == 1, watch.reports
    report = watch.reports[0]
    assert report["kind"] == "cpu", report
    assert report["cpu_ms"] >= THRESHOLD * 1e3
    assert any("in burn_60ms_of_cpu:" in line for line in report["stack"])
    assert "in spin_cpu:" in innermost(watch) or "in _step:" in innermost(watch)


def test_blocking_task_step_is_reported(watched: Watched) -> None:
    loop, watch = watched

    async def step_that_sleeps() -> None:
        await asyncio.sleep(0.03)
        time.sleep(0.06)  # noqa: ASYNC251 (the point of the test)
        await asyncio.sleep(0.03)

    loop.run_until_complete(step_that_sleeps())
    assert watch.stalls == 1, watch.reports
    assert watch.reports[0]["kind"] == "blocked"
    assert "in step_that_sleeps: time.sleep(0.06)" in innermost(watch)


def test_cpu_burn_in_a_task_step_is_reported(watched: Watched) -> None:
    """50 ms of CPU in one task step. The watcher only gets the GIL ~5 ms into the step and
    then every ~10 ms (it must wait a switch interval each time)."""
    loop, watch = watched

    async def step_that_burns() -> None:
        await asyncio.sleep(0.03)
        spin_cpu(0.05)
        await asyncio.sleep(0.03)

    loop.run_until_complete(step_that_burns())
    assert watch.stalls == 1, watch.summary()
    assert watch.reports[0]["kind"] == "cpu"
    assert any("in step_that_burns: spin_cpu(0.05)" in line for line in watch.reports[0]["stack"])


def test_blocking_c_callback_is_reported(watched: Watched) -> None:
    """No Python frame at all: the loop calls time.sleep directly."""
    loop, watch = watched

    async def scenario() -> None:
        await asyncio.sleep(0.03)
        loop.call_soon(time.sleep, 0.06)
        await asyncio.sleep(0.05)

    loop.run_until_complete(scenario())
    assert watch.stalls == 1, watch.reports
    report = watch.reports[0]
    assert report["kind"] == "blocked"
    assert any("no Python frame" in line for line in report["stack"])


def test_many_short_callbacks_in_one_iteration_are_fine(watched: Watched) -> None:
    loop, watch = watched
    ran: list[float] = []

    def short_callback() -> None:
        spin_wall(0.0001)
        ran.append(time.perf_counter())

    async def scenario() -> None:
        await asyncio.sleep(0.03)
        for _ in range(2000):  # all ready at once: one loop iteration of >= 200 ms
            loop.call_soon(short_callback)
        await asyncio.sleep(0.03)

    loop.run_until_complete(scenario())
    assert len(ran) == 2000
    assert ran[-1] - ran[0] >= 0.18  # the heartbeat really was held off all along
    assert watch.stalls == 0, watch.reports


def test_many_short_task_steps_are_fine(watched: Watched) -> None:
    loop, watch = watched

    async def busy_task() -> None:
        # One task, steps of 1 ms back to back: the same coroutine frame is on the stack at
        # almost every sample, but each step is a callback of its own.
        for _ in range(300):
            spin_cpu(0.001)
            await asyncio.sleep(0)

    loop.run_until_complete(busy_task())
    assert watch.stalls == 0, watch.reports


def test_a_task_yielding_every_15ms_is_fine(watched: Watched) -> None:
    """Steps of 15 ms overrun the heartbeat, so the watcher follows them, but each step is
    a callback of its own: they must not add up."""
    loop, watch = watched

    async def chunked_work() -> None:
        for _ in range(15):
            spin_cpu(0.015)
            await asyncio.sleep(0)

    loop.run_until_complete(chunked_work())
    summary = watch.summary()
    assert watch.stalls == 0, summary
    assert summary["closest"]["callback"] == "chunked_work", summary


def test_task_steps_blocking_12ms_each_are_fine(watched: Watched) -> None:
    """No Python frame above the coroutine while it sleeps: the watcher can only tell the
    steps apart by the heartbeat that runs between them."""
    loop, watch = watched

    async def steps_that_sleep() -> None:
        for _ in range(12):
            time.sleep(0.012)  # noqa: ASYNC251 (the point of the test)
            await asyncio.sleep(0)

    loop.run_until_complete(steps_that_sleep())
    summary = watch.summary()
    assert watch.stalls == 0, summary
    assert summary["closest"]["callback"] == "steps_that_sleep", summary


def test_many_short_c_callbacks_in_one_iteration_are_fine(watched: Watched) -> None:
    """No Python frame between them, so the watcher cannot tell them apart by frame: 100
    sleeps of 0.5 ms (50 ms in one loop iteration) must still not count as one."""
    loop, watch = watched

    async def scenario() -> None:
        await asyncio.sleep(0.03)
        for _ in range(100):
            loop.call_soon(time.sleep, 0.0005)
        await asyncio.sleep(0.03)

    loop.run_until_complete(scenario())
    assert watch.stalls == 0, watch.reports


def test_closest_is_the_worst_callback_under_the_threshold(watched: Watched) -> None:
    loop, watch = watched

    def sleep_3ms() -> None:
        time.sleep(0.003)

    def sleep_18ms() -> None:
        time.sleep(0.018)

    async def scenario() -> None:
        for callback in (sleep_3ms, sleep_18ms, sleep_3ms):
            await asyncio.sleep(0.02)
            loop.call_soon(callback)
        await asyncio.sleep(0.02)

    loop.run_until_complete(scenario())
    summary = watch.summary()
    assert watch.stalls == 0, summary
    assert summary["closest"]["callback"] == "sleep_18ms", summary
    assert 3 < summary["closest"]["blocked_ms"] < THRESHOLD * 1e3, summary


def test_task_steps_are_never_merged_even_under_a_low_threshold() -> None:
    """A threshold below the heartbeat interval: one task doing 1 ms steps back to back is
    still fine, each step is a callback of its own."""
    loop = uvloop.new_event_loop()
    watch = LoopWatch(0.003)
    watch.start(loop)

    async def busy_task() -> None:
        for _ in range(400):
            spin_cpu(0.001)
            await asyncio.sleep(0)

    try:
        loop.run_until_complete(busy_task())
    finally:
        watch.stop()
        loop.close()
    assert watch.stalls == 0, watch.reports


def test_what_counts_as_blocked() -> None:
    gil_area = (0x7000_0000, 0x7010_0000)
    in_gil, elsewhere = (202, 0x7000_01B0), (202, 0x5600_0000)
    nanosleep = (230, 1)
    # Python code asleep: blocked, except waiting for the GIL.
    assert counts_as_blocked(False, nanosleep, "hrtimer_nanosleep", gil_area)
    assert counts_as_blocked(False, elsewhere, "futex_do_wait", gil_area)  # a threading.Lock
    assert not counts_as_blocked(False, in_gil, "futex_do_wait", gil_area)
    assert not counts_as_blocked(False, None, "futex_wait_queue", None)  # cannot tell
    assert counts_as_blocked(False, None, None, gil_area)
    # No Python frame: only a known wait other than the loop's poll, by wchan or else (no
    # wchan for a task not dequeued yet) by system call, where the poll calls are known.
    polls = frozenset({232, 281, 7})
    assert counts_as_blocked(True, nanosleep, "hrtimer_nanosleep", gil_area, polls)
    assert not counts_as_blocked(True, (232, 3), "do_epoll_wait", gil_area, polls)
    assert not counts_as_blocked(True, (232, 3), "ep_poll", gil_area, polls)
    assert not counts_as_blocked(True, (7, 3), "do_sys_poll", gil_area, polls)
    assert counts_as_blocked(True, nanosleep, None, gil_area, polls)
    assert not counts_as_blocked(True, (281, 3), None, gil_area, polls)
    assert not counts_as_blocked(True, nanosleep, None, gil_area, frozenset())  # unknown
    assert not counts_as_blocked(True, None, None, gil_area, polls)
    assert not counts_as_blocked(True, in_gil, "futex_do_wait", gil_area, polls)


def test_idle_loop_is_fine(watched: Watched) -> None:
    loop, watch = watched
    loop.run_until_complete(asyncio.sleep(0.5))
    assert watch.stalls == 0, watch.reports
    assert watch.heartbeats <= 2  # the watcher left the idle loop asleep
    summary = watch.summary()
    assert summary["stalls"] == 0 and summary["last"] == []
    assert summary["threshold_ms"] == THRESHOLD * 1e3
    # Nothing but the loop's own frames: no callback was ever followed.
    assert summary["longest"] is None or summary["longest"]["callback"] is None, summary


def _pin_threads(cpus: set[int], only: int | None = None) -> dict[int, set[int]]:
    """Pin all our threads (or only thread `only`) to `cpus`; return what to put back."""
    saved = {}
    for tid in map(int, os.listdir("/proc/self/task")):
        if only is not None and tid != only:
            continue
        try:
            saved[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, cpus)
        except OSError:  # the thread ended meanwhile
            pass
    return saved


@pytest.mark.parametrize("watcher_too", [True, False], ids=["all-on-one-cpu", "watcher-free"])
def test_cpu_contention_is_not_a_violation(watched: Watched, watcher_too: bool) -> None:
    """Four busy processes on the loop's CPU: callbacks slow by the wall clock, no stall.
    The watcher shares that CPU too, or (the harder case for the accounting: it then samples
    on time while the loop thread waits for a CPU) runs free on another one."""
    loop, watch = watched
    cpu = max(os.sched_getaffinity(0))
    saved = _pin_threads({cpu}, None if watcher_too else threading.get_native_id())
    hogs: list[subprocess.Popen[bytes]] = []

    def short_callback(n: int) -> None:
        stat_cpu(0.0025)  # 5 ms of CPU and 0.4 ms asleep: well under the threshold,
        time.sleep(0.0002)  # however long it takes by the wall clock
        stat_cpu(0.0025)
        time.sleep(0.0002)
        if n:
            loop.call_soon(short_callback, n - 1)

    async def awaiter() -> None:
        while True:
            spin_cpu(0.001)
            await asyncio.sleep(0.001)

    async def scenario() -> None:
        loop.call_soon(short_callback, 10**6)
        task = asyncio.ensure_future(awaiter())
        await asyncio.sleep(1.2)
        task.cancel()

    try:
        for _ in range(4):
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            hogs.append(hog)
            os.sched_setaffinity(hog.pid, {cpu})
        time.sleep(0.05)
        t0, cpu0 = time.monotonic(), time.thread_time()
        loop.run_until_complete(scenario())
        share = (time.thread_time() - cpu0) / (time.monotonic() - t0)
    finally:
        for hog in hogs:
            hog.kill()
        for hog in hogs:
            hog.wait()
        for tid, cpus in saved.items():
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError:
                pass
    assert share < 0.6, f"no real contention: the loop thread had {share:.0%} of a CPU"
    summary = watch.summary()
    assert watch.stalls == 0, summary
    # The watcher did follow a callback for longer than the threshold by the wall clock:
    # timing callbacks by the wall clock would have reported it.
    assert summary["longest"]["wall_ms"] > THRESHOLD * 1e3, summary
    # And no callback was charged for more than it did (5 ms of CPU, 0.4 ms asleep).
    assert summary["closest"]["held_ms"] < 8, summary


@pytest.mark.parametrize("work", ["python", "c-call"])
def test_gil_contention_from_a_busy_thread_is_not_a_violation(watched: Watched,
                                                             work: str) -> None:
    """A thread running Python (as under asyncio.to_thread) makes the loop wait for the GIL
    after each system call, for a switch interval (5 ms), or for a whole C call that never
    lets the GIL go (here sum() over a range, ~10 ms): slow, but not blocked by the loop's
    own code."""
    loop, watch = watched
    done = threading.Event()

    def cpu_thread() -> None:
        while not done.is_set():
            if work == "python":
                spin_cpu(0.01)
            else:
                sum(range(300_000))

    def callback_with_syscalls(n: int) -> None:
        for _ in range(10):
            # 0.2 ms asleep (2 ms in all, far under the threshold) gives the GIL away long
            # enough for cpu_thread to take it.
            time.sleep(0.0002)
        if n:
            loop.call_soon(callback_with_syscalls, n - 1)

    async def scenario() -> None:
        loop.call_soon(callback_with_syscalls, 10**6)
        await asyncio.sleep(0.6)

    thread = threading.Thread(target=cpu_thread)
    thread.start()
    try:
        loop.run_until_complete(scenario())
    finally:
        done.set()
        thread.join()
    summary = watch.summary()
    assert watch.stalls == 0, summary
    # A callback took longer than the threshold by the wall clock, waiting for the GIL.
    assert summary["longest"]["wall_ms"] > THRESHOLD * 1e3, summary


def _blocking_connect_round(loop: asyncio.AbstractEventLoop, tmp: str) -> tuple[float, str]:
    """One callback doing a blocking connect() to a UNIX listener with a full backlog: how
    long it took, and what it raised."""
    path = os.path.join(tmp, "full.sock")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    queued = []
    for _ in range(2):  # fills the backlog (listen(1) queues 2): nobody accepts
        sock = socket.socket(socket.AF_UNIX)
        sock.setblocking(False)
        sock.connect(path)
        queued.append(sock)
    # A blocking connect that times out after 0.1 s. settimeout(0.1) would not do: Python
    # then connects in non-blocking mode, and a UNIX socket with a full backlog fails at once
    # with EAGAIN. SO_SNDTIMEO bounds the kernel's own wait in connect().
    blocking = socket.socket(socket.AF_UNIX)
    blocking.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, 100_000))
    outcome: list[tuple[float, str]] = []

    def connect_to_full_listener() -> None:
        t = time.monotonic()
        try:
            blocking.connect(path)
            raised = "nothing"
        except OSError as e:
            raised = type(e).__name__
        outcome.append((time.monotonic() - t, raised))

    async def scenario() -> None:
        await asyncio.sleep(0.03)
        loop.call_soon(connect_to_full_listener)
        await asyncio.sleep(0.05)

    try:
        loop.run_until_complete(scenario())
    finally:
        for sock in [*queued, blocking, listener]:
            sock.close()
    return outcome[0]


def test_blocking_unix_connect_is_reported(watched: Watched) -> None:
    loop, watch = watched
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(3):
            took, raised = _blocking_connect_round(loop, tmp)
            # (Once in a while connect() returned at once, with no error: an interrupted
            # connect() is taken by Python for a completed one. Not what is tested here.)
            if raised == "BlockingIOError" and took >= 0.09:
                break
        else:
            pytest.fail(f"connect() did not block: {took:.3f} s, raised {raised}")
    assert watch.stalls == 1, watch.summary()
    report = watch.reports[-1]
    assert report["kind"] == "blocked", report
    assert "in connect_to_full_listener: blocking.connect(path)" in innermost(watch)
    assert report["wchan"] is None or "unix" in report["wchan"], report


def test_a_longer_idle_interval_still_catches_a_block_after_idling() -> None:
    with pytest.raises(ValueError):
        LoopWatch(THRESHOLD, 0.005, idle_interval_s=0.001)
    loop = uvloop.new_event_loop()
    watch = LoopWatch(THRESHOLD, 0.005, idle_interval_s=0.02)
    watch.start(loop)

    def sleep_60ms_after_idling() -> None:
        time.sleep(0.06)

    async def scenario() -> None:
        await asyncio.sleep(0.2)  # long enough for the watcher to slow down
        loop.call_soon(sleep_60ms_after_idling)
        await asyncio.sleep(0.05)

    try:
        loop.run_until_complete(scenario())
    finally:
        watch.stop()
        loop.close()
    assert watch.stalls == 1, watch.summary()
    assert "in sleep_60ms_after_idling:" in innermost(watch)


def test_stop_is_idempotent_and_ends_the_thread() -> None:
    loop = uvloop.new_event_loop()
    watch = LoopWatch(THRESHOLD)
    try:
        watch.start(loop)
        loop.run_until_complete(asyncio.sleep(0.03))
        assert watch.running
        assert any(t.name == "qvirtd-loopwatch" for t in threading.enumerate())
        with pytest.raises(RuntimeError):
            watch.start(loop)
        watch.stop()
        watch.stop()
        assert not watch.running
        assert not any(t.name == "qvirtd-loopwatch" for t in threading.enumerate())
        beats_before = watch._beat
        loop.run_until_complete(asyncio.sleep(0.03))
        assert watch._beat is beats_before  # the heartbeat is gone too

        # Started again, and stopped from another thread while the loop runs.
        watch.start(loop)

        async def stop_from_a_thread() -> None:
            await asyncio.sleep(0.03)
            await asyncio.to_thread(watch.stop)
            beats = watch._beat
            await asyncio.sleep(0.03)
            assert watch._beat is beats

        loop.run_until_complete(stop_from_a_thread())
        assert not watch.running
    finally:
        watch.stop()
        loop.close()
    watch.stop()
