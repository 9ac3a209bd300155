"""UNIX sockets: paths of any length, and a connect that never blocks the loop.

sun_path holds 107 bytes, and a monitor socket under a deep `--root` (or a long domain name)
can be longer. Binding or connecting through `/proc/self/fd/N/NAME`, where N is an O_PATH
descriptor of the socket's directory, reaches the same file with a short path.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SUN_PATH_MAX = 107
CONNECT_RETRY_S = 0.05


@contextmanager
def short_path(path: Path) -> Iterator[str]:
    """A path for bind()/connect() that fits sun_path and names the same file as `path`."""
    full = str(path)
    if len(full.encode()) <= SUN_PATH_MAX:
        yield full
        return
    dir_fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        short = f"/proc/self/fd/{dir_fd}/{path.name}"
        if len(short.encode()) > SUN_PATH_MAX:
            raise OSError(f"socket name too long: {path.name}")
        yield short
    finally:
        os.close(dir_fd)


async def connect_unix(path: Path) -> socket.socket:
    """A connected, non-blocking UNIX stream socket to `path`, without ever blocking the loop
    (rule L6): a full listen backlog (EAGAIN) is retried every CONNECT_RETRY_S; the caller
    bounds the whole wait. Any other error is raised at once."""
    sock = socket.socket(socket.AF_UNIX,
                         socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        while True:
            try:
                with short_path(path) as where:
                    sock.connect(where)
                return sock
            except (BlockingIOError, InterruptedError):
                await asyncio.sleep(CONNECT_RETRY_S)
    except BaseException:
        sock.close()
        raise
