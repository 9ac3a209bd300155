"""A real qvirtd under a private --root, driven through its socket and the qvirsh CLI.

Every daemon gets a short root in /tmp. On teardown the harness stops the daemon and then
kills, by pid, every QEMU whose command line names that root, so no test leaves a guest,
a socket or a process behind.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qvirtd.cli import build_parser, normalise, params_from
from qvirtd.client import Client
from qvirtd.qemu.process import qemu_pids_mentioning
from qvirtd.qemu.unixpath import short_path
from qvirtd.verbs import VERBS

_PARSER = build_parser()  # qvirsh's own command-line parser, for Daemon.json

TEST_SETTINGS: dict[str, Any] = {
    "lock_check": True,  # every integration test is an instrumented run (rule L4)
    "loop_watch_ms": 20.0,  # and no callback may hold the loop 20 ms or more (rule L6)
    "job_wait_timeout_s": 10.0,
    "monitor_timeout_s": 10.0,
    "destroy_grace_s": 2.0,
    "log_level": "debug",
}


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str,
             interval_s: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


class Daemon:
    def __init__(self, settings: dict[str, Any] | None = None, prefix: str = "qv-",
                 env: dict[str, str] | None = None, preload: str | None = None,
                 where: str = "/tmp") -> None:
        self.root = Path(tempfile.mkdtemp(prefix=prefix, dir=where))
        self.env = {**os.environ, **(env or {})}
        self.settings = {**TEST_SETTINGS, **(settings or {})}
        self.socket = self.root / "run" / "qvirtd.sock"
        self.log = self.root / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        # Python run in the daemon's process before it starts (fault injection in tests).
        self.preload = preload

    def write_config(self) -> None:
        lines = []
        for key, value in self.settings.items():
            lines.append(f"{key} = {json.dumps(value)}")
        (self.root / "qvirtd.toml").write_text("\n".join(lines) + "\n")

    def start(self) -> Daemon:
        self.write_config()
        with open(self.log, "ab") as logf:
            run = (["-m", "qvirtd"] if self.preload is None else
                   ["-c", self.preload + "\nimport runpy, sys\nsys.argv[0] = 'qvirtd'\n"
                    "runpy.run_module('qvirtd', run_name='__main__')"])
            self.proc = subprocess.Popen(
                [sys.executable, *run, "--root", str(self.root)],
                stdout=logf, stderr=logf, stdin=subprocess.DEVNULL, env=self.env)
        wait_for(self._listening, 15, f"qvirtd to listen (log: {self.log_text()})")
        return self

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"qvirtd exited: {self.log_text()}")
        s = socket.socket(socket.AF_UNIX)
        try:
            with short_path(self.socket) as where:  # a deep root: over sun_path
                s.connect(where)
        except OSError:
            return False
        finally:
            s.close()
        return True

    def wait_log(self, pattern: str, timeout_s: float = 10) -> str:
        """The whole daemon log once `pattern` (a regular expression) is in it: the daemon
        writes its log from a thread, a moment after the line is logged."""
        found: list[str] = []

        def seen() -> bool:
            text = self.log.read_text(errors="replace")
            found[:] = [text]
            return re.search(pattern, text) is not None

        wait_for(seen, timeout_s, f"{pattern!r} in the daemon log")
        return found[0]

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def qvirsh(self, *args: str, check: bool = True,
               timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([sys.executable, "-m", "qvirtd.cli", "--socket", str(self.socket),
                              *args], capture_output=True, text=True, timeout=timeout_s)
        if check and res.returncode != 0:
            raise AssertionError(f"qvirsh {' '.join(args)} failed ({res.returncode}): "
                                 f"{res.stderr.strip()}")
        return res

    def qvirsh_async(self, *args: str) -> subprocess.Popen[str]:
        """Run qvirsh without waiting for it (the caller waits, and reads its output)."""
        return subprocess.Popen([sys.executable, "-m", "qvirtd.cli", "--socket",
                                 str(self.socket), *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def json(self, *args: str) -> Any:
        """`qvirsh ARGS --json`, parsed. The command line goes through qvirsh's own parser
        in this process and the call over the socket as qvirsh makes it, so a check
        (often polled) costs no Python start-up; streaming verbs and errors in parsing
        run the real qvirsh."""
        try:
            ns = _PARSER.parse_args(normalise([*args, "--json"]))
        except SystemExit:
            ns = None
        verb = VERBS[ns.verb] if ns is not None else None
        if verb is None or verb.stream or verb.upgrade or \
                verb.cli in ("event", "console", "screenshot"):
            return json.loads(self.qvirsh(*args, "--json").stdout)
        return self.call(verb.name, params_from(verb, ns), " ".join(args))

    def call(self, method: str, params: dict[str, Any], what: str = "",
             timeout_s: float = 120) -> Any:
        """One JSON-RPC call over a blocking socket (notifications before the reply are
        skipped); an error reply raises as a failed qvirsh would."""
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(timeout_s)
        try:
            with short_path(self.socket) as where:
                sock.connect(where)
            sock.sendall(json.dumps({"jsonrpc": "2.0", "id": 1, "method": method,
                                     "params": params}).encode() + b"\n")
            with sock.makefile("rb") as f:
                for line in f:
                    msg = json.loads(line)
                    if "result" in msg or "error" in msg:
                        break
                else:
                    raise AssertionError(f"qvirsh {what or method} failed: the daemon "
                                         "closed the connection")
        finally:
            sock.close()
        if "error" in msg:
            raise AssertionError(f"qvirsh {what or method} failed (1): error: "
                                 f"{msg['error'].get('message')}")
        return msg["result"]

    def define(self, definition: dict[str, Any]) -> None:
        path = self.root / f"{definition['name']}.def.json"
        path.write_text(json.dumps(definition))
        self.qvirsh("define", str(path))

    def state(self, name: str) -> tuple[str, str]:
        info = self.json("dominfo", name)
        return info["state"], info["reason"]

    def wait_state(self, name: str, state: str, timeout_s: float = 30) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            info = self.json("dominfo", name)
            return info if info["state"] == state else None
        return wait_for(check, timeout_s, f"domain {name} to be {state}")

    def console(self, name: str) -> str:
        return str(self.json("console-log", name)["text"]).replace("\r", "")

    def wait_console(self, name: str, text: str, count: int = 1,
                     timeout_s: float = 60) -> None:
        wait_for(lambda: self.console(name).count(text) >= count, timeout_s,
                 f"{count}x {text!r} on the console of {name}", interval_s=0.25)

    async def client(self) -> Client:
        return await Client.connect(self.socket)

    def qemu_pids(self) -> list[int]:
        return qemu_pids_mentioning(str(self.root))

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def lock_violations(self) -> int:
        return int(self.call("daemon-stats", {})["lock_violations"])

    def loop_stalls(self) -> list[dict[str, Any]]:
        """Rule L6: the callbacks that held this daemon's loop too long (most recent)."""
        watch = self.call("daemon-stats", {})["loop_watch"]
        assert watch is not None, "the daemon runs without its loop watch"
        return list(watch["last"]) if watch["stalls"] else []

    def cleanup(self) -> None:
        self.stop()
        for pid in qemu_pids_mentioning(str(self.root)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
        wait_for(lambda: not self.qemu_pids(), 10, "test QEMUs to exit")
        shutil.rmtree(self.root, ignore_errors=True)


def run_daemon(root: Path, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `qvirtd --root ROOT [--config CONFIG]` to completion (one that should refuse to
    start); its exit status and output."""
    argv = [sys.executable, "-m", "qvirtd", "--root", str(root)]
    if config is not None:
        argv += ["--config", str(config)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)


class NotifyListener:
    """A NOTIFY_SOCKET, as systemd has: collects datagrams until `done(messages)` holds."""

    def __init__(self, path: Path, done: Callable[[list[str]], bool],
                 timeout_s: float = 20) -> None:
        self.path = path
        self.messages: list[str] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(timeout_s)
        self._done = done
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._done(self.messages):
            try:
                self.messages.append(self._sock.recv(4096).decode())
            except OSError:
                return

    def finish(self, timeout_s: float = 20) -> list[str]:
        self._thread.join(timeout_s)
        self._sock.close()
        return self.messages


def guest_definition(image: Any, name: str = "guest", **extra: Any) -> dict[str, Any]:
    return {"name": name, "memory_mib": 128, "vcpus": 1, "accel": "tcg",
            "boot": {"kernel": str(image.kernel), "initrd": str(image.initrd),
                     "cmdline": image.cmdline}, **extra}


def tiny_definition(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "memory_mib": 64, "vcpus": 1, **extra}


class Terminal:
    """`qvirsh ARGS` on a real pty, as a person at a terminal runs it."""

    def __init__(self, daemon: Daemon, *args: str) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qvirtd.cli", "--socket", str(daemon.socket), *args],
            stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
        os.close(slave)
        self.seen = b""

    def read_until(self, text: bytes, timeout_s: float = 20) -> bytes:
        return self.read_until_after(text, 0, timeout_s)

    def prompt(self, prompt: bytes, timeout_s: float = 60) -> None:
        """Press Enter until the shell shows `prompt` (a key pressed while the shell starts
        may be flushed with its terminal set-up, so once is not always enough)."""
        deadline = time.monotonic() + timeout_s
        while True:
            before = len(self.seen)
            self.type(b"\r")
            try:
                self.read_until_after(prompt, before, 5)
                return
            except AssertionError:
                if time.monotonic() > deadline:
                    raise

    def read_until_after(self, text: bytes, offset: int, timeout_s: float) -> bytes:
        """Read until `text` appears at or after byte `offset` of what was seen."""
        deadline = time.monotonic() + timeout_s
        while text not in self.seen[offset:]:
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for {text!r}; saw {self.seen[-500:]!r}"
            ready, _, _ = select.select([self.master], [], [], min(left, 0.2))
            if ready:
                try:
                    self.seen += os.read(self.master, 65536)
                except OSError:
                    break
        return self.seen

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def close(self) -> int:
        try:
            return self.proc.wait(10)
        finally:
            os.close(self.master)
