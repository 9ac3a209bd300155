"""The libvirt side of bench_compare, run with Debian's python3 (python3-libvirt lives there).

Usage: /usr/bin/python3 libvirt_client.py URI RUN_DIR SCENARIO [ARGS...]; prints one JSON
document. Scenarios mirror bench_compare's: start N, queries K SECONDS, frozen, define N
RUNNING (for the memory figure; the caller reads libvirtd's RSS while domains exist, then
calls cleanup); and bench_queries': cpu PID N (libvirtd's CPU per info()), bulk PID DEFINED
RUNNING (listing with info() of each, getAllDomainStats).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import threading
import time

import libvirt  # type: ignore[import-not-found]
from procfs import cpu_s
from settle import wait_quiet

XML = """<domain type='{kind}'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='q35'>hvm</type></os><features><acpi/></features>
<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
<controller type='usb' model='none'/><memballoon model='none'/></devices></domain>"""


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else float("nan")


def define(conn: libvirt.virConnect, names: list[str], kind: str = "kvm") -> None:
    """`kind`: the domain type, kvm or qemu (TCG: a no-OS guest that idles, see events)."""
    for name in names:
        conn.defineXML(XML.format(name=name, kind=kind))


def cleanup(conn: libvirt.virConnect) -> None:
    for dom in conn.listAllDomains():
        if dom.isActive():
            dom.destroy()
        dom.undefine()


def start(uri: str, n: int) -> dict[str, float]:
    conn = libvirt.open(uri)
    names = [f"lvs{i}" for i in range(n)]
    define(conn, names)
    conns = [libvirt.open(uri) for _ in range(n)]
    errors: list[str] = []

    def one(i: int) -> None:
        try:
            conns[i].lookupByName(names[i]).create()
        except libvirt.libvirtError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - t
    cleanup(conn)
    return {"seconds": elapsed, "errors": len(errors)}


def _query(uri: str, seconds: float, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    conn = libvirt.open(uri)
    dom = conn.lookupByName("lvq")
    count = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        dom.info()
        count += 1
    out.put(count)


def queries(uri: str, clients: int, seconds: float) -> dict[str, float]:
    conn = libvirt.open(uri)
    define(conn, ["lvq"])
    conn.lookupByName("lvq").create()
    out: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    procs = [multiprocessing.Process(target=_query, args=(uri, seconds, out))
             for _ in range(clients)]
    for p in procs:
        p.start()
    total = sum(out.get(timeout=seconds + 60) for _ in procs)
    for p in procs:
        p.join()
    cleanup(conn)
    return {"per_s": total / seconds}


def frozen(uri: str, run_dir: str, cap_s: float) -> dict[str, object]:
    conn = libvirt.open(uri)
    define(conn, ["lvhealthy", "lvfrozen"])
    for name in ("lvhealthy", "lvfrozen"):
        conn.lookupByName(name).create()
    healthy = libvirt.open(uri).lookupByName("lvhealthy")

    def lat(seconds: float) -> list[float]:
        out = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            healthy.info()
            out.append(time.perf_counter() - t)
            time.sleep(0.005)
        return out

    unloaded = lat(3.0)
    pid = int(open(os.path.join(run_dir, "qemu", "lvfrozen.pid")).read().strip())
    os.kill(pid, signal.SIGSTOP)
    result: dict[str, object] = {}
    t0 = time.perf_counter()

    def call(key: str, method: str) -> None:
        try:
            getattr(libvirt.open(uri).lookupByName("lvfrozen"), method)()
            result[key] = ("returned", time.perf_counter() - t0)
        except libvirt.libvirtError as exc:
            result[key] = ("failed", time.perf_counter() - t0, str(exc))

    first = threading.Thread(target=call, args=("first", "suspend"), daemon=True)
    first.start()
    time.sleep(0.1)
    second = threading.Thread(target=call, args=("second", "resume"), daemon=True)
    second.start()
    loaded: list[float] = []
    while second.is_alive() and time.perf_counter() - t0 < cap_s:
        loaded += lat(0.5)
    t = time.perf_counter()
    try:
        libvirt.open(uri).lookupByName("lvfrozen").destroy()
        destroy_s: object = time.perf_counter() - t
    except libvirt.libvirtError as exc:
        destroy_s = f"failed after {time.perf_counter() - t:.1f} s: {exc}"
    first.join(5)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    cleanup(conn)
    return {"unloaded_p50_ms": pct(unloaded, 0.5) * 1e3,
            "unloaded_p99_ms": pct(unloaded, 0.99) * 1e3,
            "frozen_p50_ms": pct(loaded, 0.5) * 1e3, "frozen_p99_ms": pct(loaded, 0.99) * 1e3,
            "first": result.get("first", ("did not return", cap_s)),
            "second": result.get("second", ("did not return", cap_s)), "destroy_s": destroy_s}


def events(uri: str, rounds: int, producers: int, subscribers: int,
           kind: str = "kvm") -> dict[str, float]:
    """Lifecycle events: API call -> event at a subscriber (latency), and events/s to
    `subscribers` connections while `producers` domains (of type `kind`) are suspended and
    resumed."""
    conn = libvirt.open(uri)
    names = [f"lve{i}" for i in range(producers)]
    define(conn, names, kind)
    for name in names:
        conn.lookupByName(name).create()
    wait_quiet(names)  # past the firmware's boot scan, as bench_compare does for qvirtd
    got = threading.Event()
    seen: list[float] = []
    counts = [0] * subscribers
    done = threading.Event()
    expected = producers * rounds * 2

    def on_latency(c: object, dom: object, event: int, detail: int, opaque: object) -> None:
        seen.append(time.perf_counter())
        got.set()

    def counter(i: int) -> object:
        def cb(c: object, dom: object, event: int, detail: int, opaque: object) -> None:
            counts[i] += 1
            if all(n >= expected for n in counts):
                done.set()
        return cb

    lat_conn = libvirt.open(uri)
    lat_conn.domainEventRegisterAny(lat_conn.lookupByName(names[0]),
                                    libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_latency, None)
    dom = conn.lookupByName(names[0])
    latencies: list[float] = []
    for _ in range(rounds):
        for call in (dom.suspend, dom.resume):
            got.clear()
            t = time.perf_counter()
            call()
            got.wait(10)
            latencies.append(seen[-1] - t)
    subs = [libvirt.open(uri) for _ in range(subscribers)]
    for i, sub in enumerate(subs):
        sub.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, counter(i), None)

    def produce(name: str) -> None:
        d = libvirt.open(uri).lookupByName(name)
        for _ in range(rounds):
            d.suspend()
            d.resume()

    threads = [threading.Thread(target=produce, args=(n,)) for n in names]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    done.wait(60)
    elapsed = time.perf_counter() - t
    cleanup(conn)
    return {"call_to_event_p50_ms": pct(latencies, 0.5) * 1e3,
            "call_to_event_p99_ms": pct(latencies, 0.99) * 1e3,
            "events_per_s": expected / elapsed, "complete": float(done.is_set())}


def populate(uri: str, defined: int, running: int) -> dict[str, int]:
    conn = libvirt.open(uri)
    define(conn, [f"lvm{i}" for i in range(defined)])
    doms = [libvirt.open(uri).lookupByName(f"lvm{i}") for i in range(running)]
    threads = [threading.Thread(target=d.create) for d in doms]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return {"defined": defined, "running": running}


def cpu(uri: str, pid: int, n: int) -> dict[str, float]:
    """libvirtd's own CPU per info() over n calls from one client, one at a time."""
    conn = libvirt.open(uri)
    define(conn, ["lvq"])
    conn.lookupByName("lvq").create()
    dom = conn.lookupByName("lvq")
    for _ in range(min(n, 500)):
        dom.info()
    before = cpu_s(pid)
    t = time.perf_counter()
    for _ in range(n):
        dom.info()
    elapsed = time.perf_counter() - t
    used = cpu_s(pid) - before
    cleanup(conn)
    return {"cpu_us": used / n * 1e6, "wall_us": elapsed / n * 1e6}


