"""A transport and a connection that live in memory, for the rpc unit tests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from typing import Any

from qvirtd.rpc.outbound import Outbound
from qvirtd.rpc.streams import EventStream


class FakeTransport:
    """What the daemon wrote and the client has not read yet is `buffer`; `read()` is the
    client reading (it wakes a drain once the buffer is down to the low-water mark)."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.received = bytearray()
        self.high = 64 * 1024
        self.low = self.high // 4
        self.aborted = False
        self.closed = False
        self._changed = asyncio.Event()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high = high if high is not None else self.high
        self.low = low if low is not None else self.high // 4

    def get_write_buffer_size(self) -> int:
        return len(self.buffer)

    def write(self, data: bytes) -> None:
        if self.closed:
            raise RuntimeError("transport closed")
        self.buffer += data

    def read(self, n: int | None = None) -> bytes:
        n = len(self.buffer) if n is None else n
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        self.received += data
        self._changed.set()
        return data

    def messages(self) -> list[dict[str, Any]]:
        """Everything the client has read, decoded."""
        return [json.loads(line) for line in self.received.splitlines() if line.strip()]

    def abort(self) -> None:
        self.aborted = self.closed = True
        self.buffer.clear()
        self._changed.set()

    def close(self) -> None:
        self.closed = True

    async def drain(self) -> None:
        while len(self.buffer) > self.low:
            if self.closed:
                raise ConnectionResetError("closed")
            self._changed.clear()
            await self._changed.wait()


class FakeWriter:
    def __init__(self, transport: FakeTransport) -> None:
        self.transport = transport

    async def drain(self) -> None:
        await self.transport.drain()


class FakeConnection:
    """The part of a connection that subscriptions use (StreamOwner)."""

    def __init__(self, max_bytes: int = 4 * 1024 * 1024, write_timeout_s: float = 10.0) -> None:
        self.transport = FakeTransport()
        self.stuck: list[str] = []
        self.outbound = Outbound(FakeWriter(self.transport), max_bytes,  # type: ignore[arg-type]
                                 write_timeout_s, self.stuck.append)
        self.streams: set[EventStream] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    def add_stream(self, stream: EventStream) -> None:
        if self.outbound.closed:
            stream.close()
        else:
            self.streams.add(stream)

    def forget_stream(self, stream: EventStream) -> None:
        self.streams.discard(stream)

    def start_task(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def close(self) -> None:
        for stream in list(self.streams):
            stream.close()
        self.streams.clear()
        self.outbound.close()
        self.transport.abort()

    def events(self) -> list[int]:
        return [m["params"]["seq"] for m in self.transport.messages()
                if m.get("method") == "event"]
