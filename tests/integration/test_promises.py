"""Promises under attack: the reproductions of issue 9 that broke the previous round, each
against a real daemon and real QEMU (and, for faults QEMU cannot produce on cue, a scripted
QMP peer beside the real test).

Recipes 2, 3, 11 and the RPC half of 14 are in test_client_bounds.py; 12 and 15 in
test_root_lock.py and tests/unit/test_rootlock.py; 6, 9, 13 and the storage half of 14 in
test_promises_storage.py; 8 (nothing blocks the loop) is checked on every integration daemon
by the fixture.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from harness import Daemon, pid_alive, tiny_definition, wait_for

from qvirtd.client import Client, RpcError

FAKE_QEMU = str(Path(__file__).resolve().parent / "fake_qemu" / "qemu-system-fake")


def sigkill(daemon: Daemon) -> None:
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(10)


def status_file(daemon: Daemon, name: str) -> Path:
    return daemon.root / "run" / "domains" / name / "status.json"


async def latencies_while(client: Client, name: str, seconds: float) -> list[float]:
    """`list` and `dominfo NAME` in a loop for `seconds`: how long each took."""
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.monotonic()
        await asyncio.wait_for(client.call("list", {"all": True}), 5)
        await asyncio.wait_for(client.call("dominfo", {"name": name}), 5)
        out.append(time.monotonic() - t0)
        await asyncio.sleep(0.05)
    return out


# --- 1. a frozen QEMU at reconnect hangs nothing -------------------------------------------

async def test_frozen_qemu_at_reconnect_hangs_nothing(daemon_factory: Any) -> None:
    """Recipe: start a no-OS domain, SIGKILL the daemon, SIGSTOP the QEMU, start the daemon
    with monitor_connect_timeout_s = 1: `list` answered for a few seconds, then hung for good
    (each retry queued a connection in QEMU's backlog of 1; the third blocked connect() with
    the loop inside it), and a restarted daemon hung too."""
    daemon: Daemon = daemon_factory({"monitor_connect_timeout_s": 1.0,
                                     "monitor_reconnect_interval_s": 0.2})
    for name in ("frozen", "healthy"):
        daemon.define(tiny_definition(name))
        daemon.qvirsh("start", name)
    pid = daemon.json("dominfo", "frozen")["pid"]
    sigkill(daemon)
    os.kill(pid, signal.SIGSTOP)
    try:
        worst = []
        for _restart in range(2):  # the queued connections belong to QEMU: restart again
            daemon.start()
            client = await daemon.client()
            try:
                # Many retries (every 0.2 s, each waiting up to 1 s): the backlog fills.
                times = await latencies_while(client, "healthy", 4.0)
                worst.append(max(times))
                info = await client.call("dominfo", {"name": "frozen"})
                assert (info["state"], info["pid"]) == ("running", pid)
                await client.call("suspend", {"name": "healthy"})
                await client.call("resume", {"name": "healthy"})
            finally:
                await client.close()
            if _restart == 0:
                sigkill(daemon)
        print(f"\nfrozen at reconnect: {len(times)} rounds of list+dominfo per daemon, "
              f"slowest {max(worst) * 1e3:.1f} ms")
        assert max(worst) < 1.0
        # Once it thaws, the retry reconnects and the domain works again.
        os.kill(pid, signal.SIGCONT)
        client = await daemon.client()
        try:
            async def reconnected() -> None:
                while True:
                    try:
                        await client.call("suspend", {"name": "frozen"})
                        return
                    except RpcError:
                        await asyncio.sleep(0.2)
            await asyncio.wait_for(reconnected(), 15)
            assert (await client.call("dominfo", {"name": "frozen"}))["state"] == "paused"
            await client.call("destroy", {"name": "frozen"})
        finally:
            await client.close()
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGCONT)
    assert not pid_alive(pid)


# --- 4. define racing undefine does not resurrect ------------------------------------------

async def test_define_racing_undefine_never_disagrees_with_disk(daemon_factory: Any) -> None:
    """Recipe: with a job held, queue `undefine` then `define`: both succeeded, `list --all`
    was empty, yet state/domains/NAME.json existed and the domain came back after a
    restart. Now the define that waited finds the domain gone and defines it anew."""
    daemon: Daemon = daemon_factory({"test_phase_delay_s": 0.4})
    definition = {**tiny_definition("lazarus"),
                  "disks": [{"id": "d0", "path": "/nonexistent/lazarus.img"}]}
    daemon.define(definition)
    file = daemon.root / "state" / "domains" / "lazarus.json"
    clients = [await daemon.client() for _ in range(3)]
    try:
        # A start that will fail (the disk is missing) holds the domain's job meanwhile.
        start = asyncio.create_task(clients[0].call("start", {"name": "lazarus"}))
        for _ in range(100):
            job = await clients[1].call("domjobinfo", {"name": "lazarus"})
            if job["async_job"]:
                break
            await asyncio.sleep(0.02)
        assert job["async_job"]["kind"] == "start"
        undefine = asyncio.create_task(clients[1].call("undefine", {"name": "lazarus"}))
        await asyncio.sleep(0.1)
        define = asyncio.create_task(clients[2].call("define", {"definition": definition}))
        started, undefined, defined = await asyncio.gather(start, undefine, define,
                                                           return_exceptions=True)
        assert isinstance(started, RpcError) and "failed to start" in str(started)
        assert undefined == {"name": "lazarus", "transient": False, "nvram_removed": False,
                             "managed_save_removed": False}
        assert isinstance(defined, dict) and defined["created"] is True, defined
        listed = {d["name"] for d in await clients[0].call("list", {"all": True})}
        assert "lazarus" in listed and file.exists()
    finally:
        for c in clients:
            await c.close()
    daemon.stop()
    daemon.start()
    assert "lazarus" in {d["name"] for d in daemon.json("list", "--all")}
    # The other order: define (an update) first, then undefine: gone, file and all.
    daemon.qvirsh("undefine", "lazarus")
    assert not file.exists() and "lazarus" not in {d["name"] for d in
                                                    daemon.json("list", "--all")}


# --- 5. a status file the daemon cannot parse never starts a guest twice -------------------

def autostarted_then_killed(daemon: Daemon) -> tuple[int, dict[str, Any]]:
    """Domain "vm" (autostart) running, the daemon SIGKILLed: its pid and its status."""
    daemon.define(tiny_definition("vm"))
    daemon.qvirsh("autostart", "vm")
    daemon.qvirsh("start", "vm")
    pid = daemon.json("dominfo", "vm")["pid"]
    sigkill(daemon)
    return pid, json.loads(status_file(daemon, "vm").read_text())


def test_status_with_an_unknown_field_is_read(daemon: Daemon) -> None:
    """Recipe: add one unknown field to a running domain's status.json (as any format
    change between versions would), restart: the live QEMU was an "orphan", and autostart
    (or a user's start) launched a second QEMU with the same uuid."""
    pid, raw = autostarted_then_killed(daemon)
    raw["written_by_qvirtd_9"] = {"anything": [1, 2]}
    status_file(daemon, "vm").write_text(json.dumps(raw))
    daemon.start()
    wait_for(lambda: not daemon.json("dominfo", "vm")["job"]["job"], 10, "the reconnect")
    info = daemon.json("dominfo", "vm")
    assert (info["state"], info["pid"]) == ("running", pid)
    res = daemon.qvirsh("start", "vm", check=False)
    assert res.returncode == 1 and "already running" in res.stderr
    assert daemon.qemu_pids() == [pid] and daemon.json("daemon-warnings") == []
    daemon.qvirsh("destroy", "vm")


def test_a_damaged_status_is_reported_and_its_qemu_blocks_starts(daemon: Daemon) -> None:
    """A status file that cannot be used as a whole: its QEMU is found through the process
    table, reported, never killed, and no second QEMU is started for the domain, neither by
    autostart nor by a user, until that QEMU is gone."""
    pid, raw = autostarted_then_killed(daemon)
    raw["definition"]["memory_mib"] = "a lot"
    status_file(daemon, "vm").write_text(json.dumps(raw))
    daemon.start()
    time.sleep(1.0)  # autostart runs after the reconnects: give it the chance to misbehave
    assert daemon.qemu_pids() == [pid] and pid_alive(pid)
    warnings = daemon.json("daemon-warnings")
    assert any("status.json" in w and str(pid) in w and "memory_mib" in w for w in warnings), \
        warnings
    res = daemon.qvirsh("start", "vm", check=False)
    assert res.returncode == 1 and f"QEMU pid {pid} is already running" in res.stderr, \
        res.stderr
    assert daemon.qemu_pids() == [pid]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid), 10, "the QEMU to die")
    daemon.qvirsh("start", "vm")  # with it gone, the domain starts again
    assert len(daemon.qemu_pids()) == 1
    daemon.qvirsh("destroy", "vm")


