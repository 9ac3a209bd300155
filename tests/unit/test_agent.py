"""The guest agent client (qvirtd.qemu.agent) against a scripted qemu-ga: resync past stale
data, errors named, silence bounded. The real qemu-ga in the test guest is exercised by
tests/integration/test_guest_agent.py."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from qvirtd.errors import AgentError
from qvirtd.qemu.agent import GuestAgent


class FakeAgent:
    """Speaks like qemu-ga: 0xFF before a guest-sync-delimited answer; knows two commands."""

    def __init__(self, stale: bytes = b"", silent: bool = False) -> None:
        self.stale = stale
        self.silent = silent
        self.seen: list[str] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(self.stale)  # what a previous client's timed-out call left behind
        buf = b""
        while True:
            data = await reader.read(4096)
            if not data:
                return
            buf += data.replace(b"\xff", b"")
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                msg = json.loads(line)
                self.seen.append(msg["execute"])
                if self.silent:
                    continue
                if msg["execute"] == "guest-sync-delimited":
                    writer.write(b"\xff" + json.dumps(
                        {"return": msg["arguments"]["id"]}).encode() + b"\n")
                elif msg["execute"] == "guest-get-host-name":
                    writer.write(b'{"return": {"host-name": "guest"}}\n')
                else:
                    writer.write(json.dumps({"error": {"class": "CommandNotFound",
                                                       "desc": "not here"}}).encode() + b"\n")


async def connected(tmp_path: Path, fake: FakeAgent) -> tuple[GuestAgent, asyncio.Server]:
    path = tmp_path / "agent.sock"
    server = await asyncio.start_unix_server(fake.serve, path=str(path))
    agent = GuestAgent("vm", path)
    await agent.connect(2.0)
    return agent, server


async def test_a_call_resyncs_past_stale_data(tmp_path: Path) -> None:
    stale = b'{"return": {"host-name": "stale"}}\n\xff{"return": 12345}\n{"retu'
    fake = FakeAgent(stale=stale)
    agent, server = await connected(tmp_path, fake)
    try:
        assert await agent.call("guest-get-host-name", timeout_s=2.0) == {"host-name": "guest"}
        assert fake.seen == ["guest-sync-delimited", "guest-get-host-name"]
        with pytest.raises(AgentError, match="refused 'guest-fsfreeze-freeze': not here"):
            await agent.call("guest-fsfreeze-freeze", timeout_s=2.0)
        assert await agent.call("guest-shutdown", timeout_s=2.0, reply=False) is None
    finally:
        agent.close()
        server.close()


async def test_a_silent_guest_is_an_error_not_a_hang(tmp_path: Path) -> None:
    agent, server = await connected(tmp_path, FakeAgent(silent=True))
    try:
        t0 = time.monotonic()
        with pytest.raises(AgentError, match=r"did not answer 'guest-ping' within 0\.3 s"):
            await agent.call("guest-ping", timeout_s=0.3)
        assert time.monotonic() - t0 < 2
        agent.guest_connected = False  # QEMU said the guest closed its side
        t0 = time.monotonic()
        with pytest.raises(AgentError, match="not connected"):
            await agent.call("guest-ping", timeout_s=5)
        assert time.monotonic() - t0 < 0.1
    finally:
        agent.close()
        server.close()
