"""py-spy on the daemon, one recording per phase (--profile DIR), and a short summary of
each recording next to it: where the daemon's threads spend their samples, and own time by
function of the busy samples.

A recording is py-spy's raw format (collapsed stacks, with --threads and --idle): one line per
stack, `thread (TID): NAME;frame;frame;... COUNT`, each frame `function (file:line)`. A sample
counts as idle when its innermost frame is a thread waiting for work: the event loop in
`select`, an executor worker, the store's writer, a probe or spawner thread waiting on its
queue (IDLE_LEAVES).
Everything else is busy, including a loop blocked in a system call or on a lock.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from rig import Daemon, progress

TOP = 10
SCAFFOLD = ("<module> (vdsmconn/__main__.py)", "main (vdsmconn/daemon.py)")
IDLE_LEAVES = (
    "select (selectors.py:",  # EpollSelector.select
    "_worker (concurrent/futures/thread.py:",
    "Store._serve (vdsmconn/state/store.py:",
    # Pool threads waiting on their SimpleQueue (a C call: the Python frame is the leaf).
    "_Worker.run (vdsmconn/host/probe.py:",
    "_Spawner._work (vdsmconn/host/command.py:",
)
LOOP = "MainThread"


def thread_group(name: str) -> str:
    """`asyncio_3` -> `asyncio_*`, `probe probe of /mnt/x` -> `probe`, unnamed -> `unnamed`."""
    if name.startswith("thread ("):
        return "unnamed"
    first = name.split(" ", 1)[0]
    return re.sub(r"\d+$", "*", first)


def function(frame: str) -> str:
    """`f (path/file.py:12)` -> `f (path/file.py)`."""
    return re.sub(r":\d+\)$", ")", frame)


def summarize(raw: Path, top: int = TOP) -> str:
    """The text summary of one py-spy raw recording."""
    samples: Counter[str] = Counter()
    busy: Counter[str] = Counter()
    own_loop: Counter[str] = Counter()
    own_other: Counter[str] = Counter()
    inclusive_loop: Counter[str] = Counter()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[1] if ": " in frames[0] else frames[0]
        group = thread_group(thread)
        samples[group] += n
        leaf = frames[-1]
        if len(frames) == 1 or any(idle in leaf for idle in IDLE_LEAVES):
            continue
        busy[group] += n
        if group == LOOP:
            own_loop[function(leaf)] += n
            for f in {function(f) for f in frames[1:] if "(vdsmconn/" in f} - set(SCAFFOLD):
                inclusive_loop[f] += n
        else:
            own_other[f"[{group}] {function(leaf)}"] += n
    out = [f"py-spy summary of {raw.name} (idle = innermost frame in {', '.join(IDLE_LEAVES)})"]
    out.append("samples by thread: " + ", ".join(
        f"{g} {samples[g]} ({busy[g] / samples[g]:.0%} busy)" for g, _ in samples.most_common()))
    loop_busy = busy[LOOP]

    def table(title: str, counts: Counter[str], total: int) -> None:
        out.append(f"{title} ({total} samples)")
        for f, n in counts.most_common(top):
            out.append(f"  {n / total:6.1%}  {f}")

    if loop_busy:
        table("event loop (MainThread), own time of its busy samples", own_loop, loop_busy)
        table("event loop, inclusive time in vdsmconn functions", inclusive_loop, loop_busy)
    other = sum(own_other.values())
    if other:
        table("other threads, own time of their busy samples", own_other, other)
    return "\n".join(out) + "\n"


class Profiler:
    """py-spy record on the daemon for one phase, when --profile is given; writes NAME.txt
    (raw stacks) and NAME.summary.txt in the profile directory, and appends the summary to
    summary.txt there."""

    def __init__(self, out: Path | None) -> None:
        self.out = out

    def _record(self, pid: int, raw: Path) -> subprocess.Popen[bytes]:
        """py-spy on `pid`; tried again while it exits at once (an interpreter that is not
        yet initialised)."""
        pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        for _attempt in range(10):
            proc = subprocess.Popen(
                [pyspy, "record", "--nonblocking", "--threads", "--idle", "-r", "500",
                 "-f", "raw", "-o", str(raw), "-p", str(pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            try:
                proc.wait(0.3)
            except subprocess.TimeoutExpired:
                return proc
        return proc

    def _finish(self, proc: subprocess.Popen[bytes], raw: Path) -> None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._summarize(raw)

    @contextlib.contextmanager
    def phase(self, daemon: Daemon, name: str) -> Iterator[None]:
        """Profile the running `daemon` for the duration of the block."""
        if self.out is None:
            yield
            return
        self.out.mkdir(parents=True, exist_ok=True)
        raw = self.out / f"{name}.txt"
        proc = self._record(daemon.pid, raw)
        time.sleep(0.2)
        try:
            yield
        finally:
            self._finish(proc, raw)

    @contextlib.contextmanager
    def from_start(self, daemon: Daemon, name: str) -> Iterator[None]:
        """Profile `daemon` from its spawn (start it inside the block) to the block's end."""
        if self.out is None:
            yield
            return
        self.out.mkdir(parents=True, exist_ok=True)
        raw = self.out / f"{name}.txt"
        procs: list[subprocess.Popen[bytes]] = []
        attach: list[threading.Thread] = []

        def spawned(pid: int) -> None:  # attached from a thread: start() goes on meanwhile
            attach.append(threading.Thread(target=lambda: procs.append(self._record(pid, raw))))
            attach[-1].start()

        daemon.on_spawn = spawned
        try:
            yield
        finally:
            daemon.on_spawn = None
            for thread in attach:
                thread.join()
            for proc in procs:
                self._finish(proc, raw)

    def _summarize(self, raw: Path) -> None:
        assert self.out is not None
        try:
            text = summarize(raw)
        except OSError as e:
            progress(f"no py-spy summary of {raw.name}: {e}")
            return
        raw.with_suffix(".summary.txt").write_text(text)
        with open(self.out / "summary.txt", "a") as f:
            f.write(text + "\n")
        lines = text.splitlines()
        progress("\n".join(lines[:8]))