# --- 7. follow-ups are durable ---------------------------------------------------------------

async def test_reboot_survives_a_stuck_reset_and_a_daemon_kill(daemon_factory: Any,
                                                               tmp_path: Path) -> None:
    """Recipe: the reset-and-continue of a `reboot` gave up after one failure (a job held
    too long, a QEMU that did not answer) and the guest stayed powered off. Scripted QMP peer
    (QEMU cannot be made to hang exactly after the guest powered off): the first three
    system_reset get no answer. The follow-up is recorded in the status file, survives a
    SIGKILL of the daemon, and is retried until the guest runs again. (A reboot of the real
    Linux guest is in test_domain_events.py and test_guest_lifecycle.py.)"""
    log = tmp_path / "qmp.log"
    daemon: Daemon = daemon_factory(
        {"qemu_binary": FAKE_QEMU, "monitor_timeout_s": 0.5},
        env={"QVIRTD_FAKE_QEMU": json.dumps({"hang": {"system_reset": 3}}),
             "QVIRTD_FAKE_QEMU_LOG": str(log)})
    daemon.define(tiny_definition("fake", accel="tcg"))
    daemon.qvirsh("start", "fake")
    daemon.qvirsh("reboot", "fake")

    def follow_ups() -> list[dict[str, Any]]:
        try:
            return list(json.loads(status_file(daemon, "fake").read_text())["follow_ups"])
        except (OSError, ValueError):
            return []

    recorded = wait_for(follow_ups, 10, "the follow-up in the status file")
    assert recorded[0]["kind"] == "reset" and recorded[0]["why"] == "reboot"
    sigkill(daemon)  # while the follow-up is being retried
    daemon.start()
    wait_for(lambda: daemon.state("fake") == ("running", "booted"), 20,
             "the reboot to complete after the restart")
    commands = [json.loads(line)["execute"] for line in log.read_text().splitlines()]
    assert commands.count("system_reset") >= 4, commands  # three hung, then one worked
    # The status file follows the state a moment later (written by the writer thread).
    wait_for(lambda: follow_ups() == [], 10, "the follow-up to leave the status file")
    daemon.qvirsh("destroy", "fake")


