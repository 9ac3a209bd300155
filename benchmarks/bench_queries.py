"""Where users wait on queries (issue 12): the floor server, qvirtd and libvirt side by side.

* CPU per call: the thinnest client (a blocking socket, one request at a time) makes N
  `dominfo` calls; the server's own CPU time (utime + stime from /proc/PID/stat) over them,
  divided by N. The floor is `floor_server.py`, a bare uvloop JSON-lines server answering
  every request with qvirtd's own dominfo reply, with the standard library's json and with
  pydantic-core's (qvirtd's own). qvirtd is measured first and again last, so that a drift of
  the machine shows. libvirt: libvirtd's CPU over N `info()`
  calls from python3-libvirt (with --libvirt).
* Calls per second from 1 and 8 client processes, each with the thinnest client (blocking
  sockets for the floor and qvirtd; python3-libvirt for libvirt), and with qvirtd's asyncio
  client (`qvirtd.client.Client`).
* Bulk: `list --all --info` over 1,000 defined domains, and `domstats` over 50 running ones,
  with and without a frozen (SIGSTOPped) QEMU among them: wall time per call and the
  daemon's CPU per call.

Usage: python benchmarks/bench_queries.py [--quick] [--libvirt]
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Qvirtd, emit, header, run_main
from procfs import cpu_s

from qvirtd.client import Client

HERE = Path(__file__).resolve().parent
TINY = {"memory_mib": 64, "vcpus": 1}
def request(method: str, params: dict[str, Any]) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": method,
                       "params": params}).encode() + b"\n"


def blocking_calls(path: str, line: bytes, n: int) -> float:
    """n calls, one at a time, on a blocking socket: seconds taken."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    f = s.makefile("rb")
    t = time.perf_counter()
    for _ in range(n):
        s.sendall(line)
        if b'"result"' not in f.readline():
            raise SystemExit(f"call failed: {line!r}")
    elapsed = time.perf_counter() - t
    s.close()
    return elapsed


def cpu_per_call(pid: int, path: str, line: bytes, n: int) -> dict[str, float]:
    blocking_calls(path, line, min(n, 500))  # warm up
    before = cpu_s(pid)
    elapsed = blocking_calls(path, line, n)
    return {"cpu_us": (cpu_s(pid) - before) / n * 1e6, "wall_us": elapsed / n * 1e6}


def _blocking_worker(path: str, line: bytes, seconds: float, out: Any) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    f = s.makefile("rb")
    count = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        s.sendall(line)
        f.readline()
        count += 1
    s.close()
    out.put(count)


def asyncio_worker(path: str, line: bytes, seconds: float, out: Any) -> None:
    msg = json.loads(line)

    async def run() -> int:
        client = await Client.connect(path)
        count = 0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            await client.call(msg["method"], msg["params"])
            count += 1
        await client.close()
        return count
    out.put(asyncio.run(run()))


