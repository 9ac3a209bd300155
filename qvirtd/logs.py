"""The daemon's log, written off the event loop (rule L6).

A log line is a write to stderr, which under systemd is a pipe to journald: a slow or stuck
journal would stall the loop inside `write()`, and every change to a domain logs who asked.
So the loop only makes the record and queues it; one thread (`LineWriter`) formats what has
queued up and writes it to stderr. The queue is bounded: past `MAX_QUEUED` lines waiting (the
journal is stuck), further lines are dropped and counted, and the count is written once the
queue drains. A daemon killed with SIGKILL loses at most the lines still queued.

A record costs little (issue 12), on the loop and in the thread, because a record is logged
for every change to a domain:

* the format has no source location, thread or process, so the logging module is told not
  to look them up (a stack walk and a `getpid()` per record);
* the record's message is merged once, on the loop (the arguments as they are now);
* the queue is the C `SimpleQueue` (one lock operation to hand a record over; the
  `QueueHandler`/`QueueListener` pair went through a Python `Condition`);
* the thread formats a burst eight lines at a time, giving the GIL back in between (a
  burst formatted in one go would hold the loop up for its whole length);
* the thread wakes for the first line and then lingers `LINGER_S` before it writes, so a
  busy daemon wakes it a few times a second, not once per line, and what has queued up is
  written with one `os.write` on stderr's fd (the handler's text stream made a lock, a
  buffered write and a flush per line). Waking a thread costs far more than the line: a
  `suspend` spent about 200 µs of the daemon's CPU on its one log line before this (the
  wake-up crosses CPUs, and the woken thread takes the GIL from the loop and gives it back
  around each system call).

The local time zone is read once (`TZ=:/etc/localtime`): without TZ, glibc looks at
/etc/localtime again for every timestamp.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .writer import write_all

MAX_QUEUED = 10000
LINGER_S = 0.05  # a line reaches stderr at most this much later
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_STOP = object()  # queued by `LineWriter.stop()`: write what came before, then end


class QueueingHandler(logging.Handler):
    """The loop's side: merge the record's message and queue it; drop it when the queue is
    full (the writer is stuck), and say how many were dropped once it has room again."""

    def __init__(self, q: queue.SimpleQueue[object], max_queued: int = MAX_QUEUED) -> None:
        super().__init__()
        self.queue = q
        self.max_queued = max_queued
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if record.exc_info or record.stack_info:  # the traceback as text, now
                record.msg = logging.Formatter().format(record)
                record.exc_info = record.stack_info = None
                record.exc_text = None
            else:
                record.msg = record.getMessage()  # the args as they are now
            record.args = None
        except Exception:
            self.handleError(record)
            return
        if self.queue.qsize() >= self.max_queued:
            self.dropped += 1
            return
        if self.dropped:
            self.queue.put(logging.LogRecord(
                "qvirtd.logs", logging.WARNING, __file__, 0,
                f"{self.dropped} log lines were dropped: stderr (the journal) did not keep up",
                None, None))
            self.dropped = 0
        self.queue.put(record)


class LineWriter(threading.Thread):
    """The thread that formats queued records and writes them to `fd`, as many as have
    queued up in one write."""

    def __init__(self, q: queue.SimpleQueue[object], fd: int, formatter: logging.Formatter,
                 linger_s: float = LINGER_S) -> None:
        super().__init__(name="qvirtd-log", daemon=True)
        self.queue = q
        self.linger_s = linger_s
        self.fd = fd
        self.formatter = formatter
        self.failed = 0  # lines stderr refused (closed, full pipe that broke)

    def run(self) -> None:
        stop = False
        while not stop:
            batch = [self.queue.get()]
            if batch[0] is not _STOP:
                time.sleep(self.linger_s)  # let the lines of this moment join
            while True:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            lines = []
            for i, item in enumerate(batch):
                if item is _STOP:
                    stop = True
                elif isinstance(item, logging.LogRecord):
                    try:
                        lines.append(self.formatter.format(item) + "\n")
                    except Exception:  # a record that cannot be formatted loses itself only
                        self.failed += 1
                if i % 8 == 7:
                    time.sleep(0)  # let the loop have the GIL between a few lines

            if lines:
                self._write("".join(lines).encode("utf-8", "replace"), len(lines))

    def _write(self, data: bytes, count: int) -> None:
        try:
            write_all(self.fd, data)
        except OSError:
            self.failed += count

    def stop(self) -> None:
        """Write everything queued before this call, then end the thread."""
        self.queue.put(_STOP)
        self.join()


@contextmanager
def logging_off_the_loop(level: int, fd: int | None = None) -> Iterator[LineWriter]:
    """Set up the root logger for the daemon's lifetime (lines to `fd`, stderr by default);
    the writer thread is stopped (and has written everything queued) when the block ends."""
    # FORMAT uses none of these: do not look them up for each record.
    logging._srcfile = None  # documented in the logging HOWTO (Optimization)
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    if "TZ" not in os.environ:  # read the local time zone once, not per timestamp
        os.environ["TZ"] = ":/etc/localtime"
        time.tzset()
    q: queue.SimpleQueue[object] = queue.SimpleQueue()
    writer = LineWriter(q, sys.stderr.fileno() if fd is None else fd,
                        logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.setLevel(level)
    handler = QueueingHandler(q)
    root.addHandler(handler)
    sys.stderr.flush()
    writer.start()
    try:
        yield writer
    finally:
        root.removeHandler(handler)
        writer.stop()
