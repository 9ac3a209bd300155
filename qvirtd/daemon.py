"""Start-up and shut-down order of the daemon.

Start: settings and layout -> directories -> definitions from disk -> the socket (listening)
-> READY=1. Stop (SIGTERM/SIGINT): STOPPING=1 -> stop accepting -> give in-flight requests a
grace period -> stop watching QEMU processes and close monitors (the guests keep running) ->
remove the socket -> exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
from pathlib import Path

from .config import ConfigError, Layout, Settings
from .domain import Domain
from .errors import QvirtError
from .locks import LockWatch
from .loopwatch import LoopWatch
from .model import Reason
from .ops.context import Context
from .ops.devices import Devices
from .ops.guest import Guest
from .ops.lifecycle import Lifecycle
from .ops.migration import Migration
from .ops.reconnect import Reconnector
from .ops.runtime import Runtime
from .ops.saves import Saves
from .ops.stats import Stats
from .ops.volumes import Volumes
from .qemu.monitor import quieten_library_logging, warm_sources
from .qemu.unixpath import short_path
from .rpc.methods import build_methods, now_methods, upgrade_methods
from .rpc.server import RpcServer
from .systemd import listen_fds, sd_notify, watchdog_interval
from .tls import server_context, split_hostport
from .verbs import Services
from .writer import MEMORY_FILESYSTEMS, filesystem_type

log = logging.getLogger(__name__)


def bind_socket(path: str, mode: int) -> socket.socket:
    """Bind the control socket; a stale file left by a dead daemon is replaced, a live one not.
    Anything else already at `path`, or a path bind() refuses, is a ConfigError (key named)."""
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ConfigError(f"socket_path: {path} exists and is not a socket")
        # Non-blocking (rule L6): a frozen daemon with a full backlog answers EAGAIN, which
        # means someone listens there, instead of holding us in connect() for good.
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            with short_path(Path(path)) as where:
                try:
                    probe.connect(where)
                except BlockingIOError:
                    pass  # listening, backlog full: alive
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)
        except OSError as exc:
            raise ConfigError(f"socket_path: cannot use {path}: {exc.strerror or exc}") from exc
        else:
            raise SystemExit(f"qvirtd: another daemon is listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)
    try:
        with short_path(Path(path)) as where:
            sock.bind(where)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"socket_path: cannot listen on {path}: {exc.strerror or exc}") from exc
    finally:
        os.umask(old)
    os.chmod(path, mode)
    sock.listen(128)
    sock.setblocking(False)
    return sock


class Daemon:
    def __init__(self, settings: Settings, layout: Layout) -> None:
        self.settings = settings
        self.layout = layout
        self.ctx = Context(settings, layout)
        self.runtime = Runtime(self.ctx)
        self.guest = Guest(self.ctx)
        self.ops = Lifecycle(self.ctx, self.runtime, self.guest)
        self.saves = Saves(self.ctx, self.runtime, self.ops)
        self.migration = Migration(self.ctx, self.runtime)
        self.reconnector = Reconnector(self.ctx, self.runtime, self.saves, self.migration)
        self.devices = Devices(self.ctx)
        # Every verb of the registry (qvirtd/verbs.py) is a method of the server.
        services = Services(self.ctx, self.ops, self.devices, self.guest, Volumes(self.ctx),
                            self.saves, self.migration, Stats(self.ctx))
        self.server = RpcServer({}, settings.max_message_bytes,
                                settings.max_requests_in_flight, build_methods(services),
                                settings.client_write_timeout_s, settings=settings,
                                upgrade_methods=upgrade_methods(),
                                now_methods=now_methods(services))
        self._stop = asyncio.Event()

    def _prepare_dirs(self) -> None:
        for d in (self.layout.state_dir, self.layout.run_dir, self.layout.log_dir,
                  self.layout.domains_run_dir, self.layout.save_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            self.layout.socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        except OSError as exc:
            raise ConfigError(f"socket_path: cannot create {self.layout.socket_path.parent}: "
                              f"{exc.strerror or exc}") from exc
        self.ctx.store.prepare()

    async def _listen_tls(self) -> None:
        """`listen_tls`: serve peer daemons on TCP with mutual TLS (tls.py)."""
        try:
            host, port = split_hostport(self.settings.listen_tls, "listen_tls")
            context = await asyncio.to_thread(server_context, Path(self.settings.tls_dir))
            await self.server.start_tls(host, port, context)
        except (QvirtError, OSError) as exc:
            raise ConfigError(f"listen_tls: cannot listen on {self.settings.listen_tls}: "
                              f"{exc}") from exc
        log.info("qvirtd listening for peer daemons on %s (TLS)", self.settings.listen_tls)

    def _managed_saves(self) -> list[Path]:
        """Blocking: the managed save images in the state directory."""
        try:
            return [p for p in self.layout.save_dir.iterdir() if p.suffix == ".save"]
        except OSError:
            return []

    async def _load_definitions(self) -> None:
        """Every definition on disk (read in a worker thread, rule L6). Two files with one
        uuid: the first (by file name) is loaded, the other reported, never fatal."""
        images = {p.name for p in await asyncio.to_thread(self._managed_saves)}
        for definition, autostart in await asyncio.to_thread(self.ctx.store.load_all):
            try:
                dom = Domain(definition, persistent=True, autostart=autostart)
                dom.managed_save = self.layout.managed_save(dom.name).name in images
                if dom.managed_save:
                    dom.reason = Reason.SAVED
                self.ctx.table.add(dom)
            except ValueError as exc:
                self.ctx.warn(f"definition {self.ctx.store.path_for(definition.name)} is not "
                              f"loaded: {exc}")
        log.info("loaded %d domain definitions", len(self.ctx.table))

    async def run(self) -> int:
        if self.settings.loop_watch_ms > 0:  # rule L6, watched from a thread
            # Look 8 times per threshold (5 ms at most, 25 at least): the watch costs the
            # loop in proportion (docs/design.md, Checking L6).
            threshold = self.settings.loop_watch_ms / 1000
            interval = min(max(threshold / 8, 0.005), 0.025)
            self.ctx.loop_watch = LoopWatch(threshold, interval_s=interval,
                                            idle_interval_s=max(interval, 0.02))
            self.ctx.loop_watch.start(asyncio.get_running_loop())
        try:
            return await self._run()
        finally:
            if self.ctx.loop_watch is not None:
                self.ctx.loop_watch.stop()

    async def _run(self) -> int:
        LockWatch.strict = self.settings.lock_check
        quieten_library_logging(self.settings.log_level == "debug")
        await asyncio.to_thread(warm_sources)
        self._prepare_dirs()
        run_fs = await asyncio.to_thread(filesystem_type, self.layout.run_dir)
        in_memory = run_fs in MEMORY_FILESYSTEMS  # status files, console logs: no disk
        if in_memory:
            self.ctx.writer.write_inline_under(self.layout.run_dir)
        log.info("run directory %s is on %s: its small non-durable writes are done %s",
                 self.layout.run_dir, run_fs or "an unknown filesystem",
                 "by the loop" if in_memory else "by the writer threads")
        await self._load_definitions()
        sd_notify("STATUS=finding running domains")
        reconnects = await self.reconnector.adopt_all()
        activated = listen_fds()
        if activated:
            sock = activated[0]
            log.info("using the socket passed by systemd (socket activation)")
        else:
            sock = bind_socket(str(self.layout.socket_path), self.settings.socket_mode)
        await self.server.start(sock)
        if self.settings.listen_tls:
            await self._listen_tls()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        log.info("qvirtd listening on %s", self.layout.socket_path)
        sd_notify(f"READY=1\nSTATUS=listening; reconnecting {len(reconnects)} domains")
        interval = watchdog_interval()
        if interval is not None:
            self.ctx.spawn(self._watchdog(interval), "watchdog")
        self.ctx.spawn(self._after_reconnect(reconnects), "autostart")
        await self._stop.wait()
        sd_notify("STOPPING=1\nSTATUS=stopping; guests keep running")
        log.info("stopping: guests keep running")
        await self.server.stop(grace_s=5.0)
        await self._detach_all()
        if not await self.ctx.writer.drain(10.0):
            log.error("stopping with file writes still in progress")
        self.ctx.writer.close()
        if not activated:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.layout.socket_path)
        log.info("stopped")
        return 0

    async def _watchdog(self, interval: float) -> None:
        """WATCHDOG=1 from the event loop itself: if the loop blocks, the pings stop."""
        while True:
            sd_notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def _after_reconnect(self, reconnects: list[asyncio.Task[None]]) -> None:
        """Once every reconnect has settled, start the autostart domains not yet running."""
        if reconnects:
            await asyncio.wait(reconnects)
        wanted = [d for d in self.ctx.table.all() if d.autostart and not d.active]
        results = await asyncio.gather(
            *(self.runtime.start(d, False, "autostart") for d in wanted),
            return_exceptions=True)
        for dom, result in zip(wanted, results, strict=True):
            if isinstance(result, BaseException):
                log.error("autostart of %s failed: %s", dom.name, result)
            else:
                log.info("autostarted %s", dom.name)
        active = sum(1 for d in self.ctx.table.all() if d.active)
        sd_notify(f"STATUS=running; {len(self.ctx.table)} domains, {active} active")

    async def _detach_all(self) -> None:
        """Let go of every QEMU without stopping it: status files current, the runs' tasks,
        monitors, consoles and pidfds closed. The guests keep running; the next daemon
        reconnects to them."""
        for task in list(self.ctx.background_tasks):
            task.cancel()
        for dom in self.ctx.table.all():
            async with dom.lock:  # L3
                run = dom.run
                if run is not None:
                    self.ctx.save_status(dom, run)
            if run is not None:
                await run.close("qvirtd is stopping; the guest keeps running")
