"""A daemon whose run directory is on tmpfs, as /run is in production: its status files and
console logs are written by the loop itself (writer.py, "Memory filesystems"), and all the
promises still hold: the file is current after every change, no callback holds the loop
(the conftest's L6 check), and a daemon killed with SIGKILL adopts the guest from it."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import pytest
from harness import Daemon, tiny_definition, wait_for
from test_promises import status_file
from test_promises_storage import fill, tmpfs


def status(daemon: Daemon, name: str) -> dict[str, Any]:
    return json.loads(status_file(daemon, name).read_text())


def test_status_written_by_the_loop_on_tmpfs_is_current_and_survives(
        daemon_factory: Any) -> None:
    daemon: Daemon = daemon_factory(where="/dev/shm")
    assert "is on tmpfs" in daemon.wait_log("run directory .* is on ")
    daemon.define(tiny_definition("mem"))
    daemon.qvirsh("start", "mem")
    pid = daemon.json("dominfo", "mem")["pid"]
    def says(state: str, reason: str) -> bool:
        got = status(daemon, "mem")
        return (got["state"], got["reason"]) == (state, reason)

    for _ in range(20):  # the file follows every change (written at the end of its step)
        daemon.call("suspend", {"name": "mem"})
        wait_for(lambda: says("paused", "user"), 5, "the status file to say paused")
        daemon.call("resume", {"name": "mem"})
        wait_for(lambda: says("running", "unpaused"), 5, "the status file to say running")
    writer = daemon.call("daemon-stats", {})["writer"]
    assert writer["inline"] >= 40 and writer["failures"] == 0, writer
    daemon.call("suspend", {"name": "mem"})
    wait_for(lambda: says("paused", "user"), 5, "the status file to say paused")
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(10)
    daemon.start()
    wait_for(lambda: not daemon.json("dominfo", "mem")["job"]["job"], 15, "the reconnect")
    info = daemon.json("dominfo", "mem")
    assert (info["state"], info["reason"], info["pid"]) == ("paused", "user", pid)
    daemon.qvirsh("destroy", "mem")
    assert daemon.qemu_pids() == []


def test_a_tmp_root_on_disk_is_written_by_the_threads(daemon: Daemon) -> None:
    assert "is on tmpfs" not in daemon.wait_log("run directory .* is on ")
    daemon.define(tiny_definition("disk"))
    daemon.qvirsh("start", "disk")
    daemon.qvirsh("destroy", "disk")
    writer = daemon.call("daemon-stats", {})["writer"]
    assert writer["writes"] > 0 and writer["inline"] == 0, writer


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount)")
def test_a_full_tmpfs_run_directory_is_reported_and_caught_up_with(
        daemon_factory: Any) -> None:
    """Status writes the loop makes on a tmpfs that fills up: the change still happens, the
    failed write is reported (daemon-warnings, the writer's stats) and retried, and once
    there is room the file catches up. No callback holds the loop meanwhile."""
    daemon: Daemon = daemon_factory(start=False)
    run = daemon.root / "run"
    run.mkdir(mode=0o700)
    with tmpfs(run, "1m"):
        daemon.start()
        try:
            assert "is on tmpfs" in daemon.wait_log("run directory .* is on ")
            daemon.define(tiny_definition("full"))
            daemon.qvirsh("start", "full")
            filler = fill(run)
            daemon.call("suspend", {"name": "full"})  # its status write finds no room
            failing = wait_for(lambda: daemon.call("daemon-stats", {})["writer"]["failing"],
                               10, "the failed status write to be reported")
            assert "No space left on device" in failing[0] and "status.json" in failing[0]
            assert "No space left" in daemon.qvirsh("daemon-warnings").stdout
            assert daemon.state("full") == ("paused", "user")
            for path in filler:
                path.unlink()
            wait_for(lambda: status(daemon, "full")["state"] == "paused", 10,
                     "the retry to write the status")
            assert not daemon.call("daemon-stats", {})["writer"]["failing"]
            assert daemon.call("daemon-stats", {})["writer"]["inline"] > 0
            daemon.qvirsh("destroy", "full")
            assert daemon.lock_violations() == 0
            assert not daemon.loop_stalls(), daemon.loop_stalls()
        finally:
            daemon.cleanup()  # the daemon and its files go before the tmpfs does
