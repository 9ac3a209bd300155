"""`migrate --copy-storage`: the disks go with the guest, so the two daemons need not share
them (and may keep them at different paths).

Destination (before its QEMU starts): each writable disk is at the path of the domain's own
definition there if it has one (matched by disk id), else at the source's path; an image
that is missing is created (qemu-img, the source's format and virtual size), one that is the
source's own file is refused (a copy onto itself). Its incoming QEMU then serves those disks
over NBD (runtime.receive_migration; the server stops before the guest resumes there).

Source: each writable disk gets a temporary NBD client node `mig-ID` and a `blockdev-mirror`
job `mig-ID` (sync full) into it; once every job is READY (the copy has caught up and now
mirrors every write) the RAM stream starts; at pre-switchover, with the guest paused, each
job is cancelled, which for a READY mirror means "complete without switching to the copy",
and the stream goes on. Afterwards, or on any failure, the jobs are cancelled and the nodes
deleted: the temporary nodes never outlive the migration (a restarted daemon removes them
in its undo: the job's status record names them).
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

from ..domain import Domain
from ..errors import InvalidOperationError, QvirtError, StorageError
from ..job import AsyncJob
from ..model import DomainDef
from ..run import Run
from .context import Context
from .qemu_migration import TLS_OBJECT

log = logging.getLogger(__name__)

POLL_S = 0.2


def writable_disks(definition: DomainDef) -> list[str]:
    return [d.id for d in definition.disks if not d.readonly]


async def describe(ctx: Context, dom: Domain, run: Run) -> dict[str, dict[str, Any]]:
    """Source: the disks to copy, {id: {path, format, size}} (size: QEMU's virtual size)."""
    nodes = await ctx.qmp(dom, run, "query-named-block-nodes", {"flat": True},
                          what="migrate (storage)")
    sizes = {n.get("node-name"): (n.get("image") or {}).get("virtual-size") for n in nodes}
    out = {}
    for disk in run.definition.disks:
        if disk.readonly:
            continue
        size = sizes.get(f"fmt-{disk.id}")
        if not isinstance(size, int):
            raise InvalidOperationError(f"domain '{dom.name}': QEMU does not report the size "
                                        f"of disk '{disk.id}'")
        out[disk.id] = {"path": disk.path, "format": disk.format, "size": size}
    return out


def _target(path: Path, source: dict[str, Any]) -> bool:
    """Blocking: make sure `path` can receive the copy; True if it was created here."""
    if path.exists():
        try:
            if os.path.samefile(path, str(source.get("path", ""))):
                raise InvalidOperationError(
                    f"--copy-storage would copy disk {path} onto itself (both daemons use "
                    "that file): migrate without --copy-storage, or define the domain on the "
                    "destination with its own disk paths")
        except FileNotFoundError:
            pass
        return False
    fmt = str(source.get("format", "raw"))
    if fmt not in ("raw", "qcow2"):
        raise InvalidOperationError(f"disk format {fmt!r} cannot be created here")
    res = subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path),
                          str(int(source["size"]))], capture_output=True, text=True,
                         timeout=60, check=False)
    if res.returncode != 0:
        raise StorageError(f"cannot create {path} for the copied disk: "
                           f"{res.stderr.strip() or res.returncode}")
    return True


async def place_disks(definition: DomainDef, local: DomainDef | None,
                      disks: dict[str, dict[str, Any]]) -> tuple[DomainDef, list[Path]]:
    """Destination: the live definition with each copied disk at its path here (created
    if missing, off the loop); and the images created (removed again if the migration
    fails)."""
    mine = {d.id: d.path for d in local.disks} if local is not None else {}
    data = definition.model_dump(mode="json")
    created: list[Path] = []
    try:
        for disk in data["disks"]:
            source = disks.get(disk["id"])
            if source is None or disk.get("readonly"):
                continue
            disk["path"] = mine.get(disk["id"], disk["path"])
            if await asyncio.to_thread(_target, Path(disk["path"]), source):
                created.append(Path(disk["path"]))
    except BaseException:
        await remove_images(created)
        raise
    return DomainDef.model_validate(data), created


async def remove_images(paths: list[Path]) -> None:
    for path in paths:
        try:
            await asyncio.to_thread(path.unlink)
        except OSError as exc:
            log.warning("could not remove %s (created for a migration that failed): %s",
                        path, exc)


