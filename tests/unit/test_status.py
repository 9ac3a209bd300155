"""Status files (read forgivingly) and the "is this pid still our QEMU?" check a restarted
daemon relies on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from qvirtd.model import DomainDef, DomainState, Reason
from qvirtd.ops.reconnect import our_process
from qvirtd.qemu.process import proc_start_time
from qvirtd.run import FollowUp, FollowUpKind, Run
from qvirtd.status import STATUS_VERSION, DomainStatus, read_status, scan_statuses


def make_status(run_dir: Path, **over: object) -> DomainStatus:
    fields: dict[str, object] = dict(
        name="vm", uuid="00000000-0000-0000-0000-000000000001", run_token="abc",
        pid=None, start_time=None, binary="/usr/bin/qemu-system-x86_64",
        run_dir=str(run_dir), id=7, state=DomainState.RUNNING, reason=Reason.BOOTED,
        persistent=True, accel="kvm", definition=DomainDef(name="vm"))
    fields.update(over)
    return DomainStatus.model_validate(fields)


def write(run_dir: Path, data: bytes) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "status.json").write_bytes(data)


def test_scan_finds_good_damaged_and_unreadable_files(tmp_path: Path) -> None:
    runs = tmp_path / "domains"
    write(runs / "vm", make_status(runs / "vm", stop_reason=Reason.DESTROYED).encode())
    (runs / "empty").mkdir()
    write(runs / "torn", b"{not json")
    raw = json.loads(make_status(runs / "bad", pid=4242, start_time=99).encode())
    raw["definition"]["memory_mib"] = "lots"
    write(runs / "bad", json.dumps(raw).encode())
    found = {f.run_dir.name: f for f in scan_statuses(runs)}
    assert set(found) == {"vm", "torn", "bad"}
    good = found["vm"].status
    assert good is not None and good.stop_reason is Reason.DESTROYED and good.written
    assert good.version == STATUS_VERSION
    assert found["torn"].status is None and "JSON" in (found["torn"].problem or "")
    # Damaged: not usable as a whole, but what identifies the QEMU is still read.
    bad = found["bad"]
    assert bad.status is None and "memory_mib" in (bad.problem or "")
    assert (bad.pid, bad.start_time, bad.binary) == (4242, 99, "/usr/bin/qemu-system-x86_64")


def test_unknown_fields_are_ignored(tmp_path: Path) -> None:
    """A newer daemon may add fields: reading them must not make a live QEMU an orphan."""
    raw = json.loads(make_status(tmp_path, pid=123).encode())
    raw["added_by_a_newer_version"] = {"x": 1}
    raw["version"] = STATUS_VERSION + 1
    found = read_status(tmp_path, json.dumps(raw).encode())
    assert found.problem is None and found.status is not None and found.status.pid == 123


def test_version_1_files_are_read(tmp_path: Path) -> None:
    raw = {"version": 1, "name": "vm", "uuid": "00000000-0000-0000-0000-000000000001",
           "generation": 3, "phase": "starting", "pid": None, "start_time": None,
           "binary": "/usr/bin/qemu-system-x86_64", "run_dir": str(tmp_path),
           "monitor_socket": str(tmp_path / "monitor.sock"), "id": 2, "state": "paused",
           "reason": "starting up", "persistent": True, "accel": "tcg",
           "definition": {"name": "vm"}, "async_job": None}
    status = read_status(tmp_path, json.dumps(raw).encode()).status
    assert status is not None
    assert status.async_job is not None and (status.async_job.kind, status.async_job.phase) \
        == ("start", "prepare")
    raw["phase"] = "running"
    status = read_status(tmp_path, json.dumps(raw).encode()).status
    assert status is not None and status.async_job is None


async def test_run_round_trips_through_its_status(tmp_path: Path) -> None:
    from qvirtd.domain import Domain
    dom = Domain(DomainDef(name="vm"), persistent=True)
    run = Run(DomainDef(name="vm", memory_mib=256), tmp_path, 5, "tcg")
    run.stop_reason = Reason.SHUTDOWN
    run.saw_shutdown = True
    run.ports = {"d0": "rp1"}
    run.root_ports = 6
    run.pending_detach = {"d0"}
    run.follow_ups = [FollowUp(FollowUpKind.FINISH_DETACH, "detach-d0", "d0"),
                      FollowUp(FollowUpKind.RESET_CONTINUE, "reboot")]
    run.tainted = ["custom-monitor"]
    status = read_status(tmp_path, run.to_status(dom, "/usr/bin/qemu").encode()).status
    assert status is not None
    back = Run.from_status(status, tmp_path)
    for field in ("token", "definition", "id", "accel", "stop_reason", "saw_shutdown",
                  "ports", "root_ports", "pending_detach", "follow_ups", "tainted"):
        assert getattr(back, field) == getattr(run, field), field
    # A follow-up kind this daemon does not know (a newer one wrote it) is skipped.
    raw = json.loads(run.to_status(dom, "/q").encode())
    raw["follow_ups"].append({"kind": "migrate-confirm", "why": "x"})
    status = read_status(tmp_path, json.dumps(raw).encode()).status
    assert status is not None and Run.from_status(status, tmp_path).follow_ups == run.follow_ups


def test_our_process_checks_liveness_start_time_and_binary(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        start = proc_start_time(child.pid)
        exe = os.path.realpath(f"/proc/{child.pid}/exe")
        qemu = "/usr/bin/qemu-system-x86_64"
        assert our_process(child.pid, start, qemu) is None        # another binary
        assert our_process(child.pid, (start or 0) + 1, exe) is None  # a reused pid
        assert our_process(None, None, exe) is None
    finally:
        child.kill()
        child.wait()
    assert our_process(child.pid, start, exe) is None  # dead, whatever else matches
