"""The QEMU guest agent of a run: a virtio-serial channel to qemu-ga inside the guest.

`guest_agent: true` gives the domain a virtio-serial controller and the port
`org.qemu.guest_agent.0`, whose host side is a listening socket in the run directory
(`agent.sock`, passed to QEMU as an fd like the monitor's). The daemon keeps one connection
to it per run (made at start and again after a daemon restart).

Every call is bounded by `agent_timeout_s`, so a guest without a running agent is a clear
error, never a hang. The agent speaks QMP's JSON without a greeting, and whatever a timed-out
call left in the channel (or an agent restarted mid-sentence) must be skipped, so each call
first resynchronises as the protocol asks: a 0xFF byte (which resets the agent's parser),
then `guest-sync-delimited` with a fresh number, then everything up to the 0xFF sentinel the
agent puts before that answer, and the answer naming that number, is dropped. Calls run one
at a time (the domain's agent job, job.py); rule L4: no lock is held while the guest works.

QEMU tells whether the guest side of the port is open (`VSERPORT_CHANGE`): while it is
closed a call fails at once ("not connected"); after a daemon restart that is unknown until
the next change, so the call tries (bounded).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from pathlib import Path
from typing import Any

from ..errors import AgentError
from ..locks import check_no_locks
from .unixpath import connect_unix

log = logging.getLogger(__name__)

SENTINEL = b"\xff"
MAX_REPLY = 4 * 1024 * 1024  # the agent's answer to one call (file system lists are long)


class GuestAgent:
    """The host end of one run's guest agent channel."""

    def __init__(self, domain_name: str, socket_path: Path) -> None:
        self.domain_name = domain_name
        self.socket_path = socket_path
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.guest_connected: bool | None = None  # VSERPORT_CHANGE; None: not known yet

    async def connect(self, timeout_s: float) -> None:
        """Connect to QEMU's side of the channel (bounded; never blocks the loop)."""
        async with asyncio.timeout(timeout_s):
            sock = await connect_unix(self.socket_path)
            self._reader, self._writer = await asyncio.open_unix_connection(
                sock=sock, limit=MAX_REPLY)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    def _error(self, what: str) -> AgentError:
        return AgentError(f"domain '{self.domain_name}': {what}")

    async def call(self, command: str, arguments: dict[str, Any] | None = None, *,
                   timeout_s: float, reply: bool = True) -> Any:
        """Run one agent command; AgentError (named) on timeout, refusal or no agent.
        `reply=False` for commands the agent may not answer (guest-shutdown)."""
        check_no_locks(f"guest agent command '{command}' on {self.domain_name}")
        if self.guest_connected is False:
            raise self._error("the guest agent is not connected (is qemu-ga running in the "
                              "guest?)")
        if self._reader is None or self._writer is None:
            raise self._error("the guest agent channel is not open")
        try:
            async with asyncio.timeout(timeout_s):
                await self._sync()
                self._send({"execute": command, **({"arguments": arguments}
                                                   if arguments else {})})
                if not reply:
                    return None
                return await self._answer(command)
        except TimeoutError:
            raise self._error(f"the guest agent did not answer '{command}' within "
                              f"{timeout_s:g} s (is qemu-ga running in the guest?)") from None
        except (ConnectionError, OSError, EOFError, asyncio.IncompleteReadError) as exc:
            raise self._error(f"the guest agent channel closed during '{command}': "
                              f"{exc}") from None

    def _send(self, msg: dict[str, Any]) -> None:
        assert self._writer is not None
        self._writer.write(json.dumps(msg).encode() + b"\n")

    async def _sync(self) -> None:
        """Skip whatever an earlier call left in the channel (see the module docstring)."""
        assert self._reader is not None and self._writer is not None
        token = secrets.randbelow(2**31)
        self._writer.write(SENTINEL)
        self._send({"execute": "guest-sync-delimited", "arguments": {"id": token}})
        while True:
            await self._reader.readuntil(SENTINEL)
            line = await self._reader.readline()
            try:
                if json.loads(line).get("return") == token:
                    return
            except (ValueError, AttributeError):
                continue

    async def _answer(self, command: str) -> Any:
        assert self._reader is not None
        while True:
            line = await self._reader.readline()
            if not line:
                raise EOFError("end of file")
            try:
                msg = json.loads(line.strip(SENTINEL))
            except ValueError:
                continue
            if not isinstance(msg, dict):
                continue
            if "error" in msg:
                err = msg["error"] or {}
                raise self._error(f"the guest agent refused '{command}': "
                                  f"{err.get('desc') or err.get('class') or err}")
            if "return" in msg:
                return msg["return"]
