"""A screen: VNC on a UNIX socket or a loopback port, domdisplay, screenshot (PNG, not
blank), a password that VNC clients are asked for, and no screen without `graphics`."""

from __future__ import annotations

import json
import socket
import struct
import zlib
from pathlib import Path

from harness import Daemon, tiny_definition, wait_for


def png_pixels(data: bytes) -> tuple[int, int, bytes]:
    """(width, height, raw scanlines) of an 8-bit RGB PNG, as QEMU writes them."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", (0, 0)
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            size = struct.unpack(">II", chunk[:8])
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    return size[0], size[1], zlib.decompress(idat)


def rfb_greeting(sock: socket.socket) -> tuple[bytes, bytes]:
    """The RFB version line and, after answering it, the security types offered."""
    sock.settimeout(10)
    version = sock.recv(12)
    sock.sendall(b"RFB 003.008\n")
    count = sock.recv(1)[0]
    return version, sock.recv(count)


def test_vnc_on_a_unix_socket_and_a_screenshot(daemon: Daemon, tmp_path: Path) -> None:
    daemon.define(tiny_definition("screen", graphics={"type": "vnc"}))
    daemon.qvirsh("start", "screen")
    shown = daemon.qvirsh("domdisplay", "screen").stdout.strip()
    socket_path = daemon.root / "run" / "domains" / "screen" / "vnc.sock"
    assert shown == f"vnc+unix://{socket_path}"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(socket_path))
        version, security = rfb_greeting(sock)
    assert version == b"RFB 003.008\n" and security == b"\x01"  # no password: type None
    # SeaBIOS says it found nothing to boot: that text is on the screen.
    png = tmp_path / "shot.png"

    def shot_with_text() -> bool:
        daemon.qvirsh("screenshot", "screen", str(png))
        width, height, raw = png_pixels(png.read_bytes())
        return width >= 640 and height >= 400 and len(set(raw)) > 2

    wait_for(shot_with_text, 20, "a screenshot that is not blank")
    res = daemon.json("screenshot", "screen", str(png))
    assert res["format"] == "png" and res["bytes"] == png.stat().st_size and "data" not in res
    # The daemon kept nothing of it in the run directory.
    assert not list(socket_path.parent.glob("screenshot-*"))
    daemon.qvirsh("destroy", "screen")
    assert not socket_path.exists()


def test_vnc_on_loopback_with_a_password(daemon: Daemon) -> None:
    daemon.define(tiny_definition("tcpvnc", graphics={"type": "vnc", "listen": "tcp",
                                                      "password": "s3cret"}))
    daemon.qvirsh("start", "tcpvnc")
    info = daemon.json("domdisplay", "tcpvnc")
    assert info["host"] == "127.0.0.1" and 5900 <= info["port"] < 6000
    assert info["uri"] == f"vnc://127.0.0.1:{info['port'] - 5900}"
    assert info["password"] is True and "s3cret" not in json.dumps(info)
    with socket.create_connection(("127.0.0.1", info["port"])) as sock:
        _, security = rfb_greeting(sock)
    assert security == b"\x02"  # VNC authentication: the password was set before the guest ran
    pid = daemon.json("dominfo", "tcpvnc")["pid"]
    assert b"s3cret" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    daemon.qvirsh("destroy", "tcpvnc")


def test_no_graphics_means_no_screen(daemon: Daemon) -> None:
    daemon.define(tiny_definition("blind"))
    daemon.qvirsh("start", "blind")
    for verb in ("domdisplay", "screenshot"):
        args = [verb, "blind"] + (["/tmp/never.png"] if verb == "screenshot" else [])
        res = daemon.qvirsh(*args, check=False)
        assert res.returncode == 1 and "has no graphics" in res.stderr, res.stderr
    pid = daemon.json("dominfo", "blind")["pid"]
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"-vnc" not in argv and argv[argv.index(b"-display") + 1] == b"none"
    assert not Path("/tmp/never.png").exists()
    daemon.qvirsh("destroy", "blind")
