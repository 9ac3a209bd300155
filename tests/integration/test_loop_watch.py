"""Rule L6, checked at run time: every integration daemon runs with `loop_watch_ms = 20` and
the fixture fails a test whose daemon's loop was held that long by one callback. This file
shows the check catches a real blocking call in a real daemon (the unit tests in
tests/unit/test_loopwatch.py show how it tells blocking from a busy machine)."""

from __future__ import annotations

from harness import Daemon, tiny_definition

# A blocking call on the loop thread, as the old daemon made at every state change (a status
# file written with fsync): what rule L6 forbids.
BLOCKING_STATUS_WRITES = """
import time
import qvirtd.ops.context as context
_save = context.Context.save_status
def save_status_and_block(self, *args, **kwargs):
    time.sleep(0.06)
    return _save(self, *args, **kwargs)
context.Context.save_status = save_status_and_block
"""


def test_a_blocking_call_on_the_loop_is_caught() -> None:
    daemon = Daemon(preload=BLOCKING_STATUS_WRITES)  # not the fixture's: it would fail
    try:
        daemon.start()
        daemon.define(tiny_definition("slowpoke", accel="tcg"))
        daemon.qvirsh("start", "slowpoke")
        stalls = daemon.loop_stalls()
        assert stalls, "the loop watch missed a 60 ms blocking call"
        report = stalls[-1]
        assert report["kind"] == "blocked" and report["held_ms"] >= 20, report
        assert any("save_status_and_block" in line for line in report["stack"]), report
        daemon.wait_log(r"\(rule L6\)")  # logged with its stack
        daemon.qvirsh("destroy", "slowpoke")
    finally:
        daemon.cleanup()


def test_a_daemon_without_blocking_calls_has_no_stalls(daemon: Daemon) -> None:
    """The same operations on the real daemon: nothing (the fixture checks it too)."""
    daemon.define(tiny_definition("fine", accel="tcg"))
    daemon.qvirsh("start", "fine")
    daemon.qvirsh("destroy", "fine")
    assert daemon.loop_stalls() == []
