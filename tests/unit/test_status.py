"""Status files and the "is this pid still our QEMU?" check a restarted daemon relies on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from qvirtd.model import DomainDef, DomainState, Reason
from qvirtd.ops.reconnect import our_process
from qvirtd.qemu.process import proc_start_time
from qvirtd.status import DomainStatus, remove_status, save_status, scan_statuses


def make_status(run_dir: Path, **over: object) -> DomainStatus:
    fields: dict[str, object] = dict(
        name="vm", uuid="00000000-0000-0000-0000-000000000001", generation=3,
        phase="running", pid=None, start_time=None, binary="/usr/bin/qemu-system-x86_64",
        run_dir=str(run_dir), monitor_socket=str(run_dir / "monitor.sock"), id=7,
        state=DomainState.RUNNING, reason=Reason.BOOTED, persistent=True, accel="kvm",
        definition=DomainDef(name="vm"))
    fields.update(over)
    return DomainStatus.model_validate(fields)


def test_save_scan_remove(tmp_path: Path) -> None:
    runs = tmp_path / "domains"
    (runs / "vm").mkdir(parents=True)
    (runs / "empty").mkdir()
    (runs / "torn").mkdir()
    (runs / "torn" / "status.json").write_text("{not json")
    save_status(make_status(runs / "vm", stop_reason=Reason.DESTROYED))
    found = dict(scan_statuses(runs))
    assert set(found) == {runs / "vm", runs / "torn"}
    assert found[runs / "torn"] is None
    status = found[runs / "vm"]
    assert status is not None and status.stop_reason is Reason.DESTROYED and status.written
    assert json.loads((runs / "vm" / "status.json").read_text())["version"] == 1
    assert not list((runs / "vm").glob(".*tmp*"))
    remove_status(runs / "vm")
    remove_status(runs / "vm")  # idempotent
    assert dict(scan_statuses(runs)).keys() == {runs / "torn"}


def test_our_process_checks_liveness_start_time_and_binary(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        start = proc_start_time(child.pid)
        exe = os.path.realpath(f"/proc/{child.pid}/exe")
        # Not ours: another binary than the one recorded.
        assert our_process(make_status(tmp_path, pid=child.pid, start_time=start)) is None
        # A reused pid: same binary, other start time.
        assert our_process(make_status(tmp_path, pid=child.pid, start_time=(start or 0) + 1,
                                       binary=exe)) is None
        assert our_process(make_status(tmp_path, pid=None, binary=exe)) is None
    finally:
        child.kill()
        child.wait()
    # Dead: gone, whatever else matches.
    assert our_process(make_status(tmp_path, pid=child.pid, start_time=start,
                                   binary=exe)) is None
