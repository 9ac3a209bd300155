"""Daemon settings (TOML, validated by pydantic) and where files live (the path layout).

The layout follows the contract: system paths as root, XDG paths for other users, and a single
self-contained tree under `--root DIR`. Every setting has its default here and is documented,
with that default, in `config/qvirtd.toml`; a test keeps the two in step.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .qemu.unixpath import SUN_PATH_MAX

PATH_MAX = 4095  # bytes in a path, without the terminating NUL
# A socket path over sun_path is reached as /proc/self/fd/N/NAME (qemu.unixpath): its file
# name must fit beside that prefix, with room for a descriptor number of six digits.
SOCKET_NAME_MAX = SUN_PATH_MAX - len("/proc/self/fd/999999/")
# Room kept under the state and run directories for the daemon's own files (the longest is
# RUN/domains/<64-byte name>/.status.json.tmp.<pid>), so every one fits in PATH_MAX.
DIR_PATH_MAX = PATH_MAX - 128


class ConfigError(Exception):
    """A settings file that cannot be used; the message names the file and the key."""


class Settings(BaseModel):
    """Every tunable of the daemon. Unknown keys are refused so a typo never goes unnoticed."""

    model_config = ConfigDict(extra="forbid")

    job_wait_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    monitor_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 10.0
    monitor_connect_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 10.0
    monitor_reconnect_interval_s: Annotated[float, Field(gt=0, le=3600)] = 5.0
    agent_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 10.0
    migration_stall_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 60.0
    stats_timeout_s: Annotated[float, Field(ge=0, le=60)] = 0.5
    peer_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    listen_tls: str = ""
    tls_dir: str = "/etc/pki/qvirtd"
    save_max_bandwidth_mib_s: Annotated[float, Field(ge=0, le=1024 * 1024)] = 0.0
    on_host_shutdown: Literal["nothing", "shutdown", "managedsave"] = "shutdown"
    host_shutdown_timeout_s: Annotated[float, Field(gt=0, le=86400)] = 300.0
    destroy_grace_s: Annotated[float, Field(ge=0, le=600)] = 3.0
    process_exit_timeout_s: Annotated[float, Field(gt=0, le=600)] = 5.0
    shutdown_wait_default_s: Annotated[float, Field(gt=0, le=86400)] = 60.0
    qemu_binary: str = "qemu-system-x86_64"
    ovmf_code: str = "/usr/share/OVMF/OVMF_CODE_4M.fd"
    ovmf_vars_template: str = "/usr/share/OVMF/OVMF_VARS_4M.fd"
    ovmf_secboot_code: str = "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd"
    ovmf_secboot_vars_template: str = "/usr/share/OVMF/OVMF_VARS_4M.ms.fd"
    socket_path: str = ""
    socket_mode: int = 0o600
    max_message_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = 1024 * 1024
    max_requests_in_flight: Annotated[int, Field(ge=1, le=10000)] = 32
    client_write_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 10.0
    event_flush_delay_s: Annotated[float, Field(ge=0, le=10)] = 0.0
    event_queue_per_subscriber: Annotated[int, Field(ge=1, le=1_000_000)] = 1000
    event_replay_buffer: Annotated[int, Field(ge=0, le=1_000_000)] = 10000
    lock_check: bool = False
    loop_watch_ms: Annotated[float, Field(ge=0, le=60000)] = 100.0
    log_level: str = "info"
    client_outbound_max_bytes: Annotated[int, Field(ge=64 * 1024, le=1024 * 1024 * 1024)] = (
        4 * 1024 * 1024)
    max_clients: Annotated[int, Field(ge=1, le=100_000)] = 256
    client_idle_timeout_s: Annotated[float, Field(ge=0, le=86400)] = 300.0
    console_log_max_bytes: Annotated[int, Field(ge=4096, le=1024 * 1024 * 1024)] = 1024 * 1024
    test_phase_delay_s: Annotated[float, Field(ge=0, le=60)] = 0.0

    @field_validator("socket_mode", mode="before")
    @classmethod
    def _octal_mode(cls, value: object) -> object:
        """Accept "0600" (a string, read as octal) as well as an integer; never a boolean."""
        if isinstance(value, bool):
            raise ValueError("must be an octal string such as \"0600\" or an integer")
        if isinstance(value, str):
            try:
                return int(value, 8)
            except ValueError as exc:
                raise ValueError(f"not an octal mode: {value!r}") from exc
        return value

    @field_validator("socket_mode")
    @classmethod
    def _mode_range(cls, value: int) -> int:
        if not 0 <= value <= 0o777:
            raise ValueError("must be between 0000 and 0777")
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.lower() not in {"debug", "info", "warning", "error"}:
            raise ValueError("must be one of debug, info, warning, error")
        return value.lower()

    @field_validator("socket_path")
    @classmethod
    def _socket_path(cls, value: str) -> str:
        """Empty (the default), or an absolute path bind() can reach: checked here, at start,
        so a path that cannot work is refused with the key named instead of failing later."""
        if not value:
            return value
        if "\0" in value:
            raise ValueError("must not contain a NUL character")
        if not value.startswith("/"):
            raise ValueError(f"must be an absolute path, not {value!r}")
        size = len(value.encode())
        if size > PATH_MAX:
            raise ValueError(f"too long: {size} bytes, a path has at most {PATH_MAX}")
        name = Path(value).name
        name_size = len(name.encode())
        if size > SUN_PATH_MAX and name_size > SOCKET_NAME_MAX:
            raise ValueError(
                f"file name too long for a UNIX socket: {name_size} bytes; when the whole path "
                f"is over {SUN_PATH_MAX} bytes the file name may have at most {SOCKET_NAME_MAX}")
        return value

    @field_validator("ovmf_code", "ovmf_vars_template", "ovmf_secboot_code",
                     "ovmf_secboot_vars_template")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/") or "\0" in value:
            raise ValueError(f"must be an absolute path, not {value!r}")
        return value

    @field_validator("qemu_binary")
    @classmethod
    def _qemu_binary(cls, value: str) -> str:
        if not value or "\0" in value:
            raise ValueError("must be a command name or an absolute path")
        if "/" in value and not value.startswith("/"):
            raise ValueError(f"must be a bare command name (looked up in PATH) or an absolute "
                             f"path, not the relative path {value!r}")
        return value


def load_settings(path: Path | None) -> Settings:
    """Read `path` (absent: built-in defaults). Errors name the file and every bad key."""
    if path is None:
        return Settings()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: "
            + ("unknown key" if err["type"] == "extra_forbidden" else err["msg"])
            for err in exc.errors()
        )
        raise ConfigError(f"{path}: {problems}") from exc


@dataclass(frozen=True)
class Layout:
    """Where the daemon keeps things. Built once at start; read-only afterwards (no lock)."""

    config_file: Path
    state_dir: Path
    run_dir: Path
    socket_path: Path
    # Per-user directories (the XDG layout of a non-root user): the daemon creates them 0700,
    # and it and qvirsh refuse them if someone else could control them (rootlock.py).
    private_dirs: tuple[Path, ...] = ()

    @property
    def definitions_dir(self) -> Path:
        return self.state_dir / "domains"

    @property
    def autostart_dir(self) -> Path:
        return self.state_dir / "autostart"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "log"

    @property
    def nvram_dir(self) -> Path:
        return self.state_dir / "nvram"

    @property
    def save_dir(self) -> Path:
        """Managed save images (`managedsave`), one per domain."""
        return self.state_dir / "save"

    def managed_save(self, name: str) -> Path:
        return self.save_dir / f"{name}.save"

    @property
    def domains_run_dir(self) -> Path:
        return self.run_dir / "domains"

    def domain_run_dir(self, name: str) -> Path:
        return self.domains_run_dir / name

    def domain_log(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    @classmethod
    def under_root(cls, root: Path) -> Layout:
        root = root.absolute()
        return cls(root / "qvirtd.toml", root / "state", root / "run", root / "run" / "qvirtd.sock")

    @classmethod
    def default(cls) -> Layout:
        """System paths as root, else XDG paths (as the contract pins them)."""
        if os.geteuid() == 0:
            run = Path("/run/qvirtd")
            return cls(Path("/etc/qvirtd/qvirtd.toml"), Path("/var/lib/qvirtd"), run,
                       run / "qvirtd.sock")
        home = Path.home()
        cfg = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config") / "qvirtd"
        state = Path(os.environ.get("XDG_STATE_HOME") or home / ".local" / "state") / "qvirtd"
        xdg_runtime = os.environ.get("XDG_RUNTIME_DIR")
        runtime = Path(xdg_runtime or f"/tmp/qvirtd-{os.geteuid()}")
        run = runtime / "qvirtd"
        # Without XDG_RUNTIME_DIR the runtime directory sits in /tmp, where anyone could
        # have made it first: it is one of ours to check as well.
        private = (run, state) if xdg_runtime else (runtime, run, state)
        return cls(cfg / "qvirtd.toml", state, run, run / "qvirtd.sock", private)


def resolve(root: Path | None, config: Path | None) -> tuple[Layout, Settings]:
    """The daemon's layout and settings from its flags (`--root`, `--config`)."""
    layout = Layout.under_root(root) if root is not None else Layout.default()
    _check_dir_lengths(layout, root)
    config_path = config
    try:
        if config_path is None and layout.config_file.exists():
            config_path = layout.config_file
    except OSError as exc:  # a name over NAME_MAX, a directory we may not enter, ...
        raise ConfigError(f"{layout.config_file}: cannot read: {exc.strerror}") from exc
    settings = load_settings(config_path)
    if settings.socket_path:
        layout = replace(layout, socket_path=Path(settings.socket_path))
    return layout, settings