def bulk(uri: str, pid: int, defined: int, running: int) -> dict[str, float]:
    """listAllDomains + info() of each (what `list --all --info` answers in one call), and
    getAllDomainStats of the running ones: wall and libvirtd CPU per round, in ms."""
    populate(uri, defined, running)
    conn = libvirt.open(uri)
    rounds = 10

    def timed(work: object) -> tuple[float, float]:
        work()  # type: ignore[operator]
        before, t = cpu_s(pid), time.perf_counter()
        for _ in range(rounds):
            work()  # type: ignore[operator]
        return ((time.perf_counter() - t) / rounds * 1e3,
                (cpu_s(pid) - before) / rounds * 1e3)

    list_wall, list_cpu = timed(lambda: [d.info() for d in conn.listAllDomains()])
    stats_wall, stats_cpu = timed(lambda: conn.getAllDomainStats(
        flags=libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE))
    cleanup(conn)
    return {"defined": defined, "running": running, "list_wall_ms": list_wall,
            "list_cpu_ms": list_cpu, "stats_wall_ms": stats_wall, "stats_cpu_ms": stats_cpu}


def run_event_loop() -> None:
    """libvirt's default event loop, which delivers the callbacks (in this thread)."""
    while True:
        libvirt.virEventRunDefaultImpl()


def main() -> None:
    libvirt.registerErrorHandler(lambda *a: None, None)  # no stderr noise per error
    uri, run_dir, scenario, *args = sys.argv[1:]
    if scenario == "events":  # the event loop must exist before any connection is opened
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=run_event_loop, daemon=True).start()
    if scenario == "start":
        out: object = start(uri, int(args[0]))
    elif scenario == "queries":
        out = queries(uri, int(args[0]), float(args[1]))
    elif scenario == "frozen":
        out = frozen(uri, run_dir, float(args[0]))
    elif scenario == "events":
        out = events(uri, int(args[0]), int(args[1]), int(args[2]), *args[3:4])
    elif scenario == "populate":
        out = populate(uri, int(args[0]), int(args[1]))
    elif scenario == "cpu":
        out = cpu(uri, int(args[0]), int(args[1]))
    elif scenario == "bulk":
        out = bulk(uri, int(args[0]), int(args[1]), int(args[2]))
    elif scenario == "cleanup":
        cleanup(libvirt.open(uri))
        out = {}
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
