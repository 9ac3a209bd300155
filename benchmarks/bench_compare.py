"""qvirtd against the floor, measured side by side in one run (issue 6).

The floor is bare QEMU started straight from asyncio with qemu.qmp, no daemon, with the same
command line qvirtd builds for the same domain (`-S`, then `cont`). Scenarios:

* start N no-OS domains (64 MiB, q35) concurrently, N = 1, 20, 50: wall time to all running;
* dominfo queries per second from 1 and 8 concurrent clients (separate processes);
* a frozen QEMU (SIGSTOP), with the daemon's default timeouts: p50/p99 of queries on healthy
  domains (against the same unloaded), time until a command on the frozen domain fails,
  until a second job on it fails, and until destroy has removed it;
* memory: daemon RSS with 1,000 defined and 50 running domains;
* the driver lock's hold time (p99, max) under the start-50 scenario (daemon-stats);
* events: suspend/resume call -> lifecycle event at a subscriber (p50/p99) and events/s to
  10 subscribers, with 4 KVM no-OS guests (which keep 2 cores busy on their own under nested
  KVM) and again with 4 TCG guests, which idle.

With --libvirt (`make bench-libvirt`), Debian's libvirt (a private libvirtd, see
libvirt_private.py) runs the same scenarios in the same run.

Usage: python benchmarks/bench_compare.py [--quick] [--libvirt]
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_queries import asyncio_worker, rate, request
from common import Qvirtd, emit, header, kill_qemus_mentioning, percentile, run_main
from qemu.qmp import QMPClient
from settle import wait_quiet

from qvirtd.client import Client, RpcError
from qvirtd.model import Accel, DomainDef
from qvirtd.qemu.accel import cpu_model, resolve_accel
from qvirtd.qemu.argv import LaunchPaths, build_argv

TINY = {"memory_mib": 64, "vcpus": 1}


# --- the floor ---------------------------------------------------------------------------

async def floor_start(n: int) -> float:
    """Spawn n QEMUs with qvirtd's command line, connect QMP, `cont`: seconds to all running."""
    root = Path(tempfile.mkdtemp(prefix="qvfloor-", dir="/tmp"))
    accel = resolve_accel(Accel.AUTO)
    cpu = await cpu_model(accel, "qemu-system-x86_64")
    procs: list[subprocess.Popen[bytes]] = []
    clients: list[QMPClient] = []

    async def one(i: int) -> None:
        run_dir = root / f"f{i}"
        run_dir.mkdir()
        paths = LaunchPaths(run_dir)
        monitor_socket = run_dir / "monitor.sock"
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(monitor_socket))
        listener.listen(8)
        console = socket.socket(socket.AF_UNIX)  # the serial console socket, as qvirtd's
        console.bind(str(run_dir / "console.sock"))
        console.listen(8)
        argv = build_argv(DomainDef(name=f"f{i}", **TINY), accel, "qemu-system-x86_64",
                          listener.fileno(), paths, cpu, console.fileno())
        with open(run_dir / "qemu.log", "wb") as log:
            # Spawned as qvirtd spawns QEMU (Popen, own session), so the comparison is fair.
            procs.append(subprocess.Popen(  # noqa: ASYNC220
                argv, pass_fds=[listener.fileno(), console.fileno()], stdout=log, stderr=log,
                start_new_session=True))
        listener.close()
        console.close()
        qmp = QMPClient(f"f{i}")
        clients.append(qmp)
        await qmp.connect(str(monitor_socket))
        await qmp.execute("cont")

    start = time.perf_counter()
    try:
        await asyncio.gather(*(one(i) for i in range(n)))
        return time.perf_counter() - start
    finally:
        for qmp in clients:
            try:
                await qmp.disconnect()
            except Exception:  # the library re-raises the connection's error here
                pass
        for p in procs:
            p.kill()
            p.wait()
        shutil.rmtree(root, ignore_errors=True)


# --- qvirtd ------------------------------------------------------------------------------

async def connect_many(daemon: Qvirtd, n: int) -> list[Client]:
    return [await Client.connect(daemon.socket) for _ in range(n)]


async def qvirtd_start(n: int) -> dict[str, Any]:
    """Start n defined domains from n clients at once: seconds to all running; lock stats."""
    daemon = Qvirtd()
    try:
        clients = await connect_many(daemon, n)
        for i in range(n):
            await clients[0].call("define", {"definition": {"name": f"s{i}", **TINY}})
        # The first KVM start of a daemon probes the CPU model once (qemu/accel.py); the
        # floor asks the same probe before its clock starts. So one start first, untimed.
        await clients[0].call("define", {"definition": {"name": "warm", **TINY}})
        await clients[0].call("start", {"name": "warm"})
        await clients[0].call("destroy", {"name": "warm"})
        start = time.perf_counter()
        infos = await asyncio.gather(*(c.call("start", {"name": f"s{i}"})
                                       for i, c in enumerate(clients)))
        elapsed = time.perf_counter() - start
        assert all(i["state"] == "running" for i in infos)
        stats = await clients[0].call("daemon-stats")
        await asyncio.gather(*(c.call("destroy", {"name": f"s{i}"})
                               for i, c in enumerate(clients)))
        for c in clients:
            await c.close()
        return {"seconds": elapsed, "driver_lock": stats["driver_lock"]}
    finally:
        daemon.stop()


