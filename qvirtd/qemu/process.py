"""QEMU processes: spawn in their own session, identify, signal and wait for exit.

QEMU is started with plain `subprocess.Popen(start_new_session=True)`, not asyncio's subprocess
transport: that transport kills its child when it is closed, and a guest must outlive the daemon.
The fork and exec happen in a worker thread (rule L6: Popen waits until the child has exec'd,
which takes milliseconds and more with a large parent), and so do scans of /proc.
Exit is noticed through a pidfd watched by the event loop, which works for our children and,
after a daemon restart, for processes we did not start; signals also go through the pidfd, so
a reused pid can never receive a signal meant for a QEMU that is gone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from ..errors import ProcessError
from ..locks import check_no_locks

log = logging.getLogger(__name__)


def proc_stat(pid: int) -> list[bytes] | None:
    """The fields of /proc/PID/stat from the third on (the state), None if it is gone.
    `proc_stat(pid)[k]` is field k + 3 of proc(5)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # Field 2 (comm) may contain spaces and parentheses: split after the last ')'.
    return raw[raw.rindex(b")") + 2:].split()


def proc_start_time(pid: int) -> int | None:
    """The process start time (clock ticks since boot) from /proc; identifies a pid's owner."""
    fields = proc_stat(pid)
    return int(fields[19]) if fields is not None else None  # field 22 overall


def process_binary(pid: int) -> str | None:
    """The executable of `pid` (without the " (deleted)" an upgrade leaves behind)."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None
    return exe.removesuffix(" (deleted)")


def proc_state(pid: int) -> str | None:
    """The one-letter process state from /proc (R, S, D, T for stopped, Z, ...)."""
    fields = proc_stat(pid)
    return fields[0].decode() if fields is not None else None


def qemu_processes() -> list[tuple[int, bytes]]:
    """Blocking (a /proc scan: call it off the loop). Live QEMU processes and their command
    lines (arguments separated by NUL bytes)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmdline and proc_state(int(entry)) not in (None, "Z"):
            found.append((int(entry), cmdline))
    return found


def qemu_pids_mentioning(text: str) -> list[int]:
    """Blocking. Live QEMU processes whose command line contains `text` (e.g. a --root
    directory: every QEMU of a daemon names its runtime directory in its options)."""
    needle = text.encode()
    return [pid for pid, cmdline in qemu_processes() if needle in cmdline]


def uuid_needle(uuid: str) -> bytes:
    """How a QEMU of domain `uuid` shows it in its command line (`-uuid UUID`)."""
    return b"\0-uuid\0" + uuid.encode() + b"\0"


