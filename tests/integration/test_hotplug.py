"""Hotplug on the real test guest: the guest sees devices come and go, the JSON follows QEMU."""

from __future__ import annotations

import asyncio
import json
import subprocess
from typing import Any

import pytest
from harness import Daemon, guest_definition, tiny_definition

from qvirtd.client import RpcError

READY = "QVIRTD-GUEST: ready"


def qmp(daemon: Daemon, name: str, command: str, *flags: str, **arguments: Any) -> Any:
    msg = {"execute": command, "arguments": arguments} if arguments else {"execute": command}
    return json.loads(daemon.qvirsh("qemu-monitor-command", name, json.dumps(msg),
                                    *flags).stdout)


def qemu_devices(daemon: Daemon, name: str) -> set[str]:
    return {p["name"] for p in qmp(daemon, name, "qom-list", path="/machine/peripheral")
            if p["type"].startswith("child<") and not p["name"].startswith("rp")
            and p["name"] not in ("serial0", "scsi0", "pvpanic0")}


def json_devices(daemon: Daemon, name: str, inactive: bool = False) -> set[str]:
    d = json.loads(daemon.qvirsh("dumpjson", name, *(["--inactive"] if inactive else []))
                   .stdout)
    return {x["id"] for x in d["disks"] + d["cdroms"] + d["nics"]}


def node_names(daemon: Daemon, name: str) -> set[str]:
    return {n["node-name"] for n in qmp(daemon, name, "query-named-block-nodes")}


def device_file(daemon: Daemon, spec: dict[str, Any]) -> str:
    path = daemon.root / f"dev-{spec['id']}.json"
    path.write_text(json.dumps(spec))
    return str(path)


@pytest.fixture
def booted(daemon: Daemon, guest: Any) -> Daemon:
    daemon.define(guest_definition(guest, "hp"))
    daemon.qvirsh("start", "hp")
    daemon.wait_console("hp", READY)
    return daemon


async def test_disk_hotplug_seen_by_the_guest(booted: Daemon) -> None:
    daemon = booted
    image = daemon.root / "images, ü" / "data disk.qcow2"
    image.parent.mkdir()
    await asyncio.to_thread(subprocess.run, ["qemu-img", "create", "-q", "-f", "qcow2",
                                             str(image), "32M"], check=True)
    client = await daemon.client()
    try:
        await client.call("event", {"domain": "hp"})
        daemon.qvirsh("attach-device", "hp", device_file(
            daemon, {"kind": "disk", "id": "data", "path": str(image), "format": "qcow2"}))
        daemon.wait_console("hp", "QVIRTD-GUEST: block add vda 65536", timeout_s=20)
        assert "data" in qemu_devices(daemon, "hp") and "data" in json_devices(daemon, "hp")
        assert {"file-data", "fmt-data"} <= node_names(daemon, "hp")
        status = json.loads((daemon.root / "run" / "domains" / "hp" / "status.json")
                            .read_text())
        assert [d["id"] for d in status["definition"]["disks"]] == ["data"]

        res = daemon.qvirsh("detach-device", "hp", "data", "--wait", "20")
        assert "detached" in res.stdout
        daemon.wait_console("hp", "QVIRTD-GUEST: block remove vda", timeout_s=20)
        assert "data" not in qemu_devices(daemon, "hp")
        assert "data" not in json_devices(daemon, "hp")
        assert not {"file-data", "fmt-data"} & node_names(daemon, "hp")
        kinds = []
        while len(kinds) < 2:
            msg = await client.next_event(10)
            assert msg is not None
            kinds.append((msg["params"]["event"], (msg["params"].get("data") or {})
                          .get("device")))
        assert kinds == [("device-added", "data"), ("device-removed", "data")]
    finally:
        await client.close()


def test_nic_hotplug_seen_by_the_guest(booted: Daemon) -> None:
    daemon = booted
    daemon.qvirsh("attach-device", "hp", device_file(
        daemon, {"kind": "nic", "id": "lan", "mac": "52:54:00:12:34:56"}))
    daemon.wait_console("hp", "QVIRTD-GUEST: net add eth0 52:54:00:12:34:56", timeout_s=20)
    daemon.qvirsh("detach-device", "hp", "lan", "--wait", "20")
    daemon.wait_console("hp", "QVIRTD-GUEST: net remove eth0", timeout_s=20)
    assert "lan" not in qemu_devices(daemon, "hp") | json_devices(daemon, "hp")
    # QEMU 7.2 has no QMP query for netdevs: ask HMP (forced, so the domain is tainted).
    assert "net-lan" not in qmp(daemon, "hp", "human-monitor-command", "--force",
                                **{"command-line": "info network"})
    assert daemon.json("dominfo", "hp")["tainted"] == ["custom-monitor"]


