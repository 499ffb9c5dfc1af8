"""pytest plugin: tests marked ``guest`` run inside the QEMU test guest.

Load it from tests/conftest.py with ``pytest_plugins = ["tests.guest.plugin"]`` (this also
registers the guest fixtures of tests/guest/fixtures.py for every test module).

On the host, the selected guest tests are not run here: the first of them boots the guest
once for the whole session, all selected guest tests run inside it, and each one is reported
here from the guest's JUnit XML (failure text included).  A guest test that has no result
from the guest fails.  Inside the guest (VDSMCONN_IN_GUEST=1) guest tests run normally.
Without qemu on the host the guest tests fail when CI=true, and skip otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
from _pytest.reports import TestReport

from tests.guest import build, runner

pytest_plugins = ["tests.guest.fixtures"]

IN_GUEST = os.environ.get("VDSMCONN_IN_GUEST") == "1"
MARKER = "guest"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@dataclass
class Outcome:
    """One test's result as the guest reported it."""

    outcome: Literal["passed", "failed", "skipped"]
    when: Literal["setup", "call", "teardown"] = "call"
    text: str = ""
    duration: float = 0.0
    sections: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class GuestSession:
    """Runs the selected guest tests once per session and hands out their outcomes."""

    config: pytest.Config
    items: list[pytest.Item] = field(default_factory=list)
    outcomes: dict[str, Outcome] | None = None
    run: runner.GuestRun | None = None
    unavailable: str | None = None  # this host cannot run the guest (no qemu, ...)
    problem: str | None = None  # the guest run itself broke down
    results: Path | None = None
    wall_seconds: float = 0.0

    def outcome(self, item: pytest.Item) -> Outcome:
        if self.outcomes is None:
            started = time.monotonic()
            self.outcomes = self._run_guest()
            self.wall_seconds = time.monotonic() - started
        if item.nodeid in self.outcomes:
            return self.outcomes[item.nodeid]
        return Outcome("failed", text=self._missing_text())

    def _write(self, line: str) -> None:
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(line)

    def _run_guest(self) -> dict[str, Outcome]:
        try:
            runner.check_host()
        except runner.GuestUnavailable as exc:
            self.unavailable = str(exc)
            return {}
        self.results = Path(tempfile.mkdtemp(prefix="vdsmconn-guest-"))
        nodeids = [item.nodeid for item in self.items]
        if build.cached_image() is None:
            self._write("\nguest: building the guest image for this recipe (~2 min)...")
        self._write(f"\nguest: booting the test guest for {len(nodeids)} test(s)...")
        try:
            self._prepare(self.results)
            deadline = float(os.environ.get("VDSMCONN_GUEST_DEADLINE", runner.DEFAULT_DEADLINE))
            self.run = runner.run_tests(
                nodeids, srcdir=self.config.rootpath, results=self.results, deadline=deadline
            )
        except Exception as exc:  # the build or qemu itself failed: every test fails
            self.problem = f"guest run failed: {exc!r}"
            return {}
        outcomes = parse_junit(self.run.junit) if self.run.junit.exists() else {}
        passed = self.run.exit_code in (0, 5) and self.run.error is None
        keep = os.environ.get("VDSMCONN_GUEST_KEEP") == "1"
        if passed and not keep and all(o.outcome != "failed" for o in outcomes.values()):
            shutil.rmtree(self.results, ignore_errors=True)
            self.results = None
        return outcomes

    def _prepare(self, results: Path) -> None:
        """A module of guest tests may make files for them on the host first (a package
        built from the tree): its ``prepare_guest(results)`` runs once, before the boot. The
        guest sees ``results`` as /run/vdsmconn-results (image/vdsmconn-guest-boot)."""
        done: list[object] = []
        for item in self.items:
            module = getattr(item, "module", None)
            prepare = getattr(module, "prepare_guest", None)
            if callable(prepare) and module not in done:
                done.append(module)
                self._write(f"\nguest: preparing {getattr(module, '__name__', '?')} on the host")
                prepare(results)

    def _missing_text(self) -> str:
        if self.unavailable is not None:
            return f"test guest unavailable: {self.unavailable}"
        if self.problem is not None:
            return f"guest: {self.problem}"
        lines = ["this test has no result from the test guest (it did not run there)"]
        if self.run is not None:
            lines.append(f"guest: exit code {self.run.exit_code}, error: {self.run.error}")
            lines.append("--- last lines of the guest's pytest output ---")
            lines.append(self.run.text("pytest-output.txt", tail=40))
            if self.run.exit_code is None:
                lines.append("--- last lines of the serial console ---")
                lines.append(self.run.text("serial.log", tail=40))
        if self.results is not None:
            lines.append(f"guest results kept in {self.results}")
        return "\n".join(lines)


