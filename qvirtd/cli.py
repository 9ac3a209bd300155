"""`qvirsh`: the command-line client. Readable tables by default, `--json` for scripts.

Errors are one line `error: <message>` on stderr; exit status 1 when the daemon refused or
failed an operation (or cannot be reached), 2 for bad usage (the contract).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

from .client import Client, ConnectionLost, RpcError
from .config import default_socket
from .rootlock import UnsafeDirectory, check_private_dir
from .rpc.limits import MAX_JSON_DEPTH, nested_deeper_than

EXIT_FAILED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    cells = [[("-" if r.get(k) is None else str(r.get(k))) for k, _ in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h) in enumerate(columns)]
    lines = [" " + "   ".join(h.ljust(w) for (_, h), w in zip(columns, widths, strict=True))]
    lines.append("-" * (sum(widths) + 3 * (len(widths) - 1) + 2))
    for c in cells:
        lines.append(" " + "   ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)))
    return "\n".join(lines)


def _kv(info: dict[str, Any]) -> str:
    width = max(len(k) for k in info) + 1
    out = []
    for k, v in info.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in v.items() if b is not None) or "-"
        out.append(f"{(k + ':').ljust(width)} {'-' if v is None else v}")
    return "\n".join(out)


def format_event(ev: dict[str, Any]) -> str:
    dom = ev.get("domain", {})
    what = ev.get("event", "?")
    if ev.get("type"):
        what += f" {ev['type']}"
        if ev.get("detail"):
            what += f"/{ev['detail']}"
    extra = f" {json.dumps(ev['data'])}" if ev.get("data") else ""
    return f"{ev.get('time', '')} #{ev.get('seq')} domain '{dom.get('name')}': {what}{extra}"


def _jobinfo(r: dict[str, Any]) -> str:
    lines = []
    for slot, label in (("async_job", "Async job"), ("job", "Job")):
        job = r.get(slot)
        if job is None:
            lines.append(f"{label + ':':12} none")
            continue
        lines.append(f"{label + ':':12} {job['kind']}" + (f" (phase {job['phase']})"
                                                         if job.get("phase") else ""))
        lines.append(f"{'Owner:':12} {job['owner']}")
        lines.append(f"{'Elapsed:':12} {job['elapsed_s']:.1f} s (since {job['started']})")
        if job.get("allowed"):
            lines.append(f"{'Allows:':12} {', '.join(job['allowed'])}")
        if job.get("progress"):
            lines.append(f"{'Progress:':12} {json.dumps(job['progress'])}")
        if job.get("abort_requested"):
            lines.append(f"{'Aborting:':12} asked by {job['abort_requested']}")
    return "\n".join(lines)


def build_parser() -> Parser:
    p = Parser(prog="qvirsh", description="control qvirtd")
    p.add_argument("--socket", help="daemon socket (default: $QVIRTD_SOCKET or the "
                   "daemon's default)")
    sub = p.add_subparsers(dest="verb", required=True, parser_class=Parser)

    def cmd(name: str, help: str, json_flag: bool = True) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        if json_flag:
            c.add_argument("--json", action="store_true", help="print one JSON document")
        return c

    c = cmd("define", "create or update a domain from a JSON file")
    c.add_argument("file")
    c = cmd("undefine", "remove a persistent definition")
    c.add_argument("name")
    c = cmd("list", "list domains")
    c.add_argument("--all", action="store_true", help="include shut-off domains")
    for name, help in [("dominfo", "domain information"), ("reboot", "reboot via ACPI"),
                       ("reset", "hard reset"), ("suspend", "pause the vCPUs"),
                       ("resume", "continue the vCPUs"), ("destroy", "stop QEMU now")]:
        cmd(name, help).add_argument("name")
    c = cmd("dumpjson", "print the live (or persistent) definition")
    c.add_argument("name")
    c.add_argument("--inactive", action="store_true", help="the persistent definition")
    c = cmd("start", "start a domain")
    c.add_argument("name")
    c.add_argument("--paused", action="store_true", help="leave the vCPUs paused")
    c = cmd("shutdown", "ask the guest to power off (ACPI)")
    c.add_argument("name")
    c.add_argument("--wait", nargs="?", const=True, default=False, type=float,
                   metavar="SECONDS", help="wait until shut off (default time if no SECONDS)")
    c = cmd("autostart", "start the domain whenever the daemon starts")
    c.add_argument("name")
    c.add_argument("--disable", action="store_true")
    c = cmd("event", "stream domain events")
    c.add_argument("--domain")
    c.add_argument("--loop", action="store_true", help="keep going after the first event")
    c.add_argument("--timeout", type=float, help="stop after this many seconds")
    c.add_argument("--since", type=int, help="first replay buffered events after this seq")
    c = cmd("qemu-monitor-command", "pass one raw QMP command")
    c.add_argument("name")
    c.add_argument("command", help='e.g. \'{"execute": "query-status"}\'')
    c.add_argument("--force", action="store_true", help="send a command that could change "
                   "QEMU behind the domain's JSON config (the domain is marked tainted)")
    c = cmd("domjobinfo", "the domain's current jobs (kind, phase, owner, elapsed)")
    c.add_argument("name")
    c = cmd("domjobabort", "abort the domain's async job (it rolls back)")
    c.add_argument("name")
    c = cmd("attach-device", "hotplug a device described in a JSON file")
    c.add_argument("name")
    c.add_argument("file", help='{"kind": "disk"|"cdrom"|"nic", "id": ..., ...}')
    c.add_argument("--config", action="store_true", help="also (or, shut off: only) the "
                   "persistent definition")
    c = cmd("detach-device", "hot-unplug a device")
    c.add_argument("name")
    c.add_argument("device_id")
    c.add_argument("--wait", type=float, default=5.0, metavar="SECONDS",
                   help="wait this long for the guest to release it (default 5)")
    c.add_argument("--config", action="store_true", help="also the persistent definition")
    c = cmd("change-media", "insert, change or eject a CD-ROM medium")
    c.add_argument("name")
    c.add_argument("cdrom_id")
    group = c.add_mutually_exclusive_group(required=True)
    group.add_argument("path", nargs="?", help="the medium (an image file)")
    group.add_argument("--eject", action="store_true")
    c = cmd("console-log", "print the serial console log")
    c.add_argument("name")
    c.add_argument("--bytes", type=int, default=64 * 1024, help="at most this many (tail)")
    cmd("daemon-stats", "daemon counters and lock statistics")
    cmd("daemon-warnings", "what the daemon found but does not manage (orphan QEMUs)")
    return p


def _print(args: argparse.Namespace, result: Any, human: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2))
    elif human:
        print(human)


async def run(args: argparse.Namespace) -> int:
    socket_path, private = (Path(args.socket), ()) if args.socket else default_socket()
    for d in private:  # the per-user default: never talk to a socket someone else planted
        check_private_dir(d, missing_ok=True)
    try:
        client = await Client.connect(socket_path)
    except OSError as exc:
        raise ConnectionLost(f"cannot connect to qvirtd at {socket_path}: "
                             f"{exc.strerror or exc}") from exc
    async with client:
        for d in private:  # again, now that it exists: nothing is sent before this passes
            check_private_dir(d)
        c = args.verb
        if c == "define":
            r = await client.call("define", {"definition": args.definition})
            verb = "defined" if r["created"] else "updated"
            _print(args, r, f"Domain '{r['name']}' {verb} ({r['uuid']})")
        elif c == "undefine":
            r = await client.call("undefine", {"name": args.name})
            _print(args, r, f"Domain '{r['name']}' undefined"
                   + (" (still running, now transient)" if r["transient"] else ""))
        elif c == "list":
            r = await client.call("list", {"all": args.all})
            _print(args, r, _table(r, [("id", "Id"), ("name", "Name"), ("state", "State")]))
            for warning in await client.call("daemon-warnings"):
                print(f"warning: {warning}", file=sys.stderr)
        elif c == "dominfo":
            r = await client.call("dominfo", {"name": args.name})
            _print(args, r, _kv(r))
        elif c == "dumpjson":
            r = await client.call("dumpjson", {"name": args.name, "inactive": args.inactive})
            print(json.dumps(r, indent=2))
        elif c == "start":
            r = await client.call("start", {"name": args.name, "paused": args.paused})
            _print(args, r, f"Domain '{r['name']}' started (id {r['id']}, pid {r['pid']})")
        elif c == "shutdown":
            r = await client.call("shutdown", {"name": args.name, "wait": args.wait})
            msg = (f"Domain '{r['name']}' is shut off" if args.wait is not False
                   else f"Domain '{r['name']}' is being shut down")
            _print(args, r, msg)
        elif c in ("reboot", "reset", "suspend", "resume", "destroy"):
            r = await client.call(c, {"name": args.name})
            done = {"reboot": "is being rebooted", "reset": "was reset",
                    "suspend": "suspended", "resume": "resumed", "destroy": "destroyed"}[c]
            _print(args, r, f"Domain '{r['name']}' {done}")
        elif c == "autostart":
            r = await client.call("autostart", {"name": args.name, "disable": args.disable})
            _print(args, r, f"Domain '{r['name']}' autostart "
                   + ("enabled" if r["autostart"] else "disabled"))
        elif c == "qemu-monitor-command":
            command = _parse_json(args.command, "command")
            if not isinstance(command, dict):
                raise UsageError("command must be a JSON object")
            r = await client.call("qemu-monitor-command", {"name": args.name,
                                                           "command": command,
                                                           "force": args.force})
            print(json.dumps(r, indent=2) if args.json else json.dumps(r))
        elif c == "attach-device":
            r = await client.call("attach-device", {"name": args.name, "device": args.device,
                                                    "config": args.config})
            where = " and ".join(w for w, on in (("live", r["live"]),
                                                 ("in the definition", r["config"])) if on)
            _print(args, r, f"Device '{r['device']}' attached to '{r['name']}' ({where})")
        elif c == "detach-device":
            r = await client.call("detach-device", {"name": args.name,
                                                    "device": args.device_id,
                                                    "wait": args.wait, "config": args.config})
            if r["pending"]:
                msg = (f"Device '{r['device']}': removal from '{r['name']}' is pending (the "
                       "guest has not released it yet; it completes when it does)")
            else:
                msg = f"Device '{r['device']}' detached from '{r['name']}'"
            _print(args, r, msg)
        elif c == "change-media":
            r = await client.call("change-media", {"name": args.name, "device": args.cdrom_id,
                                                   "path": args.path, "eject": args.eject})
            _print(args, r, f"CD-ROM '{r['device']}' of '{r['name']}': "
                   + (f"medium {r['medium']}" if r["medium"] else "ejected"))
        elif c == "console-log":
            r = await client.call("console-log", {"name": args.name, "max_bytes": args.bytes})
            _print(args, r, r["text"].rstrip("\n"))
        elif c == "domjobinfo":
            r = await client.call("domjobinfo", {"name": args.name})
            _print(args, r, _jobinfo(r))
        elif c == "domjobabort":
            r = await client.call("domjobabort", {"name": args.name})
            a = r["aborted"]
            _print(args, r, f"Domain '{r['name']}': {a['kind']} aborted (it was in phase "
                   f"{a['phase']})")
        elif c == "daemon-warnings":
            r = await client.call("daemon-warnings")
            _print(args, r, "\n".join(f"warning: {w}" for w in r) or "no warnings")
        elif c == "daemon-stats":
            r = await client.call("daemon-stats")
            print(json.dumps(r, indent=2))
        elif c == "event":
            return await _events(client, args)
    return 0


async def _events(client: Client, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {}
    if args.domain:
        params["domain"] = args.domain
    if args.since is not None:
        params["since_seq"] = args.since
    await client.call("event", params)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.timeout if args.timeout else None
    while True:
        remaining = None if deadline is None else deadline - loop.time()
        if remaining is not None and remaining <= 0:
            return 0
        try:
            msg = await client.next_event(remaining)
        except TimeoutError:
            return 0
        if msg is None:
            raise ConnectionLost("the daemon closed the connection")
        if msg.get("method") == "event-overflow":
            params = msg.get("params") or {}
            raise RpcError(0, str(params.get("message") or "event stream overflowed: this "
                                  "client fell behind and was dropped; re-read state"))
        if msg.get("method") != "event":
            continue
        ev = msg["params"]
        print(json.dumps(ev) if args.json else format_event(ev), flush=True)
        if not args.loop:
            return 0


def _parse_json(text: str, what: str) -> Any:
    """JSON from the user; too deep a nesting is refused here, as the daemon would."""
    too_deep = UsageError(f"{what} is nested too deep (at most {MAX_JSON_DEPTH} levels)")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise too_deep from None
    if nested_deeper_than(value, MAX_JSON_DEPTH):
        raise too_deep
    return value


def _read_definition(path: str) -> Any:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path} is not valid JSON: {exc}") from exc
    return _parse_json(text, path)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.verb == "define":
            args.definition = _read_definition(args.file)
        elif args.verb == "attach-device":
            args.device = _read_definition(args.file)
        return asyncio.run(run(args))
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (RpcError, ConnectionLost, UnsafeDirectory) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # stdout closed early (e.g. piped into head): not an error of ours.
        sys.stderr.close()
        return 0
    except Exception as exc:  # never a traceback: one line, like every other error
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
