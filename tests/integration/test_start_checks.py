"""Paths checked at start: a socket path over sun_path (107 bytes) works or is refused with
the key named and exit status 2, never a traceback; so is a --root too deep for its files."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import Daemon, run_daemon, tiny_definition

from qvirtd.config import DIR_PATH_MAX


def deep_dir(base: Path, size: int) -> Path:
    """A path of about `size` bytes under `base` (components of 100 bytes), not created."""
    path = base
    while len(str(path).encode()) < size:
        path = path / ("d" * 100)
    return path


def test_socket_path_over_sun_path_works(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory(start=False)
    sock = deep_dir(daemon.root, 200) / "qvirtd.sock"
    assert len(str(sock).encode()) > 107
    daemon.settings["socket_path"] = str(sock)
    daemon.socket = sock
    daemon.start()
    assert daemon.json("list", "--all") == []  # qvirsh reaches it through /proc/self/fd/N
    assert daemon.stop() == 0
    assert not sock.exists()


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("/tmp/" + "f" * 120 + ".sock", "file name too long for a UNIX socket: 125 bytes"),
        ("qvirtd.sock", "must be an absolute path, not 'qvirtd.sock'"),
        ("{tmp}/notes.txt", "{tmp}/notes.txt exists and is not a socket"),
        ("{tmp}/notes.txt/qvirtd.sock", "cannot create {tmp}/notes.txt: File exists"),
    ],
)
def test_unusable_socket_path_is_refused_with_the_key(tmp_path: Path, value: str,
                                                      problem: str) -> None:
    value, problem = value.format(tmp=tmp_path), problem.format(tmp=tmp_path)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a socket\n")
    (tmp_path / "qvirtd.toml").write_text(f"socket_path = {value!r}\n")
    res = run_daemon(tmp_path)
    assert res.returncode == 2, res.stderr
    assert res.stderr.splitlines()[-1].startswith("qvirtd: ")
    assert "socket_path: " in res.stderr and problem in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert notes.read_text() == "not a socket\n"  # never unlinked as a "stale" socket


def test_relative_qemu_binary_is_refused_with_the_key(tmp_path: Path) -> None:
    (tmp_path / "qvirtd.toml").write_text("qemu_binary = 'bin/qemu-system-x86_64'\n")
    res = run_daemon(tmp_path)
    assert res.returncode == 2
    assert res.stderr.startswith(f"qvirtd: {tmp_path / 'qvirtd.toml'}: qemu_binary: ")
    assert "relative path 'bin/qemu-system-x86_64'" in res.stderr


def test_deep_root_works_with_a_domain(daemon_factory: Callable[..., Daemon]) -> None:
    """Every socket under a deep root (control and QEMU monitor) is over 107 bytes."""
    daemon = daemon_factory(start=False)
    outer = daemon.root
    daemon.root = deep_dir(outer, 400)
    daemon.root.mkdir(parents=True)
    daemon.socket = daemon.root / "run" / "qvirtd.sock"
    daemon.log = daemon.root / "daemon.log"
    try:
        daemon.start()
        daemon.define(tiny_definition("deep"))
        daemon.qvirsh("start", "deep")
        assert daemon.wait_state("deep", "running")["pid"] in daemon.qemu_pids()
        daemon.qvirsh("destroy", "deep")
    finally:
        daemon.cleanup()
        shutil.rmtree(outer, ignore_errors=True)


def test_root_too_deep_is_refused_with_the_flag(tmp_path: Path) -> None:
    root = deep_dir(tmp_path, DIR_PATH_MAX + 100)
    res = run_daemon(root)
    assert res.returncode == 2
    size = len(str(root).encode())
    assert res.stderr == (f"qvirtd: --root: path too long: {size} bytes, at most "
                          f"{DIR_PATH_MAX - len('/state')}\n")
    assert not (tmp_path / ("d" * 100)).exists()  # nothing was created
