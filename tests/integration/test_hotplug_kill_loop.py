"""SIGKILL the daemon at random points of attach, detach and change-media on the booted test
guest, and check the invariant every round against QEMU's own view.

While the daemon is dead its QEMU monitor is free, so the test connects to it itself and
checks, at the very moment the daemon died: nothing exists in QEMU (devices in
/machine/peripheral, block nodes, netdevs, PCI devices) without an entry in the JSON config on
disk (the status file). After the restart settles, the two must be equal.

Run with -s for the summary; QVIRTD_HOTPLUG_ROUNDS and QVIRTD_KILL_SEED as in test_kill_loop.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import re
import signal
import time
from pathlib import Path
from typing import Any

from harness import Daemon, guest_definition
from qemu.qmp import QMPClient

from qvirtd.client import Client
from qvirtd.status import DomainStatus

ROUNDS = int(os.environ.get("QVIRTD_HOTPLUG_ROUNDS", "22"))
INFRA = {"serial0", "scsi0", "pvpanic0"}


async def qemu_view(monitor: Path) -> dict[str, Any]:
    """QEMU's devices, block nodes (name -> file), netdevs and PCI devices, asked directly."""
    qmp = QMPClient("test")
    await asyncio.wait_for(qmp.connect(str(monitor)), 10)
    try:
        peripheral = await qmp.execute("qom-list", {"path": "/machine/peripheral"})
        nodes = await qmp.execute("query-named-block-nodes")
        network = await qmp.execute("human-monitor-command",
                                    {"command-line": "info network"})
        pci = await qmp.execute("query-pci")
        blocks = await qmp.execute("query-block")
    finally:
        await qmp.disconnect()
    pci_ids: set[str] = set()

    def walk(devices: list[dict[str, Any]]) -> None:
        for dev in devices:
            if dev.get("qdev_id"):
                pci_ids.add(dev["qdev_id"])
            bridge = dev.get("pci_bridge") or {}
            walk(bridge.get("devices", []))

    for bus in pci:  # type: ignore[union-attr]
        walk(bus["devices"])
    return {
        "devices": {p["name"] for p in peripheral  # type: ignore[union-attr]
                    if p["type"].startswith("child<") and not p["name"].startswith("rp")
                    and p["name"] not in INFRA},
        "nodes": {n["node-name"]: n.get("file") for n in nodes  # type: ignore[union-attr]
                  if n["node-name"].startswith(("file-", "fmt-"))},
        "netdevs": set(re.findall(r"\bnet-([A-Za-z0-9_-]+):", str(network))),
        "pci": {i for i in pci_ids if not i.startswith("rp") and i not in INFRA},
        "media": {b.get("qdev", "").rsplit("/", 1)[-1]: (b.get("inserted") or {}).get("file")
                  for b in blocks},  # type: ignore[union-attr]
    }


def json_view(status: DomainStatus) -> dict[str, Any]:
    d = status.definition
    return {"disks": {x.id: x.path for x in d.disks}, "cdroms": {c.id: c.path for c in d.cdroms},
            "nics": {n.id for n in d.nics},
            "all": {x.id for x in [*d.disks, *d.cdroms, *d.nics]}}


def check_subset(q: dict[str, Any], j: dict[str, Any]) -> None:
    """Nothing in QEMU without an entry in the JSON."""
    assert q["devices"] <= j["all"], ("devices", q["devices"], j["all"])
    assert q["pci"] <= j["all"], ("pci", q["pci"], j["all"])
    assert q["netdevs"] <= j["nics"], ("netdevs", q["netdevs"], j["nics"])
    paths = {**j["disks"], **j["cdroms"]}
    for node, filename in q["nodes"].items():
        owner = node.split("-", 1)[1]
        assert owner in paths, ("node without entry", node)
        if node.startswith("file-"):
            assert filename == paths[owner], ("node file differs", node, filename, paths)


async def settled(daemon: Daemon) -> None:
    client = await Client.connect(daemon.socket)
    try:
        deadline = time.monotonic() + 30
        while any((await client.call("dominfo", {"name": "kl"}))["job"].values()):
            assert time.monotonic() < deadline, "reconnect did not settle"
            await asyncio.sleep(0.05)
    finally:
        await client.close()


async def test_kill_the_daemon_during_hotplug(daemon: Daemon, guest: Any) -> None:
    seed = int(os.environ.get("QVIRTD_KILL_SEED", str(int(time.time()))))
    try:
        await hotplug_kill_loop(daemon, guest, seed)
    except BaseException as exc:
        raise AssertionError(f"hotplug kill loop failed (replay with QVIRTD_KILL_SEED={seed}):"
                             f" {exc!r}\n{daemon.log_text()}") from exc


