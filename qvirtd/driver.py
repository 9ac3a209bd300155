"""The domain table: lookups by name, uuid and id, and the short-held driver lock.

The driver lock (rule L1) covers the table and nothing else: it is taken to look up, reserve
or remove an entry, or to index a running domain's id, and released before anything else
happens. It is never taken while a domain lock is held (release the domain lock first), and
nothing is awaited under it except the lock itself.
"""

from __future__ import annotations

from .domain import Domain
from .errors import DomainBusyError, NoDomainError
from .locks import HoldStats, TrackedLock
from .model import looks_like_id


class DomainTable:
    def __init__(self) -> None:
        self.hold_stats = HoldStats()
        self.lock = TrackedLock("driver", stats=self.hold_stats)
        self._by_name: dict[str, Domain] = {}
        self._by_uuid: dict[str, Domain] = {}
        self._by_id: dict[int, Domain] = {}
        # Which domain's run owns run/domains/NAME (its status file and sockets), from the
        # start of a run until its teardown is complete: never two runs in one directory,
        # even when the domain was undefined and defined again in between.
        self._run_dirs: dict[str, Domain] = {}
        self._last_id = 0

    # --- everything below: caller holds self.lock (rule L1) ---------------------------------

    def find(self, ident: str) -> Domain:
        """By name, then uuid, then (for a bare number) running id, as virsh resolves names."""
        dom = self._by_name.get(ident) or self._by_uuid.get(ident.lower())
        if dom is None and looks_like_id(ident):
            dom = self._by_id.get(int(ident))
        if dom is None:
            raise NoDomainError(f"domain '{ident}' not found")
        return dom

    def get_name(self, name: str) -> Domain | None:
        return self._by_name.get(name)

    def get_uuid(self, uuid: str) -> Domain | None:
        return self._by_uuid.get(uuid)

    def add(self, dom: Domain) -> None:
        """Reserve the table slot for a new domain (its name and uuid are taken from now on).
        ValueError if either is taken (the caller checked; a duplicate on disk is reported)."""
        if dom.name in self._by_name:
            raise ValueError(f"domain name '{dom.name}' is already used")
        if dom.uuid in self._by_uuid:
            raise ValueError(f"uuid {dom.uuid} is already used by domain "
                             f"'{self._by_uuid[dom.uuid].name}'")
        self._by_name[dom.name] = dom
        self._by_uuid[dom.uuid] = dom

    def remove(self, dom: Domain) -> None:
        """Drop `dom` (the caller has released its domain lock first, rule L1)."""
        if self._by_name.get(dom.name) is dom:
            del self._by_name[dom.name]
        if self._by_uuid.get(dom.uuid) is dom:
            del self._by_uuid[dom.uuid]
        for dom_id in [i for i, d in self._by_id.items() if d is dom]:
            del self._by_id[dom_id]
        dom.removed = True

    def assign_id(self, dom: Domain) -> int:
        self._last_id += 1
        self._by_id[self._last_id] = dom
        return self._last_id

    def adopt_id(self, dom: Domain, dom_id: int) -> None:
        """Index the id a running domain had before a daemon restart; new ids come after."""
        self._by_id[dom_id] = dom
        self._last_id = max(self._last_id, dom_id)

    def release_id(self, dom: Domain, dom_id: int) -> None:
        if self._by_id.get(dom_id) is dom:
            del self._by_id[dom_id]

    def claim_run_dir(self, dom: Domain) -> None:
        """Reserve the run directory of `dom`'s name for a new run."""
        holder = self._run_dirs.get(dom.name)
        if holder is not None and holder is not dom:
            raise DomainBusyError(
                f"domain '{dom.name}': the previous run under this name (uuid {holder.uuid}) "
                "is still being cleaned up; try again in a moment")
        if holder is dom:
            raise DomainBusyError(f"domain '{dom.name}': its previous run is still being "
                                  "cleaned up; try again in a moment")
        self._run_dirs[dom.name] = dom

    def release_run_dir(self, dom: Domain) -> None:
        if self._run_dirs.get(dom.name) is dom:
            del self._run_dirs[dom.name]

    def all(self) -> list[Domain]:
        return list(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)
