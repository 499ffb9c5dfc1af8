"""kill -9 a process that commits to the store: nothing acknowledged is lost, nothing is half done.

The child runs several committers at once (so commits share transactions). Commit `i` of
committer `t` puts two rows and an attachment, and every fifth commit also deletes the pair of
commit `i - 5`. The child prints `ack t i` as soon as `commit` returns. After each kill the
parent opens the store and checks every acknowledged change and the all-or-nothing of each commit.
"""

from __future__ import annotations

import asyncio
import random
import signal
import sys
from pathlib import Path

from vdsmconn.state.store import Row, Store

ROUNDS = 10
COMMITTERS = 8
DELETE_EVERY = 5

CHILD = """
import asyncio, sys
from pathlib import Path
from vdsmconn.state.store import Delete, Put, PutAttachment, Store

async def committer(store, prefix, t, every):
    i = 0
    while True:
        cid = f"{prefix}-{t}-{i}"
        ops = [Put(cid + "-a", "k", {"i": i, "password": "x" * 64}), Put(cid + "-b", "k", {}),
               PutAttachment(cid, {"path": "/dev/null"})]
        if i % every == 0 and i > 0:
            old = f"{prefix}-{t}-{i - every}"
            ops += [Delete(old + "-a"), Delete(old + "-b")]
        await store.commit(ops)
        print("ack", t, i, flush=True)
        i += 1

async def main(state_dir, prefix, committers, every):
    store = Store(Path(state_dir))
    await store.open()
    await asyncio.gather(*(committer(store, prefix, t, every) for t in range(committers)))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
"""


async def run_child(state_dir: Path, prefix: str, rng: random.Random) -> list[tuple[int, int]]:
    """Run a child until a random moment, kill -9 it, return what it acknowledged."""
    args = (str(state_dir), prefix, str(COMMITTERS), str(DELETE_EVERY))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, *args, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    output = asyncio.create_task(proc.stdout.read())
    await asyncio.sleep(rng.uniform(0.05, 1.2))  # early kills hit start-up and migration
    proc.send_signal(signal.SIGKILL)
    assert await proc.wait() == -signal.SIGKILL
    acks = []
    for line in (await output).decode().splitlines(keepends=True):
        if line.endswith("\n"):  # the last line may have been cut by the kill
            _, t, i = line.split()
            acks.append((int(t), int(i)))
    return acks


def check(prefix: str, acks: list[tuple[int, int]], rows: list[Row], volumes: set[str]) -> None:
    present = {row.cid for row in rows if row.cid.startswith(prefix + "-")}
    committed = {v for v in volumes if v.startswith(prefix + "-")}  # never deleted
    for t, i in acks:
        assert f"{prefix}-{t}-{i}" in committed, f"acknowledged commit lost: {prefix}-{t}-{i}"
    for cid in committed | {row_cid.rsplit("-", 1)[0] for row_cid in present}:
        assert cid in committed, f"half a commit: rows of {cid} without its attachment"
        t, i = (int(n) for n in cid.split("-")[1:])
        deleted = i % DELETE_EVERY == 0 and f"{prefix}-{t}-{i + DELETE_EVERY}" in committed
        expected = set() if deleted else {cid + "-a", cid + "-b"}
        assert {cid + "-a", cid + "-b"} & present == expected, f"half a commit: {cid}"


async def test_kill_9_loses_no_acknowledged_commit(tmp_path: Path) -> None:
    seed = random.randrange(1 << 32)
    print("seed", seed)
    rng = random.Random(seed)
    history: dict[str, list[tuple[int, int]]] = {}
    total = 0
    async with asyncio.timeout(120):
        for round_ in range(ROUNDS):
            prefix = f"r{round_}"
            history[prefix] = await run_child(tmp_path / "state", prefix, rng)
            total += len(history[prefix])
            store = Store(tmp_path / "state")
            await store.open()
            try:
                rows = await store.load()
                volumes = set(await store.load_attachments())
            finally:
                await store.close()
            for earlier, acks in history.items():
                check(earlier, acks, rows, volumes)
    print("acknowledged commits", total)
    assert total > ROUNDS, "the children acknowledged almost nothing: the test proved little"
