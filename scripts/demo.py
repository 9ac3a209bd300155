"""`make demo`: a real Linux guest boots and powers off under qvirtd, start to finish.

Starts a daemon under `--root` in a temporary directory, defines and boots the tiny test guest
(TCG) with a screen and a guest agent, shows `qvirsh list` and `dominfo`, types into its
serial console through a real terminal (`qvirsh console`), takes a screenshot, asks the agent
for its addresses, powers it off through ACPI, and stops the daemon. Whatever happens, it
leaves no QEMU and no files behind but the screenshot it names.
"""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "guest"))

from build_guest import ensure_guest  # noqa: E402

from qvirtd.qemu.process import qemu_pids_mentioning  # noqa: E402


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


class Demo:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="qvirtd-demo-"))
        self.socket = self.root / "run" / "qvirtd.sock"
        self.daemon: subprocess.Popen[bytes] | None = None

    def qvirsh(self, *args: str, show: bool = True, check: bool = True) -> str:
        if show:
            print(f"$ qvirsh {' '.join(args)}", flush=True)
        res = subprocess.run([sys.executable, "-m", "qvirtd.cli", "--socket", str(self.socket),
                              *args], capture_output=True, text=True)
        if show and res.stdout:
            print(res.stdout.rstrip("\n"), flush=True)
        if res.returncode != 0:
            if show or check:
                print(res.stderr.rstrip("\n"), file=sys.stderr, flush=True)
            if check:
                raise SystemExit(f"demo failed: qvirsh {' '.join(args)}")
        return res.stdout

    def start_daemon(self) -> None:
        print(f"$ qvirtd --root {self.root} &", flush=True)
        self.log = open(self.root / "qvirtd.log", "wb")
        self.daemon = subprocess.Popen([sys.executable, "-m", "qvirtd", "--root",
                                        str(self.root)], stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 15
        while not self.socket.exists():
            if self.daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("demo failed: qvirtd did not start:\n"
                                 + (self.root / "qvirtd.log").read_text())
            time.sleep(0.05)

    def console(self) -> str:
        out = json.loads(self.qvirsh("console-log", "demo", "--json", show=False))
        return str(out["text"]).replace("\r", "")

    def wait_console(self, text: str, timeout_s: float) -> float:
        start = time.monotonic()
        while text not in self.console():
            if time.monotonic() - start > timeout_s:
                raise SystemExit(f"demo failed: no {text!r} on the console in {timeout_s} s")
            time.sleep(0.1)
        return time.monotonic() - start

    def run(self) -> None:
        banner("building (or reusing) the test guest from Debian packages")
        image = ensure_guest()
        print(f"kernel {image.kernel}\ninitrd {image.initrd}")

        banner("starting the daemon in a temporary root")
        self.start_daemon()

        banner("defining the guest")
        definition = {"name": "demo", "memory_mib": 128, "vcpus": 1, "accel": "tcg",
                      "boot": {"kernel": str(image.kernel), "initrd": str(image.initrd),
                               # Without "quiet", the console shows the kernel booting.
                               "cmdline": image.cmdline.replace("quiet", "").strip()},
                      "graphics": {"type": "vnc"}, "guest_agent": True,
                      "nics": [{"id": "lan"}]}
        path = self.root / "demo.json"
        path.write_text(json.dumps(definition, indent=2))
        print(path.read_text())
        self.qvirsh("define", str(path))

        banner("booting it")
        self.qvirsh("start", "demo")
        self.qvirsh("list")
        self.qvirsh("dominfo", "demo")
        took = self.wait_console("QVIRTD-GUEST: ready", 90)
        print(f"(the guest's init reported ready {took:.1f} s after start)")

        banner("its console (the last lines)")
        print("$ qvirsh console-log demo | tail -12")
        print("\n".join(self.console().strip().splitlines()[-12:]))

        banner("typing into its serial console (qvirsh console on a real terminal)")
        print(self.terminal_session("uname -sr; echo hello from the guest"))

        banner("its screen")
        self.qvirsh("domdisplay", "demo")
        shot = Path(tempfile.gettempdir()) / "qvirtd-demo-screenshot.png"
        self.qvirsh("screenshot", "demo", str(shot))
        data = shot.read_bytes()
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        print(f"(a {width}x{height} PNG of {len(data)} bytes, kept at {shot})")

        banner("asking the guest agent")
        self.wait_console("QVIRTD-GUEST: net address eth0", 30)
        self.qvirsh("domifaddr", "demo")

        banner("powering it off through ACPI (the guest's acpid handles the power button)")
        start = time.monotonic()
        self.qvirsh("shutdown", "demo", "--wait", "60")
        print(f"(shut off {time.monotonic() - start:.2f} s after the button press)")
        self.qvirsh("list", "--all")
        self.qvirsh("dominfo", "demo")
        print("$ qvirsh console-log demo | tail -3")
        print("\n".join(self.console().strip().splitlines()[-3:]))

        banner("stopping the daemon")
        self.stop_daemon()

    def terminal_session(self, command: str) -> str:
        """`qvirsh console demo` on a pty: Enter, the command, Ctrl-]; what the user saw."""
        print("$ qvirsh console demo", flush=True)
        master, slave = pty.openpty()
        proc = subprocess.Popen([sys.executable, "-m", "qvirtd.cli", "--socket",
                                 str(self.socket), "console", "demo"],
                                stdin=slave, stdout=slave, stderr=slave)
        os.close(slave)
        seen = b""

        def read_until(text: bytes, after: int = 0) -> None:
            """Read until `text` appears in what came after byte `after`, or fail."""
            nonlocal seen
            deadline = time.monotonic() + 20
            while text not in seen[after:]:
                if time.monotonic() > deadline:
                    raise SystemExit(f"demo failed: no {text!r} from qvirsh console")
                if select.select([master], [], [], 0.2)[0]:
                    seen += os.read(master, 65536)

        try:
            read_until(b"Escape character")
            os.write(master, b"\r")
            read_until(b"guest# ")
            os.write(master, command.encode() + b"\r")
            line = command.encode() + b"\r\n"
            read_until(line)  # the guest's echo of the line typed
            echoed = seen.index(line) + len(line)
            read_until(b"hello from the guest\r\n", echoed)  # what the command printed
            read_until(b"guest# ", echoed)
            os.write(master, b"\x1d")  # Ctrl-]
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
            os.close(master)
        # The shell asks the terminal where its cursor is after each prompt (ESC[6n): drop it.
        text = seen.replace(b"\x1b[6n", b"").decode(errors="replace").replace("\r", "")
        return text.rstrip("\n") + "\n^]  (detached)"

    def stop_daemon(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            print("$ kill -TERM <qvirtd>")
            self.daemon.send_signal(signal.SIGTERM)
            code = self.daemon.wait(15)
            print(f"qvirtd exited with status {code}")

    def cleanup(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.kill()
            self.daemon.wait()
        for pid in qemu_pids_mentioning(str(self.root)):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)


def main() -> int:
    demo = Demo()
    try:
        demo.run()
    finally:
        demo.cleanup()
    print("\ndemo finished: no QEMU or files left behind")
    return 0


if __name__ == "__main__":
    sys.exit(main())
