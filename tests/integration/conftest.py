from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from build_guest import GuestImage, ensure_guest
from harness import Daemon


@pytest.fixture(scope="session")
def guest() -> GuestImage:
    """The tiny Linux test guest (built from Debian packages once, then cached)."""
    return ensure_guest()


@pytest.fixture
def daemon_factory() -> Iterator[Callable[..., Daemon]]:
    made: list[Daemon] = []

    def make(settings: dict[str, Any] | None = None, start: bool = True,
             **kwargs: Any) -> Daemon:
        d = Daemon(settings, **kwargs)
        made.append(d)
        return d.start() if start else d

    yield make
    try:
        for d in made:
            # The instrumented run: no QMP command or process wait under a lock, ever (L4),
            # and no callback that holds the event loop 20 ms or more (L6).
            if d.proc is not None and d.proc.poll() is None:
                assert d.lock_violations() == 0, d.log_text()
                stalls = d.loop_stalls()
                assert not stalls, "rule L6 broken: " + json.dumps(stalls, indent=1)
    finally:
        for d in made:
            d.cleanup()


@pytest.fixture
def daemon(daemon_factory: Callable[..., Daemon]) -> Daemon:
    return daemon_factory()