def test_cdrom_insert_change_eject(booted: Daemon) -> None:
    daemon = booted
    a, b = daemon.root / "a.iso", daemon.root / "b, c.iso"
    a.write_bytes(b"\0" * 1024 * 1024)
    b.write_bytes(b"\0" * 2 * 1024 * 1024)
    daemon.qvirsh("attach-device", "hp", device_file(daemon, {"kind": "cdrom", "id": "cd"}))
    daemon.wait_console("hp", "QVIRTD-GUEST: block add sr0", timeout_s=20)

    def medium() -> str | None:
        blocks = qmp(daemon, "hp", "query-block")
        cd = next(x for x in blocks if x["qdev"].rsplit("/", 1)[-1] == "cd")
        return (cd.get("inserted") or {}).get("file")

    def json_medium() -> str | None:
        d = json.loads(daemon.qvirsh("dumpjson", "hp").stdout)
        return next(c["path"] for c in d["cdroms"] if c["id"] == "cd")

    for path in (a, b):  # insert into an empty drive, then change
        daemon.qvirsh("change-media", "hp", "cd", str(path))
        assert medium() == json_medium() == str(path)
    # A stale entry (the medium was removed behind our back: only a forced raw command can)
    # does not block a new medium.
    qmp(daemon, "hp", "blockdev-open-tray", id="cd", force=True)
    qmp(daemon, "hp", "blockdev-remove-medium", "--force", id="cd")
    assert medium() is None and json_medium() == str(b)
    daemon.qvirsh("change-media", "hp", "cd", str(a))
    assert medium() == json_medium() == str(a)
    daemon.qvirsh("change-media", "hp", "cd", "--eject")
    assert medium() is None and json_medium() is None
    assert not {"file-cd", "fmt-cd"} & node_names(daemon, "hp")
    res = daemon.qvirsh("change-media", "hp", "nope", str(a), check=False)
    assert res.returncode == 1 and "no CD-ROM 'nope'" in res.stderr


async def test_pending_unplug_completes_when_the_guest_releases(booted: Daemon) -> None:
    daemon = booted
    img = daemon.root / "late.raw"
    img.write_bytes(b"\0" * 1024 * 1024)
    daemon.qvirsh("attach-device", "hp", device_file(
        daemon, {"kind": "disk", "id": "late", "path": str(img)}))
    daemon.wait_console("hp", "QVIRTD-GUEST: block add vda", timeout_s=20)
    client = await daemon.client()
    try:
        await client.call("event", {"domain": "hp", "events": ["device-removed"]})
        # Do not wait at all: the removal is pending when the call returns ...
        r = await client.call("detach-device", {"name": "hp", "device": "late", "wait": 0})
        assert r["pending"] is True and r["removed"] is False
        # ... and completes when DEVICE_DELETED arrives, with the event then.
        msg = await client.next_event(20)
        assert msg is not None and msg["params"]["data"]["device"] == "late"
        for _ in range(100):
            if "late" not in json_devices(daemon, "hp"):
                break
            await asyncio.sleep(0.1)
        assert "late" not in json_devices(daemon, "hp") | qemu_devices(daemon, "hp")
    finally:
        await client.close()


async def test_a_guest_that_never_releases(daemon: Daemon) -> None:
    """A no-OS guest never acknowledges an unplug: the removal stays pending."""
    daemon.define(tiny_definition("deaf"))
    daemon.qvirsh("start", "deaf")
    img = daemon.root / "stuck.raw"
    img.write_bytes(b"\0" * 1024 * 1024)
    spec = device_file(daemon, {"kind": "disk", "id": "stuck", "path": str(img)})
    daemon.qvirsh("attach-device", "deaf", spec)
    res = daemon.qvirsh("detach-device", "deaf", "stuck", "--wait", "1")
    assert "pending" in res.stdout
    again = daemon.qvirsh("detach-device", "deaf", "stuck", check=False)
    assert again.returncode == 1 and "already pending" in again.stderr
    reattach = daemon.qvirsh("attach-device", "deaf", spec, check=False)
    assert reattach.returncode == 1 and "still being removed" in reattach.stderr
    assert "stuck" in json_devices(daemon, "deaf") and "stuck" in qemu_devices(daemon, "deaf")
    status = json.loads((daemon.root / "run" / "domains" / "deaf" / "status.json").read_text())
    assert status["pending_detach"] == ["stuck"]
    daemon.qvirsh("destroy", "deaf")


