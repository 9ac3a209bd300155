"""Events end to end: from QEMU (and the API) to socket subscribers, in order, without gaps."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from typing import Any

import pytest
from harness import Daemon, guest_definition, tiny_definition

from qvirtd.client import Client, RpcError

READY = "QVIRTD-GUEST: ready"


async def collect_until(client: Client, done: Any, timeout_s: float = 60) -> list[dict[str, Any]]:
    """Events from `client` until `done(event)` is true (inclusive)."""
    events: list[dict[str, Any]] = []
    while True:
        msg = await client.next_event(timeout_s)
        assert msg is not None, "connection closed"
        if msg.get("method") != "event":
            continue
        events.append(msg["params"])
        if done(msg["params"]):
            return events


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [e["event"] + (f" {e['type']}/{e['detail']}" if e.get("type") else "")
            for e in events]


async def test_lifecycle_produces_exactly_the_expected_events(daemon: Daemon,
                                                              guest: Any) -> None:
    client = await daemon.client()
    cli_log = daemon.root / "event-loop.txt"
    with open(cli_log, "w") as out:
        watcher = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "qvirtd.cli", "--socket", str(daemon.socket), "event",
            "--loop", "--domain", "ev", stdout=out, stderr=subprocess.STDOUT)
    try:
        sub = await client.call("event", {"domain": "ev"})
        first_seq = sub["last_seq"] + 1
        for _ in range(200):  # the CLI watcher is subscribed too before anything happens
            if (await client.call("daemon-stats"))["events"]["subscribers"] == 2:
                break
            await asyncio.sleep(0.05)
        run = asyncio.to_thread
        await run(daemon.define, guest_definition(guest, "ev"))
        await run(daemon.qvirsh, "start", "ev")
        await run(daemon.wait_console, "ev", READY)
        await run(daemon.qvirsh, "suspend", "ev")
        await run(daemon.qvirsh, "resume", "ev")
        await run(daemon.qvirsh, "reboot", "ev")
        await run(daemon.wait_console, "ev", READY, 2)
        await run(daemon.wait_state, "ev", "running")
        await run(daemon.qvirsh, "shutdown", "ev", "--wait", "60")
        await run(daemon.qvirsh, "start", "ev", "--paused")
        await run(daemon.qvirsh, "destroy", "ev")
        events = await collect_until(client, lambda e: e.get("detail") == "destroyed")
        assert kinds(events) == [
            "lifecycle defined/added",
            "lifecycle started/booted",
            "lifecycle suspended/paused",
            "lifecycle resumed/unpaused",
            "lifecycle shutdown/finished",
            "reboot",
            "lifecycle resumed/unpaused",
            "lifecycle shutdown/finished",
            "lifecycle stopped/shutdown",
            "lifecycle started/booted",  # --paused: booted, then paused (as libvirt)
            "lifecycle suspended/paused",
            "lifecycle stopped/destroyed",
        ], "\n".join(kinds(events))
        # No gaps, and every event names the domain (id only while it runs).
        assert [e["seq"] for e in events] == list(range(first_seq, first_seq + len(events)))
        assert {e["domain"]["name"] for e in events} == {"ev"}
        assert events[0]["domain"]["id"] is None and events[1]["domain"]["id"] is not None
        assert events[4]["data"]["initiator"] == "guest"
        assert events[4]["data"]["qemu_reason"] == "guest-shutdown"
        assert events[4]["qemu_time"]  # caused by QEMU's SHUTDOWN event
        assert "qemu_time" not in events[0]  # caused by the API
        await asyncio.sleep(0.5)
    finally:
        watcher.terminate()
        await asyncio.wait_for(watcher.wait(), 5)
        await client.close()
    lines = cli_log.read_text().splitlines()
    print("\n" + "\n".join(lines))
    assert len(lines) == 12 and "domain 'ev': lifecycle started/booted" in lines[1]
    assert lines[-1].endswith("lifecycle stopped/destroyed")


async def test_qemu_killed_from_outside(daemon: Daemon) -> None:
    daemon.define(tiny_definition("victim"))
    daemon.define(tiny_definition("phoenix", on_crash="restart"))
    client = await daemon.client()
    try:
        await client.call("event")
        for name in ("victim", "phoenix"):
            await client.call("start", {"name": name})
        await collect_until(client, lambda e: e["domain"]["name"] == "phoenix"
                            and e.get("detail") == "booted")
        victim_pid = (await client.call("dominfo", {"name": "victim"}))["pid"]
        os.kill(victim_pid, signal.SIGKILL)
        events = await collect_until(client, lambda e: e.get("detail") == "crashed")
        assert kinds(events) == ["lifecycle stopped/crashed"]
        info = await client.call("dominfo", {"name": "victim"})
        assert (info["state"], info["reason"], info["pid"]) == ("shutoff", "crashed", None)

        # on_crash = restart: it comes back in a new QEMU.
        old_pid = (await client.call("dominfo", {"name": "phoenix"}))["pid"]
        os.kill(old_pid, signal.SIGKILL)
        events = await collect_until(client, lambda e: e.get("detail") == "booted")
        assert kinds(events) == ["lifecycle stopped/crashed", "lifecycle started/booted"]
        info = await client.call("dominfo", {"name": "phoenix"})
        assert info["state"] == "running" and info["pid"] not in (None, old_pid)
        await client.call("destroy", {"name": "phoenix"})
    finally:
        await client.close()


@pytest.mark.parametrize("on_crash", ["destroy", "preserve"])
async def test_guest_panic(daemon: Daemon, guest: Any, on_crash: str) -> None:
    """A real kernel panic (an NMI the guest treats as fatal) reaches QEMU through pvpanic."""
    definition = guest_definition(guest, "panic", on_crash=on_crash)
    definition["boot"]["cmdline"] += " unknown_nmi_panic=1"
    daemon.define(definition)
    client = await daemon.client()
    try:
        await client.call("event", {"domain": "panic"})
        await client.call("start", {"name": "panic"})
        await asyncio.to_thread(daemon.wait_console, "panic", READY)
        await client.call("qemu-monitor-command", {"name": "panic",
                                                   "command": {"execute": "inject-nmi"}})
        if on_crash == "destroy":
            events = await collect_until(client, lambda e: e.get("type") == "stopped")
            assert kinds(events)[1:] == ["lifecycle crashed/panicked",
                                         "lifecycle stopped/crashed"]
            info = await client.call("dominfo", {"name": "panic"})
            assert (info["state"], info["reason"]) == ("shutoff", "crashed")
        else:
            events = await collect_until(client, lambda e: e.get("type") == "crashed")
            assert kinds(events)[-1] == "lifecycle crashed/panicked"
            info = await client.call("dominfo", {"name": "panic"})
            assert (info["state"], info["reason"]) == ("crashed", "panicked")
            assert info["pid"] is not None
            await client.call("destroy", {"name": "panic"})
    finally:
        await client.close()


def stalled_subscriber(daemon: Daemon) -> socket.socket:
    """A client that subscribes and then does not read at all (its socket fills up)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(str(daemon.socket))
    sock.sendall(b'{"jsonrpc": "2.0", "id": 1, "method": "event", "params": {}}\n')
    return sock


