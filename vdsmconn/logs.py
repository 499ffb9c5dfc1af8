"""The daemon's log lines: one per record on stderr (the journal under systemd), as
`2026-11-26 22:51:57,123 INFO vdsmconn.service: MANAGE cid=... key=...`.

Every change of the desired state logs an audit line, so a line must be cheap: the time
stamp is made once per second, and the lines logged in one turn of the event loop go out
together at its end, in one write where each line was one, or before, when the daemon is
about to answer a client (`flush`): a client that has its answer finds in the log every
line logged before it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, TextIO

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # what Formatter would make of it


class LineFormatter(logging.Formatter):
    """logging.Formatter(_FORMAT), with the text of the second kept."""

    def __init__(self) -> None:
        super().__init__(_FORMAT)
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self._second = second
        line = (f"{self._stamp},{int(record.msecs):03d} {record.levelname} {record.name}: "
                f"{record.getMessage()}")
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line = f"{line}\n{record.exc_text}"
        if record.stack_info:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        return line


class Record(logging.LogRecord):
    """logging.LogRecord (the daemon's record factory), made with less work where the
    daemon logs without looking for the caller (`logging._srcfile` None): the path is then
    always "(unknown file)", which LogRecord took apart anew for every line, and threads
    and processes are not looked up. Anything else is LogRecord's own work."""

    def __init__(self, name: str, level: int, pathname: str, lineno: int, msg: object,
                 args: Any, exc_info: Any, func: str | None = None,
                 sinfo: str | None = None, **kwargs: Any) -> None:
        if (pathname != _UNKNOWN or func is None or (args and len(args) == 1)
                or logging.logThreads or logging.logProcesses or logging.logMultiprocessing):
            super().__init__(name, level, pathname, lineno, msg, args, exc_info, func,
                             sinfo, **kwargs)
            return
        created = time.time()
        self.name = name
        self.msg = msg
        self.args = args
        self.levelname = _LEVEL_NAMES.get(level) or logging.getLevelName(level)
        self.levelno = level
        self.pathname = self.filename = self.module = pathname
        self.exc_info = exc_info
        self.exc_text = None
        self.stack_info = sinfo
        self.lineno = lineno
        self.funcName = func
        self.created = created
        self.msecs = int((created - int(created)) * 1000) + 0.0
        self.relativeCreated = (created - _START) * 1000
        self.thread = self.threadName = self.processName = self.process = None


_UNKNOWN = "(unknown file)"  # the path of a record made without looking for the caller
_LEVEL_NAMES = {level: logging.getLevelName(level) for level in
                (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)}
_START: float = logging._startTime  # type: ignore[attr-defined]  # relativeCreated's zero


_handlers: list[LineHandler] = []  # with lines waiting for the end of the turn


def flush() -> None:
    """Write every line still waiting for the end of this turn of the loop."""
    if _handlers:
        for handler in list(_handlers):  # another thread may write them meanwhile
            handler.flush()


class LineHandler(logging.StreamHandler[TextIO]):
    """A line logged on a thread running an event loop waits for the end of that turn of
    the loop; any other line goes out at once, after those waiting. Lines still waiting
    at exit go out with logging's own flush of every handler."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.setFormatter(LineFormatter())
        self._waiting: list[str] = []

    def handle(self, record: logging.LogRecord) -> bool:
        """Handler.handle, without its calls to a filter where there is none and to the
        lock's own methods."""
        if self.filters and not self.filter(record):
            return False
        with self.lock:  # type: ignore[union-attr]  # made by Handler.__init__
            self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self._waiting.append(line)
        loop = asyncio._get_running_loop()
        if loop is None:
            self._write(record)
        elif len(self._waiting) == 1:
            _handlers.append(self)
            loop.call_soon(self.flush)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # made by Handler.__init__
            if self._waiting:
                self._write(None)

    def _write(self, record: logging.LogRecord | None) -> None:
        text = "".join(self._waiting)
        self._waiting.clear()
        if self in _handlers:
            _handlers.remove(self)
        try:
            self.stream.write(text)
            self.stream.flush()
        except Exception:
            self.handleError(record or logging.makeLogRecord({"msg": text}))