async def latencies(client: Client, name: str, seconds: float) -> list[float]:
    samples: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        await client.call("dominfo", {"name": name})
        samples.append(time.perf_counter() - t)
        await asyncio.sleep(0.005)
    return samples


async def finished_at(call: Any) -> float:
    """When `call` ended (it is expected to fail: the domain is frozen)."""
    try:
        await call
    except RpcError:
        pass
    return time.perf_counter()


async def frozen(quick: bool) -> dict[str, Any]:
    """One QEMU SIGSTOPped; default timeouts (monitor 10 s, job wait 30 s)."""
    daemon = Qvirtd({"monitor_timeout_s": 2.0, "job_wait_timeout_s": 1.0} if quick else {})
    try:
        a, b, c = await connect_many(daemon, 3)
        for name in ("healthy", "frozen"):
            await a.call("define", {"definition": {"name": name, **TINY}})
            await a.call("start", {"name": name})
        unloaded = await latencies(c, "healthy", 1.0 if quick else 3.0)
        pid = (await a.call("dominfo", {"name": "frozen"}))["pid"]
        os.kill(pid, signal.SIGSTOP)
        t0 = time.perf_counter()
        first = asyncio.create_task(finished_at(a.call("suspend", {"name": "frozen"})))
        await asyncio.sleep(0.1)
        second = asyncio.create_task(finished_at(b.call("resume", {"name": "frozen"})))
        loaded: list[float] = []
        while not second.done():
            loaded += await latencies(c, "healthy", 0.5)
        t_first = await first - t0
        t_second = await second - t0
        t = time.perf_counter()
        await c.call("destroy", {"name": "frozen"})
        t_destroy = time.perf_counter() - t
        for cl in (a, b, c):
            await cl.close()
        return {"unloaded_p50_ms": percentile(unloaded, 0.5) * 1e3,
                "unloaded_p99_ms": percentile(unloaded, 0.99) * 1e3,
                "frozen_p50_ms": percentile(loaded, 0.5) * 1e3,
                "frozen_p99_ms": percentile(loaded, 0.99) * 1e3,
                "first_call_failed_s": t_first, "second_job_failed_s": t_second,
                "destroy_s": t_destroy}
    finally:
        daemon.stop()


async def arrived(watcher: Client) -> float:
    """When the next event reached `watcher` (perf_counter)."""
    await watcher.next_event(10)
    return time.perf_counter()


async def qvirtd_events(rounds: int, producers: int, subscribers: int,
                        accel: str = "auto", settle_s: float = 30.0) -> dict[str, Any]:
    """As libvirt_client.events: suspend/resume -> lifecycle event at a socket subscriber.
    Measured once the guests are quiet (settle.py: a no-OS guest's SeaBIOS scans for a boot
    device at up to 100 % of a CPU for its first seconds; libvirt_client waits the same way).
    `accel` tcg: guests that idle from the start."""
    daemon = Qvirtd()
    try:
        drivers = await connect_many(daemon, producers)
        names = [f"e{i}" for i in range(producers)]
        for d, name in zip(drivers, names, strict=True):
            await d.call("define", {"definition": {"name": name, **TINY, "accel": accel}})
            await d.call("start", {"name": name})
        # Past the firmware's boot scan (--quick: at most a second; it only checks it runs).
        await asyncio.to_thread(wait_quiet, names, timeout_s=settle_s)
        watcher = await Client.connect(daemon.socket)
        await watcher.call("event", {"domain": names[0]})
        latencies = []
        for _ in range(rounds):
            for method in ("suspend", "resume"):
                # The event's arrival is timed by its own task (as libvirt's callback times
                # it in its event thread), not after the call has returned.
                arrival = asyncio.create_task(arrived(watcher))
                t = time.perf_counter()
                await drivers[0].call(method, {"name": names[0]})
                latencies.append(await arrival - t)
        subs = await connect_many(daemon, subscribers)
        for s in subs:
            await s.call("event")
        expected = producers * rounds * 2

        async def consume(s: Client) -> None:
            for _ in range(expected):
                await s.next_event(30)

        async def produce(d: Client, name: str) -> None:
            for _ in range(rounds):
                await d.call("suspend", {"name": name})
                await d.call("resume", {"name": name})

        t = time.perf_counter()
        consumers = [asyncio.create_task(consume(s)) for s in subs]
        await asyncio.gather(*(produce(d, n) for d, n in zip(drivers, names, strict=True)))
        await asyncio.gather(*consumers)
        elapsed = time.perf_counter() - t
        for c in (*drivers, watcher, *subs):
            await c.close()
        return {"call_to_event_p50_ms": percentile(latencies, 0.5) * 1e3,
                "call_to_event_p99_ms": percentile(latencies, 0.99) * 1e3,
                "events_per_s": expected / elapsed}
    finally:
        daemon.stop()


