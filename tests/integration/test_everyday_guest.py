"""Real guests the everyday way (issue 10), on the Debian-built test guest under TCG: a serial
console typed into through a real pty, a screen whose screenshot shows text, a cloud-init
seed the guest reads, the guest agent, and boot from a disk (an overlay on the guest's UEFI
image) under UEFI and Secure Boot."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from build_guest import GUEST_HOSTNAME, SECURE_BOOT_MEMORY_MIB
from harness import Daemon, Terminal, guest_definition, tiny_definition, wait_for
from test_graphics import png_pixels

from qvirtd.client import RpcError

READY = "QVIRTD-GUEST: ready"


def test_console_round_trip_watchers_takeover_and_restart(daemon: Daemon, guest: Any) -> None:
    daemon.define(guest_definition(guest, "tty"))
    daemon.qvirsh("start", "tty")
    daemon.wait_console("tty", READY)
    term = Terminal(daemon, "console", "tty")
    term.type(b"\r")  # typed ahead, while qvirsh starts: it must reach the guest, not be flushed
    watcher = Terminal(daemon, "console", "tty", "--readonly")
    try:
        term.read_until(b"Escape character is ^]")
        watcher.read_until(b"(read-only)")
        term.read_until(b"guest# ")
        term.type(b"echo hel''lo-$((6*7))\r")  # the output differs from the echoed input
        term.read_until(b"hello-42")
        watcher.read_until(b"hello-42")  # a read-only watcher sees the same
        watcher.type(b"echo never\r")  # ...and cannot type
        term.type(b"\x1d")  # Ctrl-] detaches
        assert term.close() == 0
    finally:
        watcher.proc.kill()
        watcher.close()
    log = daemon.console("tty")
    assert log.count("hello-42") == 1  # attaching neither lost nor duplicated log output
    assert "echo never" not in log
    # A guest started before the daemon restarted: its console still works.
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(10)
    daemon.start()
    wait_for(lambda: not daemon.json("dominfo", "tty")["job"]["job"], 15, "the reconnect")
    term = Terminal(daemon, "console", "tty")
    term.read_until(b"Escape character")
    term.type(b"echo after-$((40+2))\r")
    term.read_until(b"after-42")
    term.type(b"\x1d")
    assert term.close() == 0
    daemon.qvirsh("destroy", "tty")


def test_screenshot_shows_the_guests_text(daemon: Daemon, guest: Any, tmp_path: Path) -> None:
    daemon.define(guest_definition(guest, "screen", graphics={"type": "vnc"}))
    daemon.qvirsh("start", "screen")
    daemon.wait_console("screen", READY)
    png = tmp_path / "screen.png"
    out = daemon.qvirsh("screenshot", "screen", str(png)).stdout
    width, height, raw = png_pixels(png.read_bytes())
    # Text on a black screen: mostly one colour, but thousands of lit pixels.
    lit = sum(1 for b in raw if b > 64)
    print(f"\n{out.strip()}: {width}x{height}, {lit} bright bytes")
    assert width >= 640 and height >= 400 and lit > 2000
    daemon.qvirsh("destroy", "screen")


def test_cloud_init_seed_reaches_the_guest(daemon: Daemon, guest: Any) -> None:
    user_data = "#cloud-config\nruncmd:\n  - echo hello from qvirtd\n"
    daemon.define(guest_definition(guest, "ci", cloud_init={
        "user_data": user_data, "meta_data": {"local-hostname": "ci-host"}}))
    uuid = daemon.json("dominfo", "ci")["uuid"]
    daemon.qvirsh("start", "ci")
    daemon.wait_console("ci", READY)
    lines = {line.split()[2]: line.split()[3] if len(line.split()) > 3 else ""
             for line in daemon.console("ci").splitlines()
             if line.startswith("QVIRTD-GUEST: cidata ") and "found" not in line}
    assert base64.b64decode(lines["user-data"]).decode() == user_data
    meta = json.loads(base64.b64decode(lines["meta-data"]))
    assert meta == {"instance-id": uuid, "local-hostname": "ci-host"}
    # The seed is a CD-ROM of the JSON config (seed 004), and QEMU has exactly it.
    live = json.loads(daemon.qvirsh("dumpjson", "ci").stdout)
    assert live["cloud_init"] is None
    assert [c["id"] for c in live["cdroms"]] == ["cidata"]
    blocks = json.loads(daemon.qvirsh("qemu-monitor-command", "ci",
                                      '{"execute": "query-block"}').stdout)
    inserted = {b["qdev"].rsplit("/", 1)[-1]: (b.get("inserted") or {}).get("file")
                for b in blocks}
    assert inserted["cidata"] == live["cdroms"][0]["path"]
    assert json.loads(daemon.qvirsh("dumpjson", "ci", "--inactive").stdout)["cloud_init"]
    daemon.qvirsh("destroy", "ci")
    assert not Path(live["cdroms"][0]["path"]).exists()


async def test_guest_agent(daemon_factory: Any, guest: Any) -> None:
    daemon: Daemon = daemon_factory({"agent_timeout_s": 5.0})
    daemon.define(guest_definition(guest, "ga", guest_agent=True, nics=[{"id": "lan"}]))
    client = await daemon.client()
    try:
        await client.call("event", {"domain": "ga", "events": ["agent-lifecycle"]})
        await asyncio.to_thread(daemon.qvirsh, "start", "ga")
        await asyncio.to_thread(daemon.wait_console, "ga", "QVIRTD-GUEST: net address eth0")
        note = await client.next_event(20)
        assert note is not None and note["params"]["data"] == {"state": "connected"}
        shown = (await asyncio.to_thread(daemon.qvirsh, "domifaddr", "ga")).stdout
        print("\n" + shown)
        assert "eth0" in shown and "10.0.2.15/24" in shown and "127.0.0.1/8" in shown
        info = await client.call("guestinfo", {"name": "ga"})
        assert info["hostname"] == GUEST_HOSTNAME and info["os"]["kernel-release"]
        frozen = await client.call("domfsfreeze", {"name": "ga"})
        thawed = await client.call("domfsthaw", {"name": "ga"})
        assert isinstance(frozen["frozen"], int) and isinstance(thawed["thawed"], int)
        started = time.monotonic()
        await client.call("shutdown", {"name": "ga", "mode": "agent", "wait": 60})
        assert (await client.call("dominfo", {"name": "ga"}))["state"] == "shutoff"
        print(f"shutdown --mode agent: shut off after {time.monotonic() - started:.1f} s")
        assert "QVIRTD-GUEST: agent shutdown poweroff" in daemon.console("ga")
    finally:
        await client.close()


async def test_no_agent_is_an_error_and_agent_and_monitor_jobs_never_wait_for_each_other(
        daemon_factory: Any) -> None:
    """A guest without a running agent (a no-OS guest) answers nothing: the call fails after
    agent_timeout_s, clearly; meanwhile monitor jobs on the same domain go on."""
    daemon: Daemon = daemon_factory({"agent_timeout_s": 3.0})
    daemon.define(tiny_definition("mute", guest_agent=True))
    daemon.qvirsh("start", "mute")
    client, other = await daemon.client(), await daemon.client()
    try:
        t0 = time.monotonic()
        call = asyncio.create_task(client.call("domifaddr", {"name": "mute"}))
        await asyncio.sleep(0.3)
        info = await other.call("dominfo", {"name": "mute"})
        assert "domifaddr" in info["agent_job"]
        for verb in ("suspend", "resume"):  # monitor jobs: no wait for the agent job
            s = time.monotonic()
            await other.call(verb, {"name": "mute"})
            assert time.monotonic() - s < 1.5
        with pytest.raises(RpcError) as err:
            await call
        elapsed = time.monotonic() - t0
        assert err.value.kind == "agent" and "did not answer" in str(err.value)
        assert 2.5 < elapsed < 10
    finally:
        await client.close()
        await other.close()
    daemon.qvirsh("destroy", "mute")


def test_uefi_boot_from_an_overlay_disk(daemon: Daemon, guest: Any) -> None:
    """The everyday way: make an overlay on a base image, boot it under UEFI with no kernel
    on the host, reach ready, power off by ACPI."""
    overlay = daemon.root / "efi-overlay.qcow2"
    daemon.qvirsh("vol-create", str(overlay), "64M", "--format", "qcow2",
                  "--backing", str(guest.uefi_disk))
    daemon.define({"name": "efi", "memory_mib": 256, "accel": "tcg", "firmware": "uefi",
                   "disks": [{"id": "root", "path": str(overlay), "format": "qcow2",
                              "boot_order": 1}]})
    daemon.qvirsh("start", "efi")
    daemon.wait_console("efi", READY, timeout_s=90)
    out = daemon.qvirsh("shutdown", "efi", "--wait", "60").stdout
    assert "is shut off" in out and daemon.state("efi") == ("shutoff", "shutdown")


@pytest.mark.skipif("not __import__('build_guest').ensure_guest().secure_boot_disk")
def test_secure_boot_from_a_signed_disk(daemon: Daemon, guest: Any) -> None:
    overlay = daemon.root / "sb-overlay.qcow2"
    daemon.qvirsh("vol-create", str(overlay), "64M", "--format", "qcow2",
                  "--backing", str(guest.secure_boot_disk))
    daemon.define({"name": "sb", "memory_mib": SECURE_BOOT_MEMORY_MIB, "accel": "tcg",
                   "firmware": "uefi", "secure_boot": True,
                   "disks": [{"id": "root", "path": str(overlay), "format": "qcow2",
                              "boot_order": 1}]})
    daemon.qvirsh("start", "sb")
    daemon.wait_console("sb", READY, timeout_s=120)
    assert "module failed" not in daemon.console("sb")  # lockdown: every module signed
    term = Terminal(daemon, "console", "sb")
    try:
        term.prompt(b"guest# ")
        term.type(b"dmesg | grep -o 'Secure boot enabled'\r")
        term.read_until(b"\nSecure boot enabled", timeout_s=10)  # after the shell's echo
        term.type(b"\x1d")
        assert term.close() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
            term.close()
    daemon.qvirsh("destroy", "sb")
