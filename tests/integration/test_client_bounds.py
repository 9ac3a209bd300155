"""One client can never hurt the daemon or the other clients (a real daemon, its socket).

A: a client that pipelines requests and never reads is cut off; the daemon's memory stays
   bounded and another client is answered promptly meanwhile.
B: subscriptions end with their connection: no subscriber, task or memory is left behind.
C: a replay longer than the subscriber queue is exact, then live delivery continues.
D: bad input is an error, never a crash or a traceback; max_clients; idle connections.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from harness import Daemon, tiny_definition, wait_for

from qvirtd.client import Client, RpcError

MIB = 1024 * 1024


def rss_kib(daemon: Daemon) -> int:
    assert daemon.proc is not None
    for line in Path(f"/proc/{daemon.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def request(method: str, params: dict[str, Any] | None = None, req_id: int = 1) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": req_id, "method": method,
                       "params": params or {}}).encode() + b"\n"


def read_lines(s: socket.socket, count: int, timeout_s: float = 10) -> list[dict[str, Any]]:
    s.settimeout(timeout_s)
    data = b""
    while data.count(b"\n") < count:
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        data += chunk
    return [json.loads(x) for x in data.splitlines() if x.strip()]


def closed_by_daemon(s: socket.socket, timeout_s: float) -> bool:
    """Drain what the daemon sent; True once it has closed its end."""
    s.settimeout(timeout_s)
    try:
        while s.recv(1 << 20):
            pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


def stats(daemon: Daemon) -> dict[str, Any]:
    return json.loads(daemon.qvirsh("daemon-stats").stdout)  # type: ignore[no-any-return]


async def define_many(daemon: Daemon, names: list[str]) -> None:
    client = await daemon.client()
    try:
        for name in names:
            await client.call("define", {"definition": tiny_definition(name)})
    finally:
        await client.close()


# --- A -----------------------------------------------------------------------------------

class Pipeliner(threading.Thread):
    """Sends `list --all` as fast as the socket takes it, never reads; when cut off, it
    connects again and carries on, until `seconds` have passed."""

    def __init__(self, path: Path, seconds: float) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.seconds = seconds
        self.sent = 0
        self.cut_offs: list[float] = []  # when the daemon cut it off
        self.sock: socket.socket | None = None

    def run(self) -> None:
        chunk = b"".join(request("list", {"all": True}, i) for i in range(100))
        start = time.monotonic()
        while time.monotonic() - start < self.seconds:
            if self.sock is None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(self.path))
                self.sock.settimeout(0.2)
            try:
                self.sock.sendall(chunk)
                self.sent += 100
            except TimeoutError:
                continue  # the daemon is not reading us: keep trying
            except OSError:  # EPIPE / ECONNRESET: the daemon cut us off
                self.cut_offs.append(time.monotonic() - start)
                self.sock.close()
                self.sock = None


class Prober(threading.Thread):
    """Another client: blocking dominfo calls in a loop, latency of each."""

    def __init__(self, path: Path, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.stop_ = stop
        self.latencies: list[float] = []
        self.errors: list[str] = []

    def run(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(self.path))
        s.settimeout(10)
        f = s.makefile("rb")
        while not self.stop_.is_set():
            t0 = time.monotonic()
            s.sendall(request("dominfo", {"name": "d0"}))
            reply = json.loads(f.readline())
            self.latencies.append(time.monotonic() - t0)
            if "result" not in reply:
                self.errors.append(str(reply))
            time.sleep(0.01)
        s.close()


# The bound: client_outbound_max_bytes (4 MiB by default) of queued replies, plus the
# StreamReader's buffer of unread requests (at most 2 x max_message_bytes, 2 MiB), plus the
# replies of the requests in flight (32 x ~20 KiB), plus allocator slack: well under 30 MiB.
# Without the bound, the same client took the daemon from 52 to 692 MiB in 10 s.
RSS_BOUND_KIB = 30 * 1024


@pytest.mark.parametrize("limit", ["bytes", "write-timeout"])
async def test_a_client_that_pipelines_and_never_reads_is_cut_off(
        daemon_factory: Any, limit: str) -> None:
    settings: dict[str, Any] = {"client_write_timeout_s": 3.0}
    if limit == "bytes":  # the outbound bound trips before the write timeout
        settings = {"client_outbound_max_bytes": 256 * 1024}
    daemon: Daemon = daemon_factory(settings)
    await define_many(daemon, [f"d{i}" for i in range(200)])
    before = rss_kib(daemon)
    stop = threading.Event()
    prober = Prober(daemon.socket, stop)
    prober.start()
    pipeliner = Pipeliner(daemon.socket, seconds=6)
    pipeliner.start()
    peak = before
    while pipeliner.is_alive():
        peak = max(peak, rss_kib(daemon))
        await asyncio.sleep(0.1)
    stop.set()
    prober.join(15)
    peak = max(peak, rss_kib(daemon))
    print(f"\nRSS {before} -> peak {peak} KiB; sent {pipeliner.sent} requests; cut off "
          f"{len(pipeliner.cut_offs)} times, first after "
          f"{pipeliner.cut_offs[0] if pipeliner.cut_offs else None} s; prober "
          f"{len(prober.latencies)} calls, max {max(prober.latencies) * 1000:.1f} ms")
    last = pipeliner.sock
    try:
        assert peak - before < RSS_BOUND_KIB, (before, peak)
        if limit == "bytes":  # quickly, and again each time it comes back
            assert len(pipeliner.cut_offs) >= 3 and pipeliner.cut_offs[0] < 2
        else:  # once it has not read for client_write_timeout_s
            assert len(pipeliner.cut_offs) >= 1 and pipeliner.cut_offs[0] >= 2.5
        if last is not None:
            last.close()
        s = wait_for(lambda: (lambda s: s if s["rpc"]["clients"] == 1 else None)(
            stats(daemon)), 15, "the offender's connection to go")
        assert s["rpc"]["cut_off"] >= len(pipeliner.cut_offs), s["rpc"]
        log = daemon.wait_log(r"client pid \d+ uid \d+ cut off")
        assert ("client_outbound_max_bytes" if limit == "bytes"
                else "client_write_timeout_s") in log
        # The other client was answered all along, promptly.
        assert not prober.errors, prober.errors[:3]
        # Answered all along: no call waited a second, and calls kept coming through the
        # whole 6 s (a count, not a speed: 60 calls is 100 ms a round on a loaded CI host).
        assert max(prober.latencies) < 1.0, max(prober.latencies)
        assert len(prober.latencies) > 60, len(prober.latencies)
    finally:
        if last is not None:
            last.close()


# --- B -----------------------------------------------------------------------------------

def subscribe_and_close(path: Path, cycles: int) -> None:
    for i in range(cycles):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(path))
        s.sendall(request("event", {"domain": "nosuch"}))
        if i % 2 == 0:  # half wait for the reply, half go away at once
            assert read_lines(s, 1)[0]["result"]["subscribed"] is True
        s.close()


def test_subscriptions_end_with_their_connection(daemon: Daemon) -> None:
    subscribe_and_close(daemon.socket, 100)  # warm up the allocator
    time.sleep(0.5)
    base = stats(daemon)
    rss_before = rss_kib(daemon)
    subscribe_and_close(daemon.socket, 2000)

    def settled() -> dict[str, Any] | None:
        s = stats(daemon)
        same = (s["events"]["subscribers"] == base["events"]["subscribers"]
                and s["background_tasks"] == base["background_tasks"]
                and s["rpc"]["tasks"] == base["rpc"]["tasks"]
                and s["rpc"]["clients"] == base["rpc"]["clients"])
        return s if same else None

    after = wait_for(settled, 10, f"subscribers and tasks back to {base}")
    assert after["events"]["subscribers"] == 0
    grown = rss_kib(daemon) - rss_before
    print(f"\nRSS grew by {grown} KiB over 2,000 subscribe/close cycles")
    assert grown < 4 * 1024, grown


# --- C -----------------------------------------------------------------------------------

async def make_events(daemon: Daemon, cycles: int, prefix: str = "e") -> None:
    """Two events per cycle: defined/added and undefined/removed."""
    client = await daemon.client()
    try:
        for i in range(cycles):
            name = f"{prefix}{i % 7}"
            await client.call("define", {"definition": tiny_definition(name)})
            await client.call("undefine", {"name": name})
    finally:
        await client.close()


async def test_replay_longer_than_the_subscriber_queue_is_exact(daemon_factory: Any) -> None:
    daemon: Daemon = daemon_factory({"event_queue_per_subscriber": 100})
    await make_events(daemon, 700)
    buffered = stats(daemon)["events"]["last_seq"]
    assert buffered >= 1400
    # A client that reads slowly, in small bites, while more events keep coming: the replay
    # has to wait for it, and switches to live in the middle of the traffic.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(str(daemon.socket))
    s.sendall(request("event", {"since_seq": 0}))
    producer = asyncio.create_task(make_events(daemon, 50, prefix="live"))
    data = b""
    seqs: list[int] = []
    other: list[dict[str, Any]] = []
    s.settimeout(10)
    while not producer.done() or not seqs or seqs[-1] < buffered + 100:
        chunk = await asyncio.to_thread(s.recv, 2048)
        assert chunk, "the daemon closed the connection"
        data += chunk
        *lines, data = data.split(b"\n")
        for line in lines:
            msg = json.loads(line)
            if msg.get("method") == "event":
                seqs.append(msg["params"]["seq"])
            else:
                other.append(msg)
        await asyncio.sleep(0.001)
    await producer
    s.close()
    assert [m for m in other if "id" not in m] == [], other  # no overflow, no gap notice
    assert seqs == list(range(1, buffered + 101)), (len(seqs), seqs[:3], seqs[-3:])
    after = stats(daemon)["events"]
    assert after["dropped_subscribers"] == 0


async def test_replay_gap_at_subscribe_is_refused_and_live_follows_replay(
        daemon_factory: Any) -> None:
    daemon: Daemon = daemon_factory({"event_replay_buffer": 50})
    await make_events(daemon, 40)
    client = await daemon.client()
    try:
        with pytest.raises(RpcError) as err:
            await client.call("event", {"since_seq": 0})
        assert err.value.kind == "replay-gap" and "re-read state" in str(err.value)
        sub = await client.call("event", {"since_seq": 60})
        await make_events(daemon, 2)
        got = []
        while len(got) < sub["last_seq"] - 60 + 4:
            msg = await client.next_event(10)
            assert msg is not None and msg["method"] == "event", msg
            got.append(msg["params"]["seq"])
        assert got == list(range(61, sub["last_seq"] + 5))
    finally:
        await client.close()


# --- D -----------------------------------------------------------------------------------

def test_a_message_nested_too_deep_is_an_error(daemon: Daemon) -> None:
    daemon.define(tiny_definition("alive"))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(daemon.socket))
    deep = b"[" * 5000 + b"]" * 5000
    s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"dominfo","params":{"name":' + deep + b"}}\n"
              + request("dominfo", {"name": "alive"}, 2)
              + b'{"jsonrpc":"2.0","id":3,"method":"define","params":{"definition":'
              + b'{"a":' * 100 + b"{}" + b"}" * 100 + b"}}\n")
    first, second, third = read_lines(s, 3)
    s.close()
    assert first["id"] is None and first["error"]["code"] == -32700
    assert "nested too deep" in first["error"]["message"] and "64" in first["error"]["message"]
    assert second["id"] == 2 and second["result"]["name"] == "alive"  # the connection lives
    assert third["id"] == 3 and third["error"]["code"] == -32602
    assert "definition" in third["error"]["message"] and "64" in third["error"]["message"]
    assert daemon.json("dominfo", "alive")["state"] == "shutoff"


def test_qvirsh_refuses_a_definition_nested_too_deep(daemon: Daemon) -> None:
    for depth in (5000, 100):
        path = daemon.root / f"deep{depth}.json"
        path.write_text('{"name": "deep", "x": ' + "[" * depth + "]" * depth + "}")
        res = daemon.qvirsh("define", str(path), check=False)
        assert res.returncode == 2, res
        assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
        assert "nested too deep" in res.stderr and "Traceback" not in res.stderr
    assert daemon.json("list", "--all") == []


def test_qvirsh_define_over_the_message_limit_prints_the_daemons_error(
        daemon_factory: Any) -> None:
    daemon: Daemon = daemon_factory({"max_message_bytes": 65536})
    for size in (100_000, 3_000_000):
        path = daemon.root / f"big{size}.json"
        path.write_text(json.dumps(tiny_definition("big", description="x" * size)))
        res = daemon.qvirsh("define", str(path), check=False)
        assert res.returncode == 1, res
        assert res.stderr == ("error: message too large: the limit is 65536 bytes per line "
                              "(max_message_bytes)\n"), res.stderr
    assert daemon.json("list", "--all") == []


def test_max_clients(daemon_factory: Any) -> None:
    daemon: Daemon = daemon_factory({"max_clients": 3})
    held = []
    for _ in range(3):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(daemon.socket))
        held.append(s)
    time.sleep(0.2)
    extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    extra.connect(str(daemon.socket))
    [refusal] = read_lines(extra, 1)
    assert closed_by_daemon(extra, 5)
    extra.close()
    assert refusal["id"] is None and refusal["error"]["code"] == -32003
    assert "max_clients" in refusal["error"]["message"] and "3" in refusal["error"]["message"]
    res = daemon.qvirsh("list", check=False)
    assert res.returncode == 1 and res.stderr.startswith("error: too many clients"), res
    held.pop().close()
    wait_for(lambda: daemon.qvirsh("list", check=False).returncode == 0, 5, "a free slot")
    for s in held:
        s.close()
    daemon.wait_log("refused client pid")


async def test_idle_connections_are_closed_subscribed_ones_are_not(
        daemon_factory: Any) -> None:
    daemon: Daemon = daemon_factory({"client_idle_timeout_s": 1.0})
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    idle.connect(str(daemon.socket))
    subscribed = await daemon.client()
    try:
        await subscribed.call("event")
        start = time.monotonic()
        [notice] = await asyncio.to_thread(read_lines, idle, 1, 10)
        assert await asyncio.to_thread(closed_by_daemon, idle, 5)
        assert 0.9 < time.monotonic() - start < 5
        assert notice["id"] is None and notice["error"]["code"] == -32004
        assert "client_idle_timeout_s" in notice["error"]["message"]
        await asyncio.sleep(2.5)  # well past the idle time: a subscriber stays
        await asyncio.to_thread(daemon.define, tiny_definition("late"))
        msg = await subscribed.next_event(10)
        assert msg is not None and msg["params"]["domain"]["name"] == "late"
        assert stats(daemon)["rpc"]["idle_closed"] >= 1
    finally:
        idle.close()
        await subscribed.close()


async def test_an_operation_outlives_its_client(daemon: Daemon) -> None:
    client = await Client.connect(daemon.socket)
    task = asyncio.create_task(client.call("define", {"definition": tiny_definition("kept")}))
    await asyncio.sleep(0)  # sent, then the client goes away at once
    await client.close()
    await asyncio.gather(task, return_exceptions=True)  # its reply is lost, or not
    wait_for(lambda: daemon.qvirsh("dominfo", "kept", check=False).returncode == 0, 10,
             "the define to complete anyway")
