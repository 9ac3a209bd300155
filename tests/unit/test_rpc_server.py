"""The JSON-RPC server's limits (qvirtd.rpc.server), in process, over a real UNIX socket.

A small method table stands in for the daemon's: `echo`, `sleep`, `big` (a reply of a given
size), `define` (a free-form `definition`), `daemon-stats`, and `event` on a real EventBus."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from qvirtd.client import Client, RpcError
from qvirtd.config import Settings
from qvirtd.events import EventBus
from qvirtd.locks import TrackedLock
from qvirtd.rpc.methods import Caller, EventParams, Method, Params
from qvirtd.rpc.server import Connection, RpcServer
from qvirtd.rpc.streams import subscribe_events


class EchoParams(Params):
    value: Any = None


class SleepParams(Params):
    seconds: float


class BigParams(Params):
    size: int


class DefineParams(Params):
    definition: dict[str, Any]


class Harness:
    def __init__(self, server: RpcServer, path: Path, bus: EventBus,
                 lock: TrackedLock) -> None:
        self.server = server
        self.lock = lock  # what `peek` reads
        self.path = path
        self.bus = bus
        self.finished: list[str] = []
        self.socks: list[socket.socket] = []

    def raw(self, rcvbuf: int | None = None) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.connect(str(self.path))
        s.setblocking(False)
        self.socks.append(s)
        return s

    async def client(self) -> Client:
        return await Client.connect(self.path)


def request(method: str, params: dict[str, Any] | None = None, req_id: int = 1) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": req_id, "method": method,
                       "params": params or {}}).encode() + b"\n"


async def read_lines(s: socket.socket, timeout_s: float = 2.0,
                     count: int | None = None) -> list[dict[str, Any]]:
    """What the daemon sent, until it closes, goes quiet, or `count` lines came."""
    loop = asyncio.get_running_loop()
    data = b""
    try:
        while count is None or data.count(b"\n") < count:
            chunk = await asyncio.wait_for(loop.sock_recv(s, 1 << 20), timeout_s)
            if not chunk:
                break
            data += chunk
    except (TimeoutError, ConnectionError):
        pass
    return [json.loads(x) for x in data.splitlines() if x.strip()]


async def closed_by_peer(s: socket.socket, timeout_s: float = 5.0) -> bool:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                if not await loop.sock_recv(s, 1 << 20):
                    return True
    except ConnectionError:
        return True
    except TimeoutError:
        return False


@asynccontextmanager
async def serving(max_in_flight: int = 32, max_message_bytes: int = 64 * 1024,
                  write_timeout_s: float = 10.0, **settings: Any) -> AsyncIterator[Harness]:
    tmp = Path(tempfile.mkdtemp(prefix="qvrpc-", dir="/tmp"))
    bus = EventBus(queue_per_subscriber=100)
    harness: Harness

    async def echo(p: EchoParams, c: Caller) -> Any:
        return p.value

    async def sleep(p: SleepParams, c: Caller) -> Any:
        await asyncio.sleep(p.seconds)
        harness.finished.append("sleep")
        return "slept"

    async def big(p: BigParams, c: Caller) -> Any:
        return "x" * p.size

    async def define(p: DefineParams, c: Caller) -> Any:
        return "defined"

    async def stats(p: Params, c: Caller) -> Any:
        return {"events": {"subscribers": bus.subscriber_count}}

    lock = TrackedLock("peeked")

    async def peek(p: Params, c: Caller) -> Any:
        async with lock:
            return "waited"

    def peek_now(conn: Connection, p: Params) -> Any:
        lock.read_now()
        return "inline"

    async def event(conn: Connection, p: EventParams) -> Any:
        return await subscribe_events(bus, conn, p.domain, p.events, p.since_seq)

    methods = {"echo": Method(EchoParams, echo, ""), "sleep": Method(SleepParams, sleep, ""),
               "big": Method(BigParams, big, ""), "define": Method(DefineParams, define, ""),
               "daemon-stats": Method(Params, stats, ""), "peek": Method(Params, peek, "")}
    server = RpcServer(methods, max_message_bytes, max_in_flight,
                       {"event": (EventParams, event)}, write_timeout_s,
                       settings=Settings(**settings), now_methods={"peek": (Params, peek_now)})
    path = tmp / "s.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(128)
    sock.setblocking(False)
    await server.start(sock)
    harness = Harness(server, path, bus, lock)
    try:
        yield harness
    finally:
        for s in harness.socks:
            s.close()
        await server.stop(0.1)
        sock.close()
        shutil.rmtree(tmp, ignore_errors=True)


async def test_a_message_nested_too_deep_is_a_parse_error_naming_the_limit() -> None:
    async with serving() as h:
        s = h.raw()
        deep = b'{"jsonrpc":"2.0","id":1,"method":"echo","params":{"value":' + b"[" * 5000
        s.sendall(deep + b"]" * 5000 + b"}}\n" + request("echo", {"value": 7}, 2))
        first, second = await read_lines(s, count=2)
        assert first["id"] is None and first["error"]["code"] == -32700
        assert "nested too deep" in first["error"]["message"]
        assert "64" in first["error"]["message"]
        assert second == {"jsonrpc": "2.0", "id": 2, "result": 7}  # the connection serves on


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


async def test_free_form_params_are_limited_to_64_levels() -> None:
    async with serving(max_message_bytes=1 << 20) as h:
        client = await h.client()
        try:
            assert await client.call("define", {"definition": nested(64)}) == "defined"
            with pytest.raises(RpcError) as err:
                await client.call("define", {"definition": nested(65)})
            assert err.value.code == -32602
            assert "definition" in str(err.value) and "64" in str(err.value)
            with pytest.raises(RpcError) as err:  # deep, but within what the parser takes
                await client.call("define", {"definition": nested(150)})
            assert err.value.code == -32602
            with pytest.raises(RpcError) as err:  # beyond it (200): refused while parsing
                await client.call("define", {"definition": nested(900)})
            assert err.value.code == -32700 and "nested too deep" in str(err.value)
        finally:
            await client.close()


async def test_the_client_fails_its_call_with_the_daemons_message_when_too_large() -> None:
    async with serving(max_message_bytes=4096) as h:
        client = await h.client()
        try:
            with pytest.raises(RpcError) as err:
                await client.call("echo", {"value": "x" * 2_000_000}, timeout_s=10)
            assert err.value.code == -32002
            assert str(err.value).startswith("message too large") and "4096" in str(err.value)
            with pytest.raises(RpcError, match="message too large"):
                await client.call("echo")  # the connection is gone; the reason stays
        finally:
            await client.close()


async def test_a_pipelined_burst_over_the_cap_is_slowed_down_not_refused() -> None:
    async with serving(max_in_flight=2) as h:
        s = h.raw()
        s.sendall(b"".join(request("echo", {"value": i}, i) for i in range(200)))
        replies = await read_lines(s, count=200)
        assert sorted(r["id"] for r in replies) == list(range(200))
        assert all("result" in r for r in replies), [r for r in replies if "error" in r][:1]


async def test_requests_over_the_cap_of_slow_operations_get_an_error() -> None:
    async with serving(max_in_flight=2) as h:
        client = await h.client()
        try:
            slow = [asyncio.create_task(client.call("sleep", {"seconds": 2.5}))
                    for _ in range(2)]
            await asyncio.sleep(0.1)
            loop = asyncio.get_running_loop()
            start = loop.time()
            with pytest.raises(RpcError) as err:
                await client.call("echo", {"value": 1})
            assert 0.9 <= loop.time() - start < 2.0  # held for CAP_WAIT_S first
            assert err.value.code == -32001 and "max_requests_in_flight" in str(err.value)
            start = loop.time()
            with pytest.raises(RpcError):  # still saturated: refused at once
                await client.call("echo", {"value": 2})
            assert loop.time() - start < 0.5
            assert await asyncio.gather(*slow) == ["slept", "slept"]
            assert await client.call("echo", {"value": 3}) == 3  # a slot is free again
        finally:
            await client.close()


async def test_a_client_at_the_cap_that_does_not_read_is_not_read_from() -> None:
    async with serving(max_in_flight=2, max_message_bytes=1 << 20) as h:
        s = h.raw(rcvbuf=4096)
        # Replies that cannot all be written: the first fills the transport, the next two
        # wait in the outbound queue, still in flight.
        s.sendall(request("big", {"size": 400_000}, 1) + request("big", {"size": 400_000}, 2))
        await asyncio.sleep(0.2)
        s.sendall(request("big", {"size": 400_000}, 3))
        await asyncio.sleep(0.2)
        conn = next(iter(h.server.connections))
        assert conn.in_flight == 2 and conn.outbound.backlogged
        # More requests: they wait unread (backpressure), no error replies pile up.
        for i in range(4, 40):
            s.sendall(request("echo", {"value": i}, i))
        await asyncio.sleep(0.3)
        assert conn.in_flight == 2
        size = conn.outbound.size
        # The client reads at last: every request is answered, none refused.
        replies = await read_lines(s, count=39)
        assert sorted(r["id"] for r in replies) == list(range(1, 40))
        assert all("result" in r for r in replies), [r for r in replies if "error" in r][:1]
        assert size < 1_000_000


async def test_a_reply_over_the_outbound_bound_cuts_the_client_off(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "qvirtd.rpc.server")
    async with serving(max_in_flight=100, client_outbound_max_bytes=256 * 1024) as h:
        s = h.raw(rcvbuf=4096)
        s.sendall(b"".join(request("big", {"size": 50_000}, i) for i in range(20)))
        other = await h.client()
        try:
            assert await closed_by_peer(s)
            assert h.server.cut_off == 1
            assert await other.call("echo", {"value": "fine"}) == "fine"
        finally:
            await other.close()
    [record] = [r for r in caplog.records if "cut off" in r.getMessage()]
    assert "pid" in record.getMessage() and "client_outbound_max_bytes" in record.getMessage()


async def test_a_client_that_stops_reading_is_cut_off_after_the_write_timeout() -> None:
    async with serving(max_in_flight=2, write_timeout_s=0.3, max_message_bytes=1 << 20) as h:
        s = h.raw(rcvbuf=4096)
        s.sendall(request("big", {"size": 400_000}, 1))
        await asyncio.sleep(1.0)  # not reading
        assert h.server.cut_off == 1
        assert await closed_by_peer(s, 3)


async def test_max_clients() -> None:
    async with serving(max_clients=2) as h:
        a, b = await h.client(), await h.client()
        try:
            assert await a.call("echo", {"value": 1}) == 1
            s = h.raw()
            [refusal] = await read_lines(s)
            assert refusal["id"] is None and refusal["error"]["code"] == -32003
            assert "max_clients" in refusal["error"]["message"]
            assert "2" in refusal["error"]["message"]
            c = await h.client()
            with pytest.raises(RpcError, match="too many clients"):
                await c.call("echo", {"value": 1})
            await c.close()
            await b.close()
            await asyncio.sleep(0.1)
            d = await h.client()  # room again
            assert await d.call("echo", {"value": 3}) == 3
            await d.close()
            assert h.server.refused == 2
        finally:
            await a.close()


async def test_idle_connections_are_closed_busy_and_subscribed_ones_are_not() -> None:
    async with serving(client_idle_timeout_s=0.3) as h:
        idle = h.raw()
        subscribed = await h.client()
        busy = await h.client()
        try:
            await subscribed.call("event", {"domain": "nosuch"})
            slow = asyncio.create_task(busy.call("sleep", {"seconds": 1.0}))
            [notice] = await read_lines(idle, timeout_s=3)
            assert notice["id"] is None and notice["error"]["code"] == -32004
            assert "client_idle_timeout_s" in notice["error"]["message"]
            assert await closed_by_peer(idle)
            assert await slow == "slept"  # in flight for longer than the idle time
            assert await busy.call("echo", {"value": "busy"}) == "busy"
            await asyncio.sleep(0.6)
            assert await subscribed.call("echo", {"value": "still here"}) == "still here"
            assert h.server.idle_closed == 2  # `idle`, then `busy` once it had been quiet
        finally:
            await subscribed.close()
            await busy.close()


async def test_closing_a_connection_ends_its_subscriptions_not_its_operations() -> None:
    async with serving() as h:
        for _ in range(50):
            s = h.raw()
            s.sendall(request("event", {"domain": "nosuch"}, 1) + request("event", {}, 2))
            await read_lines(s, count=2)
            s.close()
        client = await h.client()
        slow = asyncio.create_task(client.call("sleep", {"seconds": 0.3}))
        await asyncio.sleep(0.05)
        await client.close()
        await asyncio.sleep(0.5)
        assert h.finished == ["sleep"]  # ran to completion; its reply was dropped
        assert slow.done()
        assert h.bus.subscriber_count == 0
        assert len(h.server.connections) == 0
        names = [t.get_name() for t in asyncio.all_tasks()]
        assert "event-replay" not in names and "client-writer" not in names


async def test_daemon_stats_gets_the_rpc_counters() -> None:
    async with serving() as h:
        client = await h.client()
        try:
            stats = await client.call("daemon-stats")
            assert stats["events"] == {"subscribers": 0}
            rpc = stats["rpc"]
            assert rpc["clients"] == 1 and rpc["max_clients"] == 256
            assert rpc["requests_in_flight"] == 1  # this one
            assert {"outbound_bytes", "cut_off", "refused", "idle_closed", "tasks"} <= set(rpc)
        finally:
            await client.close()


async def test_a_read_is_answered_inline_unless_its_lock_is_held() -> None:
    """`now=` methods answer without a task while the lock they read is free; while a task
    holds it (half-way through a change) the request waits for it like any other."""
    async with serving() as h:
        s = h.raw()
        s.sendall(request("peek", req_id=1) + request("peek", {"x": 1}, req_id=2))
        first, bad = await read_lines(s, count=2)
        assert first["result"] == "inline" and not h.server._tasks
        assert bad["id"] == 2 and "x" in bad["error"]["message"]  # validated as ever
        await h.lock.acquire()
        s.sendall(request("peek", req_id=3))
        assert await read_lines(s, 0.3) == []
        h.lock.release()
        assert (await read_lines(s, count=1))[0] == {"jsonrpc": "2.0", "id": 3,
                                                      "result": "waited"}

