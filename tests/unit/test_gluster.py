"""The `gluster volume info --xml` parser on captured output, and the glusterfs connector's
gluster CLI calls and mount argv (FakeRunner)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from vdsmconn import config, errors
from vdsmconn.connectors.base import HostContext
from vdsmconn.connectors.gluster import GlusterConnector, split_connection
from vdsmconn.host import gluster, scope
from vdsmconn.host.fakerunner import FakeRunner
from vdsmconn.host.mountinfo import Mount
from vdsmconn.model import GlusterSpec
from vdsmconn.state.actual import HostState

DATA = Path(__file__).parent / "data" / "gluster"


def captured(name: str) -> str:
    return (DATA / name).read_text()


# --- parser -----------------------------------------------------------------------------------


def test_parse_two_brick_distribute_volume() -> None:
    (v,) = gluster.parse_volume_info(captured("info-2brick.xml"))
    assert v.name == "v1" and v.id == "74680f52-3d8f-465f-887a-b84e79da2d9c"
    assert v.status == "Created" and v.type == "Distribute"
    assert v.bricks == (gluster.Brick("10.231.0.2", "/tmp/glcap/b1"),
                        gluster.Brick("10.231.0.3", "/tmp/glcap/b2"))
    assert ("nfs.disable", "on") in v.options


def test_parse_arbiter_volume_keeps_brick_order_and_dedups_hosts() -> None:
    (v,) = gluster.parse_volume_info(captured("info-arbiter.xml"))
    assert v.status == "Started" and v.type == "Replicate"
    assert [b.host for b in v.bricks] == ["10.231.0.3", "10.231.0.2", "10.231.0.3"]
    assert [b.arbiter for b in v.bricks] == [False, False, True]
    assert v.brick_hosts == ["10.231.0.3", "10.231.0.2"]


def test_missing_volume_is_an_error_though_the_cli_exits_0() -> None:
    with pytest.raises(gluster.GlusterOutputError, match="Volume does not exist"):
        gluster.parse_volume_info(captured("info-missing.xml"))


@pytest.mark.parametrize("text", ["", "Connection failed.", "<other/>", "<cliOutput/>"])
def test_garbage_is_an_error(text: str) -> None:
    with pytest.raises(gluster.GlusterOutputError):
        gluster.parse_volume_info(text)


def test_brick_names_split_at_the_last_colon_slash() -> None:
    assert gluster.split_brick("fe80::1:/b/1") == gluster.Brick("fe80::1", "/b/1")
    assert gluster.split_brick("h:/b:/c") == gluster.Brick("h:/b", "/c")
    with pytest.raises(gluster.GlusterOutputError):
        gluster.split_brick("nocolon")


def _volume(*hosts: str) -> gluster.Volume:
    return gluster.Volume("v", "id", "Started", "Replicate",
                          tuple(gluster.Brick(h, f"/b{i}") for i, h in enumerate(hosts)))


@pytest.mark.parametrize(("hosts", "server", "backups"), [
    (("a", "b", "c"), "a", ["b", "c"]),
    (("a", "b", "a", "c", "b"), "b", ["a", "c"]),
    (("a", "b"), "other", ["a", "b"]),
    (("a",), "a", []),
    (("fe80::1", "fe80::2"), "[fe80::1]", ["fe80::2"]),
])
def test_backup_servers(hosts: tuple[str, ...], server: str, backups: list[str]) -> None:
    assert gluster.backup_servers(_volume(*hosts), server) == backups


# --- connector --------------------------------------------------------------------------------


class Host:
    def __init__(self, tmp_path: Path) -> None:
        self.config = dataclasses.replace(config.local(str(tmp_path)), gluster_command="gluster")
        self.runner = FakeRunner()
        self.table: dict[str, Mount] = {}
        self.connector = GlusterConnector(HostContext(config.host_settings(self.config),
                                                      self.runner, HostState(mounts=self.table)))

    def info(self, remote: str | None, rc: int = 0, stdout: str = "", stderr: str = "") -> None:
        argv = ["gluster", "--mode=script", "volume", "info", "v1"]
        if remote:
            argv.append(f"--remote-host={remote}")
        self.runner.expect([*argv, "--xml"], rc, stdout, stderr)


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Host:
    monkeypatch.setattr(scope, "unavailable", lambda *a: "no systemd in unit tests")
    return Host(tmp_path)


def mount_argv(host: Host, options: str | None) -> tuple[str, ...]:
    target = f"{host.config.mount_root}/glusterSD/10.231.0.2:_v1"
    opts = ("-o", options) if options else ()
    return ("mount", "-t", "glusterfs", *opts, "10.231.0.2:/v1", target)


async def connect(host: Host, mnt_options: str | None = None) -> None:
    host.runner.expect(["mount"], prefix=True)
    spec = GlusterSpec(connection="10.231.0.2:/v1", mnt_options=mnt_options)
    found = await host.connector.connect(spec)
    assert found.path == f"{host.config.mount_root}/glusterSD/10.231.0.2:_v1"


async def test_backups_come_from_the_volfile_server(host: Host) -> None:
    host.info("10.231.0.2", stdout=captured("info-2brick.xml"))
    await connect(host, "log-level=WARNING")
    assert host.runner.argvs[-1] == mount_argv(
        host, "backup-volfile-servers=10.231.0.3,log-level=WARNING")
    assert [c.timeout for c in host.runner.calls] == [30, 60]


async def test_local_glusterd_is_asked_when_the_server_cannot_tell(host: Host) -> None:
    host.info("10.231.0.2", rc=1, stdout="Connection failed. Please check if gluster daemon "
              "is operational.")
    host.info(None, stdout=captured("info-arbiter.xml").replace("<name>v2</name>",
                                                                "<name>v1</name>"))
    await connect(host)
    assert host.runner.argvs[0][-2:] == ("--remote-host=10.231.0.2", "--xml")
    assert host.runner.argvs[1] == ("gluster", "--mode=script", "volume", "info", "v1", "--xml")
    assert host.runner.argvs[2] == mount_argv(host, "backup-volfile-servers=10.231.0.3")


async def test_no_lookup_mounts_with_user_options_and_warns(
        host: Host, caplog: pytest.LogCaptureFixture) -> None:
    host.info("10.231.0.2", stdout=captured("info-missing.xml"))
    host.runner.expect(["gluster"], prefix=True, timeout=True)
    await connect(host, "ro")
    assert host.runner.argvs[-1] == mount_argv(host, "ro")
    assert "cannot look up brick hosts" in caplog.text
    assert "Volume does not exist" in caplog.text and "timed out" in caplog.text


async def test_user_backup_servers_are_used_as_is(host: Host) -> None:
    await connect(host, "backup-volfile-servers=x:y")
    assert host.runner.argvs == [mount_argv(host, "backup-volfile-servers=x:y")]


async def test_mount_past_its_deadline_is_480(host: Host) -> None:
    host.runner.expect(["mount"], prefix=True, timeout=True)
    spec = GlusterSpec(connection="10.231.0.2:/v1", mnt_options="backup-volfile-servers=x")
    with pytest.raises(errors.Timeout) as caught:
        await host.connector.connect(spec)
    assert caught.value.code == 480 and "timed out after 60 s" in caught.value.message


async def test_single_brick_on_the_server_has_no_backups(host: Host) -> None:
    one = captured("info-2brick.xml").replace("10.231.0.3:", "10.231.0.2:")
    host.info("10.231.0.2", stdout=one)
    await connect(host)
    assert host.runner.argvs[-1] == mount_argv(host, None)


async def test_test_verb_stops_at_tcp_connect(host: Host) -> None:
    spec = GlusterSpec(connection="127.0.0.1:/v1")
    log = await host.connector.test(spec, timeout=5)
    assert [s.step for s in log.steps] == ["resolve", "connect"]
    assert log.steps[0].ok and not log.steps[1].ok
    assert "127.0.0.1:24007" in log.steps[1].detail
    assert host.runner.argvs == []


async def test_test_verb_reports_unresolvable_server(host: Host) -> None:
    log = await host.connector.test(GlusterSpec(connection="no-such-host.invalid:/v1"), 5)
    assert [(s.step, s.ok) for s in log.steps] == [("resolve", False)]
    assert "cannot resolve no-such-host.invalid" in log.steps[0].detail


def test_split_connection() -> None:
    assert split_connection("srv:/vol") == ("srv", "vol")
    assert split_connection("srv:/vol/sub/dir") == ("srv", "vol")
    assert split_connection("[fe80::1]:/vol") == ("fe80::1", "vol")
