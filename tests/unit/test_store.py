"""Files on disk: atomic writes (qvirtd.writer), definitions and autostart marks
(qvirtd.store, written through the FileWriter)."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest

from qvirtd.model import DomainDef
from qvirtd.store import DefinitionStore, atomic_write_json
from qvirtd.writer import FileWriter, atomic_write_bytes, remove_file


def leftovers(directory: Path, target: Path) -> list[str]:
    """Anything in `directory` other than `target` (temporary files)."""
    return sorted(p.name for p in directory.iterdir() if p != target)


def make_store(tmp_path: Path) -> DefinitionStore:
    store = DefinitionStore(tmp_path / "state" / "domains", tmp_path / "state" / "autostart",
                            FileWriter())
    store.prepare()
    return store


def definition(name: str, **extra: object) -> DomainDef:
    return DomainDef.model_validate({"name": name, **extra})


# --- atomic writes -------------------------------------------------------------------------

def test_atomic_write_json_creates_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    atomic_write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    atomic_write_json(target, {"b": [1, 2]})
    assert json.loads(target.read_text()) == {"b": [1, 2]}
    assert leftovers(tmp_path, target) == []


def test_atomic_write_replaces_a_longer_file_completely(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    atomic_write_json(target, {"long": "x" * 10000})
    atomic_write_json(target, {})
    assert json.loads(target.read_text()) == {}


def test_atomic_write_mode_is_private(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    atomic_write_json(target, {})
    assert stat.S_IMODE(target.stat().st_mode) & 0o077 == 0


def test_failed_fsync_keeps_old_file_and_no_temp(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "x.json"
    atomic_write_json(target, {"version": "old"})
    before = target.read_bytes()

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="Input/output"):
        atomic_write_json(target, {"version": "new"})
    monkeypatch.undo()

    assert target.read_bytes() == before
    assert leftovers(tmp_path, target) == []


def test_failed_rename_keeps_old_file_and_no_temp(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "x.json"
    atomic_write_json(target, {"version": "old"})

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_json(target, {"version": "new"})
    monkeypatch.undo()

    assert json.loads(target.read_text()) == {"version": "old"}
    assert leftovers(tmp_path, target) == []


def test_failed_write_of_new_file_leaves_nothing(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "new.json"

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        atomic_write_json(target, {"x": 1})
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_unserialisable_object_leaves_old_file(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    atomic_write_json(target, {"ok": True})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"ok": True}
    assert leftovers(tmp_path, target) == []


def test_atomic_write_bytes_writes_exact_bytes(tmp_path: Path) -> None:
    target = tmp_path / "blob"
    atomic_write_bytes(target, b"\x00\x01\xff")
    assert target.read_bytes() == b"\x00\x01\xff"


def test_remove_file_is_idempotent(tmp_path: Path) -> None:
    target = tmp_path / "x"
    target.write_text("x")
    remove_file(target)
    assert not target.exists()
    remove_file(target)  # absent: fine


# --- definitions ---------------------------------------------------------------------------

async def test_store_creates_its_directories(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    assert store.definitions_dir.is_dir()
    assert store.autostart_dir.is_dir()


async def test_save_and_load_all_round_trip(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    a = definition("alpha", memory_mib=256, vcpus=2,
                   boot={"kernel": "/boot/k", "initrd": "/boot/i", "cmdline": "console=ttyS0"},
                   disks=[{"id": "d0", "path": "/img/a,b.img", "format": "qcow2"}],
                   cdroms=[{"id": "cd0"}],
                   nics=[{"id": "n0", "mac": "52:54:00:01:02:03"}],
                   on_reboot="destroy")
    b = definition("beta")
    await store.save(a)
    await store.save(b)
    assert store.path_for("alpha") == store.definitions_dir / "alpha.json"
    assert store.path_for("alpha").exists()

    loaded = {d.name: (d, auto) for d, auto in store.load_all()}
    assert set(loaded) == {"alpha", "beta"}
    assert loaded["alpha"] == (a, False)
    assert loaded["beta"] == (b, False)
    assert leftovers(store.definitions_dir, store.path_for("alpha")) == ["beta.json"]


async def test_a_fresh_store_reads_what_another_wrote(tmp_path: Path) -> None:
    a = definition("alpha")
    await make_store(tmp_path).save(a)
    assert make_store(tmp_path).load_all() == [(a, False)]


async def test_save_overwrites(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    await store.save(definition("alpha", memory_mib=64))
    updated = definition("alpha", memory_mib=512)
    await store.save(updated)
    assert store.load_all() == [(updated, False)]


async def test_bad_files_are_skipped_and_kept(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    store = make_store(tmp_path)
    good = definition("good")
    await store.save(good)
    corrupt = store.definitions_dir / "corrupt.json"
    corrupt.write_text('{"name": "corrupt", ')
    invalid = store.definitions_dir / "invalid.json"
    invalid.write_text(json.dumps({"name": "invalid", "colour": "red"}))
    misnamed = store.definitions_dir / "other.json"
    misnamed.write_text(json.dumps(definition("somebody").model_dump(mode="json")))
    not_json = store.definitions_dir / "notes.txt"
    not_json.write_text("hello")

    with caplog.at_level(logging.ERROR, logger="qvirtd.store"):
        assert store.load_all() == [(good, False)]

    for path in (corrupt, invalid, misnamed, not_json):
        assert path.exists(), path
    logged = caplog.text
    assert "corrupt.json" in logged
    assert "invalid.json" in logged
    assert "other.json" in logged


async def test_delete_removes_definition_and_autostart(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    await store.save(definition("alpha"))
    await store.set_autostart("alpha", True)
    await store.delete("alpha")
    await store.set_autostart("alpha", False)
    assert not store.path_for("alpha").exists()
    assert store.autostart("alpha") is False
    assert store.load_all() == []
    await store.delete("alpha")  # idempotent


# --- autostart -----------------------------------------------------------------------------

async def test_autostart_marks(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    a, b = definition("alpha"), definition("beta")
    await store.save(a)
    await store.save(b)
    assert store.autostart("alpha") is False

    await store.set_autostart("alpha", True)
    assert store.autostart("alpha") is True
    assert store.autostart("beta") is False
    assert dict((d.name, auto) for d, auto in store.load_all()) == {"alpha": True, "beta": False}

    await store.set_autostart("alpha", True)  # again: still on, no error
    assert store.autostart("alpha") is True

    await store.set_autostart("alpha", False)
    assert store.autostart("alpha") is False
    await store.set_autostart("alpha", False)  # already off: fine
    assert dict((d.name, auto) for d, auto in store.load_all()) == {"alpha": False, "beta": False}


async def test_autostart_mark_survives_a_new_store(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    await store.save(definition("alpha"))
    await store.set_autostart("alpha", True)
    assert [(d.name, auto) for d, auto in make_store(tmp_path).load_all()] == [("alpha", True)]
