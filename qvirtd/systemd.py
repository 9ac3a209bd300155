"""systemd integration without libsystemd: notify, socket activation, the watchdog.

* `sd_notify()`: one datagram to $NOTIFY_SOCKET (READY=1, STATUS=..., STOPPING=1,
  WATCHDOG=1).
* `listen_fds()`: the sockets systemd passed (LISTEN_FDS, starting at fd 3), if they are ours
  (LISTEN_PID is our pid).
* `watchdog_interval()`: how often to ping, half of WatchdogSec, if systemd asked for pings.
  The pings come from a task on the event loop, so a loop that blocks stops them and systemd
  restarts the daemon (the guests, in their own sessions, keep running).
"""

from __future__ import annotations

import os
import socket

SD_LISTEN_FDS_START = 3


def sd_notify(state: str) -> bool:
    """Send `state` to systemd if we run under Type=notify; False when there is no socket."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


def listen_fds() -> list[socket.socket]:
    """Listening sockets passed by systemd socket activation (none if not activated)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)  # never leak it into QEMU
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        socks.append(sock)
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    return socks


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None if not asked."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid is not None and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 1e6 / 2, 0.05)
    except ValueError:
        return None
