"""Live migration between two qvirtd daemons: seed 000's "coordinating with a remote server".

The source runs a MIGRATION_OUT async job (queries, destroy and domjobabort may run beside
it); every call to the destination goes through `ctx.remote()` (no lock held, the domain
re-checked afterwards). The destination's side is a START job that receives the guest
(runtime.launch with an `IncomingMigration`). The steps, libvirt's v3 protocol in short:

    source                                   destination
    begin    status: job recorded
    prepare  migrate-prepare ------------->  a QEMU with the same devices, -incoming defer,
                                             migrate-incoming unix:RUN/migrate.sock
                                             (phase incoming) <- its URI
    perform  migrate (events and pause-before-switchover capabilities): the guest runs
             here while RAM is copied; at pre-switchover QEMU pauses the guest, the
             daemon says migrate-continue; "completed": this QEMU is paused for good
                                             QEMU has loaded the guest (phase loaded)
    finish   migrate-finish resume -------->  cont only now; running, reason migrated
    confirm  this QEMU stops: shut off, reason migrated

Who may resume the guest: the destination only after the source's `migrate-finish resume`,
the source only when it knows the destination never will: before `finish`, or when the
destination answers the finish with "no such migration". A finish without an answer (the
destination unreachable, its daemon restarting) leaves the source paused and asking again
(`run.outgoing`, kept in the status file, retried by a task of the run) until it answers:
never two running guests, and the guest is never dropped. docs/design.md has the table for
a daemon killed at each phase.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .. import savefile
from ..cloudinit import run_files
from ..domain import Domain
from ..errors import (
    DomainGoneError,
    InvalidOperationError,
    NoDomainError,
    QvirtError,
    describe_validation_error,
)
from ..job import AsyncJob, AsyncJobKind
from ..locks import check_no_locks
from ..model import DomainDef, DomainState, Reason
from ..peer import Peer, PeerError, PeerRefusedError, parse_uri
from ..run import Run
from ..savefile import SaveHeader
from ..status import JobRecord
from . import qemu_migration, storage_copy
from .context import Context
from .runtime import Incoming, IncomingMigration, Runtime
from .saves import domain_for

log = logging.getLogger(__name__)

NO_MIGRATION = "no-migration"   # the destination's definite "nothing of that migration here"
KEEPALIVE_S = 30.0              # the source pings the destination this often meanwhile
FINISH_RETRY_S = (1.0, 30.0)    # an unanswered finish is asked again, backing off


class NoMigrationError(InvalidOperationError):
    """The destination has nothing of this migration (never prepared, or rolled back)."""

    kind = NO_MIGRATION


Progress = Callable[[dict[str, Any]], None]


class Migration:
    def __init__(self, ctx: Context, runtime: Runtime) -> None:
        self.ctx = ctx
        self.runtime = runtime
        # Destination: incoming migrations whose START job is running, by token.
        self._incoming: dict[str, tuple[IncomingMigration, asyncio.Task[None]]] = {}

    # === the source ===========================================================================

    async def migrate(self, ident: str, dest: str, owner: str, persistent: bool = False,
                      undefine_source: bool = False, max_downtime_ms: int | None = None,
                      bandwidth_mib_s: float | None = None,
                      progress: Progress | None = None,
                      copy_storage: bool = False) -> dict[str, Any]:
        ctx = self.ctx
        parse_uri(dest)  # a bad URI is refused before anything is done
        dom = await ctx.lookup(ident)
        async with ctx.async_job(dom, AsyncJobKind.MIGRATION_OUT, owner) as job:
            async with dom.lock:  # L3
                run = ctx.running(dom)
                if run.starting:
                    raise InvalidOperationError(f"domain '{dom.name}' is still starting")
                if run.outgoing is not None:
                    raise InvalidOperationError(f"domain '{dom.name}' is waiting for the "
                                                f"answer of {run.outgoing['dest']}")
                was_running = dom.state is DomainState.RUNNING
                token = secrets.token_hex(8)
                job.data = {"dest": dest, "token": token, "was_running": was_running}
                ctx.save_status(dom, run)
                header = SaveHeader(name=dom.name, uuid=dom.uuid, definition=run.definition,
                                    ports=dict(run.ports), root_ports=run.root_ports,
                                    accel=run.accel, was_running=was_running,
                                    saved_at=savefile.now_iso(), saved_by=owner)
                source_persistent = dom.persistent_def
            await ctx.status_barrier(run)
            header.files = savefile.encode_files(
                await asyncio.to_thread(run_files, run.run_dir, run.definition))
            log.info("domain %s: migration to %s asked by %s%s", dom.name, dest, owner,
                     " (with its disks)" if copy_storage else "")
            started = time.monotonic()
            peer: Peer | None = None
            disks: dict[str, dict[str, Any]] | None = None
            try:
                if copy_storage:
                    disks = await storage_copy.describe(ctx, dom, run)
                    async with dom.lock:  # L3: the undo (here or after a restart) cleans up
                        ctx.ensure_current(dom, run, "migrate")
                        job.data["mirror"] = list(disks)
                        ctx.save_status(dom, run)
                async with ctx.remote(dom, run, "migrate (connect)"):
                    peer = await job.abortable(Peer.connect(
                        dest, ctx.settings.peer_timeout_s, Path(ctx.settings.tls_dir)))
                await self.runtime.enter_phase(dom, run, job, "prepare")
                async with ctx.remote(dom, run, "migrate (prepare)"):
                    prepared = await job.abortable(peer.call("migrate-prepare", {
                        "header": header.model_dump(mode="json"), "token": token,
                        "paused": not was_running,
                        "persistent": persistent and source_persistent is not None,
                        "definition": (source_persistent.model_dump(mode="json")
                                       if persistent and source_persistent else None),
                        "disks": disks,
                        "transport": "tls" if peer.tls_host else "unix"}))
                await self.runtime.enter_phase(dom, run, job, "perform")
                final = await self._perform(dom, run, job, peer, prepared,
                                            max_downtime_ms, bandwidth_mib_s, progress)
                if disks:
                    await storage_copy.clean_up(ctx, dom, run, list(disks))
                if peer.tls_host is not None:
                    await qemu_migration.drop_tls(ctx, dom, run)
            except BaseException as exc:
                # The destination may hold a QEMU of this migration once prepare was sent.
                sent = job.phase in ("prepare", "perform")
                await asyncio.shield(self._undo(dom, run, peer, token, was_running,
                                                f"{exc}", list(disks or ()),
                                                dest if sent else None))
                if peer is not None:
                    await peer.close()
                raise
            # Complete: this QEMU is paused for good. From here only the destination may
            # resume the guest, once told: record that before telling it.
            async with dom.lock:  # L5
                ctx.ensure_current(dom, run, "migrate")
                job.set_phase("finish")
                run.outgoing = {"dest": dest, "token": token, "was_running": was_running}
                ctx.save_status(dom, run)
            await ctx.status_barrier(run)
            try:
                answer = await self._finish(dom, run, peer, token, was_running)
            finally:
                await peer.close()
            if answer is None:  # unknown: stay paused, keep asking (a task of the run)
                ctx.spawn(self._keep_finishing(dom, run), f"migrate-finish-{dom.name}", run)
                raise PeerError(f"domain '{dom.name}': the migration to {dest} is complete "
                                "but the destination did not confirm it resumed the guest; "
                                "the guest stays paused here and the daemon keeps asking")
            if answer is False:  # the destination has nothing: the guest goes on here
                await self._resume_here(dom, run, "the destination rolled the migration back")
                raise QvirtError(f"domain '{dom.name}': the destination {dest} rolled the "
                                 "migration back; the guest runs here again")
            await self._confirm(dom, run, job, undefine_source, owner)
        took = time.monotonic() - started
        log.info("domain %s: migrated to %s in %.2f s (downtime %s ms)", dom.name, dest, took,
                 final.get("downtime_ms"))
        return {"name": dom.name, "dest": dest, "elapsed_s": round(took, 3), **final}

    async def _perform(self, dom: Domain, run: Run, job: AsyncJob, peer: Peer,
                       prepared: dict[str, Any], max_downtime_ms: int | None,
                       bandwidth_mib_s: float | None,
                       progress: Progress | None) -> dict[str, Any]:
        ctx = self.ctx
        uri = str(prepared["uri"])
        if peer.tls_host is not None:  # QEMU to QEMU over TCP, with the daemons' certificates
            await qemu_migration.use_tls(ctx, dom, run, "client", peer.tls_host)
            uri = f"tcp:{peer.tls_host}:{int(prepared['port'])}"
        exports = [str(e) for e in prepared.get("exports") or ()]
        if exports:  # --copy-storage: the disks first, mirrored until the switch-over
            await storage_copy.mirror(ctx, dom, run, job,
                                      storage_copy.nbd_client(prepared, peer.tls_host),
                                      exports, progress)
        await qemu_migration.set_capabilities(
            ctx, dom, run, {"events": True, "pause-before-switchover": True}, "migrate")
        params: dict[str, Any] = {"max-bandwidth": qemu_migration.UNLIMITED_BYTES_S
                                  if not bandwidth_mib_s else int(bandwidth_mib_s * 2**20)}
        if max_downtime_ms is not None:
            params["downtime-limit"] = max_downtime_ms
        await ctx.qmp(dom, run, "migrate-set-parameters", params, what="migrate")
        async with dom.lock:  # L3: the STOP QEMU sends at switchover is the migration's
            ctx.ensure_current(dom, run, "migrate")
            run.pause_hint = Reason.MIGRATING
        last_ping = time.monotonic()

        async def switchover() -> None:
            if exports:  # the guest is paused: the mirrors converge and end
                await storage_copy.complete(ctx, dom, run, exports)
            await ctx.qmp(dom, run, "migrate-continue", {"state": "pre-switchover"},
                          what="migrate")

        async def polled(shown: dict[str, Any]) -> None:
            nonlocal last_ping
            if progress is not None:
                progress({"name": dom.name, **shown})
            if time.monotonic() - last_ping > KEEPALIVE_S:  # the peer's idle timeout
                last_ping = time.monotonic()
                async with ctx.remote(dom, run, "migrate (keepalive)"):
                    await peer.call("domjobinfo", {"name": dom.uuid})

        await ctx.qmp(dom, run, "migrate", {"uri": uri}, what="migrate")
        return await qemu_migration.wait_done(ctx, dom, run, job, "migrate",
                                              on_status={"pre-switchover": switchover},
                                              on_poll=polled)

    async def _finish(self, dom: Domain, run: Run, peer: Peer | None, token: str,
                      was_running: bool) -> bool | None:
        """Tell the destination to resume the guest. True: it runs there; False: the
        destination has nothing of this migration; None: no answer (unknown)."""
        ctx = self.ctx
        dest = run.outgoing["dest"] if run.outgoing else "?"
        own = peer is None
        try:
            if peer is None:
                async with ctx.remote(dom, run, "migrate (connect)"):
                    peer = await Peer.connect(dest, ctx.settings.peer_timeout_s,
                                              Path(ctx.settings.tls_dir))
            async with ctx.remote(dom, run, "migrate (finish)"):
                await peer.call("migrate-finish", {"name": dom.uuid, "token": token,
                                                   "action": "resume",
                                                   "paused": not was_running})
            return True
        except PeerRefusedError as exc:
            if exc.peer_kind == NO_MIGRATION:
                log.warning("domain %s: %s", dom.name, exc)
                return False
            log.error("domain %s: the destination's finish failed: %s", dom.name, exc)
            return None
        except PeerError as exc:
            log.error("domain %s: no answer to the finish: %s", dom.name, exc)
            return None
        finally:
            if own and peer is not None:
                await peer.close()

    @staticmethod
    async def _retries(dom: Domain, run: Run) -> AsyncIterator[dict[str, Any]]:
        """Each retry (backing off) of a call the destination did not answer, with the
        run's `outgoing` record, until the run ends or the record is cleared."""
        delay = FINISH_RETRY_S[0]
        while True:
            await asyncio.sleep(delay)
            delay = min(delay * 2, FINISH_RETRY_S[1])
            async with dom.lock:  # L5
                if dom.run is not run or run.outgoing is None:
                    return
                outgoing = dict(run.outgoing)
            yield outgoing

    async def _keep_finishing(self, dom: Domain, run: Run) -> None:
        """A finish without an answer: ask again (backing off) until the destination says;
        then confirm (the guest runs there) or resume here. A task of the run."""
        async for outgoing in self._retries(dom, run):
            try:
                answer = await self._finish(dom, run, None, outgoing["token"],
                                            bool(outgoing.get("was_running", True)))
            except DomainGoneError:
                return
            if answer is None:
                continue
            try:
                async with self.ctx.async_job(dom, AsyncJobKind.MIGRATION_OUT,
                                              "migration finish (retry)") as job:
                    if answer:
                        await self._confirm(dom, run, job, False, "migration finish (retry)")
                    else:
                        await self._resume_here(dom, run, "the destination rolled it back")
                return
            except QvirtError as exc:
                log.error("domain %s: after the destination's answer: %s", dom.name, exc)

    async def _confirm(self, dom: Domain, run: Run, job: AsyncJob, undefine_source: bool,
                       owner: str) -> None:
        """The guest runs on the destination: stop this QEMU (reason migrated)."""
        ctx = self.ctx
        async with dom.lock:  # L5
            ctx.ensure_current(dom, run, "migrate")
            job.set_phase("confirm")
            run.stop_reason = Reason.MIGRATED
            ctx.save_status(dom, run)
        await ctx.status_barrier(run)
        await self.runtime.kill(dom, run)
        if undefine_source:
            async with dom.lock:  # L3
                defined = dom.persistent_def is not None
            if defined:
                await ctx.store.set_autostart(dom.name, False)
                await ctx.store.delete(dom.name)
                async with dom.lock:  # L3
                    dom.persistent_def = None
                    dom.autostart = False
                    ctx.emit(dom, "lifecycle", "undefined", "removed")
                await ctx.remove_if_unused(dom)
                log.info("domain %s: undefined on the source after its migration (%s)",
                         dom.name, owner)

    async def _resume_here(self, dom: Domain, run: Run, why: str) -> None:
        ctx = self.ctx
        async with dom.lock:  # L3
            if dom.run is not run:
                return
            was_running = bool((run.outgoing or {}).get("was_running", True))
            run.outgoing = None
            ctx.save_status(dom, run)
        if was_running:
            await self._cont(dom, run, why)

    async def _cont(self, dom: Domain, run: Run, why: str) -> bool:
        if not await qemu_migration.resume_guest(self.ctx, dom, run, "migrate (undo)",
                                                 Reason.MIGRATED, "migrated"):
            return False
        log.warning("domain %s: the guest runs here again (%s)", dom.name, why)
        return True

    async def _cancel_and_resume(self, dom: Domain, run: Run, was_running: bool) -> bool:
        """Stop this QEMU's stream and run the guest again if it ran; False if QEMU did not
        do it (a frozen QEMU: try again later)."""
        if not await qemu_migration.cancel(self.ctx, dom, run, "migrate (undo)"):
            async with dom.lock:  # L3
                return dom.run is not run  # gone: nothing left to undo
        return await self._resume_after_cancel(dom, run, was_running)

    async def _resume_after_cancel(self, dom: Domain, run: Run, was_running: bool) -> bool:
        """The stream is stopped: run the guest again if it ran (False: QEMU did not)."""
        async with dom.lock:  # L3
            if dom.run is not run:
                return True
            run.pause_hint = None
            paused_here = dom.state is DomainState.PAUSED
        if was_running and paused_here:
            return await self._cont(dom, run, "the migration failed")
        return True

    async def _keep_undoing(self, dom: Domain, run: Run, was_running: bool) -> None:
        """A QEMU that did not answer the undo (frozen mid-migration): try again until it
        does, or the run ends (a task of the run). The guest must not stay paused for ever,
        and a stream that resumes must not complete to nobody."""
        delay = FINISH_RETRY_S[0]
        while True:
            await asyncio.sleep(delay)
            delay = min(delay * 2, FINISH_RETRY_S[1])
            async with dom.lock:  # L5
                if dom.run is not run:
                    return
            if await self._cancel_and_resume(dom, run, was_running):
                return

    async def _undo(self, dom: Domain, run: Run, peer: Peer | None, token: str,
                    was_running: bool, why: str, mirrored: list[str] | None = None,
                    dest: str | None = None) -> None:
        """The migration failed before `finish`: the destination never resumed the guest.
        Stop the stream, tell the destination to drop its QEMU, resume the guest here if it
        ran. `dest` is given when the destination may hold a QEMU of this migration
        (prepare was sent, over `peer` or a new connection): if it does not answer it is
        told again until it does (a paused copy it loaded must not stay there)."""
        ctx = self.ctx
        log.warning("domain %s: migration failed, undoing it: %s", dom.name, why)
        async with dom.lock:  # L3
            current = dom.run is run and run.monitor is not None
        cancelled = (await qemu_migration.cancel(ctx, dom, run, "migrate (undo)")
                     if current else True)
        if current and mirrored:
            await storage_copy.clean_up(ctx, dom, run, mirrored)
        if current:
            await qemu_migration.drop_tls(ctx, dom, run)
        told = await self._tell_abort(dom, peer, dest, token) if dest else True
        if not current:
            return
        if not told and dest:
            async with dom.lock:  # L3: kept in the status file until the destination answers
                if dom.run is run:
                    run.outgoing = {"dest": dest, "token": token, "abort": True,
                                    "was_running": was_running}
                    ctx.save_status(dom, run)
            ctx.spawn(self._keep_aborting(dom, run), f"migrate-abort-{dom.name}", run)
        if cancelled and await self._resume_after_cancel(dom, run, was_running):
            return
        log.error("domain %s: QEMU did not answer the undo of the migration; trying again "
                  "until it does", dom.name)
        ctx.spawn(self._keep_undoing(dom, run, was_running), f"migrate-undo-{dom.name}", run)

    async def _tell_abort(self, dom: Domain, peer: Peer | None, dest: str | None,
                          token: str) -> bool:
        """migrate-finish abort to the destination; True on a definite answer."""
        ctx = self.ctx
        own = peer is None
        try:
            if peer is None:
                if not dest:
                    return False
                peer = await Peer.connect(dest, ctx.settings.peer_timeout_s,
                                          Path(ctx.settings.tls_dir))
            check_no_locks(f"migrate-finish abort for {dom.name}")
            await peer.call("migrate-finish", {"name": dom.uuid, "token": token,
                                               "action": "abort"})
            return True
        except PeerRefusedError as exc:
            log.warning("domain %s: the destination answered the abort: %s", dom.name, exc)
            return True
        except QvirtError as exc:
            log.warning("domain %s: the destination did not answer the abort (asked again "
                        "until it does): %s", dom.name, exc)
            return False
        finally:
            if own and peer is not None:
                await peer.close()

    async def _keep_aborting(self, dom: Domain, run: Run) -> None:
        """Tell the destination to drop its QEMU until it answers (a task of the run)."""
        async for outgoing in self._retries(dom, run):
            if await self._tell_abort(dom, None, str(outgoing["dest"]),
                                      str(outgoing["token"])):
                async with dom.lock:  # L5
                    if dom.run is run and run.outgoing == outgoing:
                        run.outgoing = None
                        self.ctx.save_status(dom, run)
                return

    # --- the source after a restart -----------------------------------------------------

    async def resume_source(self, dom: Domain, run: Run, record: JobRecord | None) -> bool:
        """Reconnect (holding its job, monitor connected): a migration out of the previous
        daemon. Before `finish`: undo it. In `finish` (or an unanswered finish): ask the
        destination again. True if there was one."""
        if run.outgoing is not None:
            if run.outgoing.get("abort"):
                self.ctx.spawn(self._keep_aborting(dom, run), f"migrate-abort-{dom.name}", run)
            else:
                self.ctx.spawn(self._keep_finishing(dom, run), f"migrate-finish-{dom.name}",
                               run)
            return True
        if record is None or record.kind != AsyncJobKind.MIGRATION_OUT or \
                run.stop_reason is not None:
            return False
        data = record.data
        token, dest = str(data.get("token", "")), str(data.get("dest", ""))
        was_running = bool(data.get("was_running", True))
        if record.phase == "finish":
            async with dom.lock:  # L3
                run.outgoing = {"dest": dest, "token": token, "was_running": was_running}
                self.ctx.save_status(dom, run)
            self.ctx.spawn(self._keep_finishing(dom, run), f"migrate-finish-{dom.name}", run)
            return True
        await self._undo(dom, run, None, token, was_running,
                         f"the daemon stopped during its phase '{record.phase}'",
                         [str(d) for d in data.get("mirror") or ()],
                         dest if record.phase in ("prepare", "perform") else None)
        return True

    # === the destination ======================================================================

    async def prepare(self, raw_header: dict[str, Any], token: str, paused: bool,
                      persistent: bool, definition: dict[str, Any] | None, owner: str,
                      on_close: Callable[[Callable[[], None]], None],
                      disks: dict[str, dict[str, Any]] | None = None,
                      tls: bool = False) -> dict[str, Any]:
        """`migrate-prepare`: start a QEMU that waits for the guest; answer its URI once it
        listens. The START job goes on in a task until the source's finish (or abort, or
        its connection ends before the guest is loaded: `on_close` registers that)."""
        ctx = self.ctx
        try:
            header = SaveHeader.model_validate(raw_header)
        except ValidationError as exc:
            raise InvalidOperationError(f"migrate-prepare: the header is not valid: "
                                        f"{describe_validation_error(exc)}") from None
        if token in self._incoming:
            raise InvalidOperationError(f"migration {token} is already being prepared")
        if tls and not ctx.settings.listen_tls:
            raise InvalidOperationError("this daemon does not listen on TLS (listen_tls)")
        dom, created = await domain_for(ctx, header)
        async with dom.lock:  # L3: a running domain cannot receive itself (a migration to
            running_here = dom.active  # the daemon it runs on would wait for its own job)
        if running_here:
            raise InvalidOperationError(f"domain '{dom.name}' is running on this daemon "
                                        "already (a migration to the daemon it runs on?)")
        images: list[Path] = []
        if disks:  # --copy-storage: each disk at its path here, created if missing
            async with dom.lock:  # L3
                local = dom.persistent_def
            try:
                header.definition, images = await storage_copy.place_disks(
                    header.definition, local, disks)
            except BaseException:
                if created:
                    await ctx.remove_if_unused(dom)
                raise
        loop = asyncio.get_running_loop()
        migration = IncomingMigration(token, owner, loop.create_future(), loop.create_future(),
                                      [d for d in storage_copy.writable_disks(
                                          header.definition) if d in (disks or {})], tls)

        async def receive() -> None:
            try:
                async with ctx.async_job(dom, AsyncJobKind.START, owner) as job:
                    await self.runtime.launch(dom, job, paused,
                                              Incoming(header, migration=migration))
            except BaseException:
                await storage_copy.remove_images(images)
                raise
            finally:
                self._incoming.pop(token, None)
                if created:
                    await ctx.remove_if_unused(dom)

        task = ctx.spawn(receive(), f"migrate-in-{dom.name}")
        self._incoming[token] = (migration, task)

        def lost() -> None:
            if not migration.go.done():
                log.warning("domain %s: the source's connection of migration %s closed",
                            dom.name, token)
                migration.go.set_result("lost")

        on_close(lost)
        try:
            async with asyncio.timeout(ctx.settings.peer_timeout_s):
                await asyncio.wait({migration.listening, task},
                                   return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            lost()
            raise QvirtError(f"domain '{dom.name}': the incoming QEMU did not start within "
                             f"{ctx.settings.peer_timeout_s:g} s") from None
        if not migration.listening.done():
            task.result()  # the start failed: its error
            raise QvirtError(f"domain '{dom.name}': the incoming start ended early")
        if persistent and definition is not None:
            await self._define(dom, definition, owner,
                               {d.id: d.path for d in header.definition.disks} if disks else {})
        log.info("domain %s: incoming migration %s prepared for %s", dom.name, token, owner)
        return {"name": dom.name, **migration.listening.result()}

    async def _define(self, dom: Domain, raw: dict[str, Any], owner: str,
                      paths: dict[str, str]) -> None:
        """--persistent: the source's persistent definition becomes this domain's (with the
        copied disks at their paths here, `paths`)."""
        raw = dict(raw)
        raw["disks"] = [{**d, "path": paths.get(d.get("id"), d.get("path"))}
                        for d in raw.get("disks", [])]
        try:
            definition = DomainDef.model_validate(raw)
        except ValidationError as exc:
            raise InvalidOperationError(f"migrate-prepare: the persistent definition is not "
                                        f"valid: {describe_validation_error(exc)}") from None
        await self.ctx.store.save(definition)
        async with dom.lock:  # L3
            dom.persistent_def = definition
            self.ctx.emit(dom, "lifecycle", "defined", "added")
        log.info("domain %s: defined by its incoming migration (%s)", dom.name, owner)

    async def finish(self, ident: str, token: str, action: str, owner: str,
                     paused: bool = False) -> dict[str, Any]:
        """`migrate-finish`: the source's word. "resume": run the guest here (idempotent: a
        guest that already runs from this migration is a success); "abort": drop the
        incoming QEMU (never one that already runs). NoMigrationError if nothing of this
        migration is here."""
        ctx = self.ctx
        pending = self._incoming.get(token)
        log.info("domain %s: migrate-finish %s of migration %s (%s) asked by %s", ident,
                 action, token, "in progress" if pending else "not in progress", owner)
        if pending is not None:
            migration, task = pending
            if not migration.go.done():
                migration.go.set_result(action)
            try:
                async with asyncio.timeout(ctx.settings.peer_timeout_s):
                    await asyncio.shield(task)
            except TimeoutError:
                raise QvirtError(f"migration {token}: the incoming start did not finish "
                                 f"within {ctx.settings.peer_timeout_s:g} s") from None
            except QvirtError:
                if action == "resume":
                    raise NoMigrationError(f"migration {token} failed here and was rolled "
                                           "back") from None
        try:
            dom = await ctx.lookup(ident)
        except NoDomainError:
            if action == "abort":
                return {"name": ident, "state": "shutoff"}
            raise NoMigrationError(f"no domain '{ident}' here: migration {token} is not "
                                   "prepared (or was rolled back)") from None
        async with dom.lock:  # L3
            run = dom.run
            ours = run is not None and run.incoming_token == token
            state = dom.state
            waiting = state is DomainState.PAUSED and dom.reason is Reason.MIGRATING
        if not ours or run is None:
            if action == "abort":
                return {"name": dom.name, "state": str(state)}
            raise NoMigrationError(f"domain '{dom.name}' has no run from migration {token} "
                                   "(never prepared, or rolled back)")
        if action == "abort":
            if not waiting:
                raise InvalidOperationError(f"domain '{dom.name}' already runs here from "
                                            f"migration {token}: not dropped")
            log.warning("domain %s: incoming migration %s aborted by %s", dom.name, token,
                        owner)
            await self.runtime.kill(dom, run)
            return {"name": dom.name, "state": "shutoff"}
        if pending is None and waiting:
            # Loaded, then the source went away (or this daemon restarted): resume now.
            async with ctx.async_job(dom, AsyncJobKind.START, owner):
                if not paused:
                    await ctx.qmp(dom, run, "cont", what="migrate-finish")
                async with dom.lock:  # L5
                    ctx.ensure_current(dom, run, "migrate-finish")
                    self.runtime.announce_started(dom, paused, "migration")
                    ctx.save_status(dom, run)
        async with dom.lock:  # L3
            return dom.info()

