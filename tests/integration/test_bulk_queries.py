"""A whole host in one call (issue 12): `list --all --info` and `domstats`, against real QEMU.

`domstats` never waits for a QEMU that does not answer: a stopped one comes back at once,
with its last block counters marked stale (how fast is measured in benchmarks/, not here).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from harness import Daemon, tiny_definition, wait_for

from qvirtd.qemu.process import proc_state

FAKE_QEMU = str(Path(__file__).resolve().parent / "fake_qemu" / "qemu-system-fake")


def test_list_info_and_domstats_cover_every_domain(daemon: Daemon, tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    with open(disk, "wb") as f:
        f.truncate(8 << 20)
    daemon.define(tiny_definition("s1", disks=[{"id": "vda", "path": str(disk)}]))
    daemon.define(tiny_definition("s2"))
    daemon.define(tiny_definition("off"))
    daemon.qvirsh("start", "s1")
    daemon.qvirsh("start", "s2")

    listed = daemon.json("list", "--all", "--info")
    assert [d["name"] for d in listed] == ["s1", "s2", "off"]
    for d in listed:  # the same fields as dominfo, one call
        assert d == daemon.json("dominfo", d["name"])
    out = daemon.qvirsh("list", "--all", "--info").stdout
    assert "Pid" in out and "off" in out

    stats = daemon.json("domstats")["domains"]
    assert [d["name"] for d in stats] == ["s1", "s2"]
    s1 = stats[0]
    assert s1["state"] == "running" and s1["stale"] is False
    assert s1["cpu_time_ns"] > 0 and s1["memory"]["rss_kib"] > 0
    assert s1["memory"]["max_mib"] == 64 and s1["vcpus"] == 1
    assert [b["id"] for b in s1["block"]] == ["vda"]
    assert s1["block"][0]["rd_bytes"] >= 0
    only = daemon.json("domstats", "--domain", "off", "--domain", "s2")["domains"]
    assert [(d["name"], d["state"]) for d in only] == [("off", "shutoff"), ("s2", "running")]
    assert "cpu_time_ns" not in only[0]

    pid = daemon.json("dominfo", "s1")["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        # kill() returns before the process has stopped: once /proc says so, the daemon
        # sees it too, and never asks it (a QEMU frozen some other way is asked, and marked
        # stale after stats_timeout_s).
        wait_for(lambda: proc_state(pid) == "T", 10, "QEMU to stop")
        t = time.monotonic()
        frozen = daemon.json("domstats")["domains"]
        took = time.monotonic() - t
        s1, s2 = frozen
        assert s1["stale"] is True and "stopped" in s1["stale_reason"], s1
        assert [b["id"] for b in s1["block"]] == ["vda"] and s1["block_age_s"] >= 0
        assert s2["stale"] is False
        # Not a speed check: a call that waited for the frozen QEMU would take its
        # monitor_timeout_s (10 s).
        assert took < 5, took
        assert daemon.json("dominfo", "s1")["job"]["job"] is None  # no query left behind
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: daemon.json("domstats", "--domain", "s1")["domains"][0]["stale"] is False,
             10, "fresh stats once thawed")
    human = daemon.qvirsh("domstats").stdout
    assert "s1" in human and "RSS MiB" in human
    daemon.qvirsh("destroy", "s1")
    daemon.qvirsh("destroy", "s2")


def test_domstats_waits_once_for_a_qemu_that_does_not_answer(daemon_factory: Any) -> None:
    """A QEMU that runs but does not answer (a scripted QMP peer: real QEMU cannot be made
    to hang on cue, and a SIGSTOPped one is never asked, above): the first call waits
    stats_timeout_s for it; later calls do not wait while that query is still out."""
    daemon: Daemon = daemon_factory(
        {"qemu_binary": FAKE_QEMU, "monitor_timeout_s": 30.0, "stats_timeout_s": 0.3},
        env={"QVIRTD_FAKE_QEMU": json.dumps({"hang": {"query-blockstats": 1}})})
    daemon.define(tiny_definition("hung", accel="tcg"))
    daemon.qvirsh("start", "hung")
    first = daemon.json("domstats")["domains"][0]
    assert first["stale"] and "did not answer within 0.3 s" in first["stale_reason"], first
    second = daemon.json("domstats")["domains"][0]
    assert second["stale"] and "previous call's query" in second["stale_reason"], second
    # The query still holds its QUERY job; queries and destroy go on beside it.
    assert "domstats" in daemon.json("dominfo", "hung")["job"]["job"]
    daemon.qvirsh("destroy", "hung")