async def test_device_deleted_during_the_check_is_not_lost(daemon_factory: Any) -> None:
    """Recipe: a DEVICE_DELETED that arrived while the detach was checking QEMU's devices
    (finish_detach) was swallowed, and the device stayed "pending" for good. Scripted QMP
    peer: the guest releases the device exactly while the daemon lists /machine/peripheral.
    (The same detach against a real guest is in test_hotplug.py.)"""
    daemon: Daemon = daemon_factory(
        {"qemu_binary": FAKE_QEMU},
        env={"QVIRTD_FAKE_QEMU": json.dumps({"unplug": "during-qom-list"})})
    daemon.define(tiny_definition("fake", accel="tcg"))
    daemon.qvirsh("start", "fake")
    img = daemon.root / "d.raw"
    img.write_bytes(b"\0" * 65536)
    dev = daemon.root / "d.json"
    dev.write_text(json.dumps({"kind": "disk", "id": "d1", "path": str(img)}))
    daemon.qvirsh("attach-device", "fake", str(dev))
    result = daemon.json("detach-device", "fake", "d1", "--wait", "0.2")
    assert result["pending"] is True  # QEMU still listed it when the detach looked

    def gone() -> bool:
        disks = json.loads(daemon.qvirsh("dumpjson", "fake").stdout)["disks"]
        status = json.loads(status_file(daemon, "fake").read_text())
        return not disks and status["pending_detach"] == [] and status["follow_ups"] == []

    wait_for(gone, 10, "the released device to leave the JSON config")
    daemon.qvirsh("destroy", "fake")


