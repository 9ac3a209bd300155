"""The life of one QEMU run: launch, watch, react to QMP events, follow up, tear down.

Who notices what:
* the process watcher (pidfd) is the authority on "QEMU is gone": it lets the monitor read
  QEMU's last events, drains the event pump, then ends the run (`end_run`, the one teardown)
  under the domain lock only. It takes no job, so it can never be blocked by a stuck job: a
  job holder that was waiting on QEMU notices at its next re-check (L5) and fails cleanly.
* the event pump applies QMP events to the domain's state under the domain lock and queues
  our events there. Anything that needs the monitor or the process (reset-and-continue, a
  kill, finishing a detach) is recorded on the run as a follow-up (in the status file too)
  and done by the run's follow-up runner under a job, retried until done or the run ends:
  an event handler never talks to QEMU itself, and nothing it asks for is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from .. import savefile
from ..cloudinit import SEED_FILE, attach_seed, seed_moved_to, write_run_files
from ..domain import Domain
from ..errors import (
    DomainBusyError,
    DomainGoneError,
    InvalidOperationError,
    NoDomainError,
    QvirtError,
    StorageError,
)
from ..job import AsyncJob, AsyncJobKind, JobKind
from ..model import DomainState, LifecycleAction, Reason
from ..offloop import make_owned
from ..qemu.accel import cpu_model, resolve_accel
from ..qemu.agent import GuestAgent
from ..qemu.argv import LaunchPaths, build_argv, port_plan, root_port_id, total_ports
from ..qemu.console import SerialConsole
from ..qemu.firmware import prepare as firmware_for
from ..qemu.monitor import Monitor
from ..qemu.process import (
    QemuProcess,
    describe_status,
    process_binary,
    uuid_needle,
)
from ..qemu.unixpath import SUN_PATH_MAX, short_path
from ..run import (
    CONSOLE_LOG,
    MIGRATE_SOCKET,
    NBD_SOCKET,
    FollowUp,
    FollowUpKind,
    Run,
)
from ..savefile import SaveHeader
from ..tls import split_hostport
from . import qemu_migration, qmp_events
from .context import Context
from .devices import finish_detach

log = logging.getLogger(__name__)

_BARRIER = "__qvirtd_barrier__"
NBD_FD = "qvirtd-nbd"  # the listening socket of a --copy-storage NBD server over TLS
# How long a teardown waits for its file removals (a sick disk must not hold a run's end).
TEARDOWN_FILES_S = 5.0
# A destroy waits this long for its "destroyed" record; then it kills QEMU regardless.
DESTROY_RECORD_S = 2.0
FOLLOW_UP_RETRY_S = (0.5, 30.0)  # first and longest delay between tries of a follow-up


def _log_tail(path: Path, offset: int, limit: int = 2000) -> str:
    """Blocking, bounded: the last `limit` bytes QEMU wrote to its log after `offset`."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(offset, size - limit))
            data = f.read(limit)
    except OSError:
        return ""
    return data.decode(errors="replace").strip()


STOP_DETAIL = {
    Reason.SHUTDOWN: "shutdown",
    Reason.DESTROYED: "destroyed",
    Reason.CRASHED: "crashed",
    Reason.FAILED: "failed",
    Reason.SAVED: "saved",
    Reason.MIGRATED: "migrated",
}


def end_reason(stop_reason: Reason | None, saw_shutdown: bool) -> Reason:
    """Why a run ended: the daemon's own stop if it was stopping QEMU, else "shutdown" if
    QEMU said SHUTDOWN first, else it crashed. The one place this is decided (also used by
    a restarted daemon for runs that ended while it was away)."""
    if stop_reason is not None:
        return stop_reason
    return Reason.SHUTDOWN if saw_shutdown else Reason.CRASHED


def _listener(path: Path) -> socket.socket:
    """A listening socket for QEMU to serve (monitor, console): bound by us, passed as an fd,
    so there is no connect race and the path stays for later reconnects."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with short_path(path) as where:
            sock.bind(where)
        sock.listen(8)
    except BaseException:
        sock.close()
        raise
    return sock


def _listeners(paths: list[Path], gone: Path) -> list[socket.socket]:
    """Blocking (a worker thread, L6: unlink and bind write the run directory): a listener
    on each of `paths`, and `gone` removed (QEMU binds the VNC socket itself)."""
    made: list[socket.socket] = []
    try:
        for path in paths:
            made.append(_listener(path))
        with contextlib.suppress(FileNotFoundError):
            gone.unlink()
    except BaseException:
        _close_all(made)
        raise
    return made


def _close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


def _make_run_dir(run_dir: Path) -> None:
    """Blocking (a worker thread, L6): the run directory, private."""
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(run_dir, 0o700)


@dataclass
class IncomingMigration:
    """The destination's side of a migration, as the start that receives it sees it."""

    token: str                       # names this migration in both daemons' status files
    source: str                      # who asked (for logs)
    # Where QEMU listens, once migrate-incoming is issued: {"uri"} and, with `exports`,
    # {"nbd": the NBD server's socket, "exports": [disk ids]}.
    listening: asyncio.Future[dict[str, Any]]
    go: asyncio.Future[str]          # the source's word: "resume", "abort", or "lost"
    exports: list[str] = field(default_factory=list)  # disks the source copies (NBD)
    tls: bool = False                # QEMU listens on TCP with TLS (listen_tls's host)


