"""One daemon per root: a second qvirtd on the same --root is refused, whatever socket it was
told to use, and a SIGKILLed daemon never blocks the next one (nor does a QEMU it started)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

from harness import Daemon, run_daemon, tiny_definition


def refusal(first: Daemon) -> str:
    assert first.proc is not None
    return (f"qvirtd: another qvirtd (pid {first.proc.pid}) is already running on "
            f"{first.root / 'state'}\n")


def test_second_daemon_on_the_same_root_is_refused_until_the_first_dies(
        daemon_factory: Callable[..., Daemon]) -> None:
    first = daemon_factory()
    assert first.proc is not None
    lock_file = first.root / "state" / "qvirtd.lock"
    assert lock_file.read_text() == f"{first.proc.pid}\n"

    # Another socket_path in its config: before the lock, it would have started beside the
    # first one, and each would have started "its" QEMU for the same domain.
    other_socket = first.root / "other.sock"
    other_config = first.root / "other.toml"
    other_config.write_text(f"socket_path = {str(other_socket)!r}\nlog_level = 'debug'\n")
    began = time.monotonic()
    res = run_daemon(first.root, other_config)
    assert time.monotonic() - began < 10  # refused at once, not after a timeout
    assert (res.returncode, res.stderr, res.stdout) == (1, refusal(first), "")
    assert not other_socket.exists()

    # The first one's socket removed: the socket probe alone would have let a second start.
    first.socket.unlink()
    res = run_daemon(first.root)
    assert (res.returncode, res.stderr) == (1, refusal(first))
    assert not first.socket.exists()

    # The first one SIGKILLed: the kernel dropped its lock, the next daemon starts at once.
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    assert lock_file.read_text() == f"{first.proc.pid}\n"  # stale pid: does not matter
    first.start()
    assert lock_file.read_text() == f"{first.proc.pid}\n"
    assert first.json("list", "--all") == []
    res = run_daemon(first.root, other_config)
    assert (res.returncode, res.stderr) == (1, refusal(first))


def test_qemu_never_holds_the_root_lock(daemon_factory: Callable[..., Daemon]) -> None:
    """QEMU is a child of the daemon and outlives it: had it inherited the lock descriptor,
    a SIGKILLed daemon's guest would keep every later daemon out."""
    daemon = daemon_factory()
    lock_file = str(daemon.root / "state" / "qvirtd.lock")
    daemon.define(tiny_definition("locked"))
    daemon.qvirsh("start", "locked")
    (qemu,) = daemon.qemu_pids()
    held = {os.readlink(f"/proc/{qemu}/fd/{fd}") for fd in os.listdir(f"/proc/{qemu}/fd")}
    assert lock_file not in held, held
    assert daemon.proc is not None
    assert lock_file in {os.readlink(f"/proc/{daemon.proc.pid}/fd/{fd}")
                         for fd in os.listdir(f"/proc/{daemon.proc.pid}/fd")}

    daemon.stop(signal.SIGKILL)
    assert daemon.qemu_pids() == [qemu]  # the guest lives on
    daemon.start()  # and does not keep the next daemon out
    assert daemon.wait_state("locked", "running")["pid"] == qemu
    daemon.qvirsh("destroy", "locked")
