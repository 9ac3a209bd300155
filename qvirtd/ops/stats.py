"""`domstats`: the state, CPU time, memory, block and network counters of every running
domain in one call (libvirt's getAllDomainStats), never waiting for a QEMU that does not
answer.

* What the host knows is read for all domains at once, in one worker thread (L6): CPU time
  and process state from /proc/PID/stat, resident memory from /proc/PID/statm, and a tap
  NIC's counters from /sys/class/net/IFNAME/statistics (seen from the guest: the host's
  receive is the guest's transmit). A user-mode NIC has no counters QEMU 7.2 can give
  (reported as null); a bridge NIC's tap is named by QEMU's helper, not by us (null too).
* Block counters come from QEMU (`query-blockstats`), asked of every domain at once, each
  under a QUERY job taken without waiting (libvirt's "nowait" stats job). A domain whose job
  slot is busy, whose QEMU is stopped (process state T: SIGSTOP, a debugger) or that has not
  answered within `stats_timeout_s` gets its last block counters, marked `stale` with their
  age and why. A query that is late goes on in the background, owned by the run (it ends
  with it), and refreshes the cache when QEMU answers; while it is out, no second one is
  sent, so a hung QEMU costs the others nothing after its first call.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..domain import Domain
from ..errors import JobTimeoutError, QvirtError
from ..job import JobKind
from ..qemu.process import proc_stat
from ..run import Run
from .context import Context

TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
NET_COUNTERS = ("rx_bytes", "rx_packets", "tx_bytes", "tx_packets")


@dataclass
class _Host:
    """What /proc and /sys say of one QEMU."""

    state: str | None = None  # R, S, D, T (stopped), Z; None: gone
    cpu_time_ns: int | None = None
    rss_kib: int | None = None


def _read_host(pid: int) -> _Host:
    """Blocking (call off the loop): one QEMU's CPU time, state and resident memory."""
    fields = proc_stat(pid)
    if fields is None:
        return _Host()
    try:
        statm = Path(f"/proc/{pid}/statm").read_bytes()
    except OSError:
        return _Host()
    return _Host(fields[0].decode(), (int(fields[11]) + int(fields[12])) * TICK_NS,
                 int(statm.split()[1]) * PAGE_KIB)


def _tap_counters(ifname: str) -> dict[str, int | None]:
    """Blocking: a tap's counters as the guest sees them (host rx is guest tx)."""
    base = Path("/sys/class/net") / ifname / "statistics"
    host: dict[str, int | None] = {}
    for name in NET_COUNTERS:
        try:
            host[name] = int((base / name).read_text())
        except (OSError, ValueError):
            host[name] = None
    return {"rx_bytes": host["tx_bytes"], "rx_packets": host["tx_packets"],
            "tx_bytes": host["rx_bytes"], "tx_packets": host["rx_packets"]}


def _read_all(pids: list[int], taps: list[str]) -> tuple[dict[int, _Host],
                                                          dict[str, dict[str, int | None]]]:
    return ({pid: _read_host(pid) for pid in pids},
            {name: _tap_counters(name) for name in taps})


@dataclass
class _Entry:
    """One running domain, as it was when the call looked (under its lock)."""

    dom: Domain
    run: Run
    pid: int
    out: dict[str, Any]


