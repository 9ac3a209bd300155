"""Persistent definitions (`STATE/domains/NAME.json`) and autostart marks, on disk.

Every write is atomic and durable (temporary file, fsync, rename, fsync of the directory) and
done by the FileWriter off the event loop (rule L6). The methods here are synchronous and
cheap: they queue the write and return its future, which the caller awaits with no lock held
before it answers (a definition is on disk before `define` says so). A failure is a
`StorageError` naming the path ("cannot write /var/lib/qvirtd/domains/x.json: No space left
on device"), and the caller changes nothing in memory.

Reading (`load_all`) happens once at start, in a worker thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .model import DomainDef
from .writer import FileWriter, atomic_write_bytes

log = logging.getLogger(__name__)


def encode_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()


def atomic_write_json(path: Path, obj: Any, durable: bool = True) -> None:
    """Blocking (tests, start-up): write `obj` as JSON atomically."""
    atomic_write_bytes(path, encode_json(obj), durable=durable)


class DefinitionStore:
    """Persistent definitions and autostart marks. Callers hold the domain's job or lock
    (docs/design.md); the store has no lock, and the writer keeps writes to one file in order.
    """

    def __init__(self, definitions_dir: Path, autostart_dir: Path, writer: FileWriter) -> None:
        self.definitions_dir = definitions_dir
        self.autostart_dir = autostart_dir
        self.writer = writer

    def prepare(self) -> None:
        """Blocking (start-up): create the directories."""
        for d in (self.definitions_dir, self.autostart_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)

    def path_for(self, name: str) -> Path:
        return self.definitions_dir / f"{name}.json"

    def save(self, definition: DomainDef) -> asyncio.Future[None]:
        return self.writer.write(self.path_for(definition.name),
                                 encode_json(definition.model_dump(mode="json")), durable=True)

    def delete(self, name: str) -> asyncio.Future[None]:
        """Remove the definition (the autostart mark goes with it: `set_autostart`)."""
        return self.writer.remove(self.path_for(name), durable=True)

    def set_autostart(self, name: str, enabled: bool) -> asyncio.Future[None]:
        mark = self.autostart_dir / name
        if enabled:
            return self.writer.write(mark, b"", durable=True)
        return self.writer.remove(mark, durable=True)

    def load_all(self) -> list[tuple[DomainDef, bool]]:
        """Blocking (start-up, in a worker thread): every readable definition with its
        autostart flag; a bad file is logged and kept."""
        found: list[tuple[DomainDef, bool]] = []
        for path in sorted(self.definitions_dir.glob("*.json")):
            try:
                definition = DomainDef.model_validate_json(path.read_bytes())
            except (OSError, ValidationError, RecursionError) as exc:
                log.error("ignoring definition %s: %s", path, exc)
                continue
            if path.stem != definition.name:
                log.error("ignoring definition %s: it names domain %r", path, definition.name)
                continue
            found.append((definition, self.autostart(definition.name)))
        return found

    def autostart(self, name: str) -> bool:
        return (self.autostart_dir / name).exists()
