"""One run of a domain: one QEMU process, from the record written before it is spawned to the
teardown after it is gone.

Everything that lives and dies with a QEMU process is here, in one place, owned by the domain
(`dom.run`, None when the domain is shut off): the live definition (the run's JSON config),
its id, its files, the process and monitor handles, what the daemon knows about how it will
end, the follow-ups still to do, and the tasks that serve it (event pump, process watcher,
follow-up runner, console reader). The run is the unit of identity: a task that waited
checks `dom.run is run` (rule L5), never a number that could repeat.

`to_status()` / `from_status()` are the only conversion to and from the status file, and
`close()` the only teardown of the run's own resources (ops/runtime.py `end_run()` does the
domain's part: state, event, files, table).

Every field is guarded by the domain lock, like the domain itself (rule L3).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import secrets
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .model import DomainDef, Reason
from .status import DomainStatus, FollowUpRecord, JobRecord, status_path

if TYPE_CHECKING:
    from .domain import Domain
    from .qemu.agent import GuestAgent
    from .qemu.console import SerialConsole
    from .qemu.monitor import Monitor
    from .qemu.process import QemuProcess

log = logging.getLogger(__name__)

MONITOR_SOCKET = "monitor.sock"
CONSOLE_SOCKET = "console.sock"
CONSOLE_LOG = "console.log"
AGENT_SOCKET = "agent.sock"
MIGRATE_SOCKET = "migrate.sock"   # an incoming migration's stream (QEMU listens on it)
NBD_SOCKET = "nbd.sock"           # its disks' NBD server, with --copy-storage

# One run's QMP events on their way to its pump: (name, data, QEMU's timestamp).
QmpQueue = asyncio.Queue[tuple[str, dict[str, Any], float | None]]


class FollowUpKind(enum.StrEnum):
    KILL = "kill"                  # stop QEMU (stop_reason already set)
    RESET_CONTINUE = "reset"       # system_reset + cont in the same QEMU (reboot)
    FINISH_DETACH = "detach"       # the guest released a device: drop its backends and entry


@dataclass(frozen=True)
class FollowUp:
    """Work that a QMP event (or a resync) asked for and that needs a job or the process.
    Recorded in the status file and retried until done or the run ends."""

    kind: FollowUpKind
    why: str
    device: str | None = None


class Run:
    """One QEMU process of a domain. Guarded by the domain lock."""

    def __init__(self, definition: DomainDef, run_dir: Path, dom_id: int, accel: str,
                 token: str | None = None) -> None:
        self.token = token or secrets.token_hex(8)
        self.definition = definition            # the live definition: the run's JSON config
        self.id = dom_id
        self.run_dir = run_dir
        # One Path for the status file, built once: it is written at every change of the
        # run, and the writer keys its per-path state on it (a new Path hashes anew).
        self.status_file = status_path(run_dir)
        self.accel = accel
        self.starting = False                   # a start is bringing it up (not yet running)
        self.process: QemuProcess | None = None
        self.monitor: Monitor | None = None
        self.console: SerialConsole | None = None
        self.agent: GuestAgent | None = None
        self.agent_connected: bool | None = None  # the guest side (VSERPORT_CHANGE)
        # Set when the daemon itself stops QEMU, so its exit is not taken for a crash.
        self.stop_reason: Reason | None = None
        self.saw_shutdown = False               # QEMU said SHUTDOWN before it went
        self.fake_reboot = False                # a reboot asked for: reset on the power-off
        self.pause_hint: Reason | None = None   # why the next STOP happens, when we know
        self.last_reset_at = float("-inf")      # monotonic time of QEMU's last RESET
        self.balloon_actual_bytes: int | None = None
        # Devices: which root port each PCI device sits on, how many ports QEMU has, and
        # the devices whose removal the guest has not confirmed yet.
        self.ports: dict[str, str] = {}
        self.root_ports = 0
        self.pending_detach: set[str] = set()
        self.follow_ups: list[FollowUp] = []
        self.tainted: list[str] = []
        # Migrations: the token of the migration that brought this run here (the source's
        # migrate-finish names it), and, on a source whose finish is not answered yet,
        # where the guest went ({"dest", "token", "was_running"}).
        self.incoming_token: str | None = None
        self.outgoing: dict[str, Any] | None = None
        # The async job a previous daemon was doing on this run, until reconnect has
        # finished or undone it (kept in the status file meanwhile: a QEMU frozen at
        # reconnect may answer only after further restarts).
        self.pending_job: JobRecord | None = None
        # domstats (ops/stats.py): the last block counters QEMU gave, when, the query still
        # out (at most one), and why the last one failed.
        self.block_stats: list[dict[str, Any]] = []
        self.block_stats_at: float | None = None
        self.stats_query: asyncio.Task[None] | None = None
        self.stats_error: str | None = None
        # Set once the process is known (spawned, or adopted), or its spawn failed.
        self.spawned = asyncio.Event()
        self.ended = asyncio.Event()
        self.qmp_queue: QmpQueue = asyncio.Queue()
        self.pump_busy = False  # the pump is applying an event (later ones queue behind it)
        self.follow_up_wake = asyncio.Event()
        self.status_written: asyncio.Future[None] | None = None  # the latest status write
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- files ------------------------------------------------------------------------------

    @property
    def monitor_socket(self) -> Path:
        return self.run_dir / MONITOR_SOCKET

    @property
    def console_socket(self) -> Path:
        return self.run_dir / CONSOLE_SOCKET

    @property
    def console_log(self) -> Path:
        return self.run_dir / CONSOLE_LOG

    @property
    def agent_socket(self) -> Path:
        return self.run_dir / AGENT_SOCKET

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    # --- follow-ups -------------------------------------------------------------------------

    def add_follow_up(self, follow_up: FollowUp) -> bool:
        """Under the domain lock: record `follow_up` (once) and wake the runner. True if new;
        the caller then writes the status file."""
        if follow_up in self.follow_ups:
            return False
        self.follow_ups.append(follow_up)
        self.follow_up_wake.set()
        return True

    # --- tasks the run owns -----------------------------------------------------------------

    def own(self, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        """Make `task` the run's: it is cancelled by `close()` if still running then."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        return self.own(asyncio.create_task(coro, name=name))

    async def close(self, why: str = "the domain stopped") -> None:
        """The run's own teardown (no lock held): stop its tasks, stop watching the process,
        close the monitor and the console (its attached clients are told `why`). Idempotent.
        The process itself is not touched: at the end of a run it is gone, at a daemon stop
        it keeps running."""
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        if self.process is not None:
            self.process.close()
        if self.console is not None:
            self.console.close(why)
        if self.agent is not None:
            self.agent.close()
        if self.monitor is not None:
            await self.monitor.close()

    # --- the status file --------------------------------------------------------------------

    def to_status(self, dom: Domain, binary: str, with_job: bool = True) -> DomainStatus:
        """The status file's content for this run of `dom` (under the domain lock).
        `with_job=False`: as it will be once the async job ends (its work is done)."""
        job = dom.job.async_job if with_job else None
        process = self.process
        return DomainStatus(
            name=dom.name, uuid=dom.uuid, run_token=self.token,
            pid=process.pid if process is not None else None,
            start_time=process.start_time if process is not None else None,
            binary=(process.exe if process is not None and process.exe else binary),
            run_dir=str(self.run_dir), id=self.id,
            state=dom.state, reason=dom.reason, persistent=dom.persistent, accel=self.accel,
            definition=self.definition, stop_reason=self.stop_reason,
            saw_shutdown=self.saw_shutdown, fake_reboot=self.fake_reboot,
            async_job=JobRecord(kind=str(job.kind), phase=job.phase, owner=job.owner,
                                since=job.started_at, data=dict(job.data))
            if job is not None else self.pending_job,
            follow_ups=[FollowUpRecord(kind=str(f.kind), why=f.why, device=f.device)
                        for f in self.follow_ups],
            ports=dict(self.ports), root_ports=self.root_ports,
            pending_detach=sorted(self.pending_detach), tainted=list(self.tainted),
            incoming_token=self.incoming_token, outgoing=self.outgoing)

    @classmethod
    def from_status(cls, status: DomainStatus, run_dir: Path) -> Run:
        """The run a status file describes (its process is attached separately)."""
        run = cls(status.definition, run_dir, status.id, status.accel,
                  status.run_token or None)
        run.stop_reason = status.stop_reason
        run.saw_shutdown = status.saw_shutdown
        run.fake_reboot = status.fake_reboot
        run.ports = dict(status.ports)
        run.root_ports = status.root_ports
        run.pending_detach = set(status.pending_detach)
        run.tainted = list(status.tainted)
        run.incoming_token = status.incoming_token
        run.outgoing = status.outgoing
        run.pending_job = status.async_job
        for record in status.follow_ups:
            with contextlib.suppress(ValueError):
                run.follow_ups.append(FollowUp(FollowUpKind(record.kind), record.why,
                                               record.device))
        return run
