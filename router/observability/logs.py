"""Logs: `LOG_DIR/router.log`, rotated at midnight, written by a background thread (a queue handler), so
logging never puts disk I/O on the request path. Control characters in a logged message are escaped
(`LineFormatter`), so a value from a client (a model name with a newline) can never forge a line; only a
traceback spans several lines. `LOG_FORMAT=json` writes one JSON object per line (an access line's fields as
keys). Several workers share the file: rotation is done by whichever comes first (a hard link to the dated
name, which only one can make), and every writer reopens the path once it names a new file.

Access lines (one per request, logger name `router.access`) skip the logging machinery, which costs some
10 us a line: `AccessLog` queues each request's record and a thread of its own formats them in batches (four
times a second) and writes each batch to the same file and stream at once, about 2 us a request in all."""

from __future__ import annotations

import atexit
import contextlib
import datetime
import glob
import logging
import logging.handlers
import os
import queue
import sys
import threading
import time
from collections import deque
from typing import IO, TYPE_CHECKING, Any

import orjson

from router.config import Settings

if TYPE_CHECKING:
    from router.observability.exchange import Exchange

BACKUPS = 14  # days of rotated logs kept
ACCESS_INTERVAL = 0.25  # seconds between the access log's writes
ACCESS_QUEUE = 100_000  # access lines waiting at most (beyond, the oldest are dropped)


# C0 controls but tab, DEL, C1 controls (NEL included) and the Unicode line and paragraph separators
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0)) if c != 0x09}
_ESCAPES.update({0x0A: "\\n", 0x0D: "\\r", 0x2028: "\\u2028", 0x2029: "\\u2029"})


def escape_controls(text: str) -> str:
    """`text` with control characters written as Python escapes (`\\n`, `\\x1b`): always one line."""
    return text.translate(_ESCAPES)


