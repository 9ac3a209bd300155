"""Rule L6, "nothing blocks the event loop", checked while the daemon runs.

One blocking system call (a `connect()` that waits, an fsync, a big read, a fork) or one long
CPU-bound stretch inside a callback or task step stalls every client and every domain at once.
`LoopWatch` notices when ONE callback or task step holds the loop for `threshold_s` or more
(20 ms for the daemon), records where (the loop thread's Python stack, and the kernel's wait
channel when it sleeps in a system call), counts it in `LoopWatch.stalls` and logs it once at
WARNING (logger `qvirtd.loopwatch`). Integration tests can then assert that the count stays
zero, as they do for the lock rule L4 (`qvirtd.locks`).

Why wall-clock timing is not enough
-----------------------------------
asyncio's debug mode times each callback by the wall clock (`slow_callback_duration`). On the
test machines (2 cores, TCG guests eating both) the daemon is often simply not scheduled for
tens of milliseconds: a 2 ms callback then "takes" 40 ms although it never blocked. Debug mode
is also far too slow for production. So the watch measures what the loop thread itself did,
from the kernel's per-thread accounting, and never counts waiting for a CPU (nor for the GIL,
the same thing one level up).

How the watcher decides
-----------------------
* A daemon thread (the watcher) wakes every `interval_s` (5 ms) and looks at the loop thread's
  stack (`sys._current_frames()`). The *base* is the Python frame that runs the loop (the
  caller of `run_until_complete`, e.g. `asyncio.Runner.run`; `Handle._run` under the pure
  Python loop), learnt from a heartbeat callback (`sys._getframe(1)`); the frame right on top
  of it is the callback or task step running now, the *root*. An idle uvloop has no Python
  frame above the base (its stack is just `uvloop.run` -> `Runner.run`) and sleeps in
  `epoll_wait`: never followed. While its CPU clock does not move, the watcher does not even
  look at its stack again.
* Following a root: while the *same frame object* is the root at consecutive samples,
  everything the thread did in between happened inside that one call (a function's frame
  cannot leave the stack and come back). A coroutine frame does come back, once per task
  step, so a coroutine root counts as the same step only while the same plain function frame
  stays above it (it cannot outlive the step), or while a heartbeat asked for at the previous
  sample (while the loop thread stood still in that step) has still not run: the loop runs
  it before any later step of any task (`call_soon_threadsafe` queues it behind the running
  callback). The heartbeat is asked for only then, and to find the base: an idle loop is
  never woken by the watch.
* Samples are atomic: /proc is read through ctypes.PyDLL, which keeps the GIL, so the loop
  thread's Python code stands still while the watcher looks (the reads take microseconds;
  os.pread would hand the GIL to the loop and wait a whole switch interval to get it back).
  Only `/proc/<tid>/syscall` is read with the GIL released (the kernel may wait up to a tick
  there), and its answer is used only if the thread was not scheduled in meanwhile.
* What a followed stretch is charged with, from its first sample:
  - CPU: the loop thread's CPU clock (`pthread_getcpuclockid`), exact;
  - blocked: time asleep in ONE sleep, seen at two consecutive samples that find the thread
    asleep (S or D in `.../stat`) without it having been scheduled in between (schedstat
    field 3 unchanged), in a wait that counts (`.../syscall`): not a futex inside the
    interpreter's own static data (`_PyRuntime`, where the GIL lives). Time measured as wall
    minus CPU minus run-queue wait (schedstat field 2), so a CPU-starved thread is never
    blocked. Sleeps the watcher cannot see whole are not counted: waits for a CPU after a short
    sleep are sometimes missing from run_delay (kernel 6.18, EEVDF's delayed dequeue), GIL
    hand-overs wait for another thread to be woken on another (maybe halted) vCPU, steal time
    shows as nobody's: none of it may pass for blocking.
  A stretch with CPU + blocked >= the threshold is a violation, of kind "blocked" or "cpu",
  whichever is larger. With no Python frame above the base (C code run directly by the loop,
  e.g. `call_soon(time.sleep, 1)`) only blocked time counts, and only in a wait other than the
  loop's own poll (epoll/poll/select, judged by the wchan).

Precision: a callback is first seen at most one interval after it starts, later for pure
Python CPU work (the watcher must wait up to a GIL switch interval, 5 ms, to look, so it
samples it every ~10 ms), and is charged from its first sample. Measured (10 runs each, test
VM under load): blocking calls of 25 ms or more always reported, in a callback or a task
step; pure-Python CPU stretches of 30 ms 30 to 60 % of the time, 36 ms 60 to 100 %, 40 ms 90
to 100 %; nothing under 20 ms ever. Blocking calls each shorter than an interval are not seen
as blocking (their CPU time still counts).

Cost, measured on the 2-core test VM (benchmarks/bench_loopwatch.py, uvloop, Python 3.11;
ranges over several runs, this VM is noisy; docs/design.md, "Checking L6"): the loop itself is never
woken by the watch. Waking any thread costs 40 to 90 us of CPU on this VM, so the watcher's
wake-ups dominate: an idle loop with the watch on uses 7.5 to 15 ms of CPU per second at a 5 ms
interval, 1.3 to 1.6 times a bare thread sleeping 5 ms at a time; 3 to 6 ms with
`idle_interval_s=0.02`. While the loop runs short CPU-bound callbacks back to back it is 4 to
10 % slower (median), and the watcher uses 40 to 56 ms of CPU per second on the other core:
while it waits for the GIL, every release of it by uvloop (at each loop iteration) wakes it.
UNIX-socket echo round trips: p50 unchanged (20 to 35 us), p99 from +0 to +230 us (a message
that arrives while the watcher holds the GIL waits for it), no more than the machine's own
noise.

Limits: without per-task schedstat (CONFIG_SCHED_INFO) only CPU stretches are detected. A
process stopped (SIGSTOP, debugger, cgroup freeze) in the middle of a sleep being followed
counts the frozen time as blocked. Waiting on a `threading` lock or a `concurrent.futures`
result counts as blocked, whoever holds it: that is a blocking call in the loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import datetime
import inspect
import linecache
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from types import CodeType, FrameType
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

# A frame with these flags can leave the stack and be resumed later (a task step).
_RESUMABLE = (inspect.CO_COROUTINE | inspect.CO_GENERATOR | inspect.CO_ITERABLE_COROUTINE
              | inspect.CO_ASYNC_GENERATOR)
# Wait channels and system calls of a loop asleep in its own poll (epoll_wait, epoll_pwait,
# epoll_pwait2, poll, ppoll, select, pselect6), by machine.
_POLL_WCHANS = ("epoll", "ep_poll", "poll", "select")
_POLL_SYSCALLS = {"x86_64": frozenset({232, 281, 441, 7, 271, 23, 270}),
                  "aarch64": frozenset({22, 441, 73, 72})}.get(os.uname().machine, frozenset())
_STACK_FRAMES = 12

Beat = tuple[int, CodeType | None]  # (how many heartbeats ran, code of the base frame)


def _gil_holding_pread() -> Any:
    """libc's pread called WITHOUT releasing the GIL (ctypes.PyDLL), or None.

    os.pread releases the GIL, and a loop thread busy in Python takes it back at once: the
    watcher then waits a whole switch interval (5 ms) per read, and the loop thread runs on
    in the middle of a sample. Reads of /proc take microseconds; holding the GIL through
    them keeps a sample short and the loop thread's Python code still while it is taken."""
    try:
        libc = ctypes.PyDLL(None, use_errno=True)
        pread = libc.pread
    except (OSError, AttributeError):
        return None
    pread.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_long)
    pread.restype = ctypes.c_ssize_t
    return pread


