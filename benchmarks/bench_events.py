"""Event latency and throughput (issue 3), through a real daemon and real QEMU.

* latency: from QEMU emitting a QMP event (its own timestamp) to a socket subscriber holding
  the daemon's event, p50/p99, for STOP/RESUME events of a no-OS guest; also split at the
  daemon (QMP event -> event created) to show where the time goes;
* throughput: events per second through the queue and the socket to ten subscribers, with
  several domains producing events at once; and the bare in-process EventBus to ten queue
  subscribers, for the queue's own ceiling.

Usage: python benchmarks/bench_events.py [--quick]
"""

from __future__ import annotations

import asyncio
import datetime
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import Qvirtd, emit, header, percentile, run_main

from qvirtd.client import Client
from qvirtd.events import EventBus


def ts(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso).timestamp()


async def latency(daemon: Qvirtd, rounds: int) -> dict[str, Any]:
    driver = await Client.connect(daemon.socket)
    sub = await Client.connect(daemon.socket)
    try:
        await driver.call("define", {"definition": {"name": "lat", "memory_mib": 64}})
        await driver.call("start", {"name": "lat"})
        await sub.call("event", {"domain": "lat"})
        total: list[float] = []
        in_daemon: list[float] = []
        for _ in range(rounds):
            for cmd in ("stop", "cont"):
                await driver.call("qemu-monitor-command",
                                  {"name": "lat", "command": {"execute": cmd}})
                msg = await sub.next_event(10)
                now = time.time()
                assert msg is not None
                ev = msg["params"]
                if "qemu_time" not in ev:
                    continue
                total.append(now - ts(ev["qemu_time"]))
                in_daemon.append(ts(ev["time"]) - ts(ev["qemu_time"]))
        await driver.call("destroy", {"name": "lat"})
    finally:
        await driver.close()
        await sub.close()
    ms = 1e3
    return {"samples": len(total),
            "p50_ms": percentile(total, 0.5) * ms, "p99_ms": percentile(total, 0.99) * ms,
            "qmp_to_event_p50_ms": percentile(in_daemon, 0.5) * ms,
            "qmp_to_event_p99_ms": percentile(in_daemon, 0.99) * ms}


async def throughput(daemon: Qvirtd, domains: int, rounds: int,
                     subscribers: int = 10) -> dict[str, Any]:
    drivers = [await Client.connect(daemon.socket) for _ in range(domains)]
    subs = [await Client.connect(daemon.socket) for _ in range(subscribers)]
    try:
        for i, d in enumerate(drivers):
            await d.call("define", {"definition": {"name": f"tp{i}", "memory_mib": 64}})
            await d.call("start", {"name": f"tp{i}"})
        for s in subs:
            await s.call("event")
        expected = domains * rounds * 2
        counts = [0] * subscribers

        async def consume(i: int) -> None:
            while counts[i] < expected:
                msg = await subs[i].next_event(30)
                assert msg is not None and msg.get("method") == "event"
                counts[i] += 1

        async def produce(i: int) -> None:
            for _ in range(rounds):
                for cmd in ("stop", "cont"):
                    await drivers[i].call("qemu-monitor-command",
                                          {"name": f"tp{i}", "command": {"execute": cmd}})

        start = time.perf_counter()
        consumers = [asyncio.create_task(consume(i)) for i in range(subscribers)]
        await asyncio.gather(*(produce(i) for i in range(domains)))
        if not subscribers:
            await asyncio.sleep(0)
        await asyncio.gather(*consumers)
        elapsed = time.perf_counter() - start
        stats = await drivers[0].call("daemon-stats")
        for i, d in enumerate(drivers):
            await d.call("destroy", {"name": f"tp{i}"})
    finally:
        for c in drivers + subs:
            await c.close()
    return {"domains": domains, "subscribers": subscribers, "events": expected,
            "seconds": elapsed, "events_per_s": expected / elapsed,
            "deliveries_per_s": expected * subscribers / elapsed,
            "daemon_rss_kib": stats["rss_kib"]}


async def bare_bus(events: int, subscribers: int = 10) -> dict[str, Any]:
    bus = EventBus(queue_per_subscriber=events + 1)
    subs = [bus.subscribe() for _ in range(subscribers)]
    start = time.perf_counter()
    for i in range(events):
        bus.push("lifecycle", "bench", "00000000-0000-0000-0000-000000000000", 1,
                 "suspended", "paused")
        if i % 1000 == 999:
            await asyncio.sleep(0)  # let the flush timer run, as in the daemon
    await asyncio.sleep(0)
    elapsed = time.perf_counter() - start
    assert all(len(s.queue) == events for s in subs)
    return {"events": events, "subscribers": subscribers, "events_per_s": events / elapsed}


async def main_async(quick: bool) -> None:
    result = header("events")
    daemon = Qvirtd()
    try:
        result["latency"] = await latency(daemon, 20 if quick else 500)
        domains, rounds = (2, 20) if quick else (4, 500)
        result["producers_alone"] = await throughput(daemon, domains, rounds, subscribers=0)
        result["throughput"] = await throughput(daemon, domains, rounds)
    finally:
        daemon.stop()
    result["bare_bus"] = await bare_bus(2000 if quick else 100000)
    lat, tp, bus = result["latency"], result["throughput"], result["bare_bus"]
    alone = result["producers_alone"]
    emit(result, [
        ("QMP event -> socket subscriber, p50", f"{lat['p50_ms']:.2f} ms"),
        ("QMP event -> socket subscriber, p99", f"{lat['p99_ms']:.2f} ms"),
        ("  of which QMP event -> event created, p50/p99",
         f"{lat['qmp_to_event_p50_ms']:.2f} / {lat['qmp_to_event_p99_ms']:.2f} ms"),
        (f"events/s to {tp['subscribers']} socket subscribers ({tp['domains']} domains "
         "producing)", f"{tp['events_per_s']:,.0f} ({tp['deliveries_per_s']:,.0f} deliveries/s)"),
        ("same producers, no subscriber (the producers' own ceiling)",
         f"{alone['events_per_s']:,.0f}"),
        ("bare EventBus, events/s to 10 queue subscribers", f"{bus['events_per_s']:,.0f}"),
    ])


if __name__ == "__main__":
    run_main(__doc__ or "", main_async)
