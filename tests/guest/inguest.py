"""Inside the test guest: run the requested pytest selection and leave the results behind.

Started by the image's vdsmconn-guest.service (through /usr/local/sbin/vdsmconn-guest-boot)
as ``python3 inguest.py RESULTS SRCDIR`` with Debian's python3 and Debian's pytest.  Writes
into RESULTS: ``pytest-output.txt``, ``junit.xml``, ``exitcode`` and ``journal.txt``.
Only the standard library: this runs outside the project's virtualenv.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO


def _copy(source: IO[bytes], sinks: list[IO[bytes]]) -> None:
    for chunk in iter(lambda: source.read1(65536), b""):  # type: ignore[attr-defined]
        for sink in sinks:
            sink.write(chunk)
            sink.flush()


def run_pytest(results: Path, srcdir: Path, request: dict[str, object]) -> int:
    args = [str(a) for a in request.get("args", [])]  # type: ignore[attr-defined]
    timeout = float(request.get("timeout", 480))  # type: ignore[arg-type]
    env = dict(os.environ)
    env.update({str(k): str(v) for k, v in request.get("env", {}).items()})  # type: ignore[attr-defined]
    # The project's virtualenv is inside the shared tree: its packages (built for CPython
    # 3.11, as the guest's python3 is) give the guest the very dependencies the host tests
    # use, pytest included. Without one, Debian's packages of the image serve.
    paths = [str(srcdir), *(str(p) for p in srcdir.glob(".venv/lib/python3.11/site-packages"))]
    env.update(
        VDSMCONN_IN_GUEST="1",
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=":".join(paths),
        TMPDIR="/var/tmp",
    )
    argv = [
        sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "tests.guest.plugin",
        "-rA", "-v", f"--junitxml={results / 'junit.xml'}", "-o", "junit_logging=all",
        *args,
    ]  # fmt: skip
    with open(results / "pytest-output.txt", "wb") as out:
        out.write(f"+ {' '.join(argv)}\n".encode())
        proc = subprocess.Popen(
            argv,
            cwd=srcdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        assert proc.stdout is not None
        copier = threading.Thread(target=_copy, args=(proc.stdout, [out, sys.stdout.buffer]))
        copier.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # SIGINT first: pytest stops like on Ctrl-C and still writes the JUnit XML of
            # the tests that finished; SIGKILL if it does not stop.
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = -1
            message = f"\nVDSMCONN-GUEST: pytest interrupted after {timeout:.0f}s\n"
            copier.join(timeout=10)
            out.write(message.encode())
        copier.join(timeout=10)
    return rc


def main(argv: list[str]) -> int:
    results, srcdir = Path(argv[1]), Path(argv[2])
    started = time.monotonic()
    request = json.loads((results / "request.json").read_text())
    try:
        rc = run_pytest(results, srcdir, request)
    finally:
        with open(results / "journal.txt", "wb") as journal:
            subprocess.run(
                ["journalctl", "-b", "--no-pager", "-o", "short-monotonic"],
                stdout=journal,
                stderr=subprocess.STDOUT,
                check=False,
            )
    (results / "guest-seconds").write_text(f"{time.monotonic() - started:.1f}\n")
    # Written last: its presence tells the host that everything else is complete.
    (results / "exitcode").write_text(f"{rc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
