"""Many domains at once: concurrent starts all succeed, destroy leaves no QEMU behind."""

from __future__ import annotations

import asyncio

from harness import Daemon, tiny_definition


async def test_ten_domains_start_concurrently(daemon: Daemon) -> None:
    names = [f"tiny{i}" for i in range(10)]
    for name in names:
        daemon.define(tiny_definition(name))
    client = await daemon.client()
    try:
        infos = await asyncio.gather(*(client.call("start", {"name": n}) for n in names))
        assert {i["state"] for i in infos} == {"running"}
        assert len({i["id"] for i in infos}) == 10
        assert len({i["pid"] for i in infos}) == 10
        listed = await client.call("list")
        assert sorted(d["name"] for d in listed) == names
        assert len(daemon.qemu_pids()) == 10
        await asyncio.gather(*(client.call("destroy", {"name": n}) for n in names))
        listed = await client.call("list", {"all": True})
        assert {d["state"] for d in listed} == {"shutoff"}
        assert all(d["id"] is None for d in listed)
    finally:
        await client.close()
    assert daemon.qemu_pids() == []


def test_lookup_by_name_uuid_and_id(daemon: Daemon) -> None:
    daemon.define(tiny_definition("findme"))
    uuid = daemon.json("dominfo", "findme")["uuid"]
    daemon.qvirsh("start", "findme")
    dom_id = daemon.json("dominfo", "findme")["id"]
    assert daemon.json("dominfo", uuid)["name"] == "findme"
    assert daemon.json("dominfo", str(dom_id))["name"] == "findme"
    daemon.qvirsh("destroy", "findme")
    res = daemon.qvirsh("dominfo", str(dom_id), check=False)
    assert res.returncode == 1 and "not found" in res.stderr


def test_undefine_running_domain_becomes_transient(daemon: Daemon) -> None:
    daemon.define(tiny_definition("trans"))
    daemon.qvirsh("start", "trans")
    daemon.qvirsh("undefine", "trans")
    info = daemon.json("dominfo", "trans")
    assert info["persistent"] is False and info["state"] == "running"
    assert not (daemon.root / "state" / "domains" / "trans.json").exists()
    daemon.qvirsh("destroy", "trans")
    res = daemon.qvirsh("dominfo", "trans", check=False)
    assert res.returncode == 1 and "not found" in res.stderr
    assert daemon.json("list", "--all") == []


async def test_a_client_that_disconnects_does_not_cancel_its_operation(daemon: Daemon) -> None:
    daemon.define(tiny_definition("orphan"))
    client = await daemon.client()
    call = asyncio.create_task(client.call("start", {"name": "orphan"}))
    await asyncio.sleep(0.02)  # the request is in; the start is under way
    await client.close()
    call.cancel()
    info = await asyncio.to_thread(daemon.wait_state, "orphan", "running", 30)
    assert info["pid"] is not None
    daemon.qvirsh("destroy", "orphan")
