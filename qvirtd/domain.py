"""One domain: its lock, job condition, state and reason, definitions and QEMU handles.

Everything here is guarded by `Domain.lock` (rule L3). The lock is held only for short,
await-free stretches; across any wait a job holder drops it and afterwards checks, with
`is_current()`, that the domain is still the same running domain it was before the wait.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .job import JobCondition
from .locks import TrackedLock
from .model import DomainDef, DomainState, Reason

if TYPE_CHECKING:
    from .qemu.monitor import Monitor
    from .qemu.process import QemuProcess


class Domain:
    """A defined or running domain (an entry of the domain table)."""

    def __init__(self, definition: DomainDef, persistent: bool, autostart: bool = False) -> None:
        self.name = definition.name
        self.uuid = str(definition.uuid)
        self.lock = TrackedLock(f"domain:{self.name}")
        self.job = JobCondition(self.lock, self.name)
        self.persistent_def: DomainDef | None = definition if persistent else None
        self.live_def: DomainDef | None = None
        self.autostart = autostart
        self.state = DomainState.SHUTOFF
        self.reason = Reason.UNKNOWN
        self.id: int | None = None
        # One "run" = one QEMU process. `generation` changes at every start, so a task that
        # waited can tell whether the domain it acted on is still the one running.
        self.generation = 0
        self.process: QemuProcess | None = None
        self.monitor: Monitor | None = None
        self.run_dir: Path | None = None
        self.accel_in_use: str | None = None
        self.run_ended = asyncio.Event()
        self.run_ended.set()
        # Set when the daemon itself stops QEMU, so its exit is not taken for a crash.
        self.stop_reason: Reason | None = None
        self.starting = False
        self.saw_shutdown = False
        self.fake_reboot = False
        self.removed = False
        # Why the next STOP from QEMU happens, when we know (user, ioerror, watchdog).
        self.pause_hint: Reason | None = None
        self.balloon_actual_bytes: int | None = None
        self.last_reset_at = float("-inf")  # monotonic time of QEMU's last RESET event
        # Devices of the run: which root port each PCI device sits on, how many ports the
        # QEMU has, devices whose unplug the guest has not confirmed, and detach waiters.
        self.ports: dict[str, str] = {}
        self.root_ports = 0
        self.pending_detach: set[str] = set()
        self.device_waiters: dict[str, asyncio.Future[None]] = {}
        self.event_pump: asyncio.Task[None] | None = None
        # The run's QMP events on their way to the pump: (name, data, QEMU's timestamp).
        self.qmp_queue: asyncio.Queue[tuple[str, dict[str, Any], float | None]] | None = None

    @property
    def active(self) -> bool:
        """QEMU exists for this domain (starting, running, paused or shutting down)."""
        return self.process is not None

    @property
    def persistent(self) -> bool:
        return self.persistent_def is not None

    @property
    def definition(self) -> DomainDef:
        """The live definition while running, else the persistent one."""
        d = self.live_def if self.live_def is not None else self.persistent_def
        assert d is not None, f"domain {self.name} has no definition"
        return d

    def is_current(self, generation: int) -> bool:
        """After a wait: is this still the same running domain (rule L5)?"""
        return self.active and self.generation == generation

    def info(self) -> dict[str, Any]:
        d = self.definition
        return {
            "name": self.name,
            "uuid": self.uuid,
            "id": self.id,
            "state": str(self.state),
            "reason": str(self.reason),
            "pid": self.process.pid if self.process is not None else None,
            "memory_mib": d.memory_mib,
            "vcpus": d.vcpus,
            "persistent": self.persistent,
            "autostart": self.autostart,
            "accel": self.accel_in_use if self.accel_in_use is not None else str(d.accel),
            "job": self.job.describe(),
        }

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "uuid": self.uuid, "id": self.id, "state": str(self.state),
                "persistent": self.persistent}