def rate(worker: Any, path: str, line: bytes, clients: int, seconds: float) -> float:
    """Calls per second, summed over `clients` processes."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(path, line, seconds, out))
             for _ in range(clients)]
    for p in procs:
        p.start()
    total = sum(out.get(timeout=seconds + 60) for _ in procs)
    for p in procs:
        p.join()
    return total / seconds


def queries(quick: bool) -> dict[str, Any]:
    n = 1000 if quick else 20000
    seconds = 0.5 if quick else 4.0
    line = request("dominfo", {"name": "q"})
    out: dict[str, Any] = {"calls": n, "seconds": seconds}
    daemon = Qvirtd()
    try:
        info = asyncio.run(_setup_one(daemon))
        path = str(daemon.socket)
        out["qvirtd"] = {
            **cpu_per_call(daemon.proc.pid, path, line, n),
            "per_s": {str(k): rate(_blocking_worker, path, line, k, seconds) for k in (1, 8)},
            "asyncio_client_per_s": {str(k): rate(asyncio_worker, path, line, k, seconds)
                                     for k in (1, 8)},
        }
        asyncio.run(_destroy(daemon, "q"))
    finally:
        daemon.stop()
    for variant in ("stdlib", "pydantic-core"):
        out[f"floor_{variant}"] = floor(info, line, n, seconds, variant)
    # qvirtd again, so that a drift of the machine over the run shows as a spread.
    daemon = Qvirtd()
    try:
        asyncio.run(_setup_one(daemon))
        out["qvirtd_again"] = cpu_per_call(daemon.proc.pid, str(daemon.socket), line, n)
        asyncio.run(_destroy(daemon, "q"))
    finally:
        daemon.stop()
    return out


def floor(info: Any, line: bytes, n: int, seconds: float, variant: str) -> dict[str, Any]:
    """The floor server (floor_server.py) with `variant`'s JSON library, measured as qvirtd."""
    with tempfile.TemporaryDirectory(prefix="qvfloor-") as tmp:
        path = str(Path(tmp) / "floor.sock")
        server = subprocess.Popen([sys.executable, str(HERE / "floor_server.py"), path,
                                   json.dumps(info), variant])
        try:
            deadline = time.monotonic() + 10
            while not os.path.exists(path):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the floor server did not start")
                time.sleep(0.02)
            return {**cpu_per_call(server.pid, path, line, n),
                    "per_s": {str(k): rate(_blocking_worker, path, line, k, seconds)
                              for k in (1, 8)}}
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait()


async def _setup_one(daemon: Qvirtd) -> Any:
    """Define and start domain q; its dominfo."""
    client = await Client.connect(daemon.socket)
    await client.call("define", {"definition": {"name": "q", **TINY}})
    await client.call("start", {"name": "q"})
    info = await client.call("dominfo", {"name": "q"})
    await client.close()
    return info


async def _destroy(daemon: Qvirtd, name: str) -> None:
    client = await Client.connect(daemon.socket)
    await client.call("destroy", {"name": name})
    await client.close()


def timed_calls(pid: int, path: str, line: bytes, n: int) -> dict[str, float]:
    """Wall and daemon CPU per call, in ms, over n calls (after one warm-up call)."""
    blocking_calls(path, line, 1)
    before = cpu_s(pid)
    elapsed = blocking_calls(path, line, n)
    return {"wall_ms": elapsed / n * 1e3, "cpu_ms": (cpu_s(pid) - before) / n * 1e3}


def bulk(quick: bool) -> dict[str, Any]:
    defined, running = (30, 3) if quick else (1000, 50)
    calls = 3 if quick else 50
    out: dict[str, Any] = {"defined": defined, "running": running}
    daemon = Qvirtd()
    try:
        async def setup() -> None:
            clients = [await Client.connect(daemon.socket) for _ in range(running)]
            for i in range(defined):
                await clients[0].call("define", {"definition": {"name": f"b{i}", **TINY}})
            await asyncio.gather(*(c.call("start", {"name": f"b{i}"})
                                   for i, c in enumerate(clients)))
            for c in clients:
                await c.close()
        asyncio.run(setup())
        path, pid = str(daemon.socket), daemon.proc.pid
        out["list_all_info"] = timed_calls(pid, path, request("list", {"all": True,
                                                                         "info": True}), calls)
        stats_line = request("domstats", {})
        out["domstats"] = timed_calls(pid, path, stats_line, calls)
        frozen = json.loads(_one(path, request("dominfo", {"name": "b0"})))["result"]["pid"]
        os.kill(frozen, signal.SIGSTOP)
        try:
            out["domstats_one_frozen"] = timed_calls(pid, path, stats_line, calls)
            reply = json.loads(_one(path, stats_line))["result"]
            out["frozen_marked_stale"] = next(d for d in reply["domains"]
                                              if d["name"] == "b0").get("stale", False)
        finally:
            os.kill(frozen, signal.SIGCONT)
    finally:
        daemon.stop()
    return out


def _one(path: str, line: bytes) -> bytes:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(line)
    reply = s.makefile("rb").readline()
    s.close()
    return reply


