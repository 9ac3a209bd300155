"""Driving QEMU's migration stream, for a save (to a file), a restore (from one) and, next, a
live migration: capabilities, the wait for the end with progress, cancel.

Every wait is the enter/exit monitor pattern (rule L4: no lock held), is abortable by
`domjobabort` (the async job's `abortable()`), and ends: QEMU's MIGRATION events say when
the stream is done, `query-migrate` is polled between them for the progress `domjobinfo`
shows, and an outgoing stream whose byte count does not move for `migration_stall_timeout_s`
fails (a frozen QEMU fails sooner: its `query-migrate` times out).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from ..domain import Domain
from ..errors import DomainGoneError, MonitorClosedError, QvirtError
from ..job import AsyncJob
from ..model import DomainState, Reason
from ..run import Run
from ..tls import qemu_creds
from .context import Context

log = logging.getLogger(__name__)

POLL_S = 0.5  # how often progress is read while the stream runs
FINAL = frozenset({"completed", "failed", "cancelled"})


class MigrationFailedError(QvirtError):
    """QEMU said the migration stream failed (its own words are in the message)."""

    kind = "migration"


def progress(info: dict[str, Any]) -> dict[str, Any]:
    """`query-migrate`'s answer as `domjobinfo` shows it."""
    ram = info.get("ram") or {}
    out: dict[str, Any] = {"status": info.get("status")}
    for key, name in (("transferred", "ram_transferred_bytes"),
                      ("remaining", "ram_remaining_bytes"), ("total", "ram_total_bytes"),
                      ("dirty-pages-rate", "dirty_pages_rate"), ("mbps", "mbps"),
                      ("dirty-sync-count", "iterations")):
        if key in ram:
            out[name] = ram[key]
    for key, name in (("expected-downtime", "expected_downtime_ms"),
                      ("downtime", "downtime_ms"), ("total-time", "total_time_ms"),
                      ("setup-time", "setup_time_ms")):
        if key in info:
            out[name] = info[key]
    disk = info.get("disk")
    if disk:
        out["disk_transferred_bytes"] = disk.get("transferred")
        out["disk_remaining_bytes"] = disk.get("remaining")
    return out


async def _final(ctx: Context, dom: Domain, run: Run, info: dict[str, Any],
                 what: str) -> dict[str, Any]:
    """QEMU says "completed" a moment before it has computed the stream's total time and
    downtime (they read 0 meanwhile): ask again, briefly, for the real figures."""
    for _ in range(20):
        if info.get("total-time"):
            break
        await asyncio.sleep(0.02)
        info = await ctx.qmp(dom, run, "query-migrate", what=what)
    return info


async def set_capabilities(ctx: Context, dom: Domain, run: Run, caps: dict[str, bool],
                           what: str) -> None:
    await ctx.qmp(dom, run, "migrate-set-capabilities",
                  {"capabilities": [{"capability": k, "state": v} for k, v in caps.items()]},
                  what=what)


UNLIMITED_BYTES_S = 1 << 40  # QEMU's own default is 128 MiB/s: far too slow for a file


async def set_bandwidth(ctx: Context, dom: Domain, run: Run, mib_s: float, what: str) -> None:
    """The stream's rate limit: `mib_s` MiB/s, or none for 0."""
    rate = int(mib_s * 1024 * 1024) if mib_s > 0 else UNLIMITED_BYTES_S
    await ctx.qmp(dom, run, "migrate-set-parameters", {"max-bandwidth": rate}, what=what)


