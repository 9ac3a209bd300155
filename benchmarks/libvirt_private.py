"""A private libvirtd for side-by-side figures (`make bench-libvirt`), touching nothing else.

Debian's libvirt-daemon (QEMU driver) and python3-libvirt are installed by this setup when
missing. libvirtd runs as root in a mount namespace of its own where temporary directories are
bind-mounted over /etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/cache/libvirt and
/var/log/libvirt, so the host's libvirt files are never read or written; clients reach it
through its socket path. As this machine needs: QEMU runs as root, security_driver "none",
no cgroup controllers, and a `libvirt-qemu` system user exists.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

PACKAGES = ["libvirt-daemon", "libvirt-daemon-driver-qemu", "python3-libvirt",
            "libvirt-clients"]
MOUNTS = {"etc": "/etc/libvirt", "run": "/run/libvirt", "lib": "/var/lib/libvirt",
          "cache": "/var/cache/libvirt", "log": "/var/log/libvirt"}
SYSTEM_PYTHON = "/usr/bin/python3"

QEMU_CONF = """user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
cgroup_controllers = [ ]
stdio_handler = "file"
"""
LIBVIRTD_CONF = """unix_sock_rw_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"""


def ensure_installed() -> None:
    have = shutil.which("libvirtd") or Path("/usr/sbin/libvirtd").exists()
    lib = subprocess.run([SYSTEM_PYTHON, "-c", "import libvirt"], capture_output=True)
    if have and lib.returncode == 0:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES],
                   check=True, env=env)


def ensure_user() -> None:
    if subprocess.run(["id", "libvirt-qemu"], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", "libvirt-qemu"], check=True)


class PrivateLibvirtd:
    def __init__(self) -> None:
        ensure_installed()
        ensure_user()
        # Where qvirtd's benchmark root is (common.Qvirtd): tmpfs unless QVIRTD_BENCH_DIR
        # says otherwise, so both daemons write their status files to the same kind of disk.
        where = os.environ.get("QVIRTD_BENCH_DIR", "/dev/shm")
        self.base = Path(tempfile.mkdtemp(prefix="qvlv-", dir=where))
        for name in MOUNTS:
            (self.base / name).mkdir()
        shutil.copytree("/etc/libvirt", self.base / "etc", dirs_exist_ok=True)
        (self.base / "etc" / "qemu.conf").write_text(QEMU_CONF)
        (self.base / "etc" / "libvirtd.conf").write_text(LIBVIRTD_CONF)
        for target in MOUNTS.values():
            Path(target).mkdir(parents=True, exist_ok=True)  # mount points (empty if new)
        binds = " && ".join(f"mount --bind {self.base / name} {target}"
                            for name, target in MOUNTS.items())
        self.log = open(self.base / "libvirtd.out", "wb")
        self.proc = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c",
             f"{binds} && exec /usr/sbin/libvirtd"], stdout=self.log, stderr=self.log)
        self.socket = self.base / "run" / "libvirt-sock"
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("private libvirtd did not start: "
                                 + (self.base / "libvirtd.out").read_text())
            time.sleep(0.05)

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.socket}"

    def scenario(self, *args: str, timeout_s: float = 900) -> Any:
        """One libvirt_client.py scenario against this libvirtd (Debian's python3, where
        python3-libvirt lives): its JSON output."""
        client = str(Path(__file__).resolve().parent / "libvirt_client.py")
        res = subprocess.run([SYSTEM_PYTHON, client, self.uri, str(self.base / "run"), *args],
                             capture_output=True, text=True, timeout=timeout_s)
        if res.returncode != 0:
            raise SystemExit(f"libvirt scenario {args} failed: {res.stderr[-2000:]}")
        return json.loads(res.stdout)

    def qemu_pids(self) -> list[int]:
        pids = []
        for pidfile in (self.base / "run" / "qemu").glob("*.pid"):
            try:
                pids.append(int(pidfile.read_text().strip()))
            except (OSError, ValueError):
                continue
        return pids

    def rss_kib(self) -> int:
        """libvirtd's RSS (the process under unshare's exec)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self) -> None:
        for pid in self.qemu_pids():  # every QEMU it started, by pid
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.base, ignore_errors=True)