async def test_a_subscriber_that_never_reads_is_dropped_without_delaying_others(
        daemon_factory: Any) -> None:
    # The stalled client is read at the end, so it must not be cut off for being slow first.
    daemon: Daemon = daemon_factory({"event_queue_per_subscriber": 100,
                                     "client_write_timeout_s": 300})
    daemon.define(tiny_definition("noisy"))
    daemon.qvirsh("start", "noisy")
    reader = await daemon.client()
    driver = await daemon.client()
    stalled = stalled_subscriber(daemon)
    try:
        sub = await reader.call("event")
        await asyncio.sleep(0.2)
        before = await driver.call("daemon-stats")
        assert before["events"]["subscribers"] == 2
        # Many real events: STOP/RESUME from QEMU, ~300 bytes each on the wire, more than the
        # stalled client's socket buffers, its transport buffer (64 KiB) and its event queue
        # (100) can hold together.
        rounds = 800
        received: list[dict[str, Any]] = []

        async def read_all() -> None:
            while len(received) < 2 * rounds:
                msg = await reader.next_event(30)
                assert msg is not None
                if msg.get("method") == "event":
                    received.append(msg["params"])

        reading = asyncio.create_task(read_all())
        for _ in range(rounds):
            for cmd in ("stop", "cont"):
                await driver.call("qemu-monitor-command",
                                  {"name": "noisy", "command": {"execute": cmd}})
        await asyncio.wait_for(reading, 30)
        # The reading subscriber got every event, in order, without a gap.
        seqs = [e["seq"] for e in received]
        assert seqs == list(range(sub["last_seq"] + 1, sub["last_seq"] + 1 + 2 * rounds))
        stats = await driver.call("daemon-stats")
        assert stats["events"]["dropped_subscribers"] == 1
        assert stats["events"]["subscribers"] == 1
        # Bounded memory: 1,600 events went by; the stalled subscriber held at most 100.
        assert stats["rss_kib"] - before["rss_kib"] < 20 * 1024, (before, stats)

        # When the stalled client finally reads: the events that fit, then the notice.
        stalled.settimeout(2)
        data = b""
        try:
            while chunk := stalled.recv(1 << 20):
                data += chunk
        except TimeoutError:
            pass
        msgs = [json.loads(x) for x in data.splitlines()]
        events = [m["params"]["seq"] for m in msgs if m.get("method") == "event"]
        assert msgs[-1]["method"] == "event-overflow", msgs[-1]
        assert 0 < len(events) < 2 * rounds
        assert events == list(range(events[0], events[0] + len(events)))  # no gap before it
    finally:
        stalled.close()
        await reader.close()
        await driver.close()
    daemon.qvirsh("destroy", "noisy")


