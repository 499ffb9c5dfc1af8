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
from typing import TextIO

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