_session_key = pytest.StashKey[GuestSession]()


def parse_junit(path: Path) -> dict[str, Outcome]:
    """nodeid -> Outcome from the guest's junit.xml (nodeids recorded as a property)."""
    outcomes: dict[str, Outcome] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        nodeid = _nodeid(case)
        outcome = Outcome("passed", duration=float(case.get("time", "0") or 0))
        for child in case:
            if child.tag in ("failure", "error"):
                message = child.get("message", "")
                when: Literal["setup", "call", "teardown"] = "call"
                if child.tag == "error":
                    when = "teardown" if message.startswith("failed on teardown") else "setup"
                outcome = Outcome("failed", when, f"{message}\n{child.text or ''}".strip())
                break
            if child.tag == "skipped" and outcome.outcome == "passed":
                outcome = Outcome("skipped", "setup", child.get("message", "skipped in guest"))
        for child in case:
            if child.tag in ("system-out", "system-err") and _has_content(child.text):
                stream = "stdout" if child.tag == "system-out" else "stderr"
                outcome.sections.append((f"Captured {stream} in guest", child.text or ""))
        outcome.duration = float(case.get("time", "0") or 0)
        outcomes[nodeid] = outcome
    return outcomes


def _has_content(text: str | None) -> bool:
    """False for junit_logging output that is only empty "--- Captured X ---" headers."""
    return any(
        line.strip() and not re.fullmatch(r"-+ .* -+", line.strip())
        for line in (text or "").splitlines()
    )


def _nodeid(case: ET.Element) -> str:
    for prop in case.iter("property"):
        if prop.get("name") == "nodeid":
            return prop.get("value", "")
    classname, name = case.get("classname", ""), case.get("name", "")
    return classname.replace(".", "/") + ".py::" + name


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARKER}: runs inside the QEMU test guest")
    if not IN_GUEST:
        config.stash[_session_key] = GuestSession(config)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    guest_items = [item for item in items if item.get_closest_marker(MARKER) is not None]
    if IN_GUEST:
        for item in guest_items:
            item.user_properties.append(("nodeid", item.nodeid))
    else:
        config.stash[_session_key].items = guest_items


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    if IN_GUEST or item.get_closest_marker(MARKER) is None:
        return None
    guest = item.config.stash[_session_key]
    outcome = guest.outcome(item)
    if guest.unavailable is not None and not in_ci():
        outcome = Outcome("skipped", "setup", outcome.text)
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    for report in _reports(item, outcome):
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


def _reports(item: pytest.Item, outcome: Outcome) -> list[TestReport]:
    def report(
        when: Literal["setup", "call", "teardown"],
        result: Literal["passed", "failed", "skipped"],
        longrepr: object = None,
        duration: float = 0.0,
    ) -> TestReport:
        return TestReport(
            item.nodeid,
            item.location,
            {k: 1 for k in item.keywords},
            result,
            longrepr,  # type: ignore[arg-type]
            when,
            outcome.sections if when == "call" else [],
            duration,
            0.0,
            0.0,
            list(item.user_properties),
        )

    path, lineno, _ = item.location
    if outcome.outcome == "skipped":
        return [
            report("setup", "skipped", (str(path), (lineno or 0) + 1, outcome.text)),
            report("teardown", "passed"),
        ]
    if outcome.outcome == "failed" and outcome.when == "setup":
        return [report("setup", "failed", outcome.text), report("teardown", "passed")]
    if outcome.outcome == "failed" and outcome.when == "teardown":
        return [
            report("setup", "passed"),
            report("call", "passed", None, outcome.duration),
            report("teardown", "failed", outcome.text),
        ]
    longrepr = outcome.text if outcome.outcome == "failed" else None
    return [
        report("setup", "passed"),
        report("call", outcome.outcome, longrepr, outcome.duration),
        report("teardown", "passed"),
    ]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if IN_GUEST:
        return
    guest = terminalreporter.config.stash.get(_session_key, None)
    if guest is None or guest.outcomes is None:
        return
    terminalreporter.section("test guest")
    if guest.problem is not None:
        terminalreporter.write_line(f"guest unavailable: {guest.problem}")
    run = guest.run
    if run is not None:
        boot = f"{run.boot_seconds:.1f}s" if run.boot_seconds is not None else "never"
        terminalreporter.write_line(
            f"accel={run.accel} boot-to-tests={boot} total={run.total_seconds:.1f}s "
            f"pytest-exit={run.exit_code} wall={guest.wall_seconds:.1f}s"
            + (f" error={run.error}" if run.error else "")
        )
    if guest.results is not None:
        terminalreporter.write_line(f"results kept (serial log, journal): {guest.results}")