async def hotplug_kill_loop(daemon: Daemon, guest: Any, seed: int) -> None:
    rng = random.Random(seed)
    daemon.define(guest_definition(guest, "kl", hotplug_ports=6))
    daemon.qvirsh("start", "kl")
    await asyncio.to_thread(daemon.wait_console, "kl", "QVIRTD-GUEST: ready")
    images = daemon.root / "img, x"
    images.mkdir()
    for i in range(4):
        (images / f"d{i}.raw").write_bytes(b"\0" * 1024 * 1024)
        (images / f"m{i}.iso").write_bytes(b"\0" * 1024 * 1024)
    run_dir = daemon.root / "run" / "domains" / "kl"
    hits: collections.Counter[str] = collections.Counter()
    outcomes: collections.Counter[str] = collections.Counter()
    for round_no in range(ROUNDS):
        status = DomainStatus.model_validate_json((run_dir / "status.json").read_bytes())
        have = json_view(status)
        pci_used = len(have["disks"]) + len(have["nics"])
        choices = ["detach", "detach"] if have["all"] else []
        if pci_used < 4:
            choices += ["attach-disk", "attach-nic"]
        if len(have["cdroms"]) < 2:
            choices.append("attach-cdrom")
        if have["cdroms"]:
            choices += ["media", "media"]
        op = rng.choice(choices)
        n = rng.randrange(4)
        if op == "attach-disk":
            params = {"device": {"kind": "disk", "id": f"d{round_no}",
                                 "path": str(images / f"d{n}.raw"), "readonly": True}}
        elif op == "attach-nic":
            params = {"device": {"kind": "nic", "id": f"n{round_no}"}}
        elif op == "attach-cdrom":
            params = {"device": {"kind": "cdrom", "id": f"c{round_no}",
                                 "path": str(images / f"m{n}.iso")}}
        elif op == "detach":
            params = {"device": rng.choice(sorted(have["all"])), "wait": rng.choice([0, 2])}
        else:
            params = {"device": rng.choice(sorted(have["cdroms"])),
                      **({"eject": True} if rng.random() < 0.3
                         else {"path": str(images / f"m{n}.iso")})}
        method = {"media": "change-media", "detach": "detach-device"}.get(op, "attach-device")
        client = await Client.connect(daemon.socket)
        call = asyncio.create_task(client.call(method, {"name": "kl", **params}))
        delay = rng.choice([0.0, rng.uniform(0, 0.02), rng.uniform(0, 0.2)])
        await asyncio.sleep(delay)
        done_before = call.done()
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(daemon.proc.wait, 10)
        try:
            await asyncio.wait_for(call, 5)
        except Exception:  # cut off by the kill (or refused): both fine
            pass
        await client.close()
        hits[f"{op} {'after' if done_before else 'during'}"] += 1
        # The moment of death: QEMU has nothing the JSON on disk does not describe.
        status = DomainStatus.model_validate_json((run_dir / "status.json").read_bytes())
        try:
            check_subset(await qemu_view(run_dir / "monitor.sock"), json_view(status))
        except AssertionError as exc:
            raise AssertionError(f"round {round_no} (seed {seed}), {op} {params} killed after "
                                 f"{delay:.3f} s: {exc}") from exc
        await asyncio.to_thread(daemon.start)
        await settled(daemon)
        status = DomainStatus.model_validate_json((run_dir / "status.json").read_bytes())
        client = await Client.connect(daemon.socket)
        try:
            warnings = await client.call("daemon-warnings")
            view = await client.call("qemu-monitor-command", {"name": "kl", "command": {
                "execute": "qom-list", "arguments": {"path": "/machine/peripheral"}}})
            blocks = await client.call("qemu-monitor-command", {"name": "kl", "command": {
                "execute": "query-block"}})
        finally:
            await client.close()
        assert warnings == [], warnings
        j = json_view(status)
        devices = {p["name"] for p in view if p["type"].startswith("child<")
                   and not p["name"].startswith("rp") and p["name"] not in INFRA}
        pending = set(status.pending_detach)
        # After the restart: equal (a pending removal is in both until the guest lets go).
        assert devices == j["all"], (round_no, seed, devices, j["all"], pending)
        media = {b.get("qdev", "").rsplit("/", 1)[-1]: (b.get("inserted") or {}).get("file")
                 for b in blocks}
        for cd, path in j["cdroms"].items():
            assert media.get(cd) == path, (round_no, seed, cd, media.get(cd), path)
        outcomes[f"{op}: {len(have['all'])} -> {len(j['all'])} devices"] += 1
    print(f"\nhotplug kill loop: {ROUNDS} rounds, seed {seed}")
    print("kill points:", dict(sorted(hits.items())))
    print("outcomes:", dict(sorted(outcomes.items())))
