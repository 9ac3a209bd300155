"""The save image: a header the daemon writes, then the QEMU migration stream.

Layout (all of it written by `save`, `managedsave` and host shutdown; read by `restore` and
by a `start` that finds a managed save):

    offset 0    MAGIC (16 bytes)
    offset 16   format version, 4 bytes big-endian (FORMAT_VERSION)
    offset 20   length N of the header, 4 bytes big-endian
    offset 24   the header: N bytes of JSON (`SaveHeader`)
    ...         zero padding up to the next multiple of 4096 (`data_offset`)
    data_offset QEMU's migration stream, as QEMU wrote it to the fd it was given

The header holds the live definition of the saved run (its JSON config: what QEMU had,
hot-plugged devices included, and which root port each PCI device sat on, so the restored
QEMU is built with the same device layout), the small files of the run that QEMU reads
(the cloud-init seed, since the run directory goes with the run), whether the guest was
running, and when and by whom it was saved.

Reading is forgiving for fields (unknown ones are ignored, so a newer daemon may add some)
and strict for the frame: a wrong magic, a version this daemon does not know, a header
larger than MAX_HEADER or one that is not valid is refused with the reason named, and the
file is left as it is. The functions here block (worker thread, rule L6).
"""

from __future__ import annotations

import base64
import datetime
import os
from pathlib import Path

from pydantic import ValidationError

from .errors import InvalidOperationError, StorageError, describe_validation_error
from .model import DomainDef
from .status import Lenient

MAGIC = b"QVIRTD-SAVE\x00\x00\x00\x00\x00"
FORMAT_VERSION = 1
PROLOGUE = len(MAGIC) + 8
ALIGN = 4096
MAX_HEADER = 16 * 1024 * 1024


class SaveHeader(Lenient):
    format_version: int = FORMAT_VERSION
    name: str
    uuid: str
    definition: DomainDef                 # the live definition (the run's JSON config)
    ports: dict[str, str] = {}            # device id -> root port, as in the saved QEMU
    root_ports: int = 0
    accel: str = ""
    was_running: bool = True              # restore resumes the guest unless --paused
    saved_at: str = ""
    saved_by: str = ""
    files: dict[str, str] = {}            # run-directory file name -> base64 content


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def encode_files(files: dict[str, bytes]) -> dict[str, str]:
    return {name: base64.b64encode(data).decode() for name, data in files.items()}


def decode_files(header: SaveHeader) -> dict[str, bytes]:
    return {name: base64.b64decode(data) for name, data in header.files.items()}


def frame(header: SaveHeader) -> bytes:
    """The bytes before QEMU's stream: prologue, header, padding to ALIGN."""
    body = header.model_dump_json().encode()
    if len(body) > MAX_HEADER:
        raise InvalidOperationError(f"the save header would be {len(body)} bytes (at most "
                                    f"{MAX_HEADER})")
    head = MAGIC + FORMAT_VERSION.to_bytes(4, "big") + len(body).to_bytes(4, "big") + body
    return head + b"\0" * (-len(head) % ALIGN)


def create(path: Path, header: SaveHeader) -> int:
    """Blocking: create `path` (mode 0600, replacing a file that is there, refusing anything
    that is not a regular file), write the frame, and return the fd open for QEMU's stream
    to be appended (the caller closes it)."""
    data = frame(header)
    try:
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise InvalidOperationError(f"{path} exists and is not a regular file")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
    except OSError as exc:
        raise StorageError(f"cannot create the save file {path}: "
                           f"{exc.strerror or exc}") from exc
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError as exc:
        os.close(fd)
        raise StorageError(f"cannot write the save file {path}: "
                           f"{exc.strerror or exc}") from exc
    return fd


def finish(fd: int, path: Path) -> int:
    """Blocking: QEMU has written its stream: make the file durable, close `fd`, return the
    file's size. A short file (QEMU wrote nothing) is refused."""
    try:
        os.fsync(fd)
        size = os.fstat(fd).st_size
    except OSError as exc:
        raise StorageError(f"cannot sync the save file {path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    sync_dir(path.parent)
    if size <= ALIGN:
        raise StorageError(f"the save file {path} holds no guest state ({size} bytes)")
    return size


def sync_dir(path: Path) -> None:
    try:
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def read(path: Path) -> tuple[SaveHeader, int]:
    """Blocking: the header of save file `path` and where QEMU's stream starts."""
    try:
        with open(path, "rb") as f:
            prologue = f.read(PROLOGUE)
            if len(prologue) < PROLOGUE or not prologue.startswith(MAGIC):
                raise InvalidOperationError(f"{path} is not a qvirtd save file")
            version = int.from_bytes(prologue[16:20], "big")
            length = int.from_bytes(prologue[20:24], "big")
            if version != FORMAT_VERSION:
                raise InvalidOperationError(f"{path}: save format version {version} is not "
                                            f"known to this daemon (it reads {FORMAT_VERSION})")
            if length > MAX_HEADER:
                raise InvalidOperationError(f"{path}: its header claims {length} bytes (at "
                                            f"most {MAX_HEADER})")
            body = f.read(length)
            size = os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise StorageError(f"cannot read the save file {path}: {exc.strerror or exc}") from exc
    if len(body) < length:
        raise InvalidOperationError(f"{path}: the save file is cut short (header)")
    try:
        header = SaveHeader.model_validate_json(body)
    except ValidationError as exc:
        raise InvalidOperationError(f"{path}: the save header is not valid: "
                                    f"{describe_validation_error(exc)}") from None
    offset = PROLOGUE + length
    offset += -offset % ALIGN
    if size <= offset:
        raise InvalidOperationError(f"{path}: the save file holds no guest state (cut short)")
    return header, offset


def open_stream(path: Path, offset: int) -> int:
    """Blocking: an fd on `path` positioned at QEMU's stream (inheritable by QEMU; the
    caller closes its copy once QEMU has it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise StorageError(f"cannot open the save file {path}: {exc.strerror or exc}") from exc
    os.lseek(fd, offset, os.SEEK_SET)
    return fd