async def test_resume_from_a_sequence_number(daemon_factory: Any) -> None:
    daemon: Daemon = daemon_factory({"event_replay_buffer": 10})
    client = await daemon.client()
    try:
        base = (await client.call("daemon-stats"))["events"]["last_seq"]
        for i in range(4):
            await asyncio.to_thread(daemon.define, tiny_definition(f"r{i}"))
        await client.call("event", {"since_seq": base + 2})
        replayed = [await client.next_event(5) for _ in range(2)]
        assert [m["params"]["seq"] for m in replayed] == [base + 3, base + 4]  # type: ignore[index]
        for i in range(20):
            await asyncio.to_thread(daemon.define, tiny_definition(f"s{i}"))
        again = await daemon.client()
        with pytest.raises(RpcError) as err:
            await again.call("event", {"since_seq": base})
        assert err.value.kind == "replay-gap" and "re-read state" in str(err.value)
        await again.close()
    finally:
        await client.close()


def test_cli_event_json_and_timeout(daemon: Daemon) -> None:
    import time as _time
    start = _time.monotonic()
    quiet = daemon.qvirsh("event", "--timeout", "1", "--json")
    assert quiet.stdout == "" and 0.9 <= _time.monotonic() - start < 10
    watcher = subprocess.Popen([sys.executable, "-m", "qvirtd.cli", "--socket",
                                str(daemon.socket), "event", "--json", "--loop",
                                "--timeout", "5", "--domain", "one"],
                               stdout=subprocess.PIPE, text=True)
    try:
        _time.sleep(1.0)
        daemon.define(tiny_definition("other"))
        daemon.define(tiny_definition("one"))
        daemon.qvirsh("undefine", "one")
        out, _ = watcher.communicate(timeout=20)
    finally:
        watcher.kill()
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(e["event"], e["type"], e["detail"]) for e in lines] == [
        ("lifecycle", "defined", "added"), ("lifecycle", "undefined", "removed")]
    assert all(set(e) >= {"seq", "time", "domain", "event"} for e in lines)
    assert lines[1]["seq"] > lines[0]["seq"]
    # Without --loop: the first event, then exit.
    one = subprocess.Popen([sys.executable, "-m", "qvirtd.cli", "--socket", str(daemon.socket),
                            "event"], stdout=subprocess.PIPE, text=True)
    _time.sleep(1.0)
    daemon.define(tiny_definition("two"))
    out, _ = one.communicate(timeout=20)
    assert out.count("\n") == 1 and "domain 'two': lifecycle defined/added" in out
