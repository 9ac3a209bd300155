"""sd_notify without libsystemd: one datagram to $NOTIFY_SOCKET (READY=1, STOPPING=1, ...)."""

from __future__ import annotations

import os
import socket


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
