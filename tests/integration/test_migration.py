"""Live migration between two qvirtd daemons under two --roots on this machine (issue 11),
against real QEMU: the booted guest's counter goes on on the destination's console; a
failed, refused or aborted migration leaves the guest running on the source; a daemon killed
at any point leaves the guest running in exactly one QEMU."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

from harness import Daemon, Terminal, guest_definition, tiny_definition, wait_for
from test_save_restore import READY, TICK, assert_continues, last_tick, start_counter, ticks
from tls_certs import make_tls_dir

from qvirtd.peer import Peer, PeerRefusedError


def dest(daemon: Daemon) -> str:
    return f"unix://{daemon.socket}"


def lifecycle(daemon: Daemon, name: str) -> list[str]:
    """The lifecycle events of `name` still in the daemon's replay buffer."""
    async def collect() -> list[str]:
        client = await daemon.client()
        try:
            await client.call("event", {"domain": name, "since_seq": 0})
            got = []
            while True:
                try:
                    note = await client.next_event(0.5)
                except TimeoutError:
                    return got
                if note is None:
                    return got
                p = note.get("params") or {}
                if p.get("event") == "lifecycle":
                    got.append(f"{p['type']}/{p['detail']}")
        finally:
            await client.close()
    return asyncio.run(collect())


def state_of(daemon: Daemon, name: str) -> str | None:
    """The domain's state there, None if that daemon does not have it; "busy" while a job
    holds it (a reconnect that has not yet finished or undone the previous daemon's job
    shows the state the status file had, which it may still change)."""
    listed = {d["name"]: d for d in daemon.json("list", "--all", "--info")}
    if name not in listed:
        return None
    job = listed[name]["job"]
    return "busy" if job["job"] or job["async_job"] else str(listed[name]["state"])


def settled(a: Daemon, b: Daemon, name: str) -> bool:
    """One QEMU, its daemon says running, the other daemon has it shut off or not at all,
    and neither holds a job on it (a run whose QEMU just went is still being torn down, a
    reconnect may still be undoing the migration: not settled yet)."""
    if len(a.qemu_pids()) + len(b.qemu_pids()) != 1:
        return False
    states = sorted((state_of(a, name) or "absent", state_of(b, name) or "absent"))
    return states in (["absent", "running"], ["running", "shutoff"])


def in_one_place(a: Daemon, b: Daemon, name: str) -> str:
    """Exactly one QEMU runs the guest, and the daemons agree: 'a' or 'b'."""
    pa, pb = a.qemu_pids(), b.qemu_pids()
    assert len(pa) + len(pb) == 1, (pa, pb)
    where, there, other = ("a", a, b) if pa else ("b", b, a)
    info = there.json("dominfo", name)
    assert info["state"] == "running" and info["pid"] == (pa or pb)[0], info
    listed = {d["name"]: d for d in other.json("list", "--all")}
    assert name not in listed or listed[name]["state"] == "shutoff", listed
    return where


def test_migration_keeps_the_guest_counting(daemon_factory: Any, guest: Any) -> None:
    a, b = daemon_factory(), daemon_factory()
    a.define(guest_definition(guest, "mig"))
    a.qvirsh("autostart", "mig")
    a.qvirsh("start", "mig")
    a.wait_console("mig", READY, timeout_s=60)
    start_counter(a, "mig")
    wait_for(lambda: len(ticks(a, "mig")) >= 3, 20, "the counter")
    r = a.qvirsh("migrate", "mig", dest(b), "--persistent", "--max-downtime", "300")
    assert "migrated to" in r.stdout, r.stdout
    assert "completed" in r.stderr  # the progress lines (not a terminal: plain lines)
    last = last_tick(a, "mig")
    info = b.json("dominfo", "mig")
    assert (info["state"], info["reason"], info["persistent"]) == \
        ("running", "migrated", True)
    assert_continues(b, "mig", last)
    assert a.json("dominfo", "mig")["state"] == "shutoff"
    assert b.qemu_pids() and not a.qemu_pids()
    assert {"defined/added", "started/migrated", "resumed/migrated"} <= \
        set(lifecycle(b, "mig"))
    assert {"suspended/migrated", "stopped/migrated"} <= set(lifecycle(a, "mig"))
    # And back again, undefining it on the way out, with the JSON result.
    out = b.json("migrate", "mig", dest(a), "--undefine-source")
    assert out["status"] == "completed" and out["total_time_ms"] > 0 <= out["downtime_ms"]
    assert b.json("list", "--all") == []
    log = (b.root / "run" / "domains" / "mig" / "console.log").read_text(errors="replace")
    assert_continues(a, "mig", [int(n) for n in TICK.findall(log)][-1])
    assert a.json("dominfo", "mig")["persistent"] is True
    a.qvirsh("destroy", "mig")


