"""UNIX socket paths of any length.

sun_path holds 107 bytes, and a monitor socket under a deep `--root` (or a long domain name)
can be longer. Binding or connecting through `/proc/self/fd/N/NAME`, where N is an O_PATH
descriptor of the socket's directory, reaches the same file with a short path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SUN_PATH_MAX = 107


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
