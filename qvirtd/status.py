"""The status file of a running domain: what a restarted daemon needs to find it again.

`run/domains/NAME/status.json` is written atomically at every state change of a run, and
first *before* QEMU is spawned (phase "starting", no pid yet), so a daemon killed at any point
leaves a record of what it was doing:

* phase "starting": the start did not finish. A restarted daemon kills what it finds (the pid,
  or any QEMU naming this run directory) and the domain ends shut off, reason failed.
* phase "running": the run was established. The restarted daemon checks that the pid is still
  our QEMU (same start time in /proc, same binary), reconnects and resyncs, or, if it is gone,
  shuts the domain off (crashed, or the `stop_reason` of a stop that was under way).

The file is removed when the run ends.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from .model import DomainDef, DomainState, Reason, StrictModel
from .store import atomic_write_json

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"


class JobRecord(StrictModel):
    """An async job that was in progress (so a restart can recover or roll it back)."""

    kind: str
    owner: str
    since: str


class DomainStatus(StrictModel):
    version: Literal[1] = 1
    name: str
    uuid: str
    generation: int
    phase: Literal["starting", "running"]
    pid: int | None
    start_time: int | None          # clock ticks since boot, from /proc/PID/stat
    binary: str                     # the QEMU executable, resolved
    run_dir: str
    monitor_socket: str
    id: int
    state: DomainState
    reason: Reason
    persistent: bool
    accel: str
    definition: DomainDef           # the live definition
    stop_reason: Reason | None = None
    saw_shutdown: bool = False
    fake_reboot: bool = False
    async_job: JobRecord | None = None
    ports: dict[str, str] = {}
    root_ports: int = 0
    pending_detach: list[str] = []
    written: str = ""


def status_path(run_dir: Path) -> Path:
    return run_dir / STATUS_FILE


def save_status(status: DomainStatus) -> None:
    status.written = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
    # Atomic, not durable: see atomic_write_bytes (a status file describes live processes).
    atomic_write_json(status_path(Path(status.run_dir)), status.model_dump(mode="json"),
                      durable=False)


def remove_status(run_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(status_path(run_dir))


def scan_statuses(domains_run_dir: Path) -> list[tuple[Path, DomainStatus | None]]:
    """Every run directory with a status file; None for a file that cannot be read."""
    found: list[tuple[Path, DomainStatus | None]] = []
    if not domains_run_dir.is_dir():
        return found
    for run_dir in sorted(p for p in domains_run_dir.iterdir() if p.is_dir()):
        path = status_path(run_dir)
        if not path.exists():
            continue
        try:
            found.append((run_dir, DomainStatus.model_validate_json(path.read_bytes())))
        except (OSError, ValidationError) as exc:
            log.error("status file %s cannot be read: %s", path, exc)
            found.append((run_dir, None))
    return found


def process_binary(pid: int) -> str | None:
    """The executable of `pid` (without the " (deleted)" an upgrade leaves behind)."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None
    return exe.removesuffix(" (deleted)")