def test_device_targets_as_in_virsh(daemon: Daemon) -> None:
    """--current (default), --live, --config (the definition only), --persistent (both)."""
    daemon.define(tiny_definition("cfg"))
    img = daemon.root / "p.raw"
    img.write_bytes(b"\0" * 1024 * 1024)
    spec = device_file(daemon, {"kind": "disk", "id": "keep", "path": str(img)})
    res = daemon.qvirsh("attach-device", "cfg", spec, "--live", check=False)
    assert res.returncode == 1 and "--live changes only a running domain" in res.stderr
    daemon.qvirsh("attach-device", "cfg", spec)  # shut off: current = the definition
    assert json_devices(daemon, "cfg", inactive=True) == {"keep"}
    daemon.qvirsh("start", "cfg")  # cold-plugged from the definition
    assert "keep" in qemu_devices(daemon, "cfg")
    # Running: --config changes only the definition, and qvirsh says so.
    nic = device_file(daemon, {"kind": "nic", "id": "n1"})
    res = daemon.qvirsh("attach-device", "cfg", nic, "--config")
    assert "note: --config changed only the persistent definition" in res.stderr
    assert json_devices(daemon, "cfg", inactive=True) == {"keep", "n1"}
    assert "n1" not in qemu_devices(daemon, "cfg") | json_devices(daemon, "cfg")
    # --persistent (or --live --config): both.
    nic2 = device_file(daemon, {"kind": "nic", "id": "n2"})
    daemon.qvirsh("attach-device", "cfg", nic2, "--live", "--config")
    assert json_devices(daemon, "cfg", inactive=True) == {"keep", "n1", "n2"}
    assert "n2" in qemu_devices(daemon, "cfg") and "n2" in json_devices(daemon, "cfg")
    stored = json.loads((daemon.root / "state" / "domains" / "cfg.json").read_text())
    assert [n["id"] for n in stored["nics"]] == ["n1", "n2"]
    # Running, no flag: current = the running domain only.
    daemon.qvirsh("detach-device", "cfg", "n2", "--wait", "0")
    assert json_devices(daemon, "cfg", inactive=True) == {"keep", "n1", "n2"}
    res = daemon.qvirsh("detach-device", "cfg", "n1", "--live", check=False)
    assert res.returncode == 1 and "no device 'n1' in the running domain" in res.stderr
    daemon.qvirsh("destroy", "cfg")
    daemon.qvirsh("detach-device", "cfg", "n1")  # shut off: current = the definition
    daemon.qvirsh("detach-device", "cfg", "n2", "--persistent")
    assert json_devices(daemon, "cfg", inactive=True) == {"keep"}


def test_hostile_and_bad_devices_are_refused(daemon: Daemon) -> None:
    daemon.define(tiny_definition("bad"))
    daemon.qvirsh("start", "bad")
    cases = [
        ({"kind": "disk", "id": "x,y", "path": "/a"}, "id"),
        ({"kind": "disk", "id": "ok", "path": "relative.img"}, "path"),
        ({"kind": "disk", "id": "ok", "path": "/a\nb"}, "path"),
        ({"kind": "floppy", "id": "ok"}, "kind"),
        ({"kind": "disk", "id": "ok", "path": "/a", "driver": "evil"}, "driver"),
        ({"kind": "nic", "id": "d" * 40}, "id"),
    ]
    for spec, named in cases:
        path = daemon.root / "bad.json"
        path.write_text(json.dumps(spec))
        res = daemon.qvirsh("attach-device", "bad", str(path), check=False)
        assert res.returncode == 1 and "invalid device" in res.stderr and named in res.stderr, \
            (spec, res.stderr)
    # A file that does not exist: QEMU refuses; nothing is left in QEMU or in the JSON.
    path = daemon.root / "missing.json"
    path.write_text(json.dumps({"kind": "disk", "id": "ghost", "path": "/nonexistent,x=y"}))
    res = daemon.qvirsh("attach-device", "bad", str(path), check=False)
    assert res.returncode == 1 and "QEMU refused" in res.stderr
    assert "ghost" not in json_devices(daemon, "bad") | qemu_devices(daemon, "bad")
    assert not {"file-ghost", "fmt-ghost"} & node_names(daemon, "bad")
    # Same id twice.
    img = daemon.root / "twice.raw"
    img.write_bytes(b"\0" * 65536)
    spec_path = device_file(daemon, {"kind": "disk", "id": "twice", "path": str(img)})
    daemon.qvirsh("attach-device", "bad", spec_path)
    res = daemon.qvirsh("attach-device", "bad", spec_path, check=False)
    assert res.returncode == 1 and "already has a device 'twice'" in res.stderr


