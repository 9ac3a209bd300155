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
from pathlib import Path
from typing import Any

from .config import Layout, Settings
from .domain import Domain
from .errors import ReplayGapError
from .events import ReplayGap
from .locks import LockWatch
from .notify import sd_notify
from .ops.context import Context
from .ops.lifecycle import Lifecycle
from .ops.runtime import Runtime
from .qemu.monitor import quieten_library_logging
from .qemu.unixpath import short_path
from .rpc.methods import EventParams, build_methods
from .rpc.server import Connection, RpcServer

log = logging.getLogger(__name__)


def bind_socket(path: str, mode: int) -> socket.socket:
    """Bind the control socket; a stale file left by a dead daemon is replaced, a live one not."""
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with short_path(Path(path)) as where:
                probe.connect(where)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)
        else:
            raise SystemExit(f"qvirtd: another daemon is listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)
    try:
        with short_path(Path(path)) as where:
            sock.bind(where)
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
        self.ops = Lifecycle(self.ctx, self.runtime)
        self.server = RpcServer(build_methods(self.ctx, self.ops), settings.max_message_bytes,
                                settings.max_requests_in_flight,
                                {"event": (EventParams, self._subscribe_events)})
        self._stop = asyncio.Event()

    def _prepare_dirs(self) -> None:
        for d in (self.layout.state_dir, self.layout.run_dir, self.layout.log_dir,
                  self.layout.domains_run_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.layout.socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)

    def _load_definitions(self) -> None:
        for definition, autostart in self.ctx.store.load_all():
            self.ctx.table.add(Domain(definition, persistent=True, autostart=autostart))
        log.info("loaded %d domain definitions", len(self.ctx.table))

    async def _subscribe_events(self, conn: Connection, params: EventParams) -> Any:
        """`event` method: stream events to this connection as `event` notifications."""
        try:
            sub = self.ctx.bus.subscribe([params.domain] if params.domain else None, params.events,
                                        since_seq=params.since_seq)
        except ReplayGap as exc:
            raise ReplayGapError(str(exc)) from None

        async def forward() -> None:
            try:
                while not conn.closed:
                    ev = await sub.get()
                    if ev is None:
                        if sub.overflowed:
                            await conn.send({"jsonrpc": "2.0", "method": "event-overflow",
                                             "params": {"last_seq": self.ctx.bus.last_seq}})
                        return
                    batch = [ev, *sub.take_ready()]
                    await conn.send_line(b"".join(e.notification() for e in batch))
            finally:
                sub.close()

        self.ctx.spawn(forward(), "event-forward")
        return {"subscribed": True, "last_seq": self.ctx.bus.last_seq}

    async def run(self) -> int:
        LockWatch.strict = self.settings.lock_check
        quieten_library_logging(self.settings.log_level == "debug")
        self._prepare_dirs()
        self._load_definitions()
        sock = bind_socket(str(self.layout.socket_path), self.settings.socket_mode)
        await self.server.start(sock)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        log.info("qvirtd listening on %s", self.layout.socket_path)
        sd_notify("READY=1\nSTATUS=listening")
        await self._stop.wait()
        sd_notify("STOPPING=1\nSTATUS=stopping")
        log.info("stopping: guests keep running")
        await self.server.stop(grace_s=5.0)
        await self._detach_all()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.layout.socket_path)
        log.info("stopped")
        return 0

    async def _detach_all(self) -> None:
        """Let go of every QEMU without stopping it: close monitors and pidfds."""
        for task in list(self.ctx.background_tasks):
            task.cancel()
        for dom in self.ctx.table.all():
            if dom.process is not None:
                dom.process.close()
            if dom.monitor is not None:
                await dom.monitor.close()

