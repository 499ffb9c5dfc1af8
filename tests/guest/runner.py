"""Boot the test guest once and run a pytest selection inside it.

Usage: ``python3 -m tests.guest.runner [--results DIR] [--deadline S] -- PYTEST_ARGS...``

The guest boots Debian's stock kernel with systemd as PID 1 into ``vdsmconn-test.target``;
its ``vdsmconn-guest.service`` mounts two 9p shares (the source tree read-only at the same
path as on the host, and a writable results directory), runs ``tests/guest/inguest.py`` and
powers off.  Back on the host the results directory holds ``exitcode``, ``junit.xml``,
``pytest-output.txt``, ``journal.txt`` and ``serial.log``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.guest import build

log = logging.getLogger("vdsmconn.guest.runner")

QEMU = "qemu-system-x86_64"
RUNNING_MARK = "VDSMCONN-GUEST: running tests"
KERNEL_ARGS = (
    "console=ttyS0", "panic=-1", "fsck.mode=skip", "mitigations=off", "random.trust_cpu=on",
    "systemd.unit=vdsmconn-test.target", "systemd.show_status=1", "loglevel=4",
)  # fmt: skip
# With KVM the guest reaches the test service in a few seconds; if it has not within this
# time, KVM is refusing or crawling here and the run starts again under TCG.
KVM_BOOT_SECONDS = 25.0
KVM_FIRST_OUTPUT_SECONDS = 8.0
# Written when KVM failed on this host (kernel release inside); later runs go to TCG at once.
KVM_VERDICT = build.CACHE_ROOT / "kvm-unusable"
DEFAULT_DEADLINE = 2700.0  # boot + the whole guest suite under software emulation
FORWARDED_ENV = ("CI",)


class GuestUnavailable(Exception):
    """The host cannot boot the guest at all (no qemu, no image and no way to build it)."""


@dataclass(frozen=True)
class GuestRun:
    """What came back from one boot of the guest."""

    results: Path
    accel: str
    exit_code: int | None  # pytest's exit code; None if pytest never finished
    boot_seconds: float | None  # qemu start -> tests starting in the guest
    total_seconds: float
    error: str | None  # why the run did not finish normally

    @property
    def junit(self) -> Path:
        return self.results / "junit.xml"

    @property
    def serial_log(self) -> Path:
        return self.results / "serial.log"

    def text(self, name: str, tail: int | None = None) -> str:
        path = self.results / name
        if not path.exists():
            return ""
        lines = path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-tail:] if tail else lines)


def check_host() -> None:
    if shutil.which(QEMU) is None:
        raise GuestUnavailable(f"{QEMU} is not installed (contrib/run-tests.sh installs it)")
    if build.cached_image() is None and os.geteuid() != 0:
        raise GuestUnavailable("the guest image is not built and building it needs root")


def kvm_usable() -> bool:
    choice = os.environ.get("VDSMCONN_GUEST_ACCEL", "auto")
    if choice == "tcg":
        return False
    if (
        choice != "kvm"
        and KVM_VERDICT.exists()
        and KVM_VERDICT.read_text().strip() == os.uname().release
    ):
        return False
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True


def qemu_argv(image: build.GuestImage, accel: str, srcdir: Path, results: Path) -> list[str]:
    accel_opt = "kvm" if accel == "kvm" else "tcg,thread=multi"
    return [
        QEMU, "-accel", accel_opt, "-cpu", "max", "-smp", "2", "-m", "1536",
        "-nic", "none", "-display", "none", "-vga", "none", "-monitor", "none",
        "-no-reboot", "-serial", f"file:{results / 'serial.log'}",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd),
        "-append", " ".join(KERNEL_ARGS),
        "-drive", f"file={image.rootfs},format=raw,if=virtio,snapshot=on,cache=unsafe",
        "-virtfs",
        f"local,path={srcdir},mount_tag=src,security_model=none,readonly=on",
        "-virtfs", f"local,path={results},mount_tag=results,security_model=none",
    ]  # fmt: skip


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _clear(results: Path) -> None:
    for name in ("exitcode", "junit.xml", "pytest-output.txt", "journal.txt", "serial.log"):
        (results / name).unlink(missing_ok=True)


def _boot(
    image: build.GuestImage, accel: str, srcdir: Path, results: Path, deadline: float
) -> GuestRun:
    _clear(results)
    argv = qemu_argv(image, accel, srcdir, results)
    log.info("BOOT accel=%s results=%s", accel, results)
    (results / "qemu-argv.json").write_text(json.dumps(argv, indent=1) + "\n")
    started = time.monotonic()
    boot_seconds: float | None = None
    error: str | None = None
    with open(results / "qemu-stderr.txt", "wb") as stderr:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
        try:
            while proc.poll() is None:
                elapsed = time.monotonic() - started
                if boot_seconds is None and RUNNING_MARK in _serial(results):
                    boot_seconds = elapsed
                    log.info("RUNNING accel=%s after %.1fs", accel, elapsed)
                if (
                    accel == "kvm"
                    and boot_seconds is None
                    and (
                        elapsed > KVM_BOOT_SECONDS
                        or (elapsed > KVM_FIRST_OUTPUT_SECONDS and not _serial(results))
                    )
                ):
                    error = f"kvm: the guest did not start its tests after {elapsed:.0f}s"
                    break
                if elapsed > deadline:
                    error = f"guest killed at the deadline of {deadline:.0f}s"
                    break
                time.sleep(0.2)
        finally:
            _stop(proc)
    if error is None and proc.returncode != 0:
        error = (
            f"qemu exited with {proc.returncode}: "
            + (results / "qemu-stderr.txt").read_text(errors="replace").strip()[-2000:]
        )
    exit_code: int | None = None
    code_file = results / "exitcode"
    if code_file.exists():
        text = code_file.read_text().strip()
        exit_code = int(text) if text.lstrip("-").isdigit() else None
    if exit_code is None and error is None:
        error = "the guest powered off without a pytest exit code"
    return GuestRun(
        results=results,
        accel=accel,
        exit_code=exit_code,
        boot_seconds=boot_seconds,
        total_seconds=time.monotonic() - started,
        error=error,
    )


def _serial(results: Path) -> str:
    try:
        return (results / "serial.log").read_text(errors="replace")
    except FileNotFoundError:
        return ""


def run_tests(
    pytest_args: list[str],
    *,
    srcdir: Path,
    results: Path,
    deadline: float = DEFAULT_DEADLINE,
) -> GuestRun:
    """Boot the guest, run ``pytest pytest_args`` in srcdir inside it, return what came back.

    Builds the image first if the recipe changed (needs root).  ``deadline`` bounds the boot
    plus the test run; the guest itself stops pytest 20 s before it so the journal and the
    partial output still come back.
    """
    check_host()
    image = build.build()
    results.mkdir(parents=True, exist_ok=True)
    request = {
        "args": pytest_args,
        "timeout": max(deadline - 60.0, 30.0),
        "env": {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ},
    }
    (results / "request.json").write_text(json.dumps(request, indent=1) + "\n")
    (results / "srcdir").write_text(f"{srcdir}\n")
    started = time.monotonic()
    if kvm_usable():
        run = _boot(image, "kvm", srcdir, results, deadline)
        if run.boot_seconds is not None or os.environ.get("VDSMCONN_GUEST_ACCEL") == "kvm":
            return run
        log.warning("KVM did not boot the guest quickly (%s); using TCG", run.error)
        with contextlib.suppress(OSError):
            KVM_VERDICT.write_text(os.uname().release + "\n")
        (results / "serial.log").replace(results / "serial-kvm.log")
    remaining = deadline - (time.monotonic() - started)
    return _boot(image, "tcg", srcdir, results, remaining)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, help="results directory (default: a new one)")
    parser.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE)
    parser.add_argument("pytest_args", nargs="*")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    results = args.results or Path(tempfile.mkdtemp(prefix="vdsmconn-guest-"))
    srcdir = Path(__file__).resolve().parents[2]
    run = run_tests(args.pytest_args, srcdir=srcdir, results=results, deadline=args.deadline)
    print(run.text("pytest-output.txt"))
    boot = f"{run.boot_seconds:.1f}s" if run.boot_seconds is not None else "-"
    print(
        f"guest: accel={run.accel} boot={boot} total={run.total_seconds:.1f}s "
        f"exit={run.exit_code} error={run.error} results={results}"
    )
    return run.exit_code if run.exit_code is not None else 3


if __name__ == "__main__":
    sys.exit(main())