async def test_running_out_of_hotplug_ports(daemon: Daemon) -> None:
    daemon.define(tiny_definition("full", hotplug_ports=1))
    daemon.qvirsh("start", "full")
    daemon.qvirsh("attach-device", "full", device_file(daemon, {"kind": "nic", "id": "a"}))
    res = daemon.qvirsh("attach-device", "full", device_file(daemon, {"kind": "nic", "id": "b"}),
                        check=False)
    assert res.returncode == 1 and "no free PCIe port" in res.stderr
    client = await daemon.client()
    try:
        with pytest.raises(RpcError) as err:
            await client.call("change-media", {"name": "full", "device": "x"})
        assert err.value.code == -32602 and "path or eject" in str(err.value)
    finally:
        await client.close()



async def test_destroy_racing_a_hotplug(daemon: Daemon) -> None:
    """A detach waiting on a guest that never releases, then destroy: the detach ends
    cleanly, QEMU and its JSON config go together, nothing is left behind."""
    daemon.define(tiny_definition("race"))
    daemon.qvirsh("start", "race")
    img = daemon.root / "r.raw"
    img.write_bytes(b"\0" * 65536)
    daemon.qvirsh("attach-device", "race", device_file(
        daemon, {"kind": "disk", "id": "rd", "path": str(img)}))
    client = await daemon.client()
    try:
        detach = asyncio.create_task(client.call(
            "detach-device", {"name": "race", "device": "rd", "wait": 30}))
        await asyncio.sleep(0.5)
        await client.call("destroy", {"name": "race"})
        with pytest.raises(RpcError) as err:
            await asyncio.wait_for(detach, 10)
        assert err.value.kind == "domain-gone" and "destroyed" in str(err.value)
        info = await client.call("dominfo", {"name": "race"})
        assert info["state"] == "shutoff" and info["job"] == {"job": None, "async_job": None}
        assert not (daemon.root / "run" / "domains" / "race" / "status.json").exists()
        assert daemon.qemu_pids() == []
        # The persistent definition never had the device; a new run starts clean.
        await client.call("start", {"name": "race"})
        assert "rd" not in json_devices(daemon, "race")
        await client.call("destroy", {"name": "race"})
    finally:
        await client.close()


async def test_start_racing_undefine(daemon: Daemon) -> None:
    daemon.define(tiny_definition("fleeting"))
    client = await daemon.client()
    try:
        start = asyncio.create_task(client.call("start", {"name": "fleeting"}))
        undefine = asyncio.create_task(client.call("undefine", {"name": "fleeting"}))
        results = await asyncio.gather(start, undefine, return_exceptions=True)
        listed = {d["name"]: d for d in await client.call("list", {"all": True})}
        assert not (daemon.root / "state" / "domains" / "fleeting.json").exists()
        if isinstance(results[0], BaseException):
            # the undefine got in first: nothing to start, nothing left
            assert "fleeting" not in listed and daemon.qemu_pids() == []
        else:
            # the start ran first (the undefine waited for its job): transient and running
            assert listed["fleeting"]["persistent"] is False
            assert listed["fleeting"]["state"] == "running"
            await client.call("destroy", {"name": "fleeting"})
            assert "fleeting" not in {d["name"] for d in await client.call("list",
                                                                            {"all": True})}
        assert not isinstance(results[1], BaseException), results[1]
    finally:
        await client.close()
