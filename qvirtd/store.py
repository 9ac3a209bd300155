"""Files on disk: atomic JSON writes, persistent definitions and autostart marks.

A write never leaves a half-written file: it goes to a temporary file in the same directory,
is fsynced, renamed over the target, and the directory is fsynced so the rename survives a
power cut. A crash at any point leaves either the old file or the new one.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .model import DomainDef

log = logging.getLogger(__name__)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o600,
                       durable: bool = True) -> None:
    """Replace `path` with `data` atomically (temp file, fsync, rename, fsync dir).

    `durable=False` skips both fsyncs: the rename alone keeps the file whole across a crash
    of the daemon (a killed process cannot lose what it wrote to the page cache); only a
    power cut could, and that is fine for files that describe running processes (status
    files), which a power cut ends anyway.
    """
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb", closefd=True) as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if not durable:
        return
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_json(path: Path, obj: Any, durable: bool = True) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode(),
                       durable=durable)


def remove_file(path: Path) -> None:
    """Remove `path` durably; an absent file is fine (removal is idempotent)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class DefinitionStore:
    """Persistent definitions (`<state>/domains/NAME.json`) and autostart marks.

    Callers hold the domain's lock (rule L3 in docs/design.md): the store itself has no lock.
    """

    def __init__(self, definitions_dir: Path, autostart_dir: Path) -> None:
        self.definitions_dir = definitions_dir
        self.autostart_dir = autostart_dir
        for d in (definitions_dir, autostart_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)

    def path_for(self, name: str) -> Path:
        return self.definitions_dir / f"{name}.json"

    def save(self, definition: DomainDef) -> None:
        atomic_write_json(self.path_for(definition.name), definition.model_dump(mode="json"))

    def delete(self, name: str) -> None:
        remove_file(self.path_for(name))
        self.set_autostart(name, False)

    def load_all(self) -> list[tuple[DomainDef, bool]]:
        """Every readable definition with its autostart flag; a bad file is logged and kept."""
        found: list[tuple[DomainDef, bool]] = []
        for path in sorted(self.definitions_dir.glob("*.json")):
            try:
                definition = DomainDef.model_validate_json(path.read_bytes())
            except (OSError, ValidationError) as exc:
                log.error("ignoring definition %s: %s", path, exc)
                continue
            if path.stem != definition.name:
                log.error("ignoring definition %s: it names domain %r", path, definition.name)
                continue
            found.append((definition, self.autostart(definition.name)))
        return found

    def autostart(self, name: str) -> bool:
        return (self.autostart_dir / name).exists()

    def set_autostart(self, name: str, enabled: bool) -> None:
        mark = self.autostart_dir / name
        if enabled:
            atomic_write_bytes(mark, b"")
        else:
            remove_file(mark)
