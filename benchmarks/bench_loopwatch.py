"""What the event-loop watch (qvirtd.loopwatch, rule L6) costs, on uvloop.

* idle: CPU time per second of an idle loop: bare; with a plain thread that only sleeps
  5 ms at a time (what waking a thread costs on this machine); with the watch at a 5, 10
  and 20 ms interval, and at 5 ms but 20 ms while the loop is idle;
* latency: round trips of 64-byte messages to an echo server in the loop, from a client in
  another process (so that it does not share the GIL), p50/p99/p99.9, watch off and on;
* busy: a CPU-bound run of short callbacks (the watcher then has to take the GIL from the
  loop at every wake-up): slowdown with the watch on (median and quartiles of alternated
  pairs: the machine is noisy), and the watcher's own CPU time meanwhile.

Usage: python benchmarks/bench_loopwatch.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import emit, header, percentile

from qvirtd.loopwatch import LoopWatch

CLIENT = r"""
import json, socket, sys, time
path, rounds = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_UNIX)
s.connect(path)
msg = b"x" * 64
rtt = []
for _ in range(rounds):
    t = time.perf_counter()
    s.sendall(msg)
    got = 0
    while got < len(msg):
        got += len(s.recv(4096))
    rtt.append(time.perf_counter() - t)
    time.sleep(0.0005)
print(json.dumps(rtt))
"""


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


def with_loop(mode: str, work: Any) -> Any:
    """Run coroutine function `work` on a fresh uvloop loop: mode "off", "sleeper" (a thread
    that sleeps 5 ms at a time, nothing else), "on" (the watch, 5 ms) or "on-10"/"on-20"."""
    loop = uvloop.new_event_loop()
    interval = {"on-10": 0.01, "on-20": 0.02}.get(mode, 0.005)
    watch = LoopWatch(0.02, interval, idle_interval_s=0.02 if mode == "on-idle20" else None)
    stop = threading.Event()

    def sleeper() -> None:
        while not stop.is_set():
            time.sleep(0.005)

    thread = threading.Thread(target=sleeper)
    if mode.startswith("on"):
        watch.start(loop)
    elif mode == "sleeper":
        thread.start()
    try:
        return loop.run_until_complete(work(loop))
    finally:
        watch.stop()
        stop.set()
        if thread.is_alive():
            thread.join()
        loop.close()


def idle(seconds: float, repeats: int) -> dict[str, Any]:
    async def sit(loop: asyncio.AbstractEventLoop) -> float:
        await asyncio.sleep(0.05)
        cpu, t = time.process_time(), time.monotonic()
        await asyncio.sleep(seconds)
        return (time.process_time() - cpu) / (time.monotonic() - t)

    runs: dict[str, list[float]] = {"off": [], "sleeper": [], "on": [], "on-10": [], "on-20": [],
                                    "on-idle20": []}
    for _ in range(repeats):
        for mode in runs:
            runs[mode].append(with_loop(mode, sit))
    return {mode: round(statistics.median(v) * 1e3, 3) for mode, v in runs.items()}


def latency(rounds: int) -> dict[str, Any]:
    async def serve(loop: asyncio.AbstractEventLoop) -> list[float]:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "echo.sock")
            server = await loop.create_unix_server(Echo, path)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", CLIENT, path, str(rounds),
                stdout=subprocess.PIPE)
            out, _ = await proc.communicate()
            server.close()
            return json.loads(out)  # type: ignore[no-any-return]

    result: dict[str, Any] = {}
    for mode in ("off", "on", "off", "on"):
        rtt = with_loop(mode, serve)
        got = result.setdefault(mode, [])
        got.extend(rtt)
    us = 1e6
    return {mode: {"samples": len(v), "p50_us": round(percentile(v, 0.5) * us, 1),
                   "p99_us": round(percentile(v, 0.99) * us, 1),
                   "p999_us": round(percentile(v, 0.999) * us, 1)}
            for mode, v in result.items()}


def busy(callbacks: int, repeats: int) -> dict[str, Any]:
    async def run(loop: asyncio.AbstractEventLoop) -> tuple[float, float]:
        done = loop.create_future()

        def step(n: int) -> None:
            x = 0
            for i in range(200):  # ~10 us of Python
                x += i * i
            if n:
                loop.call_soon(step, n - 1)
            else:
                done.set_result(None)

        t, cpu, own = time.perf_counter(), time.process_time(), time.thread_time()
        loop.call_soon(step, callbacks)
        await done
        wall = time.perf_counter() - t
        # CPU of the other threads (the watcher) per second of the run.
        return wall, ((time.process_time() - cpu) - (time.thread_time() - own)) / wall

    ratios, watcher = [], []
    for _ in range(repeats):
        off, _ = with_loop("off", run)
        on, other = with_loop("on", run)
        ratios.append(on / off)
        watcher.append(other)
    ratios.sort()
    return {"callbacks": callbacks, "pairs": repeats,
            "slowdown_pct_median": round((statistics.median(ratios) - 1) * 100, 1),
            "slowdown_pct_quartiles": [round((percentile(ratios, q) - 1) * 100, 1)
                                       for q in (0.25, 0.75)],
            "watcher_cpu_ms_per_s": round(statistics.median(watcher) * 1e3, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small run: checks it works")
    quick = parser.parse_args().quick
    result = header("loopwatch")
    result["idle_cpu_ms_per_s"] = idle(0.5 if quick else 5.0, 1 if quick else 3)
    result["latency"] = latency(200 if quick else 5000)
    result["busy"] = busy(20_000 if quick else 100_000, 1 if quick else 15)
    i, lat, b = result["idle_cpu_ms_per_s"], result["latency"], result["busy"]
    emit(result, [
        ("idle loop, CPU per second: bare", f"{i['off']:.2f} ms"),
        ("idle loop + a thread sleeping 5 ms at a time", f"{i['sleeper']:.2f} ms"),
        ("idle loop, watch on (5 ms / 10 ms / 20 ms interval)",
         f"{i['on']:.2f} / {i['on-10']:.2f} / {i['on-20']:.2f} ms"),
        ("idle loop, watch on, 5 ms interval but 20 ms while idle", f"{i['on-idle20']:.2f} ms"),
        ("echo round trip p50 / p99 / p99.9, watch off",
         f"{lat['off']['p50_us']} / {lat['off']['p99_us']} / {lat['off']['p999_us']} us"),
        ("echo round trip p50 / p99 / p99.9, watch on",
         f"{lat['on']['p50_us']} / {lat['on']['p99_us']} / {lat['on']['p999_us']} us"),
        (f"{b['callbacks']} CPU-bound callbacks: slowdown, median (quartiles) of {b['pairs']}",
         f"{b['slowdown_pct_median']:+.1f} % ({b['slowdown_pct_quartiles'][0]:+.1f} / "
         f"{b['slowdown_pct_quartiles'][1]:+.1f} %)"),
        ("... the watcher's own CPU meanwhile, per second", f"{b['watcher_cpu_ms_per_s']} ms"),
    ])


if __name__ == "__main__":
    main()
