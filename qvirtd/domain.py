"""One domain: its lock, job condition, state and reason, definitions and its current run.

Everything here is guarded by `Domain.lock` (rule L3). The lock is held only for short,
await-free stretches; across any wait a job holder drops it and afterwards checks that the
domain is still in the table and still on the same run (`dom.run is run`, rule L5).
"""

from __future__ import annotations

from typing import Any

from .job import JobCondition
from .locks import TrackedLock
from .model import DomainDef, DomainState, Reason
from .run import Run


class Domain:
    """A defined or running domain (an entry of the domain table)."""

    def __init__(self, definition: DomainDef, persistent: bool, autostart: bool = False) -> None:
        self.name = definition.name
        self.uuid = str(definition.uuid)
        self.lock = TrackedLock(f"domain:{self.name}")
        self.job = JobCondition(self.lock, self.name)
        # The guest agent's own job (as libvirt's agent jobs): an agent call never waits for
        # a monitor job, nor the reverse.
        self.agent_job = JobCondition(self.lock, self.name, "agent job")
        self.persistent_def: DomainDef | None = definition if persistent else None
        self.autostart = autostart
        self.state = DomainState.SHUTOFF
        self.reason = Reason.UNKNOWN
        self.run: Run | None = None
        # The definition it was made with: what a transient domain being restored shows
        # before its run exists.
        self._initial_def = definition
        self.managed_save = False  # a managed save image waits for the next start
        self.removed = False   # set (under the driver lock) when it leaves the table

    @property
    def active(self) -> bool:
        """QEMU exists for this domain (starting, running, paused or shutting down)."""
        return self.run is not None

    @property
    def persistent(self) -> bool:
        return self.persistent_def is not None

    @property
    def id(self) -> int | None:
        return self.run.id if self.run is not None else None

    @property
    def definition(self) -> DomainDef:
        """The live definition while running, else the persistent one."""
        if self.run is not None:
            return self.run.definition
        return self.persistent_def or self._initial_def

    def assert_locked(self) -> None:
        assert self.lock.held_by_current_task(), f"domain {self.name}: lock not held"

    def info(self) -> dict[str, Any]:
        d = self.definition
        run = self.run
        return {
            "name": self.name,
            "uuid": self.uuid,
            "id": self.id,
            "state": str(self.state),
            "reason": str(self.reason),
            "pid": run.pid if run is not None else None,
            "memory_mib": d.memory_mib,
            "vcpus": d.vcpus,
            "persistent": self.persistent,
            "autostart": self.autostart,
            "managed_save": self.managed_save,
            "accel": run.accel if run is not None else str(d.accel),
            "job": self.job.describe(),
            "agent_job": self.agent_job.describe()["job"],
            "tainted": list(run.tainted) if run is not None else [],
        }

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "uuid": self.uuid, "id": self.id, "state": str(self.state),
                "persistent": self.persistent}