async def memory(defined: int, running: int) -> dict[str, Any]:
    daemon = Qvirtd()
    try:
        clients = await connect_many(daemon, max(1, running))
        base = (await clients[0].call("daemon-stats"))["rss_kib"]
        for i in range(defined):
            await clients[0].call("define", {"definition": {"name": f"m{i}", **TINY}})
        after_define = (await clients[0].call("daemon-stats"))["rss_kib"]
        await asyncio.gather(*(clients[i].call("start", {"name": f"m{i}"})
                               for i in range(running)))
        stats = await clients[0].call("daemon-stats")
        await asyncio.gather(*(clients[i].call("destroy", {"name": f"m{i}"})
                               for i in range(running)))
        for c in clients:
            await c.close()
        return {"defined": defined, "running": running, "rss_empty_kib": base,
                "rss_defined_kib": after_define, "rss_kib": stats["rss_kib"]}
    finally:
        daemon.stop()


def libvirt_figures(sizes: list[int], quick: bool) -> dict[str, Any]:
    """The same scenarios against a private libvirtd (client side under Debian's python3)."""
    from libvirt_private import PrivateLibvirtd

    lv = PrivateLibvirtd()
    run = lv.scenario
    try:
        out: dict[str, Any] = {"version": "libvirt 9.0 (Debian 12), private libvirtd"}
        out["start"] = {n: run("start", str(n))["seconds"] for n in sizes}
        seconds = "1" if quick else "5"
        out["queries"] = {k: run("queries", k, seconds)["per_s"] for k in ("1", "8")}
        out["frozen"] = run("frozen", "10" if quick else "45")
        out["events"] = run("events", "10" if quick else "200", "4", "10")
        out["events_idle"] = run("events", "10" if quick else "200", "4", "10", "qemu")
        defined, running = (50, 3) if quick else (1000, 50)
        run("populate", str(defined), str(running))
        out["memory"] = {"defined": defined, "running": running, "rss_kib": lv.rss_kib()}
        run("cleanup")
        return out
    finally:
        lv.stop()


