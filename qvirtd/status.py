"""The status file of a running domain: what a restarted daemon needs to find it again.

`run/domains/NAME/status.json` is written (atomically, off the loop: writer.py) at every
change of a run, and first *before* QEMU is spawned, with the start job in phase `prepare`
and no pid, so a daemon killed at any point leaves a record of what it was doing. It holds
the run's live definition (the JSON config of seed 004), the async job and its phase, the
follow-ups still to do, and what a restart needs to recognise the process (pid, start time,
binary). `Run.to_status()` / `Run.from_status()` (run.py) convert; the decision table of a
restarted daemon is in ops/reconnect.py and docs/design.md.

**Read forgivingly.** Files carry a format `version`. The reader ignores fields it does not
know (a newer daemon may have added some), reads version 1 files (`phase: starting` means a
start job in phase `prepare`), and when a field it needs is damaged it still extracts what
identifies the QEMU (pid, start time, binary, run directory) so the process table can decide.
Only a file that is not JSON at all is unreadable, and that is reported, never taken for
"no QEMU here".
"""

from __future__ import annotations

import datetime
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import describe_validation_error
from .model import DomainDef, DomainState, Reason

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
STATUS_VERSION = 2


class Lenient(BaseModel):
    """On-disk records we read back: unknown fields are ignored (forward compatibility)."""

    model_config = ConfigDict(extra="ignore")


class JobRecord(Lenient):
    """The async job that was in progress, and its phase."""

    kind: str
    phase: str = ""
    owner: str = ""
    since: str = ""
    data: dict[str, Any] = {}   # what finishing or undoing the job needs (per job kind)


class FollowUpRecord(Lenient):
    """Work a QMP event asked for that is not done yet (retried until done or the run ends)."""

    kind: str
    why: str = ""
    device: str | None = None


class DomainStatus(Lenient):
    version: int = STATUS_VERSION
    name: str
    uuid: str
    run_token: str = ""
    pid: int | None
    start_time: int | None          # clock ticks since boot, from /proc/PID/stat
    binary: str                     # what the process runs (/proc/PID/exe), else qemu_binary
    run_dir: str
    id: int
    state: DomainState = DomainState.PAUSED
    reason: Reason = Reason.UNKNOWN
    persistent: bool = True
    accel: str = ""
    definition: DomainDef           # the live definition (the run's JSON config)
    stop_reason: Reason | None = None
    saw_shutdown: bool = False
    fake_reboot: bool = False
    async_job: JobRecord | None = None
    follow_ups: list[FollowUpRecord] = []
    ports: dict[str, str] = {}
    root_ports: int = 0
    pending_detach: list[str] = []
    tainted: list[str] = []
    incoming_token: str | None = None          # the migration that brought the run here
    outgoing: dict[str, Any] | None = None     # a migration out whose finish is unanswered
    written: str = ""

    def encode(self) -> bytes:
        self.written = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
        return (self.model_dump_json(indent=1) + "\n").encode()


@dataclass
class FoundStatus:
    """What a restarted daemon found in one run directory."""

    run_dir: Path
    status: DomainStatus | None      # None: not usable as a whole (see `problem`)
    problem: str | None = None       # why not, or what was damaged and worked around
    pid: int | None = None           # what identifies the QEMU, even from a damaged file
    start_time: int | None = None
    binary: str | None = None


def status_path(run_dir: Path) -> Path:
    return run_dir / STATUS_FILE


def _upgrade(raw: dict[str, Any]) -> dict[str, Any]:
    """Version 1 (run phase instead of the start job's phase) -> the current format."""
    if raw.get("version", 1) == 1:
        raw = dict(raw)
        if raw.get("phase") == "starting" and not raw.get("async_job"):
            raw["async_job"] = {"kind": "start", "phase": "prepare", "owner": "start"}
        if raw.get("async_job") and not raw["async_job"].get("phase"):
            raw["async_job"] = {**raw["async_job"], "phase": "prepare"}
    return raw


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def read_status(run_dir: Path, data: bytes) -> FoundStatus:
    """Parse one status file forgivingly (see the module docstring)."""
    try:
        raw = json.loads(data)
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
    except (ValueError, RecursionError) as exc:
        return FoundStatus(run_dir, None, f"not readable as JSON: {exc}")
    found = FoundStatus(run_dir, None, pid=_int_or_none(raw.get("pid")),
                        start_time=_int_or_none(raw.get("start_time")),
                        binary=raw.get("binary") if isinstance(raw.get("binary"), str) else None)
    version = raw.get("version", 1)
    if isinstance(version, int) and version > STATUS_VERSION:
        log.warning("status file %s has format version %s (this daemon writes %d): reading "
                    "what it knows", status_path(run_dir), version, STATUS_VERSION)
    try:
        found.status = DomainStatus.model_validate(_upgrade(raw))
    except ValidationError as exc:
        found.problem = f"damaged: {describe_validation_error(exc)}"
    return found


def scan_statuses(domains_run_dir: Path) -> list[FoundStatus]:
    """Blocking (call it off the loop): every run directory that has a status file."""
    found: list[FoundStatus] = []
    if not domains_run_dir.is_dir():
        return found
    for run_dir in sorted(p for p in domains_run_dir.iterdir() if p.is_dir()):
        path = status_path(run_dir)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        except OSError as exc:
            found.append(FoundStatus(run_dir, None, f"cannot be read: {exc.strerror}"))
            continue
        item = read_status(run_dir, data)
        if item.problem is not None:
            log.error("status file %s: %s", path, item.problem)
        found.append(item)
    return found