def libvirt_figures(quick: bool) -> dict[str, Any]:
    from libvirt_private import PrivateLibvirtd

    lv = PrivateLibvirtd()
    run = lv.scenario
    try:
        n = "2000" if quick else "20000"
        seconds = "1" if quick else "4"
        out: dict[str, Any] = {"cpu": run("cpu", str(lv.proc.pid), n)}
        out["per_s"] = {k: run("queries", k, seconds)["per_s"] for k in ("1", "8")}
        defined, running = ("100", "5") if quick else ("1000", "50")
        out["bulk"] = run("bulk", str(lv.proc.pid), defined, running)
        return out
    finally:
        lv.stop()


async def main_async(quick: bool, with_libvirt: bool = False) -> None:
    result = header("queries")
    q = result["queries"] = await asyncio.to_thread(queries, quick)
    b = result["bulk"] = await asyncio.to_thread(bulk, quick)
    lv = result["libvirt"] = await asyncio.to_thread(libvirt_figures, quick) \
        if with_libvirt else None
    fl, ff, qv = q["floor_stdlib"], q["floor_pydantic-core"], q["qvirtd"]
    table = [
        ("server CPU per dominfo: floor (json) / floor (pydantic-core) / qvirtd (again)",
         f"{fl['cpu_us']:.1f} / {ff['cpu_us']:.1f} / {qv['cpu_us']:.1f} "
         f"({q['qvirtd_again']['cpu_us']:.1f}) µs"),
        ("qvirtd / floor (json), qvirtd / floor (pydantic-core)",
         f"{qv['cpu_us'] / fl['cpu_us']:.2f}x, {qv['cpu_us'] / ff['cpu_us']:.2f}x"),
        ("dominfo/s, 1 blocking client: floor (json) / floor (pydantic-core) / qvirtd",
         f"{fl['per_s']['1']:,.0f} / {ff['per_s']['1']:,.0f} / {qv['per_s']['1']:,.0f}"),
        ("dominfo/s, 8 blocking clients: floor (json) / floor (pydantic-core) / qvirtd",
         f"{fl['per_s']['8']:,.0f} / {ff['per_s']['8']:,.0f} / {qv['per_s']['8']:,.0f}"),
        ("dominfo/s, asyncio client, 1 / 8 clients",
         f"{qv['asyncio_client_per_s']['1']:,.0f} / {qv['asyncio_client_per_s']['8']:,.0f}"),
        (f"list --all --info, {b['defined']} defined: wall / daemon CPU per call",
         f"{b['list_all_info']['wall_ms']:.2f} / {b['list_all_info']['cpu_ms']:.2f} ms"),
        (f"domstats, {b['running']} running: wall / daemon CPU per call",
         f"{b['domstats']['wall_ms']:.2f} / {b['domstats']['cpu_ms']:.2f} ms"),
        (f"domstats, {b['running']} running, one frozen: wall / daemon CPU per call",
         f"{b['domstats_one_frozen']['wall_ms']:.2f} / "
         f"{b['domstats_one_frozen']['cpu_ms']:.2f} ms (frozen marked stale: "
         f"{b['frozen_marked_stale']})"),
    ]
    if lv is not None:
        table += [
            ("libvirt: libvirtd CPU per info() (qvirtd / libvirt)",
             f"{lv['cpu']['cpu_us']:.1f} µs ({qv['cpu_us'] / lv['cpu']['cpu_us']:.2f}x)"),
            *[(f"libvirt: info()/s, {k} client(s) (qvirtd blocking / libvirt)",
               f"{lv['per_s'][k]:,.0f} ({qv['per_s'][k] / lv['per_s'][k]:.2f}x)")
              for k in ("1", "8")],
            (f"libvirt: listAllDomains + info() each, {lv['bulk']['defined']} defined: "
             "wall / libvirtd CPU", f"{lv['bulk']['list_wall_ms']:.2f} / "
             f"{lv['bulk']['list_cpu_ms']:.2f} ms"),
            (f"libvirt: getAllDomainStats, {lv['bulk']['running']} running: wall / "
             "libvirtd CPU", f"{lv['bulk']['stats_wall_ms']:.2f} / "
             f"{lv['bulk']['stats_cpu_ms']:.2f} ms"),
        ]
    emit(result, table)


if __name__ == "__main__":
    run_main(__doc__ or "", main_async, libvirt=True)