async def main_async(quick: bool, with_libvirt: bool = False) -> None:
    result = header("compare")
    sizes = [1, 3] if quick else [1, 20, 50]
    result["start"] = {}
    for n in sizes:
        floor_s = await floor_start(n)
        q = await qvirtd_start(n)
        result["start"][n] = {"floor_s": floor_s, "qvirtd_s": q["seconds"],
                              "ratio": q["seconds"] / floor_s, "driver_lock": q["driver_lock"]}
    daemon = Qvirtd()
    try:
        client = await Client.connect(daemon.socket)
        await client.call("define", {"definition": {"name": "q", **TINY}})
        await client.call("start", {"name": "q"})
        seconds = 1.0 if quick else 5.0
        line = request("dominfo", {"name": "q"})
        result["queries"] = {str(k): rate(asyncio_worker, str(daemon.socket), line, k, seconds)
                             for k in (1, 8)}
        await client.call("destroy", {"name": "q"})
        await client.close()
    finally:
        daemon.stop()
    result["frozen"] = await frozen(quick)
    result["memory"] = await memory(50 if quick else 1000, 3 if quick else 50)
    ev_rounds = 10 if quick else 200
    settle_s = 1.0 if quick else 30.0
    result["events"] = await qvirtd_events(ev_rounds, 4, 10, settle_s=settle_s)
    result["events_idle"] = await qvirtd_events(ev_rounds, 4, 10, accel="tcg",
                                                settle_s=settle_s)
    kill_qemus_mentioning("/tmp/qvfloor-")
    lv = result["libvirt"] = await asyncio.to_thread(libvirt_figures, sizes, quick) \
        if with_libvirt else None
    big = str(sizes[-1])
    s, fr, mem = result["start"], result["frozen"], result["memory"]
    lock = s[sizes[-1]]["driver_lock"]
    table = [
        *[(f"start {n} domains: floor / qvirtd (ratio)",
           f"{s[n]['floor_s']:.2f} s / {s[n]['qvirtd_s']:.2f} s ({s[n]['ratio']:.2f}x)")
          for n in sizes],
        ("dominfo/s, 1 client", f"{result['queries']['1']:,.0f}"),
        ("dominfo/s, 8 clients", f"{result['queries']['8']:,.0f}"),
        ("healthy dominfo p50/p99, unloaded",
         f"{fr['unloaded_p50_ms']:.2f} / {fr['unloaded_p99_ms']:.2f} ms"),
        ("healthy dominfo p50/p99, one QEMU frozen",
         f"{fr['frozen_p50_ms']:.2f} / {fr['frozen_p99_ms']:.2f} ms"),
        ("frozen: command fails after", f"{fr['first_call_failed_s']:.2f} s"),
        ("frozen: second job fails after", f"{fr['second_job_failed_s']:.2f} s"),
        ("frozen: destroy took", f"{fr['destroy_s']:.3f} s"),
        (f"daemon RSS, {mem['defined']} defined / {mem['running']} running",
         f"{mem['rss_defined_kib'] / 1024:.1f} / {mem['rss_kib'] / 1024:.1f} MiB "
         f"(empty {mem['rss_empty_kib'] / 1024:.1f} MiB)"),
        (f"driver lock hold under start-{big}: p99 / max",
         f"{lock['p99_ms']:.3f} / {lock['max_ms']:.3f} ms"),
        ("events: suspend/resume call -> event, p50 / p99",
         f"{result['events']['call_to_event_p50_ms']:.2f} / "
         f"{result['events']['call_to_event_p99_ms']:.2f} ms"),
        ("events/s to 10 subscribers (4 domains suspended/resumed)",
         f"{result['events']['events_per_s']:,.0f}"),
        ("events, idle (TCG) guests: call -> event, p50 / p99",
         f"{result['events_idle']['call_to_event_p50_ms']:.2f} / "
         f"{result['events_idle']['call_to_event_p99_ms']:.2f} ms"),
        ("events/s to 10 subscribers, idle (TCG) guests",
         f"{result['events_idle']['events_per_s']:,.0f}"),
    ]
    if lv is not None:
        lf = lv["frozen"]
        table += [
            *[(f"libvirt: start {n} domains (qvirtd / libvirt)",
               f"{lv['start'][n]:.2f} s ({s[n]['qvirtd_s'] / lv['start'][n]:.2f}x)")
              for n in sizes],
            *[(f"libvirt: info()/s, {k} client(s) (qvirtd / libvirt)",
               f"{lv['queries'][k]:,.0f} ({result['queries'][k] / lv['queries'][k]:.2f}x)")
              for k in ("1", "8")],
            ("libvirt: healthy info() p50/p99 unloaded / one QEMU frozen",
             f"{lf['unloaded_p50_ms']:.2f}/{lf['unloaded_p99_ms']:.2f} / "
             f"{lf['frozen_p50_ms']:.2f}/{lf['frozen_p99_ms']:.2f} ms"),
            ("libvirt: frozen: first call", f"{lf['first'][0]} after {lf['first'][1]:.1f} s"),
            ("libvirt: frozen: second job", f"{lf['second'][0]} after {lf['second'][1]:.1f} s"
             + (f" ({lf['second'][2][:90]})" if len(lf["second"]) > 2 else "")),
            ("libvirt: frozen: destroy", f"{lf['destroy_s']:.2f} s"
             if isinstance(lf["destroy_s"], float) else str(lf["destroy_s"])),
            ("libvirt: events: call -> event, p50 / p99",
             f"{lv['events']['call_to_event_p50_ms']:.2f} / "
             f"{lv['events']['call_to_event_p99_ms']:.2f} ms"),
            ("libvirt: events/s to 10 subscribers (qvirtd / libvirt)",
             f"{lv['events']['events_per_s']:,.0f} "
             f"({result['events']['events_per_s'] / lv['events']['events_per_s']:.2f}x)"),
            ("libvirt: events, idle (TCG) guests: call -> event, p50 / p99",
             f"{lv['events_idle']['call_to_event_p50_ms']:.2f} / "
             f"{lv['events_idle']['call_to_event_p99_ms']:.2f} ms"),
            ("libvirt: events/s, idle (TCG) guests (qvirtd / libvirt)",
             f"{lv['events_idle']['events_per_s']:,.0f} ("
             f"{result['events_idle']['events_per_s'] / lv['events_idle']['events_per_s']:.2f}x)"),
            (f"libvirt: libvirtd RSS, {lv['memory']['defined']} defined / "
             f"{lv['memory']['running']} running", f"{lv['memory']['rss_kib'] / 1024:.1f} MiB"),
        ]
    emit(result, table)


if __name__ == "__main__":
    run_main(__doc__ or "", main_async, libvirt=True)
