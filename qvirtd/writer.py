"""Every file write of the daemon, off the event loop (rule L6), in order per file.

An fsync can take tens of milliseconds, and on a sick disk much longer; done on the event
loop it stalls every client and every domain at once. So the loop never writes a file
itself: it hands the bytes to `FileWriter` (a cheap, synchronous call, allowed under a
domain lock) and gets a future back. Worker threads do the writing.

* **Order per path.** At most one operation per path is in progress; the next one for that
  path waits for it. Different paths go in parallel (the pool has a few threads).
* **Coalescing.** A write queued for a path that is not yet started is replaced by a newer
  one for the same path: a status file changed ten times while its previous write was in
  progress is written twice, not eleven times. Every caller's future completes when its data,
  or newer data for the same path, is in place. A removal supersedes queued writes the same
  way. Appends (console logs) to one path are joined. An operation reaches a thread only at
  the end of the loop step that submitted it, so the writes of one step (an event that
  changes a run twice) become one, and the step finishes (delivers its event, answers its
  client) before a woken worker competes with it for the CPU.
* **Barriers.** A caller that must know the bytes are on disk before it goes on (the record
  written before QEMU is spawned, a hotplug's JSON entry before `device_add`, a definition
  before `define` answers) awaits its future, with no lock held. Everyone else ignores it.
* **Errors name the path.** An OSError becomes `StorageError("cannot write PATH: No space
  left on device")`. Nobody has to retrieve it: the writer logs every failure itself and
  counts it for `daemon-stats` / `daemon-warnings`. A write made with `retry_s` (status
  files) is tried again after that delay until it succeeds or newer data supersedes it, so a
  full disk that frees up brings the status file back in line.

Writes are atomic (temporary file, rename); durable ones also fsync the file and its
directory. Status files are not durable: they describe running processes, which a power cut
ends anyway, and the rename alone keeps them whole across a crash of the daemon.

**Memory filesystems.** Under a directory found at start to be on tmpfs or ramfs (the run
directory in production: /run), a write that is not durable and carries at most
`INLINE_MAX_BYTES` cannot wait for a disk: it is a bounded memory copy, and L6 allows
bounded work on the loop. Such operations are done by the loop itself, at the same end of
step, in the same order per path, with the same errors and retries. Handing a 3 KiB status
file to a thread cost the daemon 200 to 300 µs of CPU per change (waking the worker, and
the GIL passed back and forth around each of its system calls), a fifth of a `suspend`;
the write itself costs tens of µs.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import errno
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import StorageError

log = logging.getLogger(__name__)

Kind = Literal["write", "remove", "append"]

# Appends that would make a log larger than its cap rotate it first: PATH -> PATH.1.
ROTATED_SUFFIX = ".1"

#: Filesystems whose writes never wait for a disk (`filesystem_type`).
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})
#: The most a write done by the loop itself may carry (memory filesystems only).
INLINE_MAX_BYTES = 256 * 1024


@dataclass
class _Op:
    kind: Kind
    data: bytes = b""
    durable: bool = False
    mode: int = 0o600
    max_bytes: int = 0
    retry_s: float | None = None
    futures: list[asyncio.Future[None]] = field(default_factory=list)


@dataclass
class _PathState:
    running: _Op | None = None
    launched: bool = True         # `running` has been handed to a worker thread
    queued: collections.deque[_Op] = field(default_factory=collections.deque)
    retry: asyncio.TimerHandle | None = None


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o600, durable: bool = True) -> None:
    """Blocking: replace `path` with `data` atomically (temp file, fsync, rename, fsync dir).
    Call it from a worker thread (FileWriter) or before the loop runs, never from the loop
    (but for FileWriter's own bounded writes to a memory filesystem, module docstring)."""
    # Plain fd calls (no file object: its fstat, ioctl and lseek are three more system
    # calls, each a GIL hand-off in a worker thread).
    where, name = os.path.split(path)
    tmp = os.path.join(where, f".{name}.tmp.{os.getpid()}.{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        try:
            write_all(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_file(path: Path, durable: bool = True) -> None:
    """Blocking: remove `path` (absent is fine), durably if asked."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    except OSError:
        # A read-only filesystem refuses (EROFS) even to remove what is not there: absent
        # is still fine. Anything that is there, or cannot be looked at, is an error.
        try:
            os.lstat(path)
        except FileNotFoundError:
            return
        raise
    if durable:
        _fsync_dir(path.parent)


def append_capped(path: Path, data: bytes, max_bytes: int) -> None:
    """Blocking: append `data` to a log, rotating it to PATH.1 first when it would pass
    `max_bytes` (one old generation is kept; the pair never exceeds twice the cap). PATH.1
    always ends where PATH begins, so the pair reads as one stream: `data` larger than the
    cap fills PATH with its end and PATH.1 with the `max_bytes` before that."""
    if max_bytes > 0:
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            size = 0
        rotated = path.with_name(path.name + ROTATED_SUFFIX)
        if size and size + len(data) > max_bytes:
            os.replace(path, rotated)
        if len(data) > max_bytes:
            # Each step leaves a pair that reads as one stream (a reader may look between).
            head, data = data[:-max_bytes], data[-max_bytes:]
            older = _tail(rotated, max_bytes - len(head)) if len(head) < max_bytes else b""
            atomic_write_bytes(rotated, (older + head)[-max_bytes:], durable=False)
            atomic_write_bytes(path, data, durable=False)
            return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, data)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """Blocking: write all of `data` to `fd` (os.write may take only part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def filesystem_type(path: Path) -> str | None:
    """Blocking (stats `path`, reads /proc/self/mountinfo): the type of the filesystem that
    holds `path` ("tmpfs", "ext4", ...), None if it cannot be told."""
    try:
        st = os.stat(path)
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            mounts = f.read().splitlines()
    except OSError:
        return None
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    for line in mounts:
        fields = line.split(" ")
        if len(fields) > 7 and fields[2] == dev and "-" in fields[6:]:
            return fields[fields.index("-", 6) + 1]
    return None


def _tail(path: Path, limit: int) -> bytes:
    """Blocking: the last `limit` bytes of `path` (empty if it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - limit))
            return f.read(limit)
    except FileNotFoundError:
        return b""


def _perform(path: Path, op: _Op) -> None:
    if op.kind == "write":
        atomic_write_bytes(path, op.data, op.mode, op.durable)
    elif op.kind == "remove":
        remove_file(path, op.durable)
    else:
        append_capped(path, op.data, op.max_bytes)


def _describe(kind: Kind, path: Path, exc: OSError) -> str:
    verb = {"write": "write", "remove": "remove", "append": "write to"}[kind]
    return f"cannot {verb} {path}: {exc.strerror or exc}"


class FileWriter:
    """The daemon's file writes, done by worker threads; see the module docstring."""

    def __init__(self, threads: int = 2) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, "qvirtd-writer")
        self._paths: dict[Path, _PathState] = {}
        self._idle: asyncio.Event | None = None
        self.writes = 0
        self.inline = 0  # of `writes`, done by the loop (a memory filesystem)
        self._memory_dirs: tuple[Path, ...] = ()
        self._inline_dirs: dict[Path, bool] = {}  # directory -> under a memory dir
        self.failures = 0
        self.last_error: str | None = None
        # Paths whose latest write failed and is being retried (for daemon-warnings).
        self.failing: dict[Path, str] = {}

    # --- submitting (from the loop thread; never blocks) ------------------------------------

    def write(self, path: Path, data: bytes, *, durable: bool, mode: int = 0o600,
              retry_s: float | None = None) -> asyncio.Future[None]:
        """Replace `path` with `data` (atomic; fsynced when `durable`)."""
        return self._submit(path, _Op("write", data, durable, mode, retry_s=retry_s))

    def remove(self, path: Path, *, durable: bool) -> asyncio.Future[None]:
        """Remove `path`; a missing file is fine. Supersedes writes queued for it."""
        return self._submit(path, _Op("remove", durable=durable))

    def append(self, path: Path, data: bytes, *, max_bytes: int) -> asyncio.Future[None]:
        """Append to a log capped at `max_bytes` (rotated to PATH.1 when full)."""
        return self._submit(path, _Op("append", data, max_bytes=max_bytes))

    def write_inline_under(self, directory: Path) -> None:
        """`directory` is on a memory filesystem (the caller checked, `filesystem_type`):
        non-durable operations of at most INLINE_MAX_BYTES on files under it are done by the
        loop (module docstring)."""
        self._memory_dirs += (directory,)
        self._inline_dirs.clear()

    def _inline(self, path: Path, op: _Op) -> bool:
        if op.durable or not self._memory_dirs or len(op.data) > INLINE_MAX_BYTES:
            return False
        parent = path.parent
        hit = self._inline_dirs.get(parent)
        if hit is None:
            if len(self._inline_dirs) > 4096:
                self._inline_dirs.clear()
            hit = self._inline_dirs[parent] = any(
                parent.is_relative_to(d) for d in self._memory_dirs)
        return hit

    def _submit(self, path: Path, op: _Op) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        fut.add_done_callback(_retrieved)
        op.futures.append(fut)
        st = self._paths.setdefault(path, _PathState())
        if st.retry is not None:  # newer data supersedes a pending retry
            st.retry.cancel()
            st.retry = None
            self.failing.pop(path, None)
        if st.running is None:
            # Handed to a thread at the end of this loop iteration, not now: the caller (an
            # event under the domain lock) first finishes its step (delivers the event,
            # answers the client) before a woken worker competes with it for the CPU and
            # the GIL; and a second write to the path in the same step joins this one.
            self._start(loop, path, st, op, soon=True)
        elif not st.launched and (merged := _coalesce(st.running, op)) is not None:
            st.running = merged
        elif st.queued and (merged := _coalesce(st.queued[-1], op)) is not None:
            st.queued[-1] = merged
        else:
            st.queued.append(op)
        return fut

    # --- running (on the loop; the blocking part in a worker thread) ------------------------

    def _start(self, loop: asyncio.AbstractEventLoop, path: Path, st: _PathState,
               op: _Op, soon: bool = False) -> None:
        """Make `op` the path's running operation; hand it to a thread now, or at the end
        of this loop step (`soon`: until then, newer operations may join it)."""
        st.running = op
        if self._idle is not None:
            self._idle.clear()
        if soon:
            st.launched = False
            loop.call_soon(self._launch, loop, path, st)
        else:
            self._launch(loop, path, st)

    def _launch(self, loop: asyncio.AbstractEventLoop, path: Path, st: _PathState) -> None:
        op = st.running
        assert op is not None
        st.launched = True
        if self._inline(path, op):  # a memory filesystem: a bounded copy, done here (L6)
            work = loop.create_future()
            try:
                _perform(path, op)
            except Exception as exc:
                work.set_exception(exc)
            else:
                work.set_result(None)
                self.inline += 1
            self._finished(loop, path, st, op, work)
            return
        try:
            work = loop.run_in_executor(self._pool, _perform, path, op)
        except RuntimeError as exc:  # the pool is shut down: the daemon is stopping
            op.retry_s = None  # nothing can run it any more: fail it, do not retry
            work = loop.create_future()
            work.set_exception(OSError(errno.ESHUTDOWN, f"the file writer has stopped ({exc})"))
        work.add_done_callback(lambda f: self._finished(loop, path, st, op, f))

    def _finished(self, loop: asyncio.AbstractEventLoop, path: Path, st: _PathState, op: _Op,
                  work: asyncio.Future[None]) -> None:
        st.running = None
        exc = work.exception()
        if exc is None:
            self.writes += 1
            self.failing.pop(path, None)
            _settle(op, None)
        else:
            error = _as_storage_error(op, path, exc)
            self.failures += 1
            self.last_error = str(error)
            log.error("%s", error)
            _settle(op, error)
            if op.retry_s is not None and not st.queued:
                self.failing[path] = str(error)
                retry = _Op(op.kind, op.data, op.durable, op.mode, op.max_bytes, op.retry_s)
                st.retry = loop.call_later(op.retry_s, self._retry, loop, path, st, retry)
        if st.queued:
            self._start(loop, path, st, st.queued.popleft())
        elif st.running is None and st.retry is None:
            del self._paths[path]
            if not self._paths and self._idle is not None:
                self._idle.set()

    def _retry(self, loop: asyncio.AbstractEventLoop, path: Path, st: _PathState,
               op: _Op) -> None:
        st.retry = None
        if st.running is None and self._paths.get(path) is st:
            log.info("retrying %s of %s", op.kind, path)
            self._start(loop, path, st, op)

    # --- waiting ----------------------------------------------------------------------------

    async def drain(self, timeout_s: float) -> bool:
        """Wait until everything submitted so far is done (retries are dropped): daemon stop."""
        for st in self._paths.values():
            if st.retry is not None:
                st.retry.cancel()
                st.retry = None
        for path in [p for p, st in self._paths.items() if st.running is None
                     and not st.queued]:
            del self._paths[path]
        if not self._paths:
            return True
        self._idle = asyncio.Event()
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)

    def stats(self) -> dict[str, Any]:
        return {"writes": self.writes, "inline": self.inline, "failures": self.failures,
                "last_error": self.last_error,
                "in_progress": len(self._paths), "failing": sorted(self.failing.values())}


def _as_storage_error(op: _Op, path: Path, exc: BaseException) -> StorageError:
    if isinstance(exc, OSError):
        return StorageError(_describe(op.kind, path, exc))
    return StorageError(f"cannot {op.kind} {path}: {exc}")


def _coalesce(last: _Op, op: _Op) -> _Op | None:
    """`op` joined to `last`, an operation on the same path not yet handed to a thread:
    appends are concatenated, and a write or removal replaces a write or removal (every
    caller's future then completes with the newer one). None if they do not combine."""
    if last.kind == op.kind == "append":
        last.data += op.data
        last.futures += op.futures
        return last
    if last.kind != "append" and op.kind != "append":
        op.durable = op.durable or last.durable
        op.futures = last.futures + op.futures
        return op
    return None


def _settle(op: _Op, error: StorageError | None) -> None:
    for fut in op.futures:
        if fut.done():
            continue
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)


def _retrieved(fut: asyncio.Future[None]) -> None:
    """Failures are logged by the writer: a future nobody awaits must not warn."""
    if not fut.cancelled():
        fut.exception()