@dataclass
class Incoming:
    """A start that receives a guest instead of booting one: from a save file (a restore)
    or from another daemon (a migration)."""

    header: SaveHeader               # the live definition, device layout, run files
    fd: int | None = None            # restore: the save file at QEMU's stream (inherited)
    path: Path | None = None         # restore: the save file
    managed: bool = False            # restore: a managed image, deleted once loaded
    migration: IncomingMigration | None = None

    @property
    def kind(self) -> str:
        return "migration" if self.migration is not None else "restore"


class Runtime:
    """Launching and watching QEMU runs; reacting to what QEMU says."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    # --- launch --------------------------------------------------------------------------

    async def start(self, dom: Domain, paused: bool, owner: str,
                    force_boot: bool = False) -> None:
        """Start a new run of `dom` under the START async job (queries, destroy and
        domjobabort may go on beside it). A domain with a managed save image is restored
        from it (and the image deleted), unless `force_boot` (then the image is deleted and
        the guest boots afresh)."""
        ctx = self.ctx
        async with ctx.async_job(dom, AsyncJobKind.START, owner) as job:
            async with dom.lock:  # L3
                managed = dom.managed_save
            if not managed:
                await self.launch(dom, job, paused)
                return
            path = ctx.layout.managed_save(dom.name)
            if force_boot:
                await self.remove_managed_save(dom, owner)
                await self.launch(dom, job, paused)
                return
            header, offset = await asyncio.to_thread(savefile.read, path)
            if header.uuid != dom.uuid or header.name != dom.name:
                raise InvalidOperationError(
                    f"the managed save image {path} is of domain '{header.name}' "
                    f"({header.uuid}), not of this one: remove it (managedsave-remove)")
            fd = await make_owned(partial(savefile.open_stream, path, offset), os.close)
            try:
                await self.launch(dom, job, paused,
                                  Incoming(header, fd=fd, path=path, managed=True))
            finally:
                # Off the loop (L6): the last close of a managed image already deleted
                # frees its blocks, and that waits for the disk.
                await asyncio.to_thread(os.close, fd)

    async def remove_managed_save(self, dom: Domain, owner: str) -> bool:
        """Delete the domain's managed save image (durably); True if there was one."""
        ctx = self.ctx
        path = ctx.layout.managed_save(dom.name)
        existed = await asyncio.to_thread(path.exists)
        await ctx.writer.remove(path, durable=True)
        async with dom.lock:  # L3
            dom.managed_save = False
        if existed:
            log.info("domain %s: managed save image removed (%s)", dom.name, owner)
        return existed

    async def enter_phase(self, dom: Domain, run: Run, job: AsyncJob, phase: str) -> None:
        """Record the async job's new phase in the status file (rule L3), then give the
        test hook its pause."""
        async with dom.lock:  # L3
            self.ctx.ensure_current(dom, run, str(job.kind))
            job.set_phase(phase)
            self.ctx.save_status(dom, run)
        await self.test_pause()

    async def test_pause(self) -> None:
        """Fault injection for tests (`test_phase_delay_s`, zero outside tests): hold each
        phase of an async job this long, so a test can kill the daemon inside it."""
        delay = self.ctx.settings.test_phase_delay_s
        if delay > 0:
            await asyncio.sleep(delay)

    async def check_no_qemu(self, dom: Domain, run_dir: Path, by_uuid: bool = True) -> None:
        """The process table is the authority: refuse to start a domain when a QEMU with its
        uuid, or one using its run directory, is alive (a run we lost track of, a damaged
        status file, another daemon). An incoming migration checks the run directory only
        (`by_uuid` False): its source QEMU, on this machine, has the same uuid."""
        needles = [str(run_dir).encode() + b"/"]
        if by_uuid:
            needles.append(uuid_needle(dom.uuid))
        found = await self.ctx.processes.find(needles)
        if found:
            pids = ", ".join(str(pid) for pid, _ in found)
            raise DomainBusyError(
                f"domain '{dom.name}' cannot start: QEMU pid {pids} is already running for it "
                f"(its uuid {dom.uuid} or {run_dir} is in that command line) but this daemon "
                "does not manage it; stop that process first (see daemon-warnings)")

    async def launch(self, dom: Domain, job: AsyncJob, paused: bool,
                     incoming: Incoming | None = None) -> None:
        """Start QEMU for `dom` (caller holds the START job) and bring it to running or
        paused; with `incoming`, QEMU loads the saved guest instead of booting it. Whatever
        fails, nothing is left behind: no QEMU, no id, no status file (and a save image
        stays where it was)."""
        ctx = self.ctx
        settings = ctx.settings
        async with dom.lock:  # L3
            if dom.active:
                raise InvalidOperationError(f"domain '{dom.name}' is already running")
            if incoming is not None:
                definition = incoming.header.definition
            elif dom.persistent_def is None:
                raise NoDomainError(f"domain '{dom.name}' is no longer defined")
            else:
                definition = dom.persistent_def
        run_dir = ctx.layout.domain_run_dir(dom.name)
        await self.check_no_qemu(dom, run_dir, incoming is None or incoming.migration is None)
        # A guest that comes from another QEMU keeps its accelerator (TCG and KVM state do
        # not mix in one migration stream).
        accel = (incoming.header.accel if incoming is not None and incoming.header.accel
                 else resolve_accel(definition.accel))
        cpu = await cpu_model(accel, settings.qemu_binary)
        async with ctx.table.lock:  # L1: the run's directory and id, nothing else
            ctx.table.claim_run_dir(dom)
            dom_id = ctx.table.assign_id(dom)
        if incoming is not None:
            definition = seed_moved_to(definition, run_dir)
        run = Run(definition, run_dir, dom_id, accel)
        run.starting = True
        if incoming is not None:  # the saved QEMU's layout, hot-plugged devices included
            run.ports = dict(incoming.header.ports)
            run.root_ports = incoming.header.root_ports
            job.data = {"incoming": incoming.kind, "paused": paused}
            if incoming.migration is not None:
                run.incoming_token = incoming.migration.token
                job.data["token"] = incoming.migration.token
            else:
                job.data.update(restore=str(incoming.path), managed=incoming.managed)
        else:
            run.ports = {dev: root_port_id(i) for dev, i in port_plan(definition).items()}
            run.root_ports = total_ports(definition)
        log_path = ctx.layout.domain_log(dom.name)
        log_offset = 0
        published = False
        listeners: list[socket.socket] = []
        try:
            await asyncio.to_thread(_make_run_dir, run_dir)
            # The console log is the current (or last) run's, as QEMU's own file would be.
            for old in (run.console_log, run.console_log.with_name(CONSOLE_LOG + ".1")):
                ctx.writer.remove(old, durable=False)
            async with dom.lock:  # L3: publish the run; the record goes out before QEMU exists
                ctx.ensure_in_table(dom)
                dom.run = run
                published = True
                job.set_phase("prepare")
                ctx.set_state(dom, DomainState.PAUSED, Reason.STARTING_UP)
            # A daemon killed from here on finds this record and rolls the start back.
            await ctx.status_barrier(run)
            await self.test_pause()
            firmware = await firmware_for(ctx.ovmf, ctx.layout.nvram_dir, definition)
            if incoming is not None:  # the saved run's own files (its cloud-init seed)
                await asyncio.to_thread(write_run_files, run_dir,
                                        savefile.decode_files(incoming.header))
            live = await attach_seed(definition, run_dir)  # cloud-init: the seed CD-ROM
            if live is not definition:
                async with dom.lock:  # L3: the JSON config names the seed before QEMU has it
                    ctx.ensure_current(dom, run, "start")
                    definition = run.definition = live
                    ctx.save_status(dom, run)
                await ctx.status_barrier(run)
            paths = [run.monitor_socket, run.console_socket]
            if definition.guest_agent:
                paths.append(run.agent_socket)
            listeners = await make_owned(
                partial(_listeners, paths, LaunchPaths(run_dir).vnc_socket), _close_all)
            argv = build_argv(definition, accel, settings.qemu_binary, listeners[0].fileno(),
                              LaunchPaths(run_dir), cpu, listeners[1].fileno(), firmware,
                              listeners[2].fileno() if definition.guest_agent else None,
                              run.ports, run.root_ports, incoming is not None)
            log_offset = await asyncio.to_thread(self._log_start, log_path, dom.name, argv)
            await self.enter_phase(dom, run, job, "spawn")
            fds = [s.fileno() for s in listeners]
            if incoming is not None and incoming.fd is not None:
                fds.append(incoming.fd)
            process = await QemuProcess.spawn(argv, fds, log_path, run_dir)
            async with dom.lock:  # L3: the run has a process now (the status records its pid)
                self.attach(dom, run, process)
            log.info("domain %s: QEMU pid %d started (accel %s) for %s", dom.name, process.pid,
                     accel, job.owner)
            await self.enter_phase(dom, run, job, "connect")
            await job.abortable(self.connect(dom, run))
            if incoming is not None:
                await self.enter_phase(dom, run, job, "incoming")
                if incoming.migration is not None:
                    await self.receive_migration(dom, run, job, incoming.migration)
                else:
                    assert incoming.fd is not None
                    await self.receive(dom, run, job, incoming.fd)
                # From here a restarted daemon keeps this QEMU: a restore is finished, a
                # migration waits for the source's word (the managed image goes now).
                await self.enter_phase(dom, run, job, "loaded")
                await ctx.status_barrier(run)
                if incoming.managed:
                    await self.remove_managed_save(dom, job.owner)
                if incoming.migration is not None and \
                        not await self.await_source(dom, run, job, incoming.migration):
                    return
            if not paused:
                await self.enter_phase(dom, run, job, "resume")
                await job.abortable(ctx.qmp(dom, run, "cont", what="start"))
            async with dom.lock:  # L5: still our run?
                ctx.ensure_current(dom, run, "start")
                run.starting = False
                self.announce_started(dom, paused,
                                      incoming.kind if incoming is not None else None)
                ctx.save_status(dom, run, with_job=False)
            # Barrier: "started" only once the disk says so too. Until then a restarted
            # daemon would roll the start back, and a status that cannot be written (full
            # disk, no fds) fails the start here, QEMU included, rather than leave a guest
            # the next daemon would kill.
            await ctx.status_barrier(run)
        except BaseException as exc:
            await asyncio.shield(self._roll_back(dom, run, published, dom_id))
            if isinstance(exc, QvirtError | OSError):
                # QEMU's own words, if a QEMU of this start ever ran (not an older run's).
                said = (await asyncio.to_thread(_log_tail, log_path, log_offset)
                        if run.process is not None else "")
                msg = f"domain '{dom.name}' failed to start: {exc}"
                if said:
                    msg += f"; QEMU said: {said}"
                err = QvirtError(msg)
                err.kind = getattr(exc, "kind", QvirtError.kind)
                raise err from exc
            raise
        finally:
            for sock in listeners:
                sock.close()

    def announce_started(self, dom: Domain, paused: bool, incoming: str | None) -> None:
        """Under the domain lock: the state and events of a start that has finished
        (`incoming`: None for a boot, "restore" or "migration")."""
        ctx = self.ctx
        detail, reason = {None: ("booted", Reason.BOOTED),
                          "restore": ("restored", Reason.RESTORED),
                          "migration": ("migrated", Reason.MIGRATED)}[incoming]
        if paused:
            ctx.set_state(dom, DomainState.PAUSED, Reason.USER)
            ctx.emit(dom, "lifecycle", "started", detail)
            ctx.emit(dom, "lifecycle", "suspended", "paused")
        else:
            ctx.set_state(dom, DomainState.RUNNING, reason)
            ctx.emit(dom, "lifecycle", "started", detail)
            if incoming == "migration":
                ctx.emit(dom, "lifecycle", "resumed", "migrated")

    async def receive_migration(self, dom: Domain, run: Run, job: AsyncJob,
                                migration: IncomingMigration) -> None:
        """The incoming QEMU listens on a UNIX socket in its run directory (the source QEMU
        connects to it) and loads the guest; the source may give up meanwhile."""
        ctx = self.ctx
        path = run.run_dir / MIGRATE_SOCKET
        if len(str(path).encode()) > SUN_PATH_MAX:
            raise InvalidOperationError(f"the migration socket path {path} is longer than a "
                                        "UNIX socket path may be: use a shorter --root")
        uri = f"unix:{path}"
        await qemu_migration.set_capabilities(ctx, dom, run, {"events": True}, "migration")
        if migration.tls:  # another host: TCP on the TLS listener's address, QEMU's TLS
            host, _ = split_hostport(ctx.settings.listen_tls, "listen_tls")
            await qemu_migration.use_tls(ctx, dom, run, "server", None)
            uri = f"tcp:{host}:0"  # QEMU picks the port; query-migrate says which
        await ctx.qmp(dom, run, "migrate-incoming", {"uri": uri}, what="migration")
        where: dict[str, Any] = {"uri": uri}
        if migration.tls:
            info = await ctx.qmp(dom, run, "query-migrate", what="migration")
            addresses = [a for a in info.get("socket-address", ()) if a.get("type") == "inet"]
            if not addresses:
                raise qemu_migration.MigrationFailedError(
                    f"domain '{dom.name}': QEMU does not say which port it listens on")
            where.update(uri=f"tcp:{host}:{addresses[0]['port']}",
                         port=int(addresses[0]["port"]), tls=True)
        if migration.exports:  # --copy-storage: the source mirrors the disks into these
            if migration.tls:
                port = await self._nbd_over_tls(dom, run, host)
                where.update(nbd_port=port)
            else:
                nbd = run.run_dir / NBD_SOCKET
                await ctx.qmp(dom, run, "nbd-server-start",
                              {"addr": {"type": "unix", "data": {"path": str(nbd)}}},
                              what="migration (storage)")
                where.update(nbd=str(nbd))
            for disk in migration.exports:
                await ctx.qmp(dom, run, "block-export-add",
                              {"type": "nbd", "id": f"mig-{disk}", "node-name": f"fmt-{disk}",
                               "writable": True, "name": disk}, what="migration (storage)")
            where.update(exports=list(migration.exports))
        if not migration.listening.done():
            migration.listening.set_result(where)
        done = asyncio.ensure_future(
            qemu_migration.wait_done(ctx, dom, run, job, "incoming migration", outgoing=False))
        try:
            while not done.done():
                if migration.go.done() and migration.go.result() != "resume":
                    how = ("gave up on" if migration.go.result() == "abort"
                           else "went away during")
                    raise qemu_migration.MigrationFailedError(
                        f"domain '{dom.name}': the source {how} the migration before it was "
                        "complete")
                waits: set[asyncio.Future[Any]] = {done}
                if not migration.go.done():  # "resume" early: the stream ends by itself
                    waits.add(migration.go)
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not done.done():
                done.cancel()
            await asyncio.gather(done, return_exceptions=True)
        done.result()

    async def _nbd_over_tls(self, dom: Domain, run: Run, host: str) -> int:
        """The NBD server of a --copy-storage over TLS: on a TCP socket the daemon binds
        (so it knows the port) and hands to QEMU, with the migration's TLS credentials."""
        ctx = self.ctx
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                             socket.SOCK_STREAM)
        try:
            sock.bind((host, 0))
            sock.listen(8)
            port = int(sock.getsockname()[1])
            async with dom.lock:  # L3: the monitor handle only
                ctx.ensure_current(dom, run, "migration (storage)")
                monitor = run.monitor
            if monitor is None:
                raise InvalidOperationError(f"domain '{dom.name}': the monitor is not "
                                            "connected")
            await monitor.send_fd(NBD_FD, sock.fileno())
        finally:
            sock.close()
        await ctx.qmp(dom, run, "nbd-server-start",
                      {"addr": {"type": "fd", "data": {"str": NBD_FD}},
                       "tls-creds": qemu_migration.TLS_OBJECT}, what="migration (storage)")
        return port

    async def await_source(self, dom: Domain, run: Run, job: AsyncJob,
                           migration: IncomingMigration) -> bool:
        """The guest is loaded here, paused: wait for the source's word. True: resume it
        here. "abort": roll back. "lost" (the source went away): keep the paused QEMU, the
        START job ends; a later migrate-finish (the source's daemon restarted) decides."""
        ctx = self.ctx
        async with dom.lock:  # L3
            ctx.ensure_current(dom, run, "migration")
            ctx.set_state(dom, DomainState.PAUSED, Reason.MIGRATING)
        word = await job.abortable(asyncio.shield(migration.go))
        if word == "resume":
            if migration.exports:  # the disks are whole here: no more writes from outside
                try:
                    await ctx.qmp(dom, run, "nbd-server-stop", what="migration (storage)")
                except QvirtError as exc:
                    log.warning("domain %s: nbd-server-stop: %s", dom.name, exc)
            if migration.tls:  # after the NBD server, which used the credentials too
                await qemu_migration.drop_tls(ctx, dom, run)
            return True
        if word == "abort":
            raise qemu_migration.MigrationFailedError(
                f"domain '{dom.name}': the source aborted the migration")
        log.warning("domain %s: the source of the migration went away after the guest was "
                    "loaded here: it stays paused until the source decides (migrate-finish)",
                    dom.name)
        async with dom.lock:  # L5
            ctx.ensure_current(dom, run, "migration")
            run.starting = False
            ctx.save_status(dom, run, with_job=False)
        await ctx.status_barrier(run)
        return False

    async def receive(self, dom: Domain, run: Run, job: AsyncJob, fd: int) -> None:
        """The incoming QEMU loads the guest from `fd` (its inherited save file)."""
        await qemu_migration.set_capabilities(self.ctx, dom, run, {"events": True}, "restore")
        await self.ctx.qmp(dom, run, "migrate-incoming", {"uri": f"fd:{fd}"}, what="restore")
        await qemu_migration.wait_done(self.ctx, dom, run, job, "restore", outgoing=False)

    @staticmethod
    def _log_start(log_path: Path, name: str, argv: list[str]) -> int:
        """Blocking (worker thread): note the command line in the domain's QEMU log."""
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with open(log_path, "ab") as logf:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                logf.write(f"{stamp} starting domain {name}: {argv!r}\n".encode())
                return logf.tell()
        except OSError as exc:
            raise StorageError(f"cannot write {log_path}: {exc.strerror or exc}") from exc

    async def _roll_back(self, dom: Domain, run: Run, published: bool, dom_id: int) -> None:
        """A start failed or was aborted: end its run, killing its QEMU if there is one."""
        if not published:
            async with self.ctx.table.lock:  # L1: the id and directory were never used
                self.ctx.table.release_id(dom, dom_id)
                self.ctx.table.release_run_dir(dom)
            return
        async with dom.lock:  # L3
            if dom.run is run and run.stop_reason is None:
                run.stop_reason = Reason.FAILED
                self.ctx.save_status(dom, run)
        if run.process is None:  # never spawned: nothing to kill
            await self.end_run(dom, run, run.stop_reason or Reason.FAILED)
        else:
            await self.kill(dom, run)

    async def connect(self, dom: Domain, run: Run) -> None:
        """Connect the run's monitor and its console (each bounded, neither blocks)."""
        settings = self.ctx.settings
        async with dom.lock:  # L3
            self.ctx.ensure_current(dom, run, "connect")
            monitor = run.monitor
        assert monitor is not None
        await monitor.connect(run.monitor_socket, settings.monitor_connect_timeout_s)
        graphics = run.definition.graphics
        if graphics is not None and graphics.password and run.starting:
            # Before the guest runs: the password never travels on the command line.
            await self.ctx.qmp(dom, run, "set_password",
                               {"protocol": "vnc", "password": graphics.password},
                               what="start")
        if run.process is not None:
            # QEMU answers: whatever wrapper started it has exec'd it by now. This is the
            # executable a restarted daemon will expect behind the pid.
            run.process.exe = process_binary(run.process.pid)
        await self.connect_console(dom, run)
        await self.connect_agent(dom, run)

    async def connect_agent(self, dom: Domain, run: Run) -> None:
        """The host end of the guest agent channel, if the domain has one."""
        if not run.definition.guest_agent:
            return
        agent = GuestAgent(dom.name, run.agent_socket)
        await agent.connect(self.ctx.settings.monitor_connect_timeout_s)

        def install() -> GuestAgent | None:
            agent.guest_connected = run.agent_connected
            old, run.agent = run.agent, agent
            return old
        await self._install(dom, run, agent, install, "its guest agent channel")

    async def connect_console(self, dom: Domain, run: Run) -> None:
        console = SerialConsole(dom.name, run.console_socket, run.console_log, self.ctx.writer,
                             self.ctx.settings.console_log_max_bytes)
        await console.connect(self.ctx.settings.monitor_connect_timeout_s)

        def install() -> SerialConsole | None:
            old, run.console = run.console, console
            return old
        await self._install(dom, run, console, install, "its console")

    @staticmethod
    async def _install(dom: Domain, run: Run, new: GuestAgent | SerialConsole,
                       install: Callable[[], GuestAgent | SerialConsole | None],
                       what: str) -> None:
        """A channel connected with no lock held becomes the run's if the run is still the
        domain's (L5; `install` swaps it in under the lock and returns the one it replaces,
        closed here); else it is closed and DomainGoneError raised."""
        async with dom.lock:  # L5
            current = dom.run is run
            old = install() if current else None
        if not current:
            new.close()
            raise DomainGoneError(f"domain '{dom.name}' stopped while {what} was being "
                                  "connected")
        if old is not None:
            old.close()

    def attach(self, dom: Domain, run: Run, process: QemuProcess) -> None:
        """Under the domain lock: `process` is the run's QEMU; give it a (not yet connected)
        monitor, its event pump, its exit watcher and its follow-up runner. Used by launch
        and by reconnect."""
        dom.assert_locked()
        ctx = self.ctx
        run.process = process
        run.spawned.set()
        self.new_monitor(dom, run)
        ctx.spawn(self._pump(dom, run), f"qmp-events-{dom.name}", run)
        ctx.spawn(self._watch_process(dom, run, process), f"watch-{dom.name}", run)
        ctx.spawn(self._follow_ups(dom, run), f"follow-ups-{dom.name}", run)
        if dom.run is run:
            ctx.save_status(dom, run)

    def new_monitor(self, dom: Domain, run: Run) -> Monitor:
        """Under the domain lock: a fresh monitor for the run, feeding its event pump."""
        run.monitor = Monitor(dom.name, partial(self._qmp_event_arrived, dom, run),
                              partial(self._monitor_lost, dom, run),
                              self.ctx.settings.monitor_timeout_s)
        return run.monitor

    # --- stopping ------------------------------------------------------------------------

    async def kill(self, dom: Domain, run: Run) -> None:
        """Terminate the run's QEMU (no lock held, L4) and wait until the run is torn down."""
        settings = self.ctx.settings
        if run.ended.is_set():
            return
        if not run.spawned.is_set():  # a start is spawning it right now: wait (bounded)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(settings.process_exit_timeout_s):
                    await run.spawned.wait()
        process = run.process
        if process is not None:
            await process.terminate(settings.destroy_grace_s, settings.process_exit_timeout_s)
        if not await self.ctx.wait_ended(run, settings.process_exit_timeout_s):
            log.error("domain %s: the run was not torn down in time after its QEMU was "
                      "stopped", dom.name)

    async def _watch_process(self, dom: Domain, run: Run, process: QemuProcess) -> None:
        """Wait for QEMU to exit, let its last events be handled, then end the run."""
        status = await process.exited
        log.info("domain %s: QEMU pid %d %s", dom.name, process.pid, describe_status(status))
        # QEMU's SHUTDOWN event may still sit unread in the monitor socket: read it first.
        monitor = run.monitor
        if monitor is not None:
            await monitor.wait_lost(1.0)
        barrier: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        run.qmp_queue.put_nowait((_BARRIER, {"future": barrier}, None))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(barrier), 1.0)
        await self.end_run(dom, run)

    async def end_run(self, dom: Domain, run: Run, reason: Reason | None = None) -> None:
        """The one teardown of a run whose QEMU is gone (or never existed): the domain shuts
        off with its event, the run's files go, its tasks and handles close, its id and
        directory are released, and a transient domain leaves the table; then `run.ended` is
        set. Idempotent (a second call returns at once; wait for `run.ended`)."""
        ctx = self.ctx
        async with dom.lock:  # L3: state only; nothing awaited
            if dom.run is not run:
                return
            reason = reason or end_reason(run.stop_reason, run.saw_shutdown)
            restart = (reason is Reason.CRASHED and dom.persistent
                       and run.definition.on_crash is LifecycleAction.RESTART)
            ctx.set_state(dom, DomainState.SHUTOFF, reason,
                          ("stopped", STOP_DETAIL.get(reason, "shutdown")))
            dom.run = None
            run.spawned.set()
            paths = LaunchPaths(run.run_dir)
            removals = [ctx.writer.remove(path, durable=False) for path in (
                run.status_file, run.monitor_socket, run.console_socket,
                paths.pidfile, paths.vnc_socket, run.agent_socket,
                run.run_dir / SEED_FILE, run.run_dir / MIGRATE_SOCKET,
                run.run_dir / NBD_SOCKET)]
        await run.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(TEARDOWN_FILES_S):
                await asyncio.gather(*removals, return_exceptions=True)
        async with ctx.table.lock:  # L1: only at the very end (seed 003)
            ctx.table.release_id(dom, run.id)
            ctx.table.release_run_dir(dom)
            if dom.persistent_def is None and not dom.active:
                ctx.table.remove(dom)
        run.ended.set()  # only now: whoever waited for the end finds it complete
        if restart:
            log.warning("domain %s: QEMU crashed; on_crash is restart: starting it again",
                        dom.name)
            ctx.spawn(self._restart_after_crash(dom), f"on-crash-restart-{dom.name}")

    async def _restart_after_crash(self, dom: Domain) -> None:
        try:
            await self.start(dom, False, "on_crash restart")
        except QvirtError as exc:
            log.error("domain %s: restart after crash failed: %s", dom.name, exc)

    def _monitor_lost(self, dom: Domain, run: Run) -> None:
        """Monitor EOF. Normally QEMU is exiting; if it lingers without a monitor, kill it."""
        self.ctx.spawn(self._reap_lingering(dom, run), f"monitor-lost-{dom.name}", run)

    async def _reap_lingering(self, dom: Domain, run: Run) -> None:
        process = run.process
        if process is None or await process.wait(self.ctx.settings.destroy_grace_s + 2.0):
            return
        log.warning("domain %s: QEMU closed its monitor but did not exit: killing it", dom.name)
        async with dom.lock:  # L3
            if dom.run is not run:
                return
            self.ctx.emit(dom, "control-error", data={"error": "QEMU closed its monitor"})
        await self.kill(dom, run)

    # --- QMP events ----------------------------------------------------------------------

    def _qmp_event_arrived(self, dom: Domain, run: Run, name: str, data: dict[str, Any],
                           qemu_time: float | None) -> None:
        """The monitor's reader calls this for each QMP event, in order. With nothing ahead
        of it (the pump idle, its queue empty) and the domain lock free, the event is
        applied right here, exactly as the pump would, one turn of the loop sooner (issue
        12: an event reaches its subscribers in the step that read it). Otherwise the pump
        applies it, after those ahead of it."""
        if not run.pump_busy and run.qmp_queue.empty() and dom.lock.acquire_now():  # L3
            try:
                self._apply_qmp_event(dom, run, name, data, qemu_time)
            finally:
                dom.lock.release()
            self.ctx.bus.deliver_now()  # no lock held here (E1)
            return
        run.qmp_queue.put_nowait((name, data, qemu_time))

    async def _pump(self, dom: Domain, run: Run) -> None:
        """Apply this run's QMP events in order, one at a time (those the reader did not
        apply itself)."""
        while True:
            name, data, qemu_time = await run.qmp_queue.get()
            if name == _BARRIER:
                data["future"].set_result(None)
                continue
            run.pump_busy = True
            try:
                async with dom.lock:  # L3: state and events only; QEMU work: a follow-up
                    self._apply_qmp_event(dom, run, name, data, qemu_time)
            finally:
                run.pump_busy = False
            self.ctx.bus.deliver_now()  # no lock held here (E1)

    def _apply_qmp_event(self, dom: Domain, run: Run, name: str, data: dict[str, Any],
                         qemu_time: float | None) -> None:
        """Under the domain lock: one QMP event's state, events and follow-up."""
        dom.assert_locked()
        if dom.run is not run:
            return
        log.debug("domain %s: QMP event %s %s", dom.name, name, data)
        try:
            with self.ctx.events_from_qemu(qemu_time):
                follow_up = qmp_events.apply(self.ctx, dom, run, name, data)
            if follow_up is not None:
                self.follow_up(dom, run, follow_up)
        except Exception:
            log.exception("domain %s: handling QMP event %s failed", dom.name, name)

    def follow_up(self, dom: Domain, run: Run, follow_up: FollowUp) -> None:
        """Under the domain lock: record `follow_up` (status file) for the runner to do."""
        dom.assert_locked()
        run.add_follow_up(follow_up)
        self.ctx.save_status(dom, run)

    # --- follow-ups: durable, retried until done or the run ends -------------------------

    async def _follow_ups(self, dom: Domain, run: Run) -> None:
        """The run's follow-up runner: does the recorded follow-ups in order. One that fails
        (a job held too long, QEMU busy) is tried again later, never dropped."""
        delay = FOLLOW_UP_RETRY_S[0]
        while True:
            await run.follow_up_wake.wait()
            run.follow_up_wake.clear()
            while True:
                async with dom.lock:  # L3
                    if dom.run is not run or not run.follow_ups:
                        break
                    follow_up = run.follow_ups[0]
                try:
                    await self._do(dom, run, follow_up)
                except DomainGoneError:
                    return
                except QvirtError as exc:
                    log.warning("domain %s: %s (%s) failed, trying again in %.1f s: %s",
                                dom.name, follow_up.kind, follow_up.why, delay, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, FOLLOW_UP_RETRY_S[1])
                    continue
                delay = FOLLOW_UP_RETRY_S[0]
                async with dom.lock:  # L3: done: off the list (and out of the status file)
                    if dom.run is not run:
                        return
                    with contextlib.suppress(ValueError):
                        run.follow_ups.remove(follow_up)
                    self.ctx.save_status(dom, run)

    async def _do(self, dom: Domain, run: Run, follow_up: FollowUp) -> None:
        ctx = self.ctx
        if follow_up.kind is FollowUpKind.KILL:
            await self.kill(dom, run)
            raise DomainGoneError(f"domain '{dom.name}' stopped")
        owner = follow_up.why if follow_up.device is None else \
            f"detach {follow_up.device} (released)"
        async with ctx.job(dom, JobKind.MODIFY, owner):
            if follow_up.kind is FollowUpKind.FINISH_DETACH:
                assert follow_up.device is not None
                if not await finish_detach(ctx, dom, run, follow_up.device):
                    log.warning("domain %s: QEMU still has %s after DEVICE_DELETED; the next "
                                "event or detach finishes it", dom.name, follow_up.device)
                return
            await self._reset_continue(dom, run, follow_up.why)

    async def _reset_continue(self, dom: Domain, run: Run, why: str) -> None:
        """Reset and continue in the same QEMU (libvirt's fake reboot); caller holds a job."""
        ctx = self.ctx
        await ctx.qmp(dom, run, "system_reset", what=why)
        await ctx.qmp(dom, run, "cont", what=why)
        async with dom.lock:  # L5
            ctx.ensure_current(dom, run, why)
            # Only now: until the guest runs again the reboot is still owed (a restarted
            # daemon that finds it powered off must reset it, not apply on_poweroff).
            run.fake_reboot = False
            # As libvirt's fake reboot: running again, announced as resumed/unpaused.
            ctx.set_state(dom, DomainState.RUNNING, Reason.BOOTED, ("resumed", "unpaused"))
