"""qvirtd.offloop.make_owned: what a worker thread makes has an owner, even when the caller
is cancelled while the thread works (a start aborted while its sockets are bound)."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from qvirtd.offloop import make_owned


def fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


async def test_the_caller_gets_what_was_made_and_owns_it(tmp_path: Path) -> None:
    released: list[int] = []
    fd = await make_owned(lambda: os.open(tmp_path / "f", os.O_CREAT | os.O_RDWR, 0o600),
                          released.append)
    try:
        assert fd_open(fd) and released == []
    finally:
        os.close(fd)


async def test_a_cancelled_caller_leaves_nothing_open(tmp_path: Path) -> None:
    inside, finish = threading.Event(), threading.Event()
    made: list[int] = []

    def make() -> int:
        inside.set()
        finish.wait(10)
        fd = os.open(tmp_path / "f", os.O_CREAT | os.O_RDWR, 0o600)
        made.append(fd)
        return fd

    released = threading.Event()
    closed_in: list[str] = []

    def release(fd: int) -> None:
        closed_in.append(threading.current_thread().name)
        os.close(fd)
        released.set()

    caller = asyncio.create_task(make_owned(make, release))
    await asyncio.to_thread(inside.wait, 10)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    finish.set()  # the thread makes its fd only now, for nobody
    assert await asyncio.to_thread(released.wait, 10)
    assert not fd_open(made[0])
    assert closed_in and closed_in[0] != threading.main_thread().name  # off the loop (L6)


async def test_a_failure_is_the_callers_and_nothing_is_released() -> None:
    released: list[object] = []

    def make() -> int:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        await make_owned(make, released.append)
    assert released == []
