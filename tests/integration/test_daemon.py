"""The daemon process itself: files and modes, settings errors, systemd notify, clean stop."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

from harness import Daemon, NotifyListener, guest_definition, tiny_definition


def test_files_modes_and_clean_stop(daemon: Daemon) -> None:
    assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o600
    daemon.define(tiny_definition("files"))
    stored = json.loads((daemon.root / "state" / "domains" / "files.json").read_text())
    assert stored["name"] == "files" and stored["machine"] == "q35"
    daemon.qvirsh("start", "files")
    run_dir = daemon.root / "run" / "domains" / "files"
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    assert (run_dir / "monitor.sock").exists() and (run_dir / "console.log").exists()
    assert "starting domain files" in (daemon.root / "state" / "log" / "files.log").read_text()
    daemon.qvirsh("destroy", "files")
    assert not (run_dir / "monitor.sock").exists()
    assert daemon.stop() == 0
    assert not daemon.socket.exists()


def test_restart_keeps_definitions_and_autostart_flag(daemon: Daemon) -> None:
    daemon.define(tiny_definition("kept", memory_mib=80))
    daemon.qvirsh("autostart", "kept")
    assert daemon.stop() == 0
    daemon.start()
    info = daemon.json("dominfo", "kept")
    assert info["memory_mib"] == 80 and info["autostart"] is True
    daemon.qvirsh("autostart", "kept", "--disable")
    assert daemon.json("dominfo", "kept")["autostart"] is False


def test_bad_settings_are_refused_with_the_key_named(tmp_path: Path) -> None:
    for body, named in (("no_such_key = 1\n", "no_such_key: unknown key"),
                        ("monitor_timeout_s = -5\n", "monitor_timeout_s"),
                        ('socket_mode = "99x"\n', "socket_mode"),
                        ("job_wait_timeout_s = \n", "not valid TOML")):
        cfg = tmp_path / "bad.toml"
        cfg.write_text(body)
        res = subprocess.run([sys.executable, "-m", "qvirtd", "--root", str(tmp_path / "r"),
                              "--config", str(cfg)], capture_output=True, text=True,
                             timeout=30)
        assert res.returncode == 2, res
        assert named in res.stderr and str(cfg) in res.stderr, res.stderr


def test_sd_notify_ready_and_stopping(daemon_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    notify = NotifyListener(tmp_path / "notify.sock",
                            lambda got: any("STOPPING=1" in m for m in got))
    daemon: Daemon = daemon_factory(env={"NOTIFY_SOCKET": str(notify.path)})
    # READY=1 is sent once the socket listens: a client can connect as soon as it arrives.
    assert daemon.json("list", "--all") == []
    assert daemon.stop() == 0
    got = notify.finish()
    assert any("READY=1" in m for m in got), got
    assert any("STOPPING=1" in m for m in got), got
    ready = next(i for i, m in enumerate(got) if "READY=1" in m)
    assert ready < next(i for i, m in enumerate(got) if "STOPPING=1" in m)


def test_hostile_root_path_is_escaped_for_qemu(daemon_factory, guest: object) -> None:  # type: ignore[no-untyped-def]
    """The console log path goes into a QemuOpts value (-chardev file,path=...): a root with
    commas, '=' and spaces must neither break nor inject options, on a real QEMU."""
    daemon: Daemon = daemon_factory(prefix="qv,id=x,path=evil wait=off ä-")
    assert "," in str(daemon.root)
    daemon.define(guest_definition(guest, "hostile"))
    daemon.qvirsh("start", "hostile")
    daemon.wait_console("hostile", "QVIRTD-GUEST: ready")
    console = daemon.root / "run" / "domains" / "hostile" / "console.log"
    assert "QVIRTD-GUEST: ready" in console.read_text(errors="replace")
    assert not Path("evil wait=off").exists()
    daemon.qvirsh("destroy", "hostile")