class ProcessTable:
    """Scans of /proc for live QEMUs, off the loop, shared between concurrent callers.

    A caller never gets a scan that began before it asked (it could miss a QEMU spawned just
    before): one that asks while a scan runs waits for the next one, which all such callers
    share. So 50 concurrent starts cost two or three scans, not fifty, and each still sees
    the process table as it was after its own question."""

    def __init__(self) -> None:
        self._running: asyncio.Future[list[tuple[int, bytes]]] | None = None
        self._next: asyncio.Future[list[tuple[int, bytes]]] | None = None
        self.scans = 0

    async def scan(self) -> list[tuple[int, bytes]]:
        loop = asyncio.get_running_loop()
        if self._running is None:
            self._running = self._start(loop)
            return await asyncio.shield(self._running)
        if self._next is None:
            self._next = loop.create_future()
        return await asyncio.shield(self._next)

    def _start(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[list[tuple[int, bytes]]]:
        self.scans += 1
        work = loop.run_in_executor(None, qemu_processes)
        work.add_done_callback(lambda _f: self._done(loop))
        return work

    def _done(self, loop: asyncio.AbstractEventLoop) -> None:
        self._running = None
        waiting, self._next = self._next, None
        if waiting is None:
            return
        self._running = self._start(loop)
        self._running.add_done_callback(lambda f: _settle(waiting, f))

    async def find(self, needles: list[bytes]) -> list[tuple[int, bytes]]:
        """Live QEMUs whose command line contains any of `needles`."""
        return [(pid, cmd) for pid, cmd in await self.scan()
                if any(needle in cmd for needle in needles)]


def _settle(target: asyncio.Future[list[tuple[int, bytes]]],
            source: asyncio.Future[list[tuple[int, bytes]]]) -> None:
    if target.done():
        return
    if source.cancelled():
        target.cancel()
    elif source.exception() is not None:
        target.set_exception(source.exception())  # type: ignore[arg-type]
    else:
        target.set_result(source.result())


def describe_status(status: int | None) -> str:
    if status is None:
        return "exited (status unknown: not our child)"
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exited with status {status}"


class QemuProcess:
    """One running QEMU. `exited` completes with its exit status when it is gone."""

    def __init__(self, pid: int, popen: subprocess.Popen[bytes] | None) -> None:
        self.pid = pid
        self.popen = popen
        self.start_time = proc_start_time(pid)
        # What the process really runs (/proc/PID/exe), read once: QEMU itself, or the
        # interpreter of a wrapper script. A restarted daemon compares it (pid reuse).
        self.exe = process_binary(pid)
        loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[int | None] = loop.create_future()
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            self._pidfd = None
            self._reap()
            return
        loop.add_reader(self._pidfd, self._on_exit)

    @classmethod
    async def spawn(cls, argv: Sequence[str], pass_fds: Sequence[int], log_path: Path,
                    cwd: Path) -> QemuProcess:
        """Start QEMU in a new session (so it outlives us), stdout+stderr to the domain log.
        The fork/exec runs in a worker thread (rule L6)."""
        def popen() -> subprocess.Popen[bytes]:
            with open(log_path, "ab", buffering=0) as logf:
                return subprocess.Popen(
                    list(argv), stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                    pass_fds=tuple(pass_fds), start_new_session=True, cwd=cwd,
                    close_fds=True)
        try:
            child = await asyncio.to_thread(popen)
        except OSError as exc:
            raise ProcessError(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
        return cls(child.pid, child)

    def _reap(self) -> None:
        status: int | None = None
        if self.popen is not None:
            status = self.popen.poll()
        if not self.exited.done():
            self.exited.set_result(status)

    def _on_exit(self) -> None:
        """pidfd readable: the process has terminated."""
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        self._reap()

    @property
    def alive(self) -> bool:
        return not self.exited.done()

    def signal(self, sig: int) -> bool:
        """Send `sig` through the pidfd; False if the process is already gone."""
        if self._pidfd is None:
            return False
        try:
            signal.pidfd_send_signal(self._pidfd, sig)
        except ProcessLookupError:
            return False
        return True

    async def wait(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for exit (rule L4: never under a lock). True if it exited."""
        check_no_locks(f"exit of QEMU pid {self.pid}")
        if self.exited.done():
            return True
        try:
            await asyncio.wait_for(asyncio.shield(self.exited), timeout_s)
        except TimeoutError:
            return False
        return True

    async def terminate(self, grace_s: float, kill_timeout_s: float) -> None:
        """SIGTERM, then SIGKILL after the grace time.

        A stopped QEMU (SIGSTOP, or a debugger) cannot act on SIGTERM, and continuing it
        would let it run on (answer commands, write disks) just before it dies: it gets
        SIGKILL at once.
        """
        if not self.alive:
            return
        if proc_state(self.pid) in ("T", "t"):
            log.warning("QEMU pid %d is stopped: sending SIGKILL", self.pid)
        else:
            self.signal(signal.SIGTERM)
            if grace_s > 0 and await self.wait(grace_s):
                return
            log.warning("QEMU pid %d still alive %.1f s after SIGTERM: sending SIGKILL",
                        self.pid, grace_s)
        self.signal(signal.SIGKILL)
        if not await self.wait(kill_timeout_s):
            raise ProcessError(f"QEMU pid {self.pid} did not exit {kill_timeout_s:.1f} s "
                               "after SIGKILL (stuck in the kernel?)")

    def close(self) -> None:
        """Stop watching (daemon shutdown): the process itself keeps running."""
        if self._pidfd is not None:
            try:
                asyncio.get_running_loop().remove_reader(self._pidfd)
            except RuntimeError:
                pass
            os.close(self._pidfd)
            self._pidfd = None
