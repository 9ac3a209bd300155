"""Blocking work that makes something (an fd, a socket) run off the loop (rule L6), with an
owner for what it makes even when the caller is cancelled while the thread works.

`asyncio.to_thread` alone leaks there: the caller's await is cancelled (a start aborted, a
daemon stopping), the thread finishes anyway, and the fd it opened belongs to nobody. With
`make_owned` the caller owns the result if it gets it; if it was cancelled first, the result
is released as soon as the thread delivers it, itself off the loop (a close may flush, or
free the blocks of a deleted file).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


async def make_owned(make: Callable[[], T], release: Callable[[T], None]) -> T:
    """`make()` in a worker thread. Its result is the caller's; a result nobody awaits any
    more (the caller was cancelled) goes to `release()`, also in a worker thread."""
    loop = asyncio.get_running_loop()
    made = loop.run_in_executor(None, make)
    try:
        return await asyncio.shield(made)
    except asyncio.CancelledError:
        made.add_done_callback(lambda done: _release_orphan(loop, done, release))
        raise


def _release_orphan(loop: asyncio.AbstractEventLoop, done: asyncio.Future[T],
                    release: Callable[[T], None]) -> None:
    if done.cancelled() or done.exception() is not None:
        return  # nothing was made
    result = done.result()

    def run() -> None:
        try:
            release(result)
        except Exception:
            log.exception("releasing %r, made for a cancelled caller", result)

    loop.run_in_executor(None, run)
