"""Devices in a definition reach a real QEMU with the ids, buses and ports we gave them."""

from __future__ import annotations

import json
import subprocess

from harness import Daemon, tiny_definition


def qmp(daemon: Daemon, name: str, command: str, **arguments: object) -> object:
    msg = {"execute": command, "arguments": arguments} if arguments else {"execute": command}
    return json.loads(daemon.qvirsh("qemu-monitor-command", name, json.dumps(msg)).stdout)


def test_disks_nics_and_many_hotplug_ports_start(daemon: Daemon) -> None:
    img_dir = daemon.root / "images, with commas"
    img_dir.mkdir()
    raw = img_dir / "räw,disk.img"
    raw.write_bytes(b"\0" * 1024 * 1024)
    qcow = img_dir / "q.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow), "16M"], check=True)
    daemon.define(tiny_definition(
        "devs",
        disks=[{"id": "disk0", "path": str(raw)},
               {"id": "d" * 26, "path": str(qcow), "format": "qcow2", "readonly": True}],
        nics=[{"id": "net0"}, {"id": "net1", "mac": "52:54:00:aa:bb:cc"}],
        cdroms=[{"id": "cd0"}],
        hotplug_ports=32))
    daemon.qvirsh("start", "devs")
    peripherals = {p["name"] for p in qmp(daemon, "devs", "qom-list",  # type: ignore[union-attr]
                                           path="/machine/peripheral")}
    assert {"disk0", "d" * 26, "net0", "net1", "cd0", "rp0", "rp35"} <= peripherals
    blocks = {b["qdev"].rsplit("/", 2)[-2] if b["qdev"].endswith("virtio-backend")
              else b["qdev"]: b for b in qmp(daemon, "devs", "query-block")}  # type: ignore[union-attr]
    assert blocks["disk0"]["inserted"]["file"] == str(raw)
    assert blocks["d" * 26]["inserted"]["ro"] is True
    assert "inserted" not in blocks["cd0"]  # an empty tray
    pci = qmp(daemon, "devs", "query-pci")
    bridges = [d for d in pci[0]["devices"] if d.get("qdev_id", "").startswith("rp")]  # type: ignore[index]
    assert len(bridges) == 1 + 2 + 2 + 32  # the SCSI controller, disks, NICs, free ports
    assert len({d["slot"] for d in bridges}) == 5  # 37 ports packed 8 to a slot
    daemon.qvirsh("destroy", "devs")
