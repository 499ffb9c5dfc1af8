"""The daemon's log lines: the same text as logging's own formatter, and lines logged in one
turn of the event loop written together, before any answer and at the latest at the turn's
end."""

from __future__ import annotations

import asyncio
import io
import logging
import sys
import threading
from collections.abc import Iterator

import pytest

from vdsmconn import logs


class Recorder(io.StringIO):
    """A text stream that keeps each write apart."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def lines(self) -> list[str]:
        return "".join(self.writes).splitlines()


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, Recorder]]:
    stream = Recorder()
    handler = logs.LineHandler(stream)
    logger = logging.getLogger("vdsmconn.test-logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)
    handler.flush()


def test_lines_read_as_logging_would_write_them() -> None:
    ours = logs.LineFormatter()
    theirs = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        raise ValueError("boom")
    except ValueError:
        failure = sys.exc_info()
    for created in (1_700_000_000.0, 1_700_000_000.999, 1_700_000_001.5005):
        for exc_info, stack in ((None, None), (failure, None), (None, "Stack (most recent)")):
            record = logging.makeLogRecord({
                "name": "vdsmconn.service", "levelno": logging.INFO, "levelname": "INFO",
                "msg": "MANAGE cid=%s refs=%d", "args": ("c1", 2), "exc_info": exc_info,
                "stack_info": stack, "created": created,
                "msecs": (created - int(created)) * 1000})
            twin = logging.makeLogRecord(record.__dict__)
            assert ours.format(record) == theirs.format(twin)


@pytest.fixture
def lean_logging() -> Iterator[None]:
    """logging as the daemon sets it up: no caller, thread or process looked up."""
    saved = (logging._srcfile, logging.logThreads, logging.logProcesses,
             logging.logMultiprocessing)
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    yield
    (logging._srcfile, logging.logThreads, logging.logProcesses,
     logging.logMultiprocessing) = saved


@pytest.mark.parametrize(("msg", "args"), [("MANAGE %s refs=%d", ("c1", 2)), ("STARTED", ()),
                                           ("MANAGE %(cid)s", ({"cid": "c1"},)),
                                           ("MANAGE %s", ("c1",))])
@pytest.mark.parametrize("level", [logging.INFO, logging.WARNING, 25])
def test_a_record_has_what_logging_would_give_it(lean_logging: None, msg: str,
                                                 args: tuple[object, ...], level: int) -> None:
    made = [cls("vdsmconn.service", level, "(unknown file)", 0, msg, args, None,
                "(unknown function)", None) for cls in (logs.Record, logging.LogRecord)]
    ours, theirs = (dict(vars(record)) for record in made)
    for name in ("created", "msecs", "relativeCreated"):
        assert abs(ours.pop(name) - theirs.pop(name)) < 5_000  # made moments apart
    assert ours == theirs
    assert made[0].getMessage() == made[1].getMessage()


def test_a_record_with_its_caller_is_logging_s_own(lean_logging: None) -> None:
    logging.logThreads = True
    record = logs.Record("x", logging.INFO, "/a/b/service.py", 7, "m", (), None, "f")
    assert (record.filename, record.module, record.thread) == (
        "service.py", "service", threading.get_ident())


def test_a_filter_of_the_handler_is_heeded(logged: tuple[logging.Logger, Recorder]) -> None:
    logger, stream = logged
    handler = logger.handlers[0]
    handler.addFilter(lambda record: "secret" not in record.getMessage())
    logger.info("kept")
    logger.info("a secret")
    handler.flush()
    assert [line.rsplit(": ", 1)[1] for line in stream.lines()] == ["kept"]


async def test_lines_of_one_turn_go_out_together_at_its_end(
        logged: tuple[logging.Logger, Recorder]) -> None:
    log, stream = logged
    for n in range(5):
        log.info("line %d", n)
    assert stream.writes == []  # still this turn
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert len(stream.writes) == 1
    assert [line.split(": ", 1)[1] for line in stream.lines()] == [f"line {n}" for n in range(5)]


async def test_waiting_lines_go_out_before_an_answer(
        logged: tuple[logging.Logger, Recorder]) -> None:
    log, stream = logged
    log.info("before the answer")
    logs.flush()
    assert stream.lines()[-1].endswith("before the answer")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert len(stream.writes) == 1  # nothing left for the end of the turn


async def test_a_line_from_another_thread_goes_out_at_once_after_those_waiting(
        logged: tuple[logging.Logger, Recorder]) -> None:
    log, stream = logged
    log.info("from the loop")
    thread = threading.Thread(target=log.warning, args=("from a thread",))
    thread.start()
    thread.join()
    assert [line.split(": ", 1)[1] for line in stream.lines()] == ["from the loop",
                                                                   "from a thread"]


def test_without_a_loop_a_line_goes_out_at_once(
        logged: tuple[logging.Logger, Recorder]) -> None:
    log, stream = logged
    log.error("no loop")
    assert stream.lines()[-1].endswith("ERROR vdsmconn.test-logs: no loop")


async def test_lines_waiting_at_exit_go_out_with_the_handlers_flush(
        logged: tuple[logging.Logger, Recorder]) -> None:
    log, stream = logged
    log.info("last words")
    for handler in log.handlers:
        handler.flush()  # what logging.shutdown does at exit
    assert stream.lines()[-1].endswith("last words")
