"""The daemon dies, restarts, is socket-activated: guests are never lost, never doubled."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from harness import Daemon, NotifyListener, pid_alive, tiny_definition, wait_for

from qvirtd.client import Client

REPO = Path(__file__).resolve().parents[2]


def restart_after_sigkill(daemon: Daemon) -> None:
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(10)
    daemon.start()


def settled(daemon: Daemon) -> bool:
    """No reconnect (or any other job) still running on any domain."""
    for dom in daemon.json("list", "--all"):
        job = daemon.json("dominfo", dom["name"])["job"]
        if job["job"] or job["async_job"]:
            return False
    return True


async def test_running_domains_survive_a_daemon_sigkill(daemon: Daemon) -> None:
    for name in ("one", "two", "three"):
        daemon.define(tiny_definition(name))
        daemon.qvirsh("start", name)
    daemon.qvirsh("suspend", "two")
    before = {d: daemon.json("dominfo", d) for d in ("one", "two", "three")}

    restart_after_sigkill(daemon)
    wait_for(lambda: settled(daemon), 20, "reconnects to finish")
    for name, old in before.items():
        info = daemon.json("dominfo", name)
        assert (info["pid"], info["id"], info["state"], info["reason"]) == \
            (old["pid"], old["id"], old["state"], old["reason"]), name
    assert len(daemon.qemu_pids()) == 3

    client = await daemon.client()
    try:  # operations work and events flow again
        await client.call("event")
        await client.call("resume", {"name": "two"})
        await client.call("suspend", {"name": "one"})
        got = [(await client.next_event(10))["params"] for _ in range(2)]  # type: ignore[index]
        assert [(e["domain"]["name"], e["type"]) for e in got] == [("two", "resumed"),
                                                                    ("one", "suspended")]
        await client.call("destroy", {"name": "three"})
        # a domain started now gets an id after the adopted ones
        await client.call("define", {"definition": tiny_definition("four")})
        four = await client.call("start", {"name": "four"})
        assert four["id"] > max(o["id"] for o in before.values())
    finally:
        await client.close()


async def test_qemu_killed_while_the_daemon_is_down(daemon: Daemon) -> None:
    daemon.define(tiny_definition("lost"))
    daemon.define(tiny_definition("kept"))
    daemon.qvirsh("start", "lost")
    daemon.qvirsh("start", "kept")
    pid = daemon.json("dominfo", "lost")["pid"]
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(10)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid), 10, "QEMU to die")
    daemon.start()
    info = daemon.json("dominfo", "lost")
    assert (info["state"], info["reason"], info["pid"], info["id"]) == \
        ("shutoff", "crashed", None, None)
    assert not (daemon.root / "run" / "domains" / "lost" / "status.json").exists()
    assert not (daemon.root / "run" / "domains" / "lost" / "monitor.sock").exists()
    assert daemon.state("kept") == ("running", "booted")
    client = await daemon.client()
    try:  # the event happened while nobody was connected: the replay buffer has it
        await client.call("event", {"since_seq": 0, "domain": "lost"})
        msg = await client.next_event(5)
        assert msg is not None
        assert (msg["params"]["type"], msg["params"]["detail"]) == ("stopped", "crashed")
    finally:
        await client.close()
    daemon.qvirsh("start", "lost")  # and it starts again normally


def test_clean_stop_leaves_status_current_and_guests_running(daemon: Daemon) -> None:
    daemon.define(tiny_definition("calm"))
    daemon.qvirsh("start", "calm")
    daemon.qvirsh("suspend", "calm")
    pid = daemon.json("dominfo", "calm")["pid"]
    assert daemon.stop() == 0
    status = json.loads((daemon.root / "run" / "domains" / "calm" / "status.json").read_text())
    assert (status["pid"], status["state"], status["reason"], status["async_job"]) == \
        (pid, "paused", "user", None)
    assert pid_alive(pid)
    daemon.start()
    assert daemon.state("calm") == ("paused", "user")


def test_an_orphan_qemu_is_reported_and_left_alone(daemon: Daemon) -> None:
    daemon.define(tiny_definition("stray"))
    daemon.qvirsh("start", "stray")
    pid = daemon.json("dominfo", "stray")["pid"]
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(10)
    (daemon.root / "run" / "domains" / "stray" / "status.json").unlink()
    daemon.start()
    res = daemon.qvirsh("list", "--all")
    assert f"warning: QEMU pid {pid} uses" in res.stderr and "not killed" in res.stderr
    assert daemon.state("stray")[0] == "shutoff"
    assert pid_alive(pid)
    os.kill(pid, signal.SIGKILL)


def test_autostart(daemon: Daemon) -> None:
    daemon.define(tiny_definition("auto"))
    daemon.define(tiny_definition("manual"))
    daemon.qvirsh("autostart", "auto")
    assert daemon.stop() == 0
    daemon.start()
    info = wait_for(lambda: (i := daemon.json("dominfo", "auto"))["state"] == "running" and i,
                    20, "autostart")
    assert daemon.state("manual")[0] == "shutoff"
    # Started (the start job is over: "running" shows a moment before the status file says
    # so, and a start the disk does not know of is rolled back by the next daemon).
    wait_for(lambda: settled(daemon), 20, "the autostart job to end")
    # Already running when the daemon restarts: adopted, not started a second time.
    restart_after_sigkill(daemon)
    wait_for(lambda: settled(daemon), 20, "reconnects to finish")
    again = daemon.json("dominfo", "auto")
    assert again["pid"] == info["pid"] and len(daemon.qemu_pids()) == 1


def test_socket_activation(daemon_factory: Any) -> None:
    daemon: Daemon = daemon_factory(start=False)
    daemon.write_config()
    path = daemon.root / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    fd = listener.fileno()
    # What systemd does: the socket as fd 3, LISTEN_PID set to the daemon's own pid.
    launcher = ("import os, sys; os.dup2(int(sys.argv[1]), 3); "
                "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); "
                "os.execv(sys.executable, [sys.executable, '-m', 'qvirtd', '--root', sys.argv[2]])")
    with open(daemon.log, "ab") as logf:
        daemon.proc = subprocess.Popen([sys.executable, "-c", launcher, str(fd),
                                        str(daemon.root)], pass_fds=[fd], stdout=logf,
                                       stderr=logf)
    listener.close()
    try:
        daemon.socket = path
        wait_for(lambda: "socket activation" in daemon.log_text(), 15, "the daemon to start")
        daemon.define(tiny_definition("act"))
        assert [d["name"] for d in daemon.json("list", "--all")] == ["act"]
        assert not (daemon.root / "run" / "qvirtd.sock").exists()  # it did not bind its own
        assert daemon.stop() == 0
        assert path.exists()  # systemd's socket: the daemon leaves it to systemd
    finally:
        path.unlink(missing_ok=True)


def test_ready_and_watchdog_reach_notify_socket(daemon_factory: Any, tmp_path: Path) -> None:
    notify = NotifyListener(tmp_path / "notify.sock",
                            lambda got: sum("WATCHDOG=1" in m for m in got) >= 3, timeout_s=10)
    daemon: Daemon = daemon_factory(env={"NOTIFY_SOCKET": str(notify.path),
                                         "WATCHDOG_USEC": "200000"})
    got = notify.finish(10)
    assert any("READY=1" in m for m in got), got
    assert sum("WATCHDOG=1" in m for m in got) >= 3, got
    assert any("STATUS=" in m for m in got), got
    daemon.stop()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_units_verify(tmp_path: Path) -> None:
    service = (REPO / "systemd" / "qvirtd.service").read_text()
    qvirtd = shutil.which("qvirtd") or str(Path(sys.executable).parent / "qvirtd")
    qvirsh = str(Path(qvirtd).with_name("qvirsh"))
    (tmp_path / "qvirtd.service").write_text(service.replace("/usr/local/bin/qvirtd", qvirtd))
    guests = (REPO / "systemd" / "qvirtd-guests.service").read_text()
    (tmp_path / "qvirtd-guests.service").write_text(
        guests.replace("/usr/local/bin/qvirsh", qvirsh))
    shutil.copy(REPO / "systemd" / "qvirtd.socket", tmp_path / "qvirtd.socket")
    res = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "qvirtd.socket"),
                          str(tmp_path / "qvirtd.service"),
                          str(tmp_path / "qvirtd-guests.service")],
                         capture_output=True, text=True)
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr
    assert "KillMode=process" in service and "Type=notify" in service
    assert "WatchdogSec=" in service
    assert "ExecStop=/usr/local/bin/qvirsh guests-stop" in guests


async def test_frozen_qemu_at_reconnect_holds_up_nobody(daemon_factory: Any) -> None:
    daemon: Daemon = daemon_factory({"monitor_connect_timeout_s": 2.0,
                                     "monitor_timeout_s": 2.0})
    for name in ("icy", "warm"):
        daemon.define(tiny_definition(name))
        daemon.qvirsh("start", name)
    icy = daemon.json("dominfo", "icy")["pid"]
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(10)
    os.kill(icy, signal.SIGSTOP)
    try:
        start = time.monotonic()
        daemon.start()
        client = await Client.connect(daemon.socket)
        try:
            await client.call("suspend", {"name": "warm"})  # reconnected meanwhile
            assert time.monotonic() - start < 10
            assert (await client.call("dominfo", {"name": "icy"}))["state"] == "running"
            await client.call("destroy", {"name": "icy"})  # destroy gets through anyway
            assert not pid_alive(icy)
        finally:
            await client.close()
    finally:
        if pid_alive(icy):
            os.kill(icy, signal.SIGKILL)
    await asyncio.sleep(0)