class Stats:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def domstats(self, names: list[str], owner: str) -> dict[str, Any]:
        ctx = self.ctx
        async with ctx.table.lock:  # L1: look up only
            doms = [ctx.table.find(n) for n in names] if names else ctx.table.all()
        entries: list[_Entry] = []
        quiet: list[dict[str, Any]] = []  # named, but not running
        for dom in doms:
            async with dom.lock:  # L3: a snapshot of the run
                run, pid = dom.run, dom.run.pid if dom.run is not None else None
                out: dict[str, Any] = {"name": dom.name, "uuid": dom.uuid, "state": str(dom.state),
                       "reason": str(dom.reason)}
                if run is None or pid is None:
                    if names:
                        quiet.append(out)
                    continue
                d = run.definition
                out["vcpus"] = d.vcpus
                balloon = run.balloon_actual_bytes
                out["memory"] = {"max_mib": d.memory_mib,
                                 "balloon_mib": balloon // 2**20 if balloon else None}
                out["net"] = [{"id": nic.id, "backend": nic.backend,
                               "ifname": nic.ifname if nic.backend == "tap" else None}
                              for nic in d.nics]
                entries.append(_Entry(dom, run, pid, out))
        taps = sorted({n["ifname"] for e in entries for n in e.out["net"] if n["ifname"]})
        host, tap_counters = await asyncio.to_thread(_read_all, [e.pid for e in entries], taps)
        # Why no query was sent (None: one is out, this call's or an earlier one's).
        why: dict[str, str | None] = {}
        waiting: dict[str, asyncio.Task[None]] = {}
        for e in entries:
            why[e.dom.name] = self._ask(e, host[e.pid].state, owner, waiting)
        if waiting:
            await asyncio.wait(waiting.values(), timeout=ctx.settings.stats_timeout_s)
        now = time.monotonic()
        for e in entries:
            h = host[e.pid]
            e.out["cpu_time_ns"] = h.cpu_time_ns
            e.out["memory"]["rss_kib"] = h.rss_kib
            for nic in e.out["net"]:
                counters = tap_counters.get(nic["ifname"]) if nic["ifname"] else None
                nic.update(counters or dict.fromkeys(NET_COUNTERS))
            stale = why[e.dom.name]
            task = e.run.stats_query
            if stale is None and task is not None and not task.done():
                stale = (f"QEMU did not answer within {ctx.settings.stats_timeout_s:g} s"
                         if e.dom.name in waiting else
                         "QEMU has not answered the previous call's query yet")
            elif stale is None:
                stale = e.run.stats_error
            e.out["block"] = e.run.block_stats
            e.out["stale"] = stale is not None
            if stale is not None:
                e.out["stale_reason"] = stale
                e.out["block_age_s"] = (round(now - e.run.block_stats_at, 3)
                                        if e.run.block_stats_at is not None else None)
        domains = [e.out for e in entries] + quiet
        domains.sort(key=lambda d: d["name"])
        return {"domains": domains}

    def _ask(self, e: _Entry, state: str | None, owner: str,
             waiting: dict[str, asyncio.Task[None]]) -> str | None:
        """Send the run's block-stats query (into `waiting`, for this call to wait for), or
        say why none is sent. One still out from an earlier call is not waited for again
        (None, not in `waiting`): that QEMU did not answer then."""
        run, dom = e.run, e.dom
        if state in ("T", "t"):  # its answer could not come before SIGCONT
            return "QEMU is stopped (SIGSTOP or a debugger)"
        if run.stats_query is not None and not run.stats_query.done():
            return None
        if run.starting or run.monitor is None or run.monitor.closed:
            return "the domain is starting (or its monitor is not connected)"
        if dom.lock.locked() or not dom.job.can_start_now(JobKind.QUERY):
            return f"busy: {dom.job.holder()}"
        run.stats_query = self.ctx.spawn(self._query(dom, run, owner),
                                         f"domstats-{dom.name}", run)
        waiting[dom.name] = run.stats_query
        return None

    async def _query(self, dom: Domain, run: Run, owner: str) -> None:
        """One `query-blockstats` under a QUERY job taken without waiting; the answer goes
        to the run's cache."""
        ctx = self.ctx
        try:
            async with ctx.job(dom, JobKind.QUERY, owner, timeout_s=0.0):
                reply = await ctx.qmp(dom, run, "query-blockstats", what="domstats")
        except JobTimeoutError as exc:
            run.stats_error = f"busy: {exc}"
            return
        except QvirtError as exc:
            run.stats_error = str(exc)
            return
        block: list[dict[str, Any]] = []
        for item in reply if isinstance(reply, list) else ():
            node = str(item.get("node-name") or "")
            device = node.removeprefix("fmt-") if node.startswith("fmt-") else \
                str(item.get("qdev") or item.get("device") or node)
            stats = item.get("stats") or {}
            block.append({"id": device,
                          "rd_bytes": stats.get("rd_bytes"), "wr_bytes": stats.get("wr_bytes"),
                          "rd_reqs": stats.get("rd_operations"),
                          "wr_reqs": stats.get("wr_operations"),
                          "flush_reqs": stats.get("flush_operations")})
        block.sort(key=lambda b: str(b["id"]))
        run.block_stats, run.block_stats_at, run.stats_error = block, time.monotonic(), None

