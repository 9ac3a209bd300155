"""Settings and path layout (qvirtd.config)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from qvirtd.config import (
    DIR_PATH_MAX,
    SOCKET_NAME_MAX,
    ConfigError,
    Layout,
    Settings,
    default_socket,
    default_socket_path,
    load_settings,
    resolve,
)
from qvirtd.qemu.unixpath import SUN_PATH_MAX

REPO_ROOT = Path(__file__).resolve().parents[2]
DOC_CONFIG = REPO_ROOT / "config" / "qvirtd.toml"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- defaults and the documented file ------------------------------------------------------

def test_defaults() -> None:
    s = Settings()
    assert s.job_wait_timeout_s == 30.0
    assert s.monitor_timeout_s == 10.0
    assert s.socket_mode == 0o600
    assert s.socket_path == ""
    assert s.qemu_binary == "qemu-system-x86_64"
    assert s.lock_check is False
    assert s.log_level == "info"
    assert s.event_flush_delay_s == 0.0


def test_no_file_means_defaults() -> None:
    assert load_settings(None) == Settings()


def test_documented_config_names_every_setting() -> None:
    text = DOC_CONFIG.read_text(encoding="utf-8")
    documented = set(re.findall(r"^([a-z_][a-z0-9_]*)\s*=", text, flags=re.MULTILINE))
    fields = set(Settings.model_fields)
    assert fields - documented == set(), "settings missing from config/qvirtd.toml"
    assert documented - fields == set(), "config/qvirtd.toml documents unknown keys"


def test_documented_config_shows_the_defaults() -> None:
    assert load_settings(DOC_CONFIG) == Settings()


# --- refusals ------------------------------------------------------------------------------

def test_unknown_key_is_refused_and_named(tmp_path: Path) -> None:
    path = write(tmp_path / "q.toml", "job_wait_timeout_s = 5\njob_wait_timout_s = 5\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert "job_wait_timout_s" in message
    assert "unknown key" in message
    assert str(path) in message


def test_unknown_table_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "q.toml", "[daemon]\nlog_level = 'info'\n")
    with pytest.raises(ConfigError, match="daemon"):
        load_settings(path)


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("job_wait_timeout_s = 0", "job_wait_timeout_s"),
        ("job_wait_timeout_s = -1.5", "job_wait_timeout_s"),
        ("monitor_timeout_s = 'soon'", "monitor_timeout_s"),
        ("destroy_grace_s = 601", "destroy_grace_s"),
        ("max_message_bytes = 10", "max_message_bytes"),
        ("max_requests_in_flight = 0", "max_requests_in_flight"),
        ("event_queue_per_subscriber = 0", "event_queue_per_subscriber"),
        ("log_level = 'verbose'", "log_level"),
        ("lock_check = 'maybe'", "lock_check"),
        ("socket_mode = '0999'", "socket_mode"),
        ("socket_mode = 'rw'", "socket_mode"),
        ("socket_mode = 0o1000", "socket_mode"),
        ("socket_mode = -1", "socket_mode"),
    ],
)
def test_bad_value_is_refused_and_named(tmp_path: Path, line: str, key: str) -> None:
    path = write(tmp_path / "q.toml", line + "\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert f"{key}:" in str(info.value)
    assert str(path) in str(info.value)


def test_every_bad_key_is_named(tmp_path: Path) -> None:
    path = write(tmp_path / "q.toml", "monitor_timeout_s = 0\nbogus = 1\nlog_level = 'x'\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    for key in ("monitor_timeout_s", "bogus", "log_level"):
        assert key in message


def test_bad_toml_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "q.toml", "job_wait_timeout_s = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_settings(path)
    assert str(path) in str(info.value)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(path)


# --- values --------------------------------------------------------------------------------

def test_values_are_read(tmp_path: Path) -> None:
    path = write(tmp_path / "q.toml",
                 "job_wait_timeout_s = 2.5\nmonitor_timeout_s = 1\nlock_check = true\n"
                 "log_level = 'DEBUG'\nqemu_binary = '/opt/qemu/bin/qemu'\n")
    s = load_settings(path)
    assert s.job_wait_timeout_s == 2.5
    assert s.monitor_timeout_s == 1.0
    assert s.lock_check is True
    assert s.log_level == "debug"
    assert s.qemu_binary == "/opt/qemu/bin/qemu"
    # Keys left out keep their defaults.
    assert s.destroy_grace_s == Settings().destroy_grace_s


@pytest.mark.parametrize(
    ("line", "mode"),
    [("socket_mode = '0600'", 0o600), ("socket_mode = '0660'", 0o660),
     ("socket_mode = '600'", 0o600), ("socket_mode = 384", 0o600),
     ("socket_mode = 0o640", 0o640), ("socket_mode = 0", 0)],
)
def test_socket_mode_string_or_int(tmp_path: Path, line: str, mode: int) -> None:
    assert load_settings(write(tmp_path / "q.toml", line + "\n")).socket_mode == mode


@pytest.mark.parametrize("value", ["true", "false"])
def test_socket_mode_boolean_is_refused(tmp_path: Path, value: str) -> None:
    path = write(tmp_path / "q.toml", f"socket_mode = {value}\n")
    with pytest.raises(ConfigError, match="socket_mode"):
        load_settings(path)


# --- layout --------------------------------------------------------------------------------

def test_layout_under_root(tmp_path: Path) -> None:
    layout = Layout.under_root(tmp_path)
    assert layout.config_file == tmp_path / "qvirtd.toml"
    assert layout.socket_path == tmp_path / "run" / "qvirtd.sock"
    assert layout.state_dir == tmp_path / "state"
    assert layout.run_dir == tmp_path / "run"
    assert layout.definitions_dir == tmp_path / "state" / "domains"
    assert layout.autostart_dir == tmp_path / "state" / "autostart"
    assert layout.log_dir == tmp_path / "state" / "log"
    assert layout.domain_run_dir("vm") == tmp_path / "run" / "domains" / "vm"
    assert layout.domain_log("vm") == tmp_path / "state" / "log" / "vm.log"


def test_layout_under_relative_root_is_absolute(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    layout = Layout.under_root(Path("inst"))
    assert layout.socket_path == tmp_path / "inst" / "run" / "qvirtd.sock"
    assert layout.socket_path.is_absolute()


def test_two_roots_share_nothing(tmp_path: Path) -> None:
    a = Layout.under_root(tmp_path / "a")
    b = Layout.under_root(tmp_path / "b")
    for path_a, path_b in zip(
        (a.config_file, a.state_dir, a.run_dir, a.socket_path),
        (b.config_file, b.state_dir, b.run_dir, b.socket_path),
        strict=True,
    ):
        assert tmp_path / "a" in path_a.parents
        assert tmp_path / "b" in path_b.parents


def test_resolve_root_without_config_uses_defaults(tmp_path: Path) -> None:
    layout, settings = resolve(tmp_path, None)
    assert layout == Layout.under_root(tmp_path)
    assert settings == Settings()


def test_resolve_reads_config_under_root(tmp_path: Path) -> None:
    write(tmp_path / "qvirtd.toml", "job_wait_timeout_s = 7\n")
    layout, settings = resolve(tmp_path, None)
    assert settings.job_wait_timeout_s == 7.0
    assert layout.socket_path == tmp_path / "run" / "qvirtd.sock"


def test_resolve_bad_config_under_root_is_refused(tmp_path: Path) -> None:
    write(tmp_path / "qvirtd.toml", "nope = 1\n")
    with pytest.raises(ConfigError, match="nope"):
        resolve(tmp_path, None)


def test_resolve_config_flag_overrides_root_config(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    write(root / "qvirtd.toml", "job_wait_timeout_s = 7\n")
    other = write(tmp_path / "other.toml", "monitor_timeout_s = 3\n")
    layout, settings = resolve(root, other)
    assert settings.monitor_timeout_s == 3.0
    assert settings.job_wait_timeout_s == Settings().job_wait_timeout_s
    assert layout.state_dir == root / "state"


def test_resolve_socket_path_setting_moves_the_socket(tmp_path: Path) -> None:
    sock = tmp_path / "elsewhere" / "ctl.sock"
    write(tmp_path / "qvirtd.toml", f"socket_path = '{sock}'\n")
    layout, _ = resolve(tmp_path, None)
    assert layout.socket_path == sock
    assert layout.run_dir == tmp_path / "run"


# --- paths checked at start ----------------------------------------------------------------

@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("run/qvirtd.sock", "must be an absolute path"),
        ("./qvirtd.sock", "must be an absolute path"),
        ("~/qvirtd.sock", "must be an absolute path"),
        ("/tmp/" + "f" * 120 + ".sock", "file name too long for a UNIX socket"),
        ("/tmp/" + "g" * 300, "file name too long for a UNIX socket"),
        ("/tmp/" + "d/" * 2100 + "x.sock", "too long: 4211 bytes"),
    ],
)
def test_unusable_socket_path_is_refused_and_named(tmp_path: Path, value: str,
                                                   problem: str) -> None:
    path = write(tmp_path / "q.toml", f"socket_path = '{value}'\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert "socket_path:" in str(info.value) and problem in str(info.value)


def test_socket_path_with_a_nul_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "q.toml", 'socket_path = "/tmp/a\\u0000b.sock"\n')
    with pytest.raises(ConfigError, match=r"socket_path: .*NUL"):
        load_settings(path)


@pytest.mark.parametrize(
    "value",
    [
        "/run/qvirtd.sock",
        "/" + "d" * 150 + "/qvirtd.sock",  # a long path: bound through /proc/self/fd/N
        "/" + "d" * 150 + "/" + "n" * SOCKET_NAME_MAX,  # the longest file name that works
        "/t/" + "n" * 100,  # the whole path fits sun_path: any file name does
    ],
)
def test_long_socket_paths_that_work_are_accepted(tmp_path: Path, value: str) -> None:
    path = write(tmp_path / "q.toml", f"socket_path = '{value}'\n")
    assert load_settings(path).socket_path == value


def test_socket_name_limit_leaves_room_for_any_descriptor() -> None:
    assert len(f"/proc/self/fd/{10**6 - 1}/" + "n" * SOCKET_NAME_MAX) <= SUN_PATH_MAX


@pytest.mark.parametrize("value", ["bin/qemu", "./qemu-system-x86_64", "../qemu", ""])
def test_relative_qemu_binary_is_refused_and_named(tmp_path: Path, value: str) -> None:
    path = write(tmp_path / "q.toml", f"qemu_binary = '{value}'\n")
    with pytest.raises(ConfigError, match="qemu_binary: "):
        load_settings(path)


@pytest.mark.parametrize("value", ["qemu-system-x86_64", "/usr/bin/qemu-system-x86_64"])
def test_qemu_binary_name_or_absolute_is_accepted(tmp_path: Path, value: str) -> None:
    path = write(tmp_path / "q.toml", f"qemu_binary = '{value}'\n")
    assert load_settings(path).qemu_binary == value


def deep_path(base: Path, size: int) -> Path:
    """A path of exactly `size` bytes under `base`, in components of at most 200 bytes."""
    path = str(base)
    while len(path) < size:
        path += "/" + "d" * min(200, size - len(path) - 1)
    assert len(path.encode()) == size
    return Path(path)


def test_root_too_deep_for_its_files_is_refused(tmp_path: Path) -> None:
    limit = DIR_PATH_MAX - len("/state")
    deep = deep_path(tmp_path, limit + 1)  # never created: refused before any file access
    with pytest.raises(ConfigError) as info:
        resolve(deep, None)
    assert str(info.value) == f"--root: path too long: {limit + 1} bytes, at most {limit}"


def test_deep_root_within_the_limit_is_accepted(tmp_path: Path) -> None:
    deep = deep_path(tmp_path, DIR_PATH_MAX - len("/state"))
    layout, _ = resolve(deep, None)
    assert layout.state_dir == deep / "state"


def test_root_with_a_name_over_name_max_is_refused(tmp_path: Path) -> None:
    root = tmp_path / ("n" * 300)
    with pytest.raises(ConfigError, match=r"qvirtd\.toml: cannot read: File name too long"):
        resolve(root, None)


def test_root_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    root = Path(os.fsdecode(os.fsencode(tmp_path) + b"/\xff\xfe"))
    with pytest.raises(ConfigError, match=r"^--root: not a UTF-8 path: "):
        resolve(root, None)
    assert os.listdir(tmp_path) == []


def test_resolve_socket_path_keeps_the_private_dirs(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    fake_user(monkeypatch, tmp_path)
    write(tmp_path / "elsewhere.toml", f"socket_path = '{tmp_path / 'ctl.sock'}'\n")
    layout, _ = resolve(None, tmp_path / "elsewhere.toml")
    assert layout.socket_path == tmp_path / "ctl.sock"
    assert layout.private_dirs == Layout.default().private_dirs != ()


# --- per-user directories ------------------------------------------------------------------

FAKE_UID = 3_999_000


def fake_user(monkeypatch: pytest.MonkeyPatch, home: Path, runtime: Path | None = None) -> None:
    """Run the layout code as a non-root user (uid FAKE_UID) whose home is `home`."""
    monkeypatch.setattr(os, "geteuid", lambda: FAKE_UID)
    monkeypatch.setenv("HOME", str(home))
    for var in ("XDG_CONFIG_HOME", "XDG_STATE_HOME", "QVIRTD_SOCKET"):
        monkeypatch.delenv(var, raising=False)
    if runtime is None:
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    else:
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))


def test_root_flag_and_system_layouts_have_no_private_dirs(tmp_path: Path) -> None:
    assert Layout.under_root(tmp_path).private_dirs == ()
    assert os.geteuid() != 0 or Layout.default().private_dirs == ()


def test_fallback_runtime_dir_is_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_user(monkeypatch, tmp_path)
    layout = Layout.default()
    base = Path(f"/tmp/qvirtd-{FAKE_UID}")
    assert layout.socket_path == base / "qvirtd" / "qvirtd.sock"
    assert layout.private_dirs == (base, base / "qvirtd", tmp_path / ".local/state/qvirtd")
    assert default_socket() == (layout.socket_path, (base, base / "qvirtd"))
    assert default_socket_path() == layout.socket_path


def test_xdg_runtime_dir_itself_is_not_ours(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    fake_user(monkeypatch, tmp_path, runtime=tmp_path / "xdg")
    layout = Layout.default()
    assert layout.private_dirs == (tmp_path / "xdg/qvirtd", tmp_path / ".local/state/qvirtd")
    assert default_socket() == (tmp_path / "xdg/qvirtd/qvirtd.sock", (tmp_path / "xdg/qvirtd",))


def test_chosen_socket_is_not_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_user(monkeypatch, tmp_path)
    monkeypatch.setenv("QVIRTD_SOCKET", "/srv/shared/qvirtd.sock")
    assert default_socket() == (Path("/srv/shared/qvirtd.sock"), ())