# --- 10. raw QMP cannot break the JSON-config invariant --------------------------------------

def test_raw_qmp_that_adds_devices_is_refused_unless_forced(daemon: Daemon) -> None:
    """Recipe: `qemu-monitor-command` with a raw device_add put a device in QEMU that no
    JSON config listed."""
    daemon.define(tiny_definition("raw"))
    daemon.qvirsh("start", "raw")
    add = json.dumps({"execute": "device_add",
                      "arguments": {"driver": "virtio-rng-pci", "id": "sneaky", "bus": "rp1"}})
    refused = [add] + [json.dumps({"execute": c, "arguments": a}) for c, a in (
        ("blockdev-add", {"driver": "null-co", "node-name": "n1"}),
        ("netdev_add", {"type": "user", "id": "n1"}),
        ("chardev-add", {"id": "c1", "backend": {"type": "null", "data": {}}}),
        ("object-add", {"qom-type": "memory-backend-file", "id": "m", "size": 4096,
                        "mem-path": "/tmp/x"}),
        ("migrate", {"uri": "exec:touch /tmp/qvirtd-pwned"}),
        ("human-monitor-command", {"command-line": "info status"}))]
    for command in refused:
        res = daemon.qvirsh("qemu-monitor-command", "raw", command, check=False)
        assert res.returncode == 1 and "--force" in res.stderr, (command, res.stderr)
    peripherals = json.loads(daemon.qvirsh("qemu-monitor-command", "raw", json.dumps(
        {"execute": "qom-list", "arguments": {"path": "/machine/peripheral"}})).stdout)
    assert "sneaky" not in {p["name"] for p in peripherals}
    assert daemon.json("dominfo", "raw")["tainted"] == []
    assert not Path("/tmp/qvirtd-pwned").exists()
    # Forced: it goes through, and the domain says it is tainted (and the log who did it).
    daemon.qvirsh("qemu-monitor-command", "raw", add, "--force")
    assert daemon.json("dominfo", "raw")["tainted"] == ["custom-monitor"]
    daemon.wait_log(r"tainted \(custom-monitor\): 'device_add' forced by qemu-monitor-command "
                    r"\(client pid")
    status = json.loads(status_file(daemon, "raw").read_text())
    assert status["tainted"] == ["custom-monitor"]
    daemon.qvirsh("destroy", "raw")


# --- the job model: domjobinfo, domjobabort, kills inside a job's phases ---------------------