def _check_dir_lengths(layout: Layout, root: Path | None) -> None:
    """Refuse a root (or XDG directory) so deep that the daemon's files under it would not
    fit in PATH_MAX; anything shorter works (long socket paths go through qemu.unixpath)."""
    if root is not None:
        try:
            str(root.absolute()).encode()  # QEMU options, logs and /proc scans need text
        except UnicodeEncodeError:
            raise ConfigError(f"--root: not a UTF-8 path: {root!s:.200}") from None
        size = len(os.fsencode(root.absolute()))
        limit = DIR_PATH_MAX - len("/state")
        if size > limit:
            raise ConfigError(f"--root: path too long: {size} bytes, at most {limit}")
    for d in (layout.state_dir, layout.run_dir):
        size = len(os.fsencode(d))
        if size > DIR_PATH_MAX:
            raise ConfigError(f"{d}: path too long: {size} bytes, at most {DIR_PATH_MAX}")


def default_socket() -> tuple[Path, tuple[Path, ...]]:
    """The socket a client uses when `--socket` does not say, and the per-user directories
    on its way that the client must check (none for `$QVIRTD_SOCKET`: the user chose it)."""
    env = os.environ.get("QVIRTD_SOCKET")
    if env:
        return Path(env), ()
    layout = Layout.default()
    where = layout.socket_path.parent
    return layout.socket_path, tuple(d for d in layout.private_dirs
                                     if d == where or d in where.parents)


def default_socket_path() -> Path:
    """The socket a client uses when neither `--socket` nor `$QVIRTD_SOCKET` says otherwise."""
    return default_socket()[0]