def nbd_client(prepared: dict[str, Any], tls_host: str | None) -> dict[str, Any]:
    """Source: how its NBD client nodes reach the destination's server (the `server` and
    TLS options of blockdev-add), from the destination's prepare answer."""
    if tls_host is None:
        return {"server": {"type": "unix", "path": str(prepared["nbd"])}}
    return {"server": {"type": "inet", "host": tls_host, "port": str(prepared["nbd_port"])},
            "tls-creds": TLS_OBJECT, "tls-hostname": tls_host}


async def mirror(ctx: Context, dom: Domain, run: Run, job: AsyncJob, where: dict[str, Any],
                 exports: list[str], progress: Any) -> None:
    """Source: start a mirror of each disk into the destination's NBD export (`where`:
    nbd_client()) and wait until all are READY (abortable)."""
    for disk in exports:
        await ctx.qmp(dom, run, "blockdev-add",
                      {"driver": "nbd", "node-name": f"mig-{disk}", "export": disk, **where},
                      what="migrate (storage)")
        await ctx.qmp(dom, run, "blockdev-mirror",
                      {"job-id": f"mig-{disk}", "device": f"fmt-{disk}",
                       "target": f"mig-{disk}", "sync": "full"}, what="migrate (storage)")
    while True:
        jobs = {j["device"]: j for j in await job.abortable(
            ctx.qmp(dom, run, "query-block-jobs", what="migrate (storage)"))}
        mine = [jobs.get(f"mig-{d}") for d in exports]
        if any(j is None for j in mine):
            raise QvirtError(f"domain '{dom.name}': a disk copy stopped before it caught up")
        done = sum(int(j["offset"]) for j in mine if j)
        total = sum(int(j["len"]) for j in mine if j)
        shown = {"status": "copying disks", "disk_transferred_bytes": done,
                 "disk_total_bytes": total}
        async with dom.lock:  # L3: domjobinfo reads it
            ctx.ensure_current(dom, run, "migrate (storage)")
            job.progress = shown
        if progress is not None:
            progress({"name": dom.name, **shown})
        if all(j and j.get("ready") for j in mine):
            return
        await job.abortable(asyncio.sleep(POLL_S))


async def complete(ctx: Context, dom: Domain, run: Run, exports: list[str]) -> None:
    """Source, at pre-switchover (the guest paused): finish each mirror without switching
    to the copy, and wait until the jobs are gone."""
    for disk in exports:
        await ctx.qmp(dom, run, "block-job-cancel", {"device": f"mig-{disk}"},
                      what="migrate (storage)")
    await _wait_gone(ctx, dom, run, exports)


async def _wait_gone(ctx: Context, dom: Domain, run: Run, exports: list[str]) -> None:
    wanted = {f"mig-{d}" for d in exports}
    deadline = asyncio.get_running_loop().time() + ctx.settings.monitor_timeout_s * 3
    while True:
        jobs = await ctx.qmp(dom, run, "query-block-jobs", what="migrate (storage)")
        if not wanted & {j["device"] for j in jobs}:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise QvirtError(f"domain '{dom.name}': the disk copies did not finish")
        await asyncio.sleep(0.05)


async def clean_up(ctx: Context, dom: Domain, run: Run, exports: list[str]) -> None:
    """Source, after the migration or its failure: no mirror job or NBD node is left in
    QEMU (errors logged: this is an undo)."""
    try:
        jobs = {j["device"] for j in await ctx.qmp(dom, run, "query-block-jobs",
                                                   what="migrate (clean-up)")}
        for disk in exports:
            if f"mig-{disk}" in jobs:
                await ctx.qmp(dom, run, "block-job-cancel",
                              {"device": f"mig-{disk}", "force": True},
                              what="migrate (clean-up)")
        await _wait_gone(ctx, dom, run, exports)
        nodes = {n.get("node-name") for n in await ctx.qmp(
            dom, run, "query-named-block-nodes", {"flat": True}, what="migrate (clean-up)")}
        for disk in exports:
            if f"mig-{disk}" in nodes:
                await ctx.qmp(dom, run, "blockdev-del", {"node-name": f"mig-{disk}"},
                              what="migrate (clean-up)")
    except QvirtError as exc:
        log.warning("domain %s: removing the disk copies' nodes: %s", dom.name, exc)
