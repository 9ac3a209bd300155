"""qvirtd.logs: the log written by a thread, bounded, in order, messages as they were."""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Iterator

import pytest

from qvirtd.logs import FORMAT, LineWriter, QueueingHandler, logging_off_the_loop


def read_all(fd: int) -> str:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks).decode()


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    saved = (logging.getLogger().level, logging._srcfile, logging.logThreads,
             logging.logProcesses, logging.logMultiprocessing)
    yield
    (level, logging._srcfile, logging.logThreads, logging.logProcesses,
     logging.logMultiprocessing) = saved
    logging.getLogger().setLevel(level)


def test_lines_in_order_with_the_arguments_as_they_were_when_logged() -> None:
    r, w = os.pipe()
    reader = threading.Thread(target=lambda: out.append(read_all(r)))
    out: list[str] = []
    reader.start()
    log = logging.getLogger("qvirtd.test.logs")
    with logging_off_the_loop(logging.INFO, fd=w) as writer:
        state = ["running"]
        for i in range(500):
            log.info("line %d: %s", i, state)
        state[0] = "changed"  # after the call: the line keeps what it said then
        log.debug("not at INFO")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed %s", "here")
        assert writer.is_alive()
    assert not writer.is_alive()  # stopped, with everything written
    os.close(w)
    reader.join(10)
    os.close(r)
    lines = out[0].splitlines()
    assert [line.split(": ", 1)[1] for line in lines[:500]] == \
        [f"line {i}: ['running']" for i in range(500)]
    assert " INFO qvirtd.test.logs: line 0" in lines[0]
    assert "not at INFO" not in out[0]
    assert "ERROR qvirtd.test.logs: failed here" in lines[500]
    assert "Traceback" in out[0] and "ValueError: boom" in out[0]


def test_a_stuck_writer_drops_lines_past_the_bound_and_says_how_many() -> None:
    q: queue.SimpleQueue[object] = queue.SimpleQueue()
    handler = QueueingHandler(q, max_queued=5)
    log = logging.getLogger("qvirtd.test.stuck")
    log.propagate = False
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        for i in range(12):  # nobody writes: the queue fills
            log.info("queued %d", i)
        assert q.qsize() == 5 and handler.dropped == 7
        r, w = os.pipe()
        writer = LineWriter(q, w, logging.Formatter(FORMAT))
        writer.start()  # the journal is back
        while q.qsize():
            threading.Event().wait(0.01)
        log.info("after")
        writer.stop()
        os.close(w)
        text = read_all(r)
        os.close(r)
    finally:
        log.removeHandler(handler)
    lines = text.splitlines()
    assert [line.rsplit(": ", 1)[1] for line in lines[:5]] == [f"queued {i}" for i in range(5)]
    assert "WARNING qvirtd.logs: 7 log lines were dropped" in lines[5]
    assert lines[6].endswith("after") and len(lines) == 7


def test_a_closed_stderr_loses_lines_not_the_daemon() -> None:
    r, w = os.pipe()
    os.close(r)  # writing gets EPIPE (SIGPIPE is ignored by Python)
    q: queue.SimpleQueue[object] = queue.SimpleQueue()
    writer = LineWriter(q, w, logging.Formatter(FORMAT))
    writer.start()
    q.put(logging.LogRecord("x", logging.INFO, __file__, 0, "lost", None, None))
    writer.stop()
    os.close(w)
    assert writer.failed == 1