_PREAD = _gil_holding_pread()


class _TaskProc:
    """Reads one thread's /proc/self/task/<tid> files through descriptors opened once."""

    def __init__(self, tid: int) -> None:
        self.buf = ctypes.create_string_buffer(4096)
        self.fds: dict[str, int] = {}
        for name in ("stat", "schedstat", "syscall", "wchan"):
            with contextlib.suppress(OSError):
                self.fds[name] = os.open(f"/proc/self/task/{tid}/{name}",
                                         os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()

    def _read(self, name: str, keep_gil: bool = True) -> str:
        fd = self.fds.get(name)
        if fd is None:
            return ""
        if _PREAD is not None and keep_gil:
            n = _PREAD(fd, self.buf, 4096, 0)
            return self.buf.raw[:n].decode("ascii", "replace") if n > 0 else ""
        try:
            return os.pread(fd, 4096, 0).decode("ascii", "replace")
        except OSError:
            return ""

    def state(self) -> str | None:
        """Field 3 of stat: R (running or runnable), S or D (asleep), T, Z..."""
        text = self._read("stat")
        end = text.rfind(")")
        return text[end + 2:end + 3] or None if end >= 0 else None

    def schedstat(self) -> tuple[int, int, int] | None:
        """(ns on a CPU, ns waiting on a run queue, times scheduled in), None if the kernel
        does not keep them."""
        try:
            ran, waited, slices = (int(x) for x in self._read("schedstat").split())
        except ValueError:
            return None
        return (ran, waited, slices) if ran > 0 else None

    def syscall(self) -> tuple[int, int] | None:
        """(system call number, first argument) while asleep in a system call.

        Read with the GIL released: the kernel waits for the thread to be off its run queue
        (wait_task_inactive), up to a scheduler tick for a thread that just went to sleep
        (EEVDF's delayed dequeue), and the loop thread may want the GIL meanwhile."""
        words = self._read("syscall", keep_gil=False).split()
        if words[:1] == ["-1"]:
            return -1, 0  # asleep outside a system call: a page fault, say
        if len(words) < 2 or words[0] == "running":
            return None
        try:
            return int(words[0]), int(words[1], 16)
        except ValueError:
            return None

    def wchan(self) -> str | None:
        text = self._read("wchan").strip()
        return text if text and text != "0" else None


def _find_interpreter_data() -> tuple[int, int] | None:
    """The address range of the memory mapping that holds `_PyRuntime`, hence the GIL."""
    try:
        addr = ctypes.addressof(ctypes.c_char.in_dll(ctypes.pythonapi, "_PyRuntime"))
        with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
            lines = maps.read().splitlines()
    except (AttributeError, ValueError, OSError):
        return None
    found: tuple[int, int] | None = None
    for line in lines:
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if found is None:
            if start <= addr < end:
                found = (start, end)
        elif start == found[1] and len(fields) < 6:  # the anonymous .bss right after
            found = (found[0], end)
        else:
            break
    return found


_INTERP_DATA: tuple[int, int] | None = None
_INTERP_DATA_DONE = False


def _interpreter_data() -> tuple[int, int] | None:
    global _INTERP_DATA, _INTERP_DATA_DONE
    if not _INTERP_DATA_DONE:
        _INTERP_DATA = _find_interpreter_data()
        _INTERP_DATA_DONE = True
    return _INTERP_DATA


def counts_as_blocked(c_level: bool, syscall: tuple[int, int] | None, wchan: str | None,
                      interp_data: tuple[int, int] | None,
                      poll_syscalls: frozenset[int] = _POLL_SYSCALLS) -> bool:
    """Whether a loop thread asleep in `syscall` (number, first argument; wait channel
    `wchan`) is blocked by the code it runs. Not if it waits for the GIL (a futex inside the
    interpreter's static data, `interp_data`) or, with no Python frame on top of the loop
    (`c_level`), if it is (or may be) the loop's own poll."""
    if syscall is not None and interp_data is not None and \
            interp_data[0] <= syscall[1] < interp_data[1]:
        return False
    if interp_data is None and wchan is not None and wchan.startswith("futex"):
        return False  # cannot tell the GIL from a lock: do not count
    if c_level:
        if wchan is not None:
            return not any(w in wchan for w in _POLL_WCHANS)
        # No wait channel for a task the scheduler has not dequeued yet (EEVDF's delayed
        # dequeue): the system call tells, where we know the numbers of the poll calls.
        return syscall is not None and bool(poll_syscalls) and syscall[0] not in poll_syscalls
    return True


@dataclass
class _Point:
    """What the watcher read at one sample."""

    t: float
    cpu: float  # loop thread CPU time, s
    sched: tuple[int, int, int] | None  # loop thread schedstat


class _Frames(NamedTuple):
    """Where the loop thread is, as seen by the watcher."""

    inner: FrameType | None  # innermost Python frame
    root: FrameType  # the callback or task step right above the base, or the base itself
    anchor: FrameType | None  # a plain function frame above a coroutine root: while it
    # stays on the stack, so does the task step
    c_level: bool  # no Python frame above the base


@dataclass
class _Stretch:
    """One callback or task step being followed by the watcher."""

    root: FrameType
    c_level: bool  # no Python frame above the base: C code run by the loop
    beat: Beat  # the last heartbeat before the stretch was seen
    first: _Point
    acct: _Point  # the last accounting point (a sample with the thread asleep)
    last_t: float
    cpu: float = 0.0
    runq: float = 0.0
    blocked: float = 0.0
    excluded: float = 0.0  # asleep but not blocked by the code: GIL waits, poll...
    wchan: str | None = None
    report: dict[str, Any] | None = None
    anchor: FrameType | None = None
    # A heartbeat was waiting to run (asked for at the latest) when the last sample measured:
    # until it has run, the loop has not gone round since.
    held_up: bool = False


class LoopWatch:
    """Counts callbacks or task steps that hold the event loop for `threshold_s` or more."""

    def __init__(self, threshold_s: float, interval_s: float = 0.005, keep: int = 20,
                 idle_interval_s: float | None = None) -> None:
        """`interval_s`: how often the watcher looks; `idle_interval_s` (default the same):
        how often while the loop sleeps in its poll (longer costs less when idle, but a
        callback that starts then is seen that much later); `keep`: reports kept."""
        idle_interval_s = interval_s if idle_interval_s is None else idle_interval_s
        if threshold_s <= 0 or interval_s <= 0 or idle_interval_s < interval_s:
            raise ValueError("need threshold_s > 0 and idle_interval_s >= interval_s > 0")
        self.threshold_s = threshold_s
        self.interval_s = interval_s
        self.idle_interval_s = idle_interval_s
        self._idle = False  # the last sample found the loop idle
        self.stalls = 0
        self.longest: dict[str, Any] | None = None
        self.closest: dict[str, Any] | None = None
        self._reports: collections.deque[dict[str, Any]] = collections.deque(maxlen=keep)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.Handle | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._beat: Beat = (0, None)
        self._requested = -1  # heartbeats that had run when the watcher asked for one more
        self._asked_base = 0.0  # when the watcher last asked for a heartbeat to find the base
        self._idle_cpu = -1.0  # the loop thread's CPU time when last seen idle
        self._ident = 0
        self._cpuclock = 0
        self._proc: _TaskProc | None = None
        self._has_schedstat = False
        self._stretch: _Stretch | None = None
        self._failed = False

    # -- public API ---------------------------------------------------------------------

    @property
    def reports(self) -> list[dict[str, Any]]:
        """The last few violations (copies, JSON-serialisable), oldest first."""
        with self._lock:
            return [dict(r, stack=list(r["stack"])) for r in self._reports]

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def heartbeats(self) -> int:
        """How many times the loop ran the watcher's heartbeat (asked for only while the loop
        is busy: an idle loop is never woken by the watch)."""
        return self._beat[0]

    def summary(self) -> dict[str, Any]:
        """Threshold, count and the last reports, plus two stretches the watcher followed:
        `longest` by the wall clock, violation or not (its wall time against its CPU,
        blocked and run-queue time shows what the machine's load did to the loop), and
        `closest`, the one with the most CPU + blocked time that stayed under the threshold
        (how close the daemon comes to breaking the rule)."""
        with self._lock:
            longest = dict(self.longest) if self.longest is not None else None
            closest = dict(self.closest) if self.closest is not None else None
        return {"threshold_ms": self.threshold_s * 1e3, "stalls": self.stalls,
                "last": self.reports, "longest": longest, "closest": closest}

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Arm the heartbeat on `loop` and start the watcher. Call from the loop's thread,
        before or while the loop runs."""
        if self.running:
            raise RuntimeError("LoopWatch already started")
        self._loop = loop
        self._stopping = False
        self._ident = threading.get_ident()
        self._cpuclock = time.pthread_getcpuclockid(self._ident)
        self._proc = _TaskProc(threading.get_native_id())
        self._has_schedstat = self._proc.schedstat() is not None
        if not self._has_schedstat:
            log.info("no per-thread schedstat: the loop watch only sees CPU stretches")
        _interpreter_data()
        self._requested = self._beat[0]
        self._idle_cpu = -1.0
        self._handle = loop.call_soon(self._heartbeat)
        self._thread = threading.Thread(target=self._watch, name="qvirtd-loopwatch",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the watcher and the heartbeat. Idempotent; joins the watcher thread."""
        self._stopping = True
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        handle, self._handle = self._handle, None
        loop = self._loop
        if handle is not None and loop is not None and not loop.is_closed():
            if threading.get_ident() == self._ident:
                handle.cancel()
            else:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(handle.cancel)
        self._end_stretch()
        if self._proc is not None:
            self._proc.close()
            self._proc = None

    # -- the loop side ------------------------------------------------------------------

    def _heartbeat(self) -> None:
        """Run by the loop when the watcher asks (never periodically: an idle loop is left
        asleep). It notes which frame runs the loop, and that the loop went round."""
        if self._stopping:
            return
        try:
            base: CodeType | None = sys._getframe(1).f_code
        except ValueError:
            base = None
        self._beat = (self._beat[0] + 1, base)

    # -- the watcher thread -------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stopping:
            self._idle = False
            try:
                self._sample(time.monotonic())
            except Exception:
                if not self._failed:
                    self._failed = True
                    log.exception("loop watch sample failed")
            time.sleep(self.idle_interval_s if self._idle else self.interval_s)

    def _loop_frames(self, base: CodeType) -> _Frames | None:
        """Where the loop thread is, None if not under the base frame (loop not running)."""
        frame = inner = sys._current_frames().get(self._ident)
        above: FrameType | None = None
        anchor: FrameType | None = None
        depth = 0
        while frame is not None and depth < 2000:
            if frame.f_code is base:
                if above is None:
                    return _Frames(inner, frame, None, True)
                return _Frames(inner, above, anchor if anchor is not above else None, False)
            if not frame.f_code.co_flags & _RESUMABLE:
                anchor = frame
            above, frame = frame, frame.f_back
            depth += 1
        return None

    def _ask_heartbeat(self, loop: asyncio.AbstractEventLoop) -> None:
        """Have the loop run a heartbeat as soon as it is free, unless one is waiting."""
        if self._requested == self._beat[0]:
            return
        self._requested = self._beat[0]
        try:
            self._handle = loop.call_soon_threadsafe(self._heartbeat)
        except RuntimeError:  # closed
            pass

    def _sample(self, now: float) -> None:
        proc = self._proc
        if self._stretch is None and self._idle_cpu >= 0:
            # Last seen idle in the loop's poll, and has not run a nanosecond since: still
            # there. (The cheapest look: one clock_gettime.)
            if time.clock_gettime(self._cpuclock) == self._idle_cpu:
                self._idle = True
                return
            self._idle_cpu = -1.0
        beat = self._beat
        stretch = self._stretch
        if stretch is not None and stretch.beat is not beat:
            self._end_stretch()  # the loop went round: that stretch is over
            stretch = None
        loop, base = self._loop, beat[1]
        if loop is None or proc is None or not loop.is_running():
            self._end_stretch()
            return
        at = self._loop_frames(base) if base is not None else None
        if at is None:
            self._end_stretch()
            # The loop runs, but not under the frame we know: ask (now and then) where from.
            if now - self._asked_base > 1.0:
                self._asked_base = now
                self._ask_heartbeat(loop)
            return
        if stretch is not None and not (
                stretch.root is at.root and (
                    not (at.c_level or at.root.f_code.co_flags & _RESUMABLE)  # one call
                    or (at.anchor is not None and at.anchor is stretch.anchor)  # one step
                    or stretch.held_up)):  # no loop iteration could start since
            self._end_stretch()
            stretch = None
        if at.c_level:
            # No Python frame above the loop's. Only time blocked in C code could count:
            # not while it runs (the loop's own code between callbacks), not while it sleeps
            # in its poll (idle).
            cpu = time.clock_gettime(self._cpuclock)
            state = proc.state()
            if state not in ("S", "D") or (stretch is None and not self._blocked_in_c(proc)):
                self._end_stretch()
                if state == "S":
                    self._idle, self._idle_cpu = True, cpu
                return
        held_up = at.c_level or bool(at.root.f_code.co_flags & _RESUMABLE and at.anchor is None)
        if held_up:
            # Only a heartbeat held up behind it can tell this from the next loop iteration:
            # asked for now, while the loop thread stands still (we hold the GIL), it runs
            # before any later step of any task. Until it has run, the loop has not gone
            # round since this sample.
            self._ask_heartbeat(loop)
        point = _Point(t=0.0, cpu=time.clock_gettime(self._cpuclock),
                       sched=proc.schedstat() if self._has_schedstat else None)
        point.t = time.monotonic()
        state = proc.state()
        asleep = state in ("S", "D")
        wchan = proc.wchan() if asleep else None
        countable = False  # asleep in a wait that counts as blocked
        if asleep and "syscall" not in proc.fds:
            countable = counts_as_blocked(at.c_level, None, wchan, _INTERP_DATA)
        elif asleep:
            syscall = proc.syscall()
            again_sched = proc.schedstat() if point.sched is not None else None
            if syscall is not None and (again_sched is None or point.sched is None
                                        or again_sched[2] == point.sched[2]):
                countable = counts_as_blocked(at.c_level, syscall, wchan, _INTERP_DATA)
            # else it woke up meanwhile: no telling what it slept on
        # Only if the loop thread stayed in the same frames, in the same loop iteration,
        # from before the first read to after the last (should the GIL have changed hands).
        again = self._loop_frames(base) if base is not None else None
        if again is None or again.root is not at.root or again.anchor is not at.anchor \
                or self._beat is not beat:
            self._end_stretch()
            return
        if stretch is None:
            stretch = self._stretch = _Stretch(
                root=at.root, c_level=at.c_level, beat=beat, first=point, acct=point,
                last_t=point.t)
        else:
            self._account(stretch, again.inner, point, state, countable, wchan)
        stretch.anchor, stretch.held_up = at.anchor, held_up

    @staticmethod
    def _blocked_in_c(proc: _TaskProc) -> bool:
        """Whether a loop thread asleep with no Python frame is in a wait other than its poll
        (if it cannot tell: no)."""
        wchan = proc.wchan()
        syscall = proc.syscall() if wchan is None else None
        return counts_as_blocked(True, syscall, wchan, _INTERP_DATA)

    def _account(self, s: _Stretch, frame: FrameType | None, p: _Point, state: str | None,
                 countable: bool, wchan: str | None) -> None:
        s.last_t = p.t
        s.cpu = p.cpu - s.first.cpu
        if p.sched is not None and s.first.sched is not None:
            s.runq = (p.sched[1] - s.first.sched[1]) / 1e9
        a = s.acct
        if state in ("S", "D") and p.sched is not None and a.sched is not None:
            # An accounting point: asleep. Time since the last one neither on a CPU nor
            # waiting for one was spent asleep; it counts as blocked only if the thread was
            # not scheduled in meanwhile (schedstat field 3), i.e. slept in one go, in the
            # wait we see now. Anything else mixes sleeps with waits for a CPU that the
            # kernel does not always charge to run_delay (after a short sleep under EEVDF's
            # delayed dequeue), with hand-overs of the GIL, with steal time: not counted.
            slept = max(0.0, (p.t - a.t) - (p.cpu - a.cpu) - (p.sched[1] - a.sched[1]) / 1e9)
            if countable and p.sched[2] == a.sched[2]:
                s.blocked += slept
                if wchan:
                    s.wchan = wchan
            else:
                s.excluded += slept
            s.acct = p
        held = s.blocked + (0.0 if s.c_level else s.cpu)
        if s.report is None:
            if held >= self.threshold_s:
                self._violation(s, frame, state)
        else:
            with self._lock:
                self._fill(s.report, s)

    # -- reports ------------------------------------------------------------------------

    @staticmethod
    def _fill(report: dict[str, Any], s: _Stretch) -> None:
        report["held_ms"] = round((s.blocked + (0.0 if s.c_level else s.cpu)) * 1e3, 1)
        report["wall_ms"] = round((s.last_t - s.first.t) * 1e3, 1)
        report["cpu_ms"] = round(s.cpu * 1e3, 1)
        report["blocked_ms"] = round(s.blocked * 1e3, 1)
        report["runq_ms"] = round(s.runq * 1e3, 1)
        report["excluded_ms"] = round(s.excluded * 1e3, 1)
        report["wchan"] = s.wchan

    def _violation(self, s: _Stretch, frame: FrameType | None, state: str | None) -> None:
        kind = "blocked" if s.c_level or s.blocked >= s.cpu else "cpu"
        stack = _format_stack(frame, s.root, s.c_level)
        started = time.time() - (s.last_t - s.first.t)
        report: dict[str, Any] = {
            "at": datetime.datetime.fromtimestamp(started, datetime.UTC).isoformat(
                timespec="milliseconds"),
            "kind": kind,
            "state": state,
            "stack": stack,
            "ended": False,
        }
        self._fill(report, s)
        s.report = report
        with self._lock:
            self.stalls += 1
            self._reports.append(report)
        how = (f"{report['blocked_ms']:.0f} ms blocked in a system call"
               f" (wchan {report['wchan'] or '?'})" if kind == "blocked"
               else f"{report['cpu_ms']:.0f} ms of CPU")
        log.warning("event loop held for %.0f ms by one %s (rule L6): %s; stack, innermost "
                    "last:\n  %s", report["held_ms"],
                    "C call" if s.c_level else "callback", how, "\n  ".join(stack))

    def _end_stretch(self) -> None:
        s, self._stretch = self._stretch, None
        if s is None:
            return
        held = s.blocked + (0.0 if s.c_level else s.cpu)
        with self._lock:
            if s.report is not None:
                s.report["ended"] = True
            elif self.closest is None or held * 1e3 > self.closest["held_ms"]:
                self.closest = self._describe(s)
            if self.longest is None or s.last_t - s.first.t > self.longest["wall_ms"] / 1e3:
                self.longest = self._describe(s)

    def _describe(self, s: _Stretch) -> dict[str, Any]:
        described: dict[str, Any] = {"callback": None if s.c_level else s.root.f_code.co_name}
        self._fill(described, s)
        return described


def _format_stack(frame: FrameType | None, root: FrameType, c_level: bool) -> list[str]:
    """The loop thread's frames from the one running the loop to the innermost."""
    # Where each frame is, first: reading source lines may release the GIL.
    places: list[tuple[str, int, str] | str] = []
    if c_level:
        places.append("<no Python frame: C code called by the event loop>")
        base = root
    else:
        base = root.f_back if root.f_back is not None else root
        skipped = 0
        while frame is not None and frame is not base:
            if len(places) < _STACK_FRAMES - 1 or frame is root:
                places.append((frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name))
            else:
                skipped += 1
            frame = frame.f_back
        if skipped:
            places.insert(-1, f"... {skipped} frames ...")
    places.append((base.f_code.co_filename, base.f_lineno, base.f_code.co_name))
    lines = []
    for place in reversed(places):
        if isinstance(place, str):
            lines.append(place)
            continue
        filename, lineno, name = place
        source = linecache.getline(filename, lineno).strip()
        lines.append(f"{filename}:{lineno} in {name}" + (f": {source}" if source else ""))
    return lines
