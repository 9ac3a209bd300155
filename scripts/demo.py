"""`make demo`: a real Linux guest boots and powers off under qvirtd, start to finish.

Starts a daemon under `--root` in a temporary directory, defines and boots the tiny test guest
(TCG), shows `qvirsh list` and `dominfo`, the guest's console output, powers it off through
ACPI, and stops the daemon. Whatever happens, it leaves no QEMU and no files behind.
"""

from __future__ import annotations

import json
import os
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
                               "cmdline": image.cmdline.replace("quiet", "").strip()}}
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