async def wait_done(ctx: Context, dom: Domain, run: Run, job: AsyncJob, what: str,
                    outgoing: bool = True,
                    on_status: dict[str, Any] | None = None,
                    on_poll: Any = None) -> dict[str, Any]:
    """Wait (no lock held) until the run's migration stream is completed; return the final
    `query-migrate` (as `progress()`). MigrationFailedError if QEMU says it failed or was
    cancelled, JobAbortedError on `domjobabort`. `on_status`: status name -> coroutine
    function awaited when QEMU reports that status (pre-switchover, for a migration);
    `on_poll`: a coroutine function given each progress reading."""
    monitor = run.monitor
    if monitor is None:
        raise MonitorClosedError(f"domain '{dom.name}': the QEMU monitor is not connected")
    stall_s = ctx.settings.migration_stall_timeout_s
    last_moved = time.monotonic()
    last_bytes = -1
    seen: set[str] = set()
    with monitor.listen(["MIGRATION"]) as listener:
        while True:
            info = await job.abortable(ctx.qmp(dom, run, "query-migrate", what=what))
            status = str(info.get("status", "none"))
            if status == "completed" and outgoing:
                info = await _final(ctx, dom, run, info, what)
            shown = progress(info)
            async with dom.lock:  # L3: domjobinfo reads it
                ctx.ensure_current(dom, run, what)
                job.progress = shown
            if on_poll is not None:
                await on_poll(shown)
            if status == "completed":
                return shown
            if status in ("failed", "cancelled"):
                raise MigrationFailedError(
                    f"domain '{dom.name}': {what} failed: QEMU reports the migration stream "
                    f"{status}" + (f" ({info['error-desc']})" if info.get("error-desc") else ""))
            if on_status and status in on_status and status not in seen:
                seen.add(status)
                await on_status[status]()
                continue
            if outgoing:
                moved = int(shown.get("ram_transferred_bytes", 0)) + int(
                    shown.get("disk_transferred_bytes") or 0)
                now = time.monotonic()
                if moved != last_bytes:
                    last_bytes, last_moved = moved, now
                elif now - last_moved > stall_s:
                    raise MigrationFailedError(
                        f"domain '{dom.name}': {what} failed: the migration stream has not "
                        f"moved for {stall_s:g} s (status {status})")
            with contextlib.suppress(TimeoutError):
                await job.abortable(listener.get(POLL_S))


TLS_OBJECT = "mig-tls"


async def use_tls(ctx: Context, dom: Domain, run: Run, endpoint: str,
                  hostname: str | None) -> None:
    """The stream over TLS with the daemons' certificates (`tls_dir`): QEMU's x509
    credentials object, named in the migration parameters. `drop_tls` removes both."""
    await ctx.qmp(dom, run, "object-add",
                  qemu_creds(TLS_OBJECT, Path(ctx.settings.tls_dir), endpoint),
                  what="migration (tls)")
    params: dict[str, Any] = {"tls-creds": TLS_OBJECT}
    if hostname is not None:
        params["tls-hostname"] = hostname
    await ctx.qmp(dom, run, "migrate-set-parameters", params, what="migration (tls)")


async def drop_tls(ctx: Context, dom: Domain, run: Run) -> None:
    """Nothing of the migration's TLS stays in QEMU (errors logged: an undo)."""
    try:
        objects = await ctx.qmp(dom, run, "qom-list", {"path": "/objects"},
                                what="migration (tls)")
        if not any(o.get("name") == TLS_OBJECT for o in objects):
            return
        await ctx.qmp(dom, run, "migrate-set-parameters", {"tls-creds": "",
                                                           "tls-hostname": ""},
                      what="migration (tls)")
        await ctx.qmp(dom, run, "object-del", {"id": TLS_OBJECT}, what="migration (tls)")
    except QvirtError as exc:
        log.warning("domain %s: removing the migration's TLS credentials: %s", dom.name, exc)


async def resume_guest(ctx: Context, dom: Domain, run: Run, what: str, reason: Reason,
                       detail: str) -> bool:
    """`cont` after an undone save or migration, and the state that goes with it (event
    resumed/`detail`). False if QEMU did not do it (logged); True if the run is gone."""
    try:
        await ctx.qmp(dom, run, "cont", what=what)
        async with dom.lock:  # L5
            ctx.ensure_current(dom, run, what)
            ctx.set_state(dom, DomainState.RUNNING, reason, ("resumed", detail))
        return True
    except DomainGoneError:
        return True  # nothing left to resume
    except QvirtError as exc:
        log.error("domain %s: could not resume the guest (%s): %s", dom.name, what, exc)
        return False


async def cancel(ctx: Context, dom: Domain, run: Run, what: str) -> bool:
    """Ask QEMU to stop an outgoing stream and wait (bounded) until it has: after this the
    source QEMU may be resumed. False if QEMU did not confirm (frozen, busy); errors are
    logged, not raised (this is an undo)."""
    try:
        await ctx.qmp(dom, run, "migrate_cancel", what=what)
        deadline = time.monotonic() + ctx.settings.monitor_timeout_s
        while time.monotonic() < deadline:
            info = await ctx.qmp(dom, run, "query-migrate", what=what)
            if str(info.get("status", "none")) in FINAL | {"none"}:
                return True
            await asyncio.sleep(0.05)
        log.warning("domain %s: the migration stream did not stop within %.0f s of "
                    "migrate_cancel", dom.name, ctx.settings.monitor_timeout_s)
    except QvirtError as exc:
        log.warning("domain %s: cancelling the migration stream: %s", dom.name, exc)
    return False
