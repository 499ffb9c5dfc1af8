"""Backoff arithmetic, and configuration loading that fails fast naming the key."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from vdsmconn import config
from vdsmconn.reconcile.backoff import Backoff


def test_backoff_doubles_with_jitter_and_caps() -> None:
    b = Backoff(0.5, 60, jitter=0.2, rng=random.Random(7))
    delays = [b.next_delay() for _ in range(12)]
    for n, d in enumerate(delays[:7]):
        base = 0.5 * 2**n
        assert base * 0.8 <= d <= base * 1.2
    assert all(d <= 60 for d in delays)
    assert delays[-1] >= 48
    b.reset()
    assert b.next_delay() <= 0.6


def test_backoff_jitter_spreads_keys() -> None:
    delays = {Backoff(1, 60, rng=random.Random(seed)).next_delay() for seed in range(20)}
    assert len(delays) == 20


def test_defaults_match_spec() -> None:
    c = config.Config()
    assert c.state_dir == "/var/lib/vdsmconn" and c.mount_root == "/rhev/data-center/mnt"
    assert c.rpc.socket == "/run/vdsmconn/vdsmconn.sock" and c.rpc.socket_group == "kvm"
    assert c.metrics.listen == "127.0.0.1:9917"
    assert (c.supervisor.backoff_initial, c.supervisor.backoff_max) == (0.5, 60.0)
    assert (c.supervisor.probe_interval, c.supervisor.probe_timeout) == (10.0, 10.0)
    assert c.iscsi.parallel_logins == 10 and c.logging.level == "info"


def test_file_overrides_and_nested_keys(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("mount_root: /srv/mnt\nsupervisor:\n  backoff_max: 30\nrpc:\n"
                 "  tcp: {listen: '0.0.0.0:54321'}\nmetrics: {listen: null}\n")
    c = config.load(str(f))
    assert c.mount_root == "/srv/mnt" and c.supervisor.backoff_max == 30.0
    assert c.supervisor.backoff_initial == 0.5
    assert c.rpc.tcp.listen == "0.0.0.0:54321" and c.metrics.listen is None


@pytest.mark.parametrize(("text", "named"), [
    ("bogus: 1", "'bogus'"),
    ("supervisor:\n  backof_max: 3", "'supervisor.backof_max'"),
    ("supervisor:\n  backoff_max: fast", "supervisor.backoff_max"),
    ("supervisor:\n  probe_timeout: -1", "supervisor.probe_timeout"),
    ("mount_root: relative/path", "mount_root"),
    ("logging:\n  level: loud", "logging.level"),
    ("iscsi:\n  parallel_logins: 0", "iscsi.parallel_logins"),
    ("metrics:\n  listen: nowhere", "metrics.listen"),
    ("rpc: 5", "rpc"),
    ("supervisor:\n  backoff_initial: 100", "backoff_initial"),
    (": : :", "not valid YAML"),
])
def test_bad_config_names_the_key(tmp_path: Path, text: str, named: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(config.ConfigError) as e:
        config.load(str(f))
    assert named in str(e.value) and str(f) in str(e.value)


def test_local_default_keeps_everything_in_one_folder(tmp_path: Path) -> None:
    c = config.local(str(tmp_path))
    for path in (c.state_dir, c.run_dir, c.mount_root, c.rpc.socket):
        assert path.startswith(str(tmp_path))
    assert c.metrics.listen is None and c.rpc.socket_group is None


def test_dump_round_trips(tmp_path: Path) -> None:
    c = config.local(str(tmp_path))
    f = tmp_path / "dump.yaml"
    f.write_text(config.dump(c))
    assert config.load(str(f)) == c


def test_example_config_file_lists_the_defaults() -> None:
    example = Path(__file__).parents[2] / "etc" / "vdsmconn.yaml"
    assert config.load(str(example)) == config.Config()
