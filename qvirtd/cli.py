"""`qvirsh`: the command-line client. Readable output by default, `--json` for scripts.

Every command, its arguments, its help and how its result prints come from the verb
registry (qvirtd/verbs.py); this module only turns a command line into a call and a result
into output, plus the few steps some verbs need (a stream of events, the warnings `list`
shows, the note `--config` prints).

Errors are one line `error: <message>` on stderr; exit status 1 when the daemon refused or
failed an operation (or cannot be reached), 2 for bad usage (the contract).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import termios
import tty
from pathlib import Path
from typing import Any, NoReturn

from . import __version__, text
from .client import Client, ConnectionLost, RpcError, open_stream
from .config import default_socket
from .rootlock import UnsafeDirectory, check_private_dir
from .rpc.limits import MAX_JSON_DEPTH, nested_deeper_than
from .verbs import VERBS, ArgKind, Verb, optional_number_flags, register_arguments

EXIT_FAILED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> Parser:
    p = Parser(prog="qvirsh", description="control qvirtd (every command also takes --json "
               "and --socket)")
    p.add_argument("--socket", help="daemon socket (default: $QVIRTD_SOCKET or the "
                   "daemon's default)")
    p.add_argument("--version", action="version", version=f"qvirsh {__version__}")
    sub = p.add_subparsers(dest="verb", required=True, parser_class=Parser,
                           metavar="COMMAND")
    for v in VERBS.values():
        c = sub.add_parser(v.name, help=v.summary, description=v.summary)
        register_arguments(c, v)
        c.add_argument("--json", action="store_true", help="print one JSON document")
        # Global options are accepted after the verb too ("qvirsh list --socket S").
        c.add_argument("--socket", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def normalise(argv: list[str]) -> list[str]:
    """A bare option that takes an optional number ("--wait") must not swallow the next
    word when that is not a number ("shutdown --wait NAME"): it becomes "--wait="."""
    flags = optional_number_flags()
    out = []
    for i, word in enumerate(argv):
        if word in flags:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is None or not _is_number(nxt):
                word += "="
        out.append(word)
    return out


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def params_from(v: Verb, args: argparse.Namespace) -> dict[str, Any]:
    """The JSON-RPC params a command line stands for."""
    params: dict[str, Any] = {}
    for a in v.args:
        if not a.param:
            continue  # qvirsh's own option
        value = getattr(args, a.key, None)
        if a.kind is ArgKind.JSON_FILE:
            value = _read_json_file(str(value))
        elif a.kind is ArgKind.PATH and value is not None:
            value = os.path.abspath(str(value))
        elif a.kind is ArgKind.JSON_TEXT:
            value = _parse_json(str(value), "the JSON argument")
            if not isinstance(value, dict):
                raise UsageError(f"{a.metavar or a.param} must be a JSON object")
        if value is None or (a.kind is ArgKind.FLAG and value is False):
            continue
        if a.kind is ArgKind.CONST:
            if a.param in params:
                continue
            try:
                value = a.combine(set(value)) if a.combine else value[-1]
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        params[a.param] = value
    return params


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
        v = VERBS[args.verb]
        params = params_from(v, args)
        if v.cli == "console":
            return await console(socket_path, params)
        if v.cli in PROGRESS:
            return await _with_progress(client, args, v, params)
        if v.cli == "event":
            return await _events(client, args, params)
        result = await client.call(v.name, params)
        if v.cli == "screenshot":
            return _save_screenshot(args, result)
        _print(args, v, result)
        if v.cli == "list" and not args.json:
            for warning in await client.call("daemon-warnings"):
                print(f"warning: {warning}", file=sys.stderr)
        elif (v.cli == "device-change" and params.get("mode") == "config"
              and result.get("running")):
            print(f"note: --config changed only the persistent definition of "
                  f"'{result['name']}' (as in virsh); the running domain is unchanged: use "
                  "--persistent for both, or --live", file=sys.stderr)
    return 0


def _print(args: argparse.Namespace, v: Verb, result: Any) -> None:
    if args.json or v.human is None:
        print(json.dumps(result, indent=2))
    elif v.cli == "shutdown" and args.wait is not False:
        print(f"Domain '{result['name']}' is shut off")
    else:
        out = v.human(result)
        if out:
            print(out)


def _save_screenshot(args: argparse.Namespace, result: dict[str, Any]) -> int:
    data = base64.b64decode(result.pop("data"))
    try:
        Path(args.file).write_bytes(data)
    except OSError as exc:
        raise UsageError(f"cannot write {args.file}: {exc.strerror}") from exc
    result["file"] = args.file
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"Screenshot of '{result['name']}' saved to {args.file} ({len(data)} bytes, "
              f"{result['format'].upper()})")
    return 0


def _vol_line(p: dict[str, Any]) -> str:
    pct = 100.0 * p["done"] / max(p["total"], 1)
    return f"{p['path']}: {pct:5.1f}% ({p['done'] >> 20} of {p['total'] >> 20} MiB)"


def _bar(pct: float, width: int = 30) -> str:
    filled = int(width * pct / 100)
    return "#" * filled + "-" * (width - filled)


def _migrate_line(p: dict[str, Any]) -> str:
    if p.get("disk_total_bytes"):  # --copy-storage, before the RAM stream
        done, total = int(p.get("disk_transferred_bytes") or 0), int(p["disk_total_bytes"])
        pct = 100.0 * done / total
        return (f"{p.get('name', '?')}: [{_bar(pct)}] {pct:5.1f}% copying disks, "
                f"{done >> 20} of {total >> 20} MiB")
    total = p.get("ram_total_bytes") or 0
    done = p.get("ram_transferred_bytes") or 0
    left = p.get("ram_remaining_bytes")
    pct = 100.0 * (total - left) / total if total and left is not None else 0.0
    bar = _bar(pct)
    rate = p.get("mbps")
    return (f"{p.get('name', '?')}: [{bar}] {pct:5.1f}% {p.get('status', '?')}, "
            f"{done >> 20} MiB sent" + (f", {left >> 20} MiB left" if left is not None else "")
            + (f", {rate:.0f} Mbit/s" if rate else "")
            + (f", dirty {p['dirty_pages_rate']} pages/s" if p.get("dirty_pages_rate") else ""))


# verb -> (its progress notification, how one reads)
PROGRESS: dict[str, tuple[str, Any]] = {"vol-create": ("vol-progress", _vol_line),
                                        "migrate": ("migrate-progress", _migrate_line)}


async def _with_progress(client: Client, args: argparse.Namespace, v: Verb,
                         params: dict[str, Any]) -> int:
    """The call, with the daemon's progress notes meanwhile (one line redrawn on a
    terminal, plain lines otherwise)."""
    method, line_of = PROGRESS[str(v.cli)]
    call = asyncio.ensure_future(client.call(v.name, params))
    tty_err = sys.stderr.isatty()
    shown = False
    while not call.done():
        try:
            note = await client.next_event(0.2)
        except TimeoutError:
            continue
        if note is None or note.get("method") != method:
            continue
        line = line_of(note["params"])
        print(("\r" + line) if tty_err else line, end="" if tty_err else "\n",
              file=sys.stderr, flush=True)
        shown = True
    if shown and tty_err:
        print(file=sys.stderr)
    _print(args, v, await call)
    return 0


ESCAPE = b"\x1d"  # Ctrl-], as in virsh


async def console(socket_path: Path, params: dict[str, Any]) -> int:
    """Attach this terminal to the guest's serial console until Ctrl-] (or the daemon ends
    the session). The terminal is raw meanwhile (restored whatever happens)."""
    _result, reader, writer = await open_stream(socket_path, "console", params)
    readonly = bool(params.get("readonly"))
    name = params["name"]
    loop = asyncio.get_running_loop()
    stdin = sys.stdin.fileno()
    stdout = sys.stdout.buffer
    detached = asyncio.Event()
    saved = None
    end = "\n"
    if os.isatty(stdin):
        # Raw before the banner, and without flushing: a key typed as soon as the banner
        # shows (or before) reaches the guest instead of being discarded with the mode change.
        saved = termios.tcgetattr(stdin)
        tty.setraw(stdin, termios.TCSANOW)
        end = "\r\n"  # raw output: a newline no longer returns the carriage
    print(f"Connected to domain '{name}'" + (" (read-only)" if readonly else ""),
          file=sys.stderr, end=end)
    print("Escape character is ^] (Ctrl + ])", file=sys.stderr, end=end)

    def keystrokes() -> None:
        try:
            data = os.read(stdin, 4096)
        except OSError:
            data = b""
        if not data:
            detached.set()
            return
        cut = data.find(ESCAPE)
        if cut >= 0:
            data = data[:cut]
            detached.set()
        if data and not readonly:
            writer.write(data)

    loop.add_reader(stdin, keystrokes)

    async def output() -> None:
        while True:
            data = await reader.read(4096)
            if not data:
                return
            stdout.write(data)
            stdout.flush()

    out = asyncio.create_task(output())
    waiter = asyncio.create_task(detached.wait())
    try:
        await asyncio.wait({out, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        loop.remove_reader(stdin)
        for task in (out, waiter):
            task.cancel()
        writer.close()
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
    print("", file=sys.stderr)
    return 0


async def _events(client: Client, args: argparse.Namespace, params: dict[str, Any]) -> int:
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
            notice = msg.get("params") or {}
            raise RpcError(0, str(notice.get("message") or "event stream overflowed: this "
                                  "client fell behind and was dropped; re-read state"))
        if msg.get("method") != "event":
            continue
        ev = msg["params"]
        print(json.dumps(ev) if args.json else text.event_line(ev), flush=True)
        if not args.loop:
            return 0


def _parse_json(source: str, what: str) -> Any:
    """JSON from the user; too deep a nesting is refused here, as the daemon would."""
    too_deep = UsageError(f"{what} is nested too deep (at most {MAX_JSON_DEPTH} levels)")
    try:
        value = json.loads(source)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise too_deep from None
    if nested_deeper_than(value, MAX_JSON_DEPTH):
        raise too_deep
    return value


def _read_json_file(path: str) -> Any:
    try:
        content = Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path} is not valid JSON: {exc}") from exc
    return _parse_json(content, path)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(normalise(sys.argv[1:] if argv is None else argv))
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
