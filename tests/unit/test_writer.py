"""The FileWriter (qvirtd.writer): off the loop, in order per path, coalescing, errors that
name the path, retries, rotation of capped logs."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from qvirtd.errors import StorageError
from qvirtd.writer import (
    INLINE_MAX_BYTES,
    MEMORY_FILESYSTEMS,
    FileWriter,
    append_capped,
    filesystem_type,
)


@pytest.fixture
def writer() -> FileWriter:
    return FileWriter()


async def test_write_and_remove(writer: FileWriter, tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    await writer.write(target, b"one", durable=True)
    assert target.read_bytes() == b"one"
    await writer.remove(target, durable=True)
    assert not target.exists()
    await writer.remove(target, durable=False)  # absent: fine
    assert writer.stats()["failures"] == 0


async def test_queued_writes_coalesce_and_every_future_completes(
        writer: FileWriter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "status.json"
    started = threading.Event()
    release = threading.Event()
    real = os.replace
    performed: list[bytes] = []

    def slow_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        performed.append(Path(src).read_bytes())
        started.set()
        release.wait(5)
        real(src, dst)

    monkeypatch.setattr(os, "replace", slow_replace)
    first = writer.write(target, b"v1", durable=False)
    await asyncio.to_thread(started.wait, 5)
    later = [writer.write(target, f"v{i}".encode(), durable=False) for i in range(2, 12)]
    release.set()
    await asyncio.gather(first, *later)
    assert target.read_bytes() == b"v11"
    assert performed == [b"v1", b"v11"]  # ten queued writes became one


async def test_writes_of_one_loop_step_are_handed_to_a_thread_once(
        writer: FileWriter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target, log = tmp_path / "status.json", tmp_path / "console.log"
    real = os.replace
    performed: list[bytes] = []

    def counting_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        performed.append(Path(src).read_bytes())
        real(src, dst)

    monkeypatch.setattr(os, "replace", counting_replace)
    # One step (no await between): nothing starts before the step ends, then the newest
    # data is written once and every caller's future completes.
    futures = [writer.write(target, f"v{i}".encode(), durable=False) for i in range(5)]
    futures += [writer.append(log, b"a", max_bytes=100), writer.append(log, b"b", max_bytes=100)]
    assert not target.exists() and not log.exists()
    await asyncio.gather(*futures)
    assert performed == [b"v4"] and target.read_bytes() == b"v4"
    assert log.read_bytes() == b"ab"


async def test_a_write_after_the_writer_closed_fails_instead_of_hanging(
        writer: FileWriter, tmp_path: Path) -> None:
    writer.close()
    with pytest.raises(StorageError, match=r"status\.json.*writer has stopped"):
        await asyncio.wait_for(writer.write(tmp_path / "status.json", b"x", durable=False,
                                            retry_s=0.01), 5)
    await asyncio.sleep(0.05)
    assert writer.stats()["failures"] == 1  # failed once, not retried


async def test_a_removal_supersedes_queued_writes_in_order(
        writer: FileWriter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "status.json"
    gate = threading.Event()
    real = os.replace

    def gated(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        gate.wait(5)
        real(src, dst)

    monkeypatch.setattr(os, "replace", gated)
    a = writer.write(target, b"a", durable=False)
    b = writer.write(target, b"b", durable=False)
    gone = writer.remove(target, durable=False)
    gate.set()
    await asyncio.gather(a, b, gone)
    assert not target.exists()  # a late write never recreates a removed file


async def test_appends_join_and_the_log_rotates_at_its_cap(writer: FileWriter,
                                                           tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    await asyncio.gather(*(writer.append(log, b"x" * 100, max_bytes=1000) for _ in range(9)))
    assert log.stat().st_size == 900
    await writer.append(log, b"y" * 200, max_bytes=1000)
    assert log.read_bytes() == b"y" * 200
    assert (tmp_path / "console.log.1").read_bytes() == b"x" * 900
    # A single chunk larger than the cap keeps its end, and the rotated file what came just
    # before it: the pair still reads as one stream, nothing missing where they join.
    append_capped(log, b"0123456789" * 200, 1000)
    assert log.stat().st_size == 1000 and log.read_bytes().endswith(b"789")
    assert (tmp_path / "console.log.1").read_bytes() + log.read_bytes() == \
        (b"0123456789" * 200)[-2000:]
    append_capped(log, b"abc" * 400, 1000)  # 1,200 bytes: 200 of them follow the old log
    assert (tmp_path / "console.log.1").read_bytes() + log.read_bytes() == \
        ((b"0123456789" * 200) + b"abc" * 400)[-2000:]


async def test_an_error_names_the_path_and_the_old_file_stays(
        writer: FileWriter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "def.json"
    await writer.write(target, b"old", durable=True)

    def read_only(fd: int) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(os, "fsync", read_only)
    with pytest.raises(StorageError) as info:
        await writer.write(target, b"new", durable=True)
    assert str(info.value) == f"cannot write {target}: Read-only file system"
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["def.json"]  # no temporary file left
    busy = tmp_path / "busy"
    with pytest.raises(StorageError, match=f"cannot remove {busy}: "):
        await _raise_for(writer, busy)


async def _raise_for(writer: FileWriter, directory: Path) -> None:
    """A removal that fails (the path is a non-empty directory)."""
    directory.mkdir()
    (directory / "f").write_text("x")
    await writer.remove(directory, durable=True)


async def test_failures_are_counted_retried_and_superseded(
        writer: FileWriter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "status.json"
    calls = {"n": 0}
    real = os.replace

    def full_disk_twice(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        calls["n"] += 1
        if calls["n"] <= 2:
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(os, "replace", full_disk_twice)
    fut = writer.write(target, b"state", durable=False, retry_s=0.05)
    with pytest.raises(StorageError, match="No space left on device") as info:
        await fut
    assert str(target) in str(info.value) and info.value.kind == "storage"
    assert writer.failing  # reported while it is being retried
    for _ in range(100):
        if not writer.failing:
            break
        await asyncio.sleep(0.02)
    assert target.read_bytes() == b"state"  # the retry wrote it once the disk had room
    assert writer.stats()["failures"] == 2 and not writer.failing


async def test_a_slow_fsync_does_not_hold_the_loop(writer: FileWriter, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.fsync

    def slow_fsync(fd: int) -> None:
        time.sleep(0.3)
        real(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    fut = writer.write(tmp_path / "d.json", b"x", durable=True)
    gaps = []
    last = time.monotonic()
    while not fut.done():
        await asyncio.sleep(0.01)
        now = time.monotonic()
        gaps.append(now - last)
        last = now
    await fut
    assert max(gaps) < 0.1, max(gaps)


async def test_drain_waits_for_everything(writer: FileWriter, tmp_path: Path) -> None:
    futures = [writer.write(tmp_path / f"f{i}", b"x", durable=True) for i in range(20)]
    assert await writer.drain(5.0)
    assert all(f.done() for f in futures)
    assert len(list(tmp_path.iterdir())) == 20
    writer.close()


async def test_on_a_memory_filesystem_the_loop_writes_small_non_durable_files(
        writer: FileWriter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a directory declared memory-backed: the end of the step writes it on the loop
    thread; durable and large operations still go to the threads, in order per path."""
    writer.write_inline_under(tmp_path)
    where: list[tuple[str, int, bool]] = []  # file, size, written by the loop's thread
    real = os.replace
    loop_thread = threading.current_thread()

    def noting_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        where.append((Path(dst).name, Path(src).stat().st_size,
                      threading.current_thread() is loop_thread))
        real(src, dst)

    monkeypatch.setattr(os, "replace", noting_replace)
    status = tmp_path / "run" / "status.json"
    status.parent.mkdir()
    futures = [writer.write(status, f"v{i}".encode(), durable=False) for i in range(3)]
    assert not status.exists()  # not before the step ends
    await asyncio.sleep(0)
    assert status.read_bytes() == b"v2" and all(f.done() for f in futures)
    assert where == [("status.json", 2, True)]
    durable = writer.write(tmp_path / "def.json", b"d", durable=True)
    big = writer.write(status, b"x" * (INLINE_MAX_BYTES + 1), durable=False)
    await asyncio.gather(durable, big)
    assert sorted(where[1:]) == [("def.json", 1, False),
                                 ("status.json", INLINE_MAX_BYTES + 1, False)]
    await writer.write(status, b"small again", durable=False)
    assert status.read_bytes() == b"small again"
    assert where[3] == ("status.json", 11, True)
    assert writer.stats()["inline"] == 2 and writer.stats()["writes"] == 4
    # Outside the declared directory: the threads, as before.
    await writer.write(Path(str(tmp_path) + "-other.json"), b"o", durable=False)
    assert where[-1] == ("-".join([tmp_path.name, "other.json"]), 1, False)
    Path(str(tmp_path) + "-other.json").unlink()


async def test_an_error_on_the_loop_is_reported_and_retried_like_a_threads(
        writer: FileWriter, tmp_path: Path) -> None:
    writer.write_inline_under(tmp_path)
    target = tmp_path / "gone" / "status.json"  # its directory does not exist yet
    with pytest.raises(StorageError, match=r"cannot write .*status\.json"):
        await writer.write(target, b"s", durable=False, retry_s=0.05)
    assert writer.stats()["failing"]
    target.parent.mkdir()
    for _ in range(100):  # the retry finds the directory
        if target.exists():
            break
        await asyncio.sleep(0.01)
    assert target.read_bytes() == b"s" and not writer.stats()["failing"]


def test_filesystem_type_reads_the_mount_table(tmp_path: Path) -> None:
    assert filesystem_type(Path("/proc/self")) == "proc"
    if Path("/dev/shm").is_dir():
        assert filesystem_type(Path("/dev/shm")) in MEMORY_FILESYSTEMS
    assert filesystem_type(tmp_path / "missing") is None
