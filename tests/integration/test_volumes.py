"""Disk images as users have them: vol-create (raw, qcow2, an overlay on a base, a full
preallocation with its progress line) and domblklist."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from harness import Daemon, tiny_definition


def info(path: Path) -> dict[str, object]:
    return dict(json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(path)],
                                          capture_output=True, text=True,
                                          check=True).stdout))


def test_vol_create_images_and_an_overlay(daemon: Daemon) -> None:
    base = daemon.root / "base.raw"
    out = daemon.qvirsh("vol-create", str(base), "16M").stdout
    assert f"Volume {base} created (raw, 16777216 bytes)" in out
    assert info(base)["virtual-size"] == 16 * 2**20 and info(base)["format"] == "raw"
    overlay = daemon.root / "top.qcow2"
    res = daemon.json("vol-create", str(overlay), "32M", "--format", "qcow2",
                      "--backing", str(base))
    assert (res["backing"], res["backing_format"]) == (str(base), "raw")
    i = info(overlay)
    assert i["format"] == "qcow2" and i["backing-filename"] == str(base)
    assert i["backing-filename-format"] == "raw" and i["virtual-size"] == 32 * 2**20
    # Refusals: an existing file (never overwritten), a bad size, a raw overlay.
    for args, said in ((["vol-create", str(base), "1M"], "never overwrites"),
                       (["vol-create", str(daemon.root / "x"), "lots"], "not a size"),
                       (["vol-create", str(daemon.root / "y"), "1M", "--backing", str(base)],
                        "must be qcow2"),
                       (["vol-create", "rel.img", "1M"], "absolute")):
        res = daemon.qvirsh(*args, check=False)
        assert res.returncode == 1 and said in res.stderr, (args, res.stderr)
    assert info(base)["virtual-size"] == 16 * 2**20
    # The overlay boots as a domain's disk; domblklist lists it.
    daemon.define(tiny_definition("vol", disks=[{"id": "root", "path": str(overlay),
                                                 "format": "qcow2", "boot_order": 1}],
                                  cdroms=[{"id": "cd"}]))
    daemon.qvirsh("start", "vol")
    listed = daemon.qvirsh("domblklist", "vol").stdout
    assert "root" in listed and str(overlay) in listed and "cdrom" in listed
    rows = daemon.json("domblklist", "vol")["devices"]
    assert [(r["target"], r["kind"], r["format"], r["boot_order"]) for r in rows] == \
        [("root", "disk", "qcow2", 1), ("cd", "cdrom", "raw", None)]
    daemon.qvirsh("destroy", "vol")


def test_a_full_preallocation_shows_progress(daemon: Daemon) -> None:
    target = daemon.root / "full.raw"
    res = subprocess.run([sys.executable, "-m", "qvirtd.cli", "--socket", str(daemon.socket),
                          "vol-create", str(target), "1G", "--prealloc", "full"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    progress = [line for line in res.stderr.splitlines() if "% (" in line]
    print(f"\n{len(progress)} progress lines, last: {progress[-1] if progress else None}")
    assert progress and progress[-1].startswith(f"{target}:")
    assert target.stat().st_blocks * 512 >= 2**30
    target.unlink()
