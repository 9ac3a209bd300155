"""Bad input gets a clear error naming what is wrong, loses nothing, and the daemon serves on."""

from __future__ import annotations

import asyncio
import json
import socket

from harness import Daemon, tiny_definition


def raw_exchange(daemon: Daemon, payload: bytes, read_timeout_s: float = 5) -> list[dict]:  # type: ignore[type-arg]
    """Send raw bytes, return every reply line until the daemon closes or goes quiet."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(daemon.socket))
    s.sendall(payload)
    s.settimeout(read_timeout_s)
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        pass
    finally:
        s.close()
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def test_invalid_definitions_are_refused_and_nothing_is_stored(daemon: Daemon) -> None:
    daemon.define(tiny_definition("keep", memory_mib=96))
    cases = {
        "extra.json": ({"name": "x", "color": "blue"}, "color: unknown field"),
        "badname.json": ({"name": "a,b"}, "name"),
        "slash.json": ({"name": "../etc"}, "name"),
        "memory.json": ({"name": "big", "memory_mib": 10**9, "vcpus": 0},
                        "memory_mib"),
        "kernel.json": ({"name": "k", "boot": {"kernel": "relative/vmlinuz"}},
                        "boot.kernel"),
        "update.json": ({"name": "keep", "memory_mib": "lots"}, "memory_mib"),
    }
    for fname, (definition, named) in cases.items():
        path = daemon.root / fname
        path.write_text(json.dumps(definition))
        res = daemon.qvirsh("define", str(path), check=False)
        assert res.returncode == 1, (fname, res.stderr)
        assert res.stderr.startswith("error: invalid definition") and named in res.stderr, \
            res.stderr
        assert res.stderr.count("\n") == 1  # one line
    # vcpus is named too, alongside memory_mib (every offending field)
    (daemon.root / "two.json").write_text(json.dumps({"name": "t", "memory_mib": 1,
                                                      "vcpus": 0}))
    res = daemon.qvirsh("define", str(daemon.root / "two.json"), check=False)
    assert "memory_mib" in res.stderr and "vcpus" in res.stderr
    assert [d["name"] for d in daemon.json("list", "--all")] == ["keep"]
    assert daemon.json("dominfo", "keep")["memory_mib"] == 96
    stored = sorted(p.name for p in (daemon.root / "state" / "domains").iterdir())
    assert stored == ["keep.json"]


def test_cli_usage_errors_exit_2(daemon: Daemon) -> None:
    for args in (["frobnicate"], ["start"], ["shutdown", "x", "--wait", "soon"],
                 ["define", str(daemon.root / "missing.json")]):
        res = daemon.qvirsh(*args, check=False)
        assert res.returncode == 2, (args, res)
        assert res.stderr.startswith("error: "), res.stderr
    (daemon.root / "notjson.json").write_text("{nope")
    res = daemon.qvirsh("define", str(daemon.root / "notjson.json"), check=False)
    assert res.returncode == 2 and "not valid JSON" in res.stderr


def test_operation_errors_exit_1(daemon: Daemon) -> None:
    daemon.define(tiny_definition("off"))
    for args, text in ((["start", "ghost"], "not found"),
                       (["suspend", "off"], "not running"),
                       (["destroy", "off"], "not running")):
        res = daemon.qvirsh(*args, check=False)
        assert res.returncode == 1 and text in res.stderr, (args, res.stderr)
    res = daemon.qvirsh("--socket", "/nonexistent/sock", "list", check=False)
    assert res.returncode == 1 and "cannot connect" in res.stderr


async def test_bad_rpc_requests_get_clear_errors(daemon: Daemon) -> None:
    client = await daemon.client()
    try:
        async def err(method: str, params: object) -> dict:  # type: ignore[type-arg]
            from qvirtd.client import RpcError
            try:
                await client.call(method, params)  # type: ignore[arg-type]
            except RpcError as exc:
                return {"code": exc.code, "message": str(exc)}
            raise AssertionError(f"{method} {params} succeeded")

        e = await err("nosuchmethod", {})
        assert e["code"] == -32601 and "nosuchmethod" in e["message"]
        e = await err("dominfo", {"name": 5})
        assert e["code"] == -32602 and "name" in e["message"]
        e = await err("dominfo", {})
        assert e["code"] == -32602 and "name" in e["message"] and "required" in e["message"]
        e = await err("list", {"all": "yes please"})
        assert e["code"] == -32602 and "all" in e["message"]
        e = await err("start", {"name": "x", "bogus": 1})
        assert e["code"] == -32602 and "bogus" in e["message"]
        e = await err("shutdown", {"name": "x", "wait": -1})
        assert e["code"] == -32602 and "wait" in e["message"]
        e = await err("event", {"since_seq": "x"})
        assert e["code"] == -32602 and "since_seq" in e["message"]
        assert await client.call("list") == []
    finally:
        await client.close()


def test_garbage_and_oversized_messages(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    daemon: Daemon = daemon_factory({"max_message_bytes": 4096})
    daemon.define(tiny_definition("alive"))
    # Not JSON: a parse error reply, and the connection stays usable.
    replies = raw_exchange(daemon, b"\xff\xfe\x00garbage\n"
                           b'{"jsonrpc":"2.0","id":7,"method":"list","params":{"all":true}}\n',
                           read_timeout_s=2)
    assert replies[0]["error"]["code"] == -32700 and replies[0]["id"] is None
    assert replies[1]["id"] == 7 and replies[1]["result"][0]["name"] == "alive"
    # Not a request object: invalid request.
    replies = raw_exchange(daemon, b'[1,2,3]\n{"jsonrpc":"1.0","id":1,"method":"list"}\n',
                           read_timeout_s=2)
    assert [r["error"]["code"] for r in replies] == [-32600, -32600]
    # Params not an object.
    replies = raw_exchange(daemon, b'{"jsonrpc":"2.0","id":2,"method":"list","params":[1]}\n',
                           read_timeout_s=2)
    assert replies[0]["error"]["code"] == -32602
    # Oversized line: an error naming the limit, then the daemon closes the connection.
    replies = raw_exchange(daemon, b"x" * 20000)
    assert replies[0]["error"]["code"] == -32002 and "4096" in replies[0]["error"]["message"]
    # A stream of garbage: cut off after a few lines, without a reply per line forever.
    replies = raw_exchange(daemon, b"garbage\n" * 100)
    assert 1 <= len(replies) <= 10
    # The daemon is fine and serves everyone else.
    assert daemon.json("dominfo", "alive")["state"] == "shutoff"


async def test_requests_in_flight_are_capped(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    daemon: Daemon = daemon_factory({"max_requests_in_flight": 2})
    daemon.define(tiny_definition("slow"))
    daemon.qvirsh("start", "slow")
    client = await daemon.client()
    try:
        # A no-OS guest ignores the power button: `shutdown --wait 3` stays in flight.
        slow = [asyncio.create_task(client.call("shutdown", {"name": "slow", "wait": 3}))
                for _ in range(2)]
        await asyncio.sleep(0.5)
        from qvirtd.client import RpcError
        try:
            await client.call("list")
            raise AssertionError("a third request in flight was accepted")
        except RpcError as exc:
            assert exc.code == -32001 and "in flight" in str(exc)
        for t in slow:
            try:
                await t
            except RpcError as exc:
                assert "did not shut off within 3 s" in str(exc)
        assert await client.call("list") != []  # under the cap again
    finally:
        await client.close()
    daemon.qvirsh("destroy", "slow")
