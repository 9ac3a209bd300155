"""Disk images as users have them: `vol-create` makes one with qemu-img.

`vol-create PATH SIZE [--format raw|qcow2] [--backing BASE] [--prealloc ...]` runs
`qemu-img create` in a worker thread (rule L6: never a fork or a long wait on the loop); a
qcow2 image may be an overlay on a base image (its format is read with `qemu-img info`, as
qemu-img wants it named). While qemu-img works, the call sends `vol-progress` notifications
(bytes allocated so far, from the file's size on disk) so `qvirsh` can draw a progress line:
a fully preallocated image of many gigabytes takes a while. An existing file is never
overwritten; two creations of one path at once are refused; the size is bounded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import InvalidOperationError, InvalidParamsError, QvirtError
from .context import Context

log = logging.getLogger(__name__)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
MAX_SIZE = 1 << 50
PROGRESS_S = 0.5
QEMU_IMG_TIMEOUT_S = 6 * 3600.0  # a full preallocation of a very large disk on a slow device


def parse_size(text: str) -> int:
    """"10G", "512M", "1.5GiB", "1048576" -> bytes (binary units, as qemu-img)."""
    m = _SIZE.match(text)
    if m is None:
        raise InvalidParamsError(f"size: not a size: {text!r} (e.g. 10G, 512M, 1048576)")
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if not 0 < size <= MAX_SIZE:
        raise InvalidParamsError(f"size: {text!r} is out of range (1 byte .. 1 PiB)")
    return size


def _qemu_img(argv: list[str]) -> str:
    """Blocking (worker thread): run qemu-img; its stdout, or QvirtError with its words."""
    try:
        res = subprocess.run(argv, capture_output=True, text=True, check=False,
                             timeout=QEMU_IMG_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise QvirtError(f"{argv[0]} failed: {exc}") from exc
    if res.returncode != 0:
        raise QvirtError(f"qemu-img failed: {(res.stderr or res.stdout).strip()[-500:]}")
    return res.stdout


def _allocated(path: Path) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


class Volumes:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._creating: set[Path] = set()

    async def create(self, path: str, size: str, fmt: str, backing: str | None,
                     prealloc: str, owner: str,
                     progress: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        target = Path(path)
        if not target.is_absolute():
            raise InvalidParamsError(f"path: must be absolute: {path!r}")
        nbytes = parse_size(size)
        if backing is not None and fmt != "qcow2":
            raise InvalidParamsError("backing: an overlay must be qcow2 (--format qcow2)")
        if backing is not None and not Path(backing).is_absolute():
            raise InvalidParamsError(f"backing: must be an absolute path: {backing!r}")
        if prealloc != "off" and backing is not None:
            raise InvalidParamsError("prealloc: not with a backing image")
        if target in self._creating:
            raise InvalidOperationError(f"{target} is being created by another call")
        if await asyncio.to_thread(os.path.lexists, target):
            raise InvalidOperationError(f"{target} exists: vol-create never overwrites a file")
        if not await asyncio.to_thread(target.parent.is_dir):
            raise InvalidOperationError(f"{target.parent} is not a directory")
        argv = ["qemu-img", "create", "-f", fmt]
        backing_fmt = None
        if backing is not None:
            info = json.loads(await asyncio.to_thread(
                _qemu_img, ["qemu-img", "info", "--output=json", "--force-share", backing]))
            backing_fmt = str(info.get("format"))
            argv += ["-b", backing, "-F", backing_fmt]
        if prealloc != "off":
            argv += ["-o", f"preallocation={prealloc}"]
        argv += [str(target), str(nbytes)]
        self._creating.add(target)
        try:
            work = asyncio.ensure_future(asyncio.to_thread(_qemu_img, argv))
            while not work.done():
                await asyncio.wait({work}, timeout=PROGRESS_S)
                if not work.done():
                    progress({"path": str(target), "done": await asyncio.to_thread(
                        _allocated, target), "total": nbytes})
            await work
        finally:
            self._creating.discard(target)
        log.info("volume %s created (%s, %d bytes%s) by %s", target, fmt, nbytes,
                 f", backing {backing}" if backing else "", owner)
        return {"path": str(target), "format": fmt, "size": nbytes, "backing": backing,
                "backing_format": backing_fmt, "prealloc": prealloc}
