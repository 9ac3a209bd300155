"""The full lifecycle of a real Linux guest (TCG), through the CLI, as a user would drive it."""

from __future__ import annotations

from harness import Daemon, guest_definition, pid_alive

READY = "QVIRTD-GUEST: ready"
BUTTON = "QVIRTD-GUEST: power button"


def test_full_lifecycle_on_the_test_guest(daemon: Daemon, guest: object) -> None:
    daemon.define(guest_definition(guest, "linux"))
    assert daemon.state("linux") == ("shutoff", "unknown")

    # start: the guest really boots (its init prints READY once acpid listens)
    daemon.qvirsh("start", "linux")
    info = daemon.json("dominfo", "linux")
    assert (info["state"], info["reason"], info["accel"]) == ("running", "booted", "tcg")
    first_pid = info["pid"]
    daemon.wait_console("linux", READY)

    # suspend / resume
    daemon.qvirsh("suspend", "linux")
    assert daemon.state("linux") == ("paused", "user")
    status = daemon.qvirsh("qemu-monitor-command", "linux", '{"execute": "query-status"}')
    assert '"paused"' in status.stdout
    daemon.qvirsh("resume", "linux")
    assert daemon.state("linux") == ("running", "unpaused")

    # reboot: power button, the guest powers off, and the same QEMU resets and continues
    daemon.qvirsh("reboot", "linux")
    daemon.wait_console("linux", READY, count=2)
    info = daemon.wait_state("linux", "running")
    assert info["pid"] == first_pid
    assert daemon.console("linux").count(BUTTON) == 1

    # reset: a hard reset, the guest boots again in the same QEMU
    daemon.qvirsh("reset", "linux")
    daemon.wait_console("linux", READY, count=3)
    assert daemon.json("dominfo", "linux")["pid"] == first_pid
    assert daemon.state("linux")[0] == "running"

    # shutdown: the ACPI power button really powers the guest off
    daemon.qvirsh("shutdown", "linux", "--wait", "60")
    assert daemon.state("linux") == ("shutoff", "shutdown")
    assert daemon.console("linux").count(BUTTON) == 2
    assert not pid_alive(first_pid)

    # start again: a new QEMU, a new id
    daemon.qvirsh("start", "linux")
    info = daemon.json("dominfo", "linux")
    assert info["state"] == "running" and info["pid"] != first_pid and info["id"] >= 2
    pid = info["pid"]

    # destroy: gone now, no QEMU left behind
    daemon.qvirsh("destroy", "linux")
    assert daemon.state("linux") == ("shutoff", "destroyed")
    assert not pid_alive(pid)
    assert daemon.qemu_pids() == []

def test_start_paused_then_resume(daemon: Daemon, guest: object) -> None:
    daemon.define(guest_definition(guest, "paused"))
    daemon.qvirsh("start", "paused", "--paused")
    assert daemon.state("paused") == ("paused", "user")
    assert READY not in daemon.console("paused")
    daemon.qvirsh("resume", "paused")
    daemon.wait_console("paused", READY)
    daemon.qvirsh("destroy", "paused")


def test_on_poweroff_preserve_keeps_qemu(daemon: Daemon, guest: object) -> None:
    daemon.define(guest_definition(guest, "keep", on_poweroff="preserve"))
    daemon.qvirsh("start", "keep")
    daemon.wait_console("keep", READY)
    daemon.qvirsh("shutdown", "keep")
    info = daemon.wait_state("keep", "paused")
    assert info["reason"] == "shutdown" and pid_alive(info["pid"])
    daemon.qvirsh("destroy", "keep")
    assert daemon.state("keep") == ("shutoff", "destroyed")


def test_on_poweroff_restart_boots_again(daemon: Daemon, guest: object) -> None:
    daemon.define(guest_definition(guest, "again", on_poweroff="restart"))
    daemon.qvirsh("start", "again")
    daemon.wait_console("again", READY)
    pid = daemon.json("dominfo", "again")["pid"]
    daemon.qvirsh("shutdown", "again")
    daemon.wait_console("again", READY, count=2)
    info = daemon.wait_state("again", "running")
    assert info["pid"] == pid
    daemon.qvirsh("destroy", "again")


def test_guests_outlive_the_daemon(daemon: Daemon, guest: object) -> None:
    daemon.define(guest_definition(guest, "survivor"))
    daemon.qvirsh("start", "survivor")
    pid = daemon.json("dominfo", "survivor")["pid"]
    assert daemon.stop() == 0
    assert pid_alive(pid), "SIGTERM to qvirtd must leave guests running"
    assert not daemon.socket.exists()