def test_refused_and_aborted_migrations_leave_the_guest_on_the_source(
        daemon_factory: Any, tmp_path: Path) -> None:
    a, b = daemon_factory(), daemon_factory()
    disk = tmp_path / "data.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(disk), "16M"], check=True)
    a.define(tiny_definition("ref", memory_mib=256,
                             disks=[{"id": "data", "path": str(disk), "format": "raw"}]))
    a.qvirsh("start", "ref")
    # The destination cannot open the disk (gone from the path; the source has it open).
    moved = tmp_path / "moved.img"
    disk.rename(moved)
    r = a.qvirsh("migrate", "ref", dest(b), check=False)
    assert r.returncode == 1 and "refused 'migrate-prepare'" in r.stderr, r.stderr
    moved.rename(disk)
    assert in_one_place(a, b, "ref") == "a"
    assert a.json("dominfo", "ref")["reason"] in ("booted", "migrated")
    # A destination that is not there, a bad URI.
    r = a.qvirsh("migrate", "ref", "unix:///nonexistent/qvirtd.sock", check=False)
    assert r.returncode == 1 and "cannot reach the destination" in r.stderr
    r = a.qvirsh("migrate", "ref", dest(a), check=False)  # to itself
    assert r.returncode == 1 and "running on this daemon already" in r.stderr, r.stderr
    r = a.qvirsh("migrate", "ref", "http://x", check=False)
    assert r.returncode == 1 and "unix:///PATH/qvirtd.sock" in r.stderr
    assert in_one_place(a, b, "ref") == "a"

    # Aborted half-way: a slow stream (the no-OS guest's ~1 MB at 0.1 MiB/s), domjobabort
    # while it runs.
    migrating = a.qvirsh_async("migrate", "ref", dest(b), "--bandwidth", "0.1")

    def streaming() -> bool:
        job = a.json("domjobinfo", "ref")["async_job"]
        return bool(job and job["phase"] == "perform" and job["progress"]
                    and job["progress"].get("ram_transferred_bytes", 0) > 0)

    wait_for(streaming, 30, "the migration stream to move")
    info = a.json("domjobinfo", "ref")["async_job"]
    assert info["kind"] == "migration-out" and info["progress"]["ram_total_bytes"] > 0
    a.qvirsh("domjobabort", "ref")
    _, err = migrating.communicate(30)
    assert migrating.returncode == 1 and "aborted" in err, err
    wait_for(lambda: not b.qemu_pids(), 10, "the incoming QEMU to go")
    assert in_one_place(a, b, "ref") == "a"
    assert b.json("list", "--all") == []
    a.qvirsh("destroy", "ref")


def test_destination_daemon_killed_mid_migration(daemon_factory: Any) -> None:
    """SIGKILL the destination daemon while the stream runs: its QEMU goes on receiving;
    the source finishes the stream, gets no answer to its finish and keeps the guest paused
    until the restarted destination answers. Then exactly one runs."""
    a, b = daemon_factory(), daemon_factory()
    a.define(tiny_definition("dk", memory_mib=256))
    a.qvirsh("start", "dk")
    migrating = a.qvirsh_async("migrate", "dk", dest(b), "--bandwidth", "0.2")
    wait_for(lambda: (a.json("domjobinfo", "dk")["async_job"] or {}).get("phase")
             == "perform", 30, "the stream to start")
    b.stop(signal.SIGKILL)
    migrating.communicate(120)
    b.start()
    wait_for(lambda: settled(a, b, "dk"), 90, "the guest to run in exactly one place")
    where = in_one_place(a, b, "dk")
    print(f"destination killed mid-migration: the guest runs on {where}")
    (a if where == "a" else b).qvirsh("destroy", "dk")


def test_frozen_source_qemu_fails_the_migration_and_keeps_the_guest(
        daemon_factory: Any) -> None:
    settings = {"monitor_timeout_s": 2.0, "migration_stall_timeout_s": 5.0}
    a, b = daemon_factory(settings), daemon_factory(settings)
    a.define(tiny_definition("fz", memory_mib=256))
    a.qvirsh("start", "fz")
    pid = a.json("dominfo", "fz")["pid"]
    migrating = a.qvirsh_async("migrate", "fz", dest(b), "--bandwidth", "0.01")
    wait_for(lambda: (a.json("domjobinfo", "fz")["async_job"] or {}).get("phase")
             == "perform", 30, "the stream to start")
    os.kill(pid, signal.SIGSTOP)
    try:
        _, err = migrating.communicate(60)
        assert migrating.returncode == 1, err
        wait_for(lambda: not b.qemu_pids(), 20, "the incoming QEMU to go")
    finally:
        os.kill(pid, signal.SIGCONT)
    # Thawed, the undo goes through (a task of the run retries it): running on the source.
    wait_for(lambda: a.json("dominfo", "fz")["state"] == "running", 30,
             "the guest to run on the source again")
    assert in_one_place(a, b, "fz") == "a"
    a.qvirsh("destroy", "fz")


