"""The daemon's log, written off the event loop (rule L6).

A log line is a write to stderr, which under systemd is a pipe to journald: a slow or stuck
journal would stall the loop inside `write()`, and every change to a domain logs who asked.
So the loop only formats the record and queues it (`QueueHandler`); one thread writes the
queue to stderr (`QueueListener`). The queue is bounded: past `MAX_QUEUED` lines waiting
(the journal is stuck), further lines are dropped and counted, and the count is written once
the queue drains. A daemon killed with SIGKILL loses at most the lines still queued.

A record costs the loop little (issue 12): the format has no source location, thread or
process, so the logging module is told not to look them up (a stack walk and a `getpid()`
per record), and a record without a traceback is queued with its message merged, not copied
and formatted twice.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
import sys
from collections.abc import Iterator
from contextlib import contextmanager

MAX_QUEUED = 10000
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    """Queue each record (formatted here, on the loop); drop it when the queue is full."""

    def __init__(self, q: queue.Queue[logging.LogRecord]) -> None:
        super().__init__(q)
        self.bounded = q
        self.dropped = 0

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if record.exc_info or record.stack_info:
            prepared: logging.LogRecord = super().prepare(record)  # traceback into the text
            return prepared
        record.msg = record.getMessage()  # the args as they are now, not when written
        record.args = None
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            if self.dropped and self.bounded.empty():
                note = logging.LogRecord("qvirtd.logs", logging.WARNING, __file__, 0,
                                         "%d log lines were dropped: stderr (the journal) "
                                         "did not keep up", (self.dropped,), None)
                self.bounded.put_nowait(self.prepare(note))
                self.dropped = 0
            self.bounded.put_nowait(record)
        except queue.Full:
            self.dropped += 1


@contextmanager
def logging_off_the_loop(level: int) -> Iterator[None]:
    """Set up the root logger for the daemon's lifetime; the writer thread is stopped (and
    has written everything queued) when the block ends."""
    # FORMAT uses none of these: do not look them up for each record.
    logging._srcfile = None  # documented in the logging HOWTO (Optimization)
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    q: queue.Queue[logging.LogRecord] = queue.Queue(MAX_QUEUED)
    out = logging.StreamHandler(sys.stderr)
    out.setFormatter(logging.Formatter(FORMAT))
    listener = logging.handlers.QueueListener(q, out)
    root = logging.getLogger()
    root.setLevel(level)
    handler = _DroppingQueueHandler(q)
    root.addHandler(handler)
    listener.start()
    try:
        yield
    finally:
        root.removeHandler(handler)
        listener.stop()