class LineFormatter(logging.Formatter):
    """Escapes control characters in the formatted message (after %-formatting), never in the traceback
    that `format` appends, so one record is one line plus its traceback."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(super().formatMessage(record))


def console_handler(fmt: str) -> logging.Handler:
    """A stderr handler whose lines are escaped (the Local Agent's)."""
    handler = logging.StreamHandler()
    handler.setFormatter(LineFormatter(fmt))
    return handler


_listener: logging.handlers.QueueListener | None = None


def stop_logging() -> None:
    """Write out what is queued and stop the writer threads."""
    global _listener, access_log
    if access_log is not None:
        access_log.stop()
        access_log = None
    if _listener is not None:
        _listener.stop()
        for handler in _listener.handlers:
            handler.close()
        _listener = None


atexit.register(stop_logging)


class SharedRotatingFileHandler(logging.handlers.WatchedFileHandler):
    """A file rotated at local midnight into `NAME.YYYY-MM-DD`, safe with several processes writing it."""

    def __init__(self, filename: str) -> None:
        super().__init__(filename, encoding="utf-8")
        self.rollover_at = self._next_midnight(time.time())

    @staticmethod
    def _next_midnight(now: float) -> float:
        day = datetime.datetime.fromtimestamp(now).date() + datetime.timedelta(days=1)
        return datetime.datetime.combine(day, datetime.time()).timestamp()

    def emit(self, record: logging.LogRecord) -> None:
        now = time.time()
        if now >= self.rollover_at:
            self.rotate(now)
        super().emit(record)  # reopens the path first when another process rotated it

    def write_text(self, text: str) -> None:
        """Write already formatted lines (the access log's batches), rotating and reopening as `emit` does."""
        self.acquire()
        try:
            now = time.time()
            if now >= self.rollover_at:
                self.rotate(now)
            self.reopenIfNeeded()
            if self.stream is None:
                self.stream = self._open()
            self.stream.write(text)
            self.stream.flush()
        except OSError:
            pass
        finally:
            self.release()

    def rotate(self, now: float) -> None:
        day = datetime.datetime.fromtimestamp(self.rollover_at - 1).strftime("%Y-%m-%d")
        self.rollover_at = self._next_midnight(now)
        try:
            os.link(self.baseFilename, f"{self.baseFilename}.{day}")  # exactly one process wins this
        except FileExistsError:
            return  # another process rotated it: our next write reopens the path
        except OSError:
            return
        os.unlink(self.baseFilename)
        for old in sorted(glob.glob(glob.escape(self.baseFilename) + ".????-??-??"))[:-BACKUPS]:
            with contextlib.suppress(OSError):
                os.unlink(old)


class PrefixFormatter(logging.Formatter):
    """The writer thread's text lines: time, level, pid, logger, message. A message the logging thread left
    unformatted (an access line) is formatted, and escaped, here."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        if getattr(record, "deferred", False):
            record.message = escape_controls(record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, pid, logger, message, an access line's fields, a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname, "pid": record.process, "logger": record.name, "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields is not None:
            entry.update(fields() if callable(fields) else fields)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["traceback"] = record.exc_text
        return orjson.dumps(entry, default=str).decode()


class _QueueHandler(logging.handlers.QueueHandler):
    """Formats (and escapes) a message in the logging thread, as the stdlib's does, except a record marked
    `deferred` (an access line: its arguments are plain values), which the writer thread formats."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if getattr(record, "deferred", False):
            return record
        return super().prepare(record)


class AccessLog:
    """One line per request, written by a thread of its own in batches (see the module's docstring)."""

    def __init__(self, file: SharedRotatingFileHandler, console: IO[str], json: bool) -> None:
        self.file, self.console, self.json = file, console, json
        self.pending: deque[Exchange] = deque(maxlen=ACCESS_QUEUE)  # append and popleft are thread-safe
        self.pid = os.getpid()
        self._second = -1
        self._stamp = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
        self._thread.start()

    def submit(self, ex: Exchange) -> None:
        self.pending.append(ex)

    def _run(self) -> None:
        while not self._stop.wait(ACCESS_INTERVAL):
            self.flush()
        self.flush()

    def flush(self) -> None:
        lines = []
        pending = self.pending
        while pending:
            lines.append(self._line(pending.popleft()))
        if lines:
            text = "".join(lines)
            self.file.write_text(text)
            with contextlib.suppress(OSError, ValueError):
                self.console.write(text)
                self.console.flush()

    def _line(self, ex: Exchange) -> str:
        ended = ex.received_at + ex.duration
        if self.json:
            entry = {"time": datetime.datetime.fromtimestamp(ended, datetime.UTC).isoformat(timespec="milliseconds"),
                     "level": "INFO", "pid": self.pid, "logger": "router.access",
                     "message": str(ex), **ex.fields()}  # orjson escapes control characters itself
            return orjson.dumps(entry, default=str).decode() + "\n"
        second = int(ended)
        if second != self._second:
            self._second, self._stamp = second, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        text = str(ex)
        if not text.isprintable():  # a client's model name, say: one line whatever it holds
            text = escape_controls(text)
        return f"{self._stamp},{int((ended - second) * 1000):03d} INFO {self.pid} router.access: {text}\n"

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


#: the access log of this process, once `setup_logging` ran
access_log: AccessLog | None = None


def setup_logging(settings: Settings) -> None:
    """Route the `router` and uvicorn loggers through a queue to file and stderr."""
    global _listener, access_log
    stop_logging()
    os.makedirs(settings.log_dir, exist_ok=True)
    # the message is formatted and escaped once, by the queue handler, in the thread that logs; the writer
    # thread's handlers add the prefix to a message that may hold a traceback's lines, and escape nothing
    fmt: logging.Formatter = (JsonFormatter() if settings.log_format == "json"
                              else PrefixFormatter("%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"))
    file_handler = SharedRotatingFileHandler(os.path.join(settings.log_dir, "router.log"))
    console = logging.StreamHandler()
    for h in (file_handler, console):
        h.setFormatter(fmt)
    q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    _listener = logging.handlers.QueueListener(q, file_handler, console, respect_handler_level=False)
    _listener.start()
    if settings.access_log:
        access_log = AccessLog(file_handler, sys.stderr, settings.log_format == "json")
    handler = _QueueHandler(q)
    handler.setFormatter(LineFormatter("%(message)s"))
    for name in ("router", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(settings.log_level)
        logger.propagate = False