def test_kill_loop_either_daemon_at_random_points(daemon_factory: Any) -> None:
    """16 migrations back and forth (QVIRTD_MIGRATION_ROUNDS sets more); SIGKILL the source,
    the destination or both daemons at a random moment of each, restart: the guest ends in
    exactly one QEMU every time."""
    a, b = daemon_factory(), daemon_factory()
    a.define(tiny_definition("kl", memory_mib=128))
    a.qvirsh("start", "kl")
    seed = int(os.environ.get("QVIRTD_TEST_SEED", "0")) or random.randrange(1 << 30)
    rng = random.Random(seed)
    counts: dict[str, int] = {}
    for i in range(int(os.environ.get("QVIRTD_MIGRATION_ROUNDS", "16"))):
        src, dst = (a, b) if a.qemu_pids() else (b, a)
        who = rng.choice(["source", "destination", "both"])
        victims = {"source": [src], "destination": [dst], "both": [src, dst]}[who]
        migrating = src.qvirsh_async("migrate", "kl", dest(dst), "--bandwidth",
                                     str(rng.choice([2, 8, 64])))
        time.sleep(rng.uniform(0.0, 0.6))
        for victim in victims:
            victim.stop(signal.SIGKILL)
        _, err = migrating.communicate(120)
        for victim in victims:
            victim.start()
        try:
            wait_for(lambda: settled(a, b, "kl"), 90, "the guest to run in exactly one place")
            where = in_one_place(a, b, "kl")
        except AssertionError as exc:
            for d, label in ((a, "a"), (b, "b")):
                kept = Path(f"/tmp/qvirtd-kill-loop-{label}.log")
                kept.write_text(d.log.read_text(errors="replace"))
            raise AssertionError(f"seed {seed}, round {i} ({who} killed): {exc}; "
                                 f"migrate said {err!r}; pids a {a.qemu_pids()} b "
                                 f"{b.qemu_pids()}; the daemons' logs are in "
                                 "/tmp/qvirtd-kill-loop-{a,b}.log") from None
        moved = (where == "b") == (src is a)
        key = f"{who} killed, " \
              f"{'moved' if moved else 'stayed'}"
        counts[key] = counts.get(key, 0) + 1
    print(f"migration kill loop (seed {seed}): {json.dumps(counts, sort_keys=True)}")
    for d in (a, b):
        for dom in d.json("list"):
            d.qvirsh("destroy", dom["name"])


def guest_shell(daemon: Daemon, name: str, command: str, expect: bytes) -> bytes:
    """Type `command` into the guest's shell; what it printed up to `expect`."""
    term = Terminal(daemon, "console", name)
    try:
        term.read_until(b"Escape character")
        term.prompt(b"guest# ")
        start = len(term.seen)
        term.type(command.encode() + b"\r")
        line = command.encode() + b"\r\n"  # the shell's echo of what was typed
        term.read_until_after(line, start, 20)
        echoed = term.seen.index(line, start) + len(line)
        seen = term.read_until_after(expect, echoed, 60)  # what it printed
        term.type(b"\x1d")
        term.close()
        return seen[echoed:]
    finally:
        if term.proc.poll() is None:
            term.proc.kill()