async def test_domjobinfo_and_domjobabort_of_a_start(daemon_factory: Any) -> None:
    """A start stuck connecting to a frozen QEMU shows its phase and owner, lets queries run
    beside it, and `domjobabort` rolls it back at once (no QEMU left)."""
    daemon: Daemon = daemon_factory({"monitor_connect_timeout_s": 30.0,
                                     "test_phase_delay_s": 0.3})
    daemon.define(tiny_definition("slow"))
    client, other = await daemon.client(), await daemon.client()
    try:
        start = asyncio.create_task(client.call("start", {"name": "slow"}))
        for _ in range(200):
            info = await other.call("domjobinfo", {"name": "slow"})
            if info["async_job"] and info["async_job"]["phase"] == "spawn":
                break
            await asyncio.sleep(0.01)
        pid = (await other.call("dominfo", {"name": "slow"}))["pid"]
        while pid is None:
            await asyncio.sleep(0.01)
            pid = (await other.call("dominfo", {"name": "slow"}))["pid"]
        os.kill(pid, signal.SIGSTOP)  # it will never answer its monitor
        try:
            for _ in range(200):
                info = await other.call("domjobinfo", {"name": "slow"})
                if info["async_job"]["phase"] == "connect":
                    break
                await asyncio.sleep(0.02)
            job = info["async_job"]
            assert (job["kind"], job["phase"]) == ("start", "connect")
            assert job["owner"].startswith("start (client pid ")
            assert job["allowed"] == ["abort", "destroy", "query"]
            res = await asyncio.to_thread(daemon.qvirsh, "domjobinfo", "slow")
            assert "start (phase connect)" in res.stdout
            # A modify job waits (and would time out); a query job does not.
            t0 = time.monotonic()
            res = await asyncio.to_thread(daemon.qvirsh, "domjobabort", "slow")
            assert "start aborted (it was in phase connect)" in res.stdout
            with pytest.raises(RpcError) as err:
                await asyncio.wait_for(start, 10)
            elapsed = time.monotonic() - t0
            assert err.value.kind == "job-aborted" and "aborted by domjobabort" in str(
                err.value)
            print(f"\ndomjobabort of a start stuck connecting: {elapsed:.2f} s")
            assert elapsed < 10  # far from the 30 s connect timeout
        finally:
            if pid_alive(pid):
                os.kill(pid, signal.SIGCONT)
        assert not pid_alive(pid)
        info = await other.call("dominfo", {"name": "slow"})
        assert (info["state"], info["reason"]) == ("shutoff", "failed")
        assert (await other.call("domjobinfo", {"name": "slow"}))["async_job"] is None
        with pytest.raises(RpcError, match="has no job to abort"):
            await other.call("domjobabort", {"name": "slow"})
    finally:
        await client.close()
        await other.close()


@pytest.mark.parametrize("phase", ["prepare", "spawn", "connect", "resume"])
def test_kill_the_daemon_inside_each_start_phase(daemon_factory: Any, phase: str) -> None:
    """SIGKILL the daemon while a start is in `phase` (held there by test_phase_delay_s):
    the restarted daemon rolls the start back: no QEMU, shut off (failed), no status file,
    and the domain starts normally afterwards."""
    daemon: Daemon = daemon_factory({"test_phase_delay_s": 0.6})
    daemon.define(tiny_definition("cut"))
    proc = daemon.qvirsh_async("start", "cut")
    try:
        wait_for(lambda: (daemon.json("domjobinfo", "cut")["async_job"] or {}).get("phase")
                 == phase, 15, f"phase {phase}")

        def recorded() -> bool:  # the phase is in the status file (written off the loop)
            try:
                return json.loads(status_file(daemon, "cut").read_text())["async_job"][
                    "phase"] == phase
            except (OSError, ValueError, TypeError):
                return False

        wait_for(recorded, 5, f"phase {phase} in the status file")
        sigkill(daemon)
    finally:
        proc.wait(10)
    daemon.start()
    wait_for(lambda: daemon.state("cut")[0] == "shutoff", 15, "the start to be rolled back")
    assert daemon.state("cut") == ("shutoff", "failed")
    assert daemon.qemu_pids() == []
    assert not status_file(daemon, "cut").exists()
    assert daemon.json("daemon-warnings") == []
    daemon.qvirsh("start", "cut")
    assert daemon.state("cut") == ("running", "booted")
    daemon.qvirsh("destroy", "cut")
