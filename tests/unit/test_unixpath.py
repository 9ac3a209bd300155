"""UNIX socket paths longer than sun_path (qvirtd.qemu.unixpath)."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from qvirtd.qemu.unixpath import SUN_PATH_MAX, short_path


def long_socket_path(base: Path, length: int = 200) -> Path:
    """A socket path of more than `length` bytes, its directories created."""
    directory = base
    while len(str(directory / "monitor.sock").encode()) <= length:
        directory = directory / ("d" * 40)
    directory.mkdir(parents=True)
    return directory / "monitor.sock"


def test_the_long_path_is_really_too_long(tmp_path: Path) -> None:
    path = long_socket_path(tmp_path)
    assert len(str(path).encode()) > SUN_PATH_MAX
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s, pytest.raises(OSError):
        s.bind(str(path))


def test_bind_and_connect_through_a_short_path(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = long_socket_path(tmp_path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        with short_path(path) as short:
            assert len(short.encode()) <= SUN_PATH_MAX
            server.bind(short)
        server.listen(1)
        assert stat.S_ISSOCK(os.stat(path).st_mode)

        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            with short_path(path) as short:
                client.connect(short)
            conn, _ = server.accept()
            with conn:
                client.sendall(b"ping")
                assert conn.recv(4) == b"ping"

        # The file at the long path is the listening socket: reach it by a relative name too.
        monkeypatch.chdir(path.parent)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
            other.connect(path.name)
            conn, _ = server.accept()
            conn.close()


def test_short_path_closes_its_descriptor(tmp_path: Path) -> None:
    path = long_socket_path(tmp_path)
    with short_path(path) as short:
        fd = int(short.split("/")[4])
        os.fstat(fd)  # open while in use
    with pytest.raises(OSError):
        os.fstat(fd)


def test_a_path_that_fits_is_used_as_it_is(tmp_path: Path) -> None:
    path = Path("/tmp") / f"qv-{os.getpid()}.sock"
    with short_path(path) as short:
        assert short == str(path)


def test_missing_directory_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / ("x" * 120) / "monitor.sock"
    with pytest.raises(FileNotFoundError), short_path(path):
        pass


def test_socket_name_too_long_for_any_short_path(tmp_path: Path) -> None:
    path = tmp_path / ("s" * 100)
    with pytest.raises(OSError, match="too long"), short_path(path):
        pass