def test_copy_storage_to_a_daemon_with_other_disk_paths(daemon_factory: Any, guest: Any,
                                                         tmp_path: Path) -> None:
    a, b = daemon_factory(), daemon_factory()
    here, there = tmp_path / "a", tmp_path / "b"
    here.mkdir()
    there.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(here / "data.img"), "32M"],
                   check=True)
    definition = guest_definition(guest, "cs", disks=[
        {"id": "data", "path": str(here / "data.img"), "format": "raw"}])
    a.define(definition)
    uuid = a.json("dominfo", "cs")["uuid"]
    # Defined on the destination too, with its own disk path (not there yet: created).
    b.define({**definition, "uuid": uuid,
              "disks": [{"id": "data", "path": str(there / "data.img"), "format": "raw"}]})
    a.qvirsh("start", "cs")
    a.wait_console("cs", READY, timeout_s=60)
    wait_for(lambda: "QVIRTD-GUEST: block add vda" in a.console("cs"), 30, "the disk")
    # (Short command lines: the guest's shell wraps at 80 columns.)
    guest_shell(a, "cs", "echo COPIED-$((6*7))|dd of=/dev/vda seek=8 conv=fsync",
                b"records out")
    out = a.json("migrate", "cs", dest(b), "--copy-storage")
    assert out["status"] == "completed"
    assert in_one_place(a, b, "cs") == "b"
    assert b.json("domblklist", "cs")["devices"][0]["source"] == str(there / "data.img")
    said = guest_shell(b, "cs", "dd if=/dev/vda skip=8 count=1 2>/dev/null|head -c9;echo :E",
                       b":E")
    assert b"COPIED-42:E" in said, said
    assert (there / "data.img").read_bytes()[4096:4105] == b"COPIED-42"
    # And home again, disks included: the data is in A's file too.
    b.qvirsh("migrate", "cs", dest(a), "--copy-storage")
    assert in_one_place(a, b, "cs") == "a"
    assert (here / "data.img").read_bytes()[4096:4105] == b"COPIED-42"
    a.qvirsh("destroy", "cs")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_migration_over_tls(daemon_factory: Any, guest: Any, tmp_path: Path) -> None:
    """Two daemons as if on two hosts: each listens on TCP with mutual TLS; the counting
    guest goes over and back (the QEMUs stream over TLS too)."""
    certs = make_tls_dir(tmp_path / "pki")
    ports = free_port(), free_port()
    a, b = (daemon_factory({"tls_dir": str(certs), "listen_tls": f"127.0.0.1:{port}"})
            for port in ports)
    a.define(guest_definition(guest, "tls"))
    a.qvirsh("start", "tls")
    a.wait_console("tls", READY, timeout_s=60)
    start_counter(a, "tls")
    wait_for(lambda: len(ticks(a, "tls")) >= 3, 20, "the counter")
    out = a.json("migrate", "tls", f"tls://127.0.0.1:{ports[1]}")
    assert out["status"] == "completed"
    last = last_tick(a, "tls")
    assert in_one_place(a, b, "tls") == "b"
    assert_continues(b, "tls", last)
    b.wait_log("tls peer qvirtd test client")  # who asked, from its certificate
    b.qvirsh("migrate", "tls", f"tls://localhost:{ports[0]}")
    assert in_one_place(a, b, "tls") == "a"

    # Without a client certificate the TLS listener lets nobody in; with one, only what a
    # peer daemon needs.
    async def probe() -> tuple[str, str]:
        bare = ssl.create_default_context(cafile=str(certs / "ca-cert.pem"))
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", ports[0], ssl=bare)
            writer.write(b'{"jsonrpc": "2.0", "id": 1, "method": "list", "params": {}}\n')
            await writer.drain()
            no_cert = (await asyncio.wait_for(reader.readline(), 5)).decode() or "closed"
        except (ssl.SSLError, ConnectionError) as exc:
            no_cert = f"refused: {exc}"
        peer = await Peer.connect(f"tls://127.0.0.1:{ports[0]}", 5, certs)
        try:
            await peer.call("destroy", {"name": "tls"})
            denied = "allowed"
        except PeerRefusedError as exc:
            denied = str(exc)
        finally:
            await peer.close()
        return no_cert, denied

    no_cert, denied = asyncio.run(probe())
    assert no_cert == "closed" or no_cert.startswith("refused"), no_cert
    assert "not available over TLS" in denied, denied
    assert a.json("dominfo", "tls")["state"] == "running"
    a.qvirsh("destroy", "tls")


def test_copy_storage_over_tls(daemon_factory: Any, tmp_path: Path) -> None:
    """--copy-storage between "hosts": the NBD stream is TLS too; the destination keeps the
    disk at its own path. The data written before is in the destination's file."""
    certs = make_tls_dir(tmp_path / "pki")
    ports = free_port(), free_port()
    a, b = (daemon_factory({"tls_dir": str(certs), "listen_tls": f"127.0.0.1:{port}"})
            for port in ports)
    mine, theirs = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(mine), "64M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 1M 2M", str(mine)], check=True,
                   capture_output=True)
    definition = tiny_definition("ct", disks=[{"id": "d0", "path": str(mine),
                                               "format": "qcow2"}])
    a.define(definition)
    b.define({**definition, "uuid": a.json("dominfo", "ct")["uuid"],
              "disks": [{"id": "d0", "path": str(theirs), "format": "qcow2"}]})
    a.qvirsh("start", "ct")
    out = a.json("migrate", "ct", f"tls://127.0.0.1:{ports[1]}", "--copy-storage")
    assert out["status"] == "completed"
    assert in_one_place(a, b, "ct") == "b"
    b.qvirsh("destroy", "ct")
    check = subprocess.run(["qemu-io", "-r", "-c", "read -P 0x5a 1M 2M", str(theirs)],
                           capture_output=True, text=True, check=True)
    assert "Pattern verification failed" not in check.stdout, check.stdout
