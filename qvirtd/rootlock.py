"""One daemon per root, and per-user directories nobody else controls.

* `take_root(layout)` runs before the daemon reads anything from its state or run directory:
  it creates and checks the per-user directories (`check_private_dir`), then takes an
  exclusive flock on `STATE/qvirtd.lock` and writes its pid there. The lock is held until the
  process exits; a daemon killed with SIGKILL loses it with its last descriptor (the kernel
  drops it), so it never blocks the next one. The descriptor is close-on-exec: QEMU and
  every other child never inherit it, so a guest cannot keep a dead daemon's lock.
* `check_private_dir(path)` is the rule shared by the daemon and `qvirsh`: a per-user
  directory must be a real directory (not a symlink), owned by our euid, and not writable by
  group or others. Otherwise another user could plant a socket the client talks to.
"""

from __future__ import annotations

import fcntl
import os
import stat
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Layout

LOCK_NAME = "qvirtd.lock"


class StartRefused(Exception):
    """The daemon must not start; the message says why in one line (exit status 1)."""


class UnsafeDirectory(StartRefused):
    """A per-user directory that someone else could control."""


class RootLocked(StartRefused):
    """Another daemon holds the root lock."""


def check_private_dir(path: Path, missing_ok: bool = False) -> None:
    """Raise UnsafeDirectory unless `path` is a directory (not a symlink) owned by our euid
    that neither group nor others can write to. A missing `path` passes if `missing_ok`."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if missing_ok:
            return
        raise UnsafeDirectory(f"refusing to use {path}: it does not exist") from None
    euid = os.geteuid()
    if stat.S_ISLNK(st.st_mode):
        problem = "it is a symbolic link"
    elif not stat.S_ISDIR(st.st_mode):
        problem = "it is not a directory"
    elif st.st_uid != euid:
        problem = f"it is owned by uid {st.st_uid}, not by uid {euid} (this user)"
    elif st.st_mode & 0o022:
        problem = f"group or others can write to it (mode {stat.S_IMODE(st.st_mode):04o})"
    else:
        return
    raise UnsafeDirectory(f"refusing to use {path}: {problem}")


def prepare_private_dirs(dirs: tuple[Path, ...]) -> None:
    """Create each directory (mode 0700) or, if it exists, leave it as it is; then check it.
    A directory someone else made or opened up is refused, never repaired."""
    for d in dirs:
        try:
            d.mkdir(parents=True, mode=0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise StartRefused(f"cannot create {d}: {exc.strerror or exc}") from exc
        check_private_dir(d)


class RootLock:
    """The exclusive flock on `STATE/qvirtd.lock`, held for as long as it is open."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def take(cls, state_dir: Path) -> RootLock:
        path = state_dir / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise StartRefused(f"cannot open {path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_pid(fd)
            os.close(fd)
            raise RootLocked(f"another qvirtd (pid {holder or 'unknown'}) is already running "
                             f"on {state_dir}") from None
        except OSError as exc:
            os.close(fd)
            raise StartRefused(f"cannot lock {path}: {exc.strerror or exc}") from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RootLock:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _holder_pid(fd: int) -> int | None:
    """The pid the lock holder wrote. It writes it just after locking: wait a moment for it."""
    for _ in range(20):
        try:
            return int(os.pread(fd, 32, 0).decode().strip())
        except (OSError, ValueError, UnicodeDecodeError):
            time.sleep(0.01)
    return None


def take_root(layout: Layout) -> RootLock:
    """What the daemon does before it reads its state: per-user directories created and
    checked, the state directory made, the root lock taken."""
    prepare_private_dirs(layout.private_dirs)
    try:
        layout.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise StartRefused(f"cannot create {layout.state_dir}: {exc.strerror or exc}") from exc
    return RootLock.take(layout.state_dir)
