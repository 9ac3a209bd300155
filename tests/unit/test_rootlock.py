"""One daemon per root, private per-user directories (qvirtd.rootlock), and what the daemon
and qvirsh print when they refuse. Run as root: other owners are made with os.chown, and a
non-root user is the layout code with a fake euid."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qvirtd import __main__ as daemon_main
from qvirtd import cli
from qvirtd.config import Layout
from qvirtd.rootlock import (
    LOCK_NAME,
    RootLock,
    RootLocked,
    StartRefused,
    UnsafeDirectory,
    check_private_dir,
    prepare_private_dirs,
    take_root,
)

OTHER_UID = 65534  # nobody
FAKE_UID = 3_999_100 + os.getpid() % 1000  # a non-root user of our own, for the layout code

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown)")


def mkdir(path: Path, mode: int = 0o700, uid: int | None = None) -> Path:
    path.mkdir()
    os.chmod(path, mode)
    if uid is not None:
        os.chown(path, uid, -1)
    return path


# --- check_private_dir ---------------------------------------------------------------------

@pytest.mark.parametrize("mode", [0o700, 0o755, 0o750, 0o1700])
def test_own_directory_not_writable_by_others_passes(tmp_path: Path, mode: int) -> None:
    check_private_dir(mkdir(tmp_path / "d", mode))


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770, 0o702, 0o720])
def test_directory_writable_by_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    d = mkdir(tmp_path / "d", mode)
    with pytest.raises(UnsafeDirectory) as info:
        check_private_dir(d)
    assert str(info.value) == (f"refusing to use {d}: group or others can write to it "
                               f"(mode {mode:04o})")


def test_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    d = mkdir(tmp_path / "d", 0o700, uid=OTHER_UID)
    with pytest.raises(UnsafeDirectory) as info:
        check_private_dir(d)
    assert str(info.value) == (f"refusing to use {d}: it is owned by uid {OTHER_UID}, "
                               f"not by uid 0 (this user)")


def test_symlink_is_refused_even_to_a_good_directory(tmp_path: Path) -> None:
    target = mkdir(tmp_path / "target")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(UnsafeDirectory, match=f"^refusing to use {link}: it is a symbolic link$"):
        check_private_dir(link)


def test_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("")
    with pytest.raises(UnsafeDirectory, match="it is not a directory"):
        check_private_dir(f)


def test_missing_directory(tmp_path: Path) -> None:
    check_private_dir(tmp_path / "absent", missing_ok=True)
    with pytest.raises(UnsafeDirectory, match="it does not exist"):
        check_private_dir(tmp_path / "absent")


# --- prepare_private_dirs ------------------------------------------------------------------

def test_private_dirs_are_created_0700_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        dirs = (tmp_path / "base", tmp_path / "base" / "qvirtd", tmp_path / "a" / "b" / "state")
        prepare_private_dirs(dirs)
    finally:
        os.umask(old)
    for d in dirs:
        assert stat.S_IMODE(d.lstat().st_mode) == 0o700


def test_existing_unsafe_dir_is_refused_not_repaired(tmp_path: Path) -> None:
    d = mkdir(tmp_path / "base", 0o777)
    with pytest.raises(UnsafeDirectory, match="mode 0777"):
        prepare_private_dirs((d, d / "qvirtd"))
    assert stat.S_IMODE(d.stat().st_mode) == 0o777
    assert not (d / "qvirtd").exists()


def test_existing_good_dir_is_kept(tmp_path: Path) -> None:
    d = mkdir(tmp_path / "base", 0o755)
    prepare_private_dirs((d,))
    assert stat.S_IMODE(d.stat().st_mode) == 0o755


def test_dir_that_cannot_be_created_is_a_clean_refusal(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StartRefused, match=f"^cannot create {tmp_path}/file/d: Not a directory$"):
        prepare_private_dirs((tmp_path / "file" / "d",))


# --- the root lock -------------------------------------------------------------------------

def test_lock_records_our_pid_and_refuses_a_second_holder(tmp_path: Path) -> None:
    with RootLock.take(tmp_path) as lock:
        assert lock.path == tmp_path / LOCK_NAME
        assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"
        with pytest.raises(RootLocked) as info:
            RootLock.take(tmp_path)  # a second open file description: flock refuses it
        assert str(info.value) == (f"another qvirtd (pid {os.getpid()}) is already running "
                                   f"on {tmp_path}")
    with RootLock.take(tmp_path):  # released on exit
        pass


def test_lock_descriptor_is_close_on_exec(tmp_path: Path) -> None:
    lock = RootLock.take(tmp_path)
    try:
        fd = lock._fd
        assert fd is not None
        assert not os.get_inheritable(fd)
        # A child started without close_fds still does not get it: exec closes it.
        child = subprocess.Popen(["sleep", "30"], close_fds=False)
        try:
            time.sleep(0.2)  # past the exec
            held = [os.readlink(f"/proc/{child.pid}/fd/{n}")
                    for n in os.listdir(f"/proc/{child.pid}/fd")]
            assert str(lock.path) not in held, held
            lock.release()
            # The child is still running, and it holds nothing: the lock is free.
            RootLock.take(tmp_path).release()
        finally:
            child.kill()
            child.wait()
    finally:
        lock.release()


def test_lock_of_a_sigkilled_holder_is_released_by_the_kernel(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from pathlib import Path\n"
         "from qvirtd.rootlock import RootLock\n"
         "lock = RootLock.take(Path(sys.argv[1]))\n"
         "print('locked', flush=True)\n"
         "time.sleep(60)\n", str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with pytest.raises(RootLocked, match=f"pid {holder.pid}\\)"):
            RootLock.take(tmp_path)
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert (tmp_path / LOCK_NAME).read_text() == f"{holder.pid}\n"  # stale content: no matter
    with RootLock.take(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"


def test_lock_file_symlink_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / LOCK_NAME).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StartRefused, match="cannot open"):
        RootLock.take(tmp_path)
    assert not (tmp_path / "elsewhere").exists()


def test_take_root_under_root_makes_the_state_dir(tmp_path: Path) -> None:
    layout = Layout.under_root(tmp_path / "r")
    with take_root(layout):
        assert stat.S_IMODE(layout.state_dir.stat().st_mode) == 0o700
        assert (layout.state_dir / LOCK_NAME).exists()
        with pytest.raises(RootLocked):
            take_root(layout)


# --- a non-root user: the daemon and qvirsh refuse a directory someone else controls --------

@pytest.fixture
def fallback_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """The layout code of user FAKE_UID without XDG_RUNTIME_DIR: its runtime directory is
    /tmp/qvirtd-FAKE_UID, which the test makes (as another user would) before the daemon."""
    monkeypatch.setattr(os, "geteuid", lambda: FAKE_UID)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var in ("XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "XDG_STATE_HOME", "QVIRTD_SOCKET"):
        monkeypatch.delenv(var, raising=False)
    base = Path(f"/tmp/qvirtd-{FAKE_UID}")
    remove(base)
    try:
        yield base
    finally:
        remove(base)


def remove(path: Path) -> None:
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def refusals(capsys: pytest.CaptureFixture[str]) -> tuple[int, int, str, str]:
    daemon_status = daemon_main.main([])
    daemon_err = capsys.readouterr().err
    client_status = cli.main(["list"])
    client_err = capsys.readouterr().err
    return daemon_status, client_status, daemon_err, client_err


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda base: mkdir(base, 0o700, uid=OTHER_UID),
         f"it is owned by uid {OTHER_UID}, not by uid {FAKE_UID} (this user)"),
        (lambda base: mkdir(base, 0o777, uid=FAKE_UID),
         "group or others can write to it (mode 0777)"),
        (lambda base: mkdir(base, 0o1777, uid=OTHER_UID),
         f"it is owned by uid {OTHER_UID}, not by uid {FAKE_UID} (this user)"),
    ],
)
def test_planted_fallback_dir_is_refused_by_daemon_and_client(
        fallback_dir: Path, capsys: pytest.CaptureFixture[str], make: object,
        problem: str) -> None:
    assert callable(make)
    make(fallback_dir)
    # Another user's socket where qvirsh would look for the daemon's.
    inner = mkdir(fallback_dir / "qvirtd", 0o777, uid=OTHER_UID)
    (inner / "qvirtd.sock").write_text("")
    daemon_status, client_status, daemon_err, client_err = refusals(capsys)
    assert daemon_status == 1
    assert daemon_err == f"qvirtd: refusing to use {fallback_dir}: {problem}\n"
    assert client_status == 1
    assert client_err == f"error: refusing to use {fallback_dir}: {problem}\n"
    assert not (Path(os.environ["HOME"]) / ".local").exists()  # nothing made, nothing read


def test_symlinked_fallback_dir_is_refused_by_daemon_and_client(
        fallback_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = mkdir(tmp_path / "target", 0o700, uid=FAKE_UID)
    fallback_dir.symlink_to(target)
    daemon_status, client_status, daemon_err, client_err = refusals(capsys)
    assert (daemon_status, client_status) == (1, 1)
    assert daemon_err == f"qvirtd: refusing to use {fallback_dir}: it is a symbolic link\n"
    assert client_err == f"error: refusing to use {fallback_dir}: it is a symbolic link\n"


def test_unsafe_inner_runtime_dir_is_refused(fallback_dir: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    mkdir(fallback_dir, 0o700, uid=FAKE_UID)
    inner = mkdir(fallback_dir / "qvirtd", 0o700, uid=OTHER_UID)
    daemon_status, client_status, daemon_err, client_err = refusals(capsys)
    assert (daemon_status, client_status) == (1, 1)
    assert f"refusing to use {inner}: it is owned by uid {OTHER_UID}" in daemon_err
    assert client_err.startswith(f"error: refusing to use {inner}: ")


def test_unsafe_state_dir_is_refused_by_the_daemon(fallback_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "home" / ".local" / "state" / "qvirtd"
    state.mkdir(parents=True)
    os.chmod(state, 0o775)
    os.chown(state, FAKE_UID, -1)
    mkdir(fallback_dir, 0o700, uid=FAKE_UID)
    assert daemon_main.main([]) == 1
    assert capsys.readouterr().err.startswith(f"qvirtd: refusing to use {fallback_dir}/qvirtd")
    os.chown(fallback_dir / "qvirtd", FAKE_UID, -1)
    assert daemon_main.main([]) == 1
    assert capsys.readouterr().err == (f"qvirtd: refusing to use {state}: group or others can "
                                       f"write to it (mode 0775)\n")


def test_explicit_socket_is_not_checked(fallback_dir: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    mkdir(fallback_dir, 0o777, uid=OTHER_UID)
    chosen = tmp_path / "chosen.sock"
    assert cli.main(["--socket", str(chosen), "list"]) == 1
    assert capsys.readouterr().err == (f"error: cannot connect to qvirtd at {chosen}: "
                                       f"No such file or directory\n")
