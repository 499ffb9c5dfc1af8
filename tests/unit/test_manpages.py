"""The man pages are written from the parsers and the configuration: every option, verb and
key is in them, every key has a description, and groff and man render them without a
warning."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
from pathlib import Path

import pytest

from vdsmconn import cli, config, daemon, manpage


def _plain(roff: str) -> str:
    """The roff text with escapes undone, for looking words up."""
    return re.sub(r"\\f[BIRP]", "", roff).replace("\\-", "-").replace("\\e", "\\")


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return [s for a in parser._actions for s in a.option_strings]


def _verbs(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_every_key_has_a_description_and_no_description_is_stale() -> None:
    names = {k.name for k in config.key_infos()}
    assert "rpc.tcp.listen" in names and "rpc.tcp" in names
    assert sorted(names - set(config.DESCRIPTIONS)) == []
    assert sorted(set(config.DESCRIPTIONS) - names) == []
    assert all(text.strip() for text in config.DESCRIPTIONS.values())


def test_key_infos_carry_defaults_and_checks() -> None:
    infos = {k.name: k for k in config.key_infos()}
    assert infos["mount_root"].default == "/rhev/data-center/mnt"
    assert infos["mount_root"].expected == "an absolute path"
    assert infos["rpc.socket_group"].type == "str | None"
    assert infos["supervisor"].group and not infos["supervisor.probe_interval"].group


def test_daemon_page_lists_every_option() -> None:
    page = _plain(manpage.daemon_page())
    options = _options(daemon.build_parser())
    assert {"-c", "--config", "--local", "--show-config", "--version"} <= set(options)
    for option in options:
        assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", page), option
    assert "print the effective configuration and exit".capitalize() in page


def test_client_page_lists_every_verb_and_its_options() -> None:
    parser = cli.build_parser()
    page = _plain(manpage.client_page())
    verbs = _verbs(parser)
    assert {"manage", "unmanage", "list", "wait", "info", "watch"} <= set(verbs)
    for option in _options(parser):
        assert option in page, option
    for name, sub in verbs.items():
        section = page.split(f'.SS "{name}"', 1)
        assert len(section) == 2, name
        body = section[1].split(".SS ", 1)[0]
        for option in _options(sub):
            if option not in ("-h", "--help"):
                assert option in body, (name, option)
        for action in sub._actions:
            if not action.option_strings:
                assert str(action.metavar or action.dest) in body, (name, action.dest)


def test_config_page_lists_every_key_with_its_default() -> None:
    page = _plain(manpage.config_page())
    for key in config.key_infos():
        assert key.name in page, key.name
        if not key.group:
            line = next(ln for ln in page.splitlines() if ln.startswith(f"{key.name} ("))
            assert f"default {manpage.value_text(key.default)})" in line, line
    assert "default /rhev/data-center/mnt" in page
    assert "Must be an absolute path." in page


def test_escape_keeps_roff_requests_out_of_text() -> None:
    assert manpage.escape(".hidden\n'quoted\\") == "\\&.hidden\n\\&'quoted\\e"
    assert manpage.escape("--json") == "\\-\\-json"


def test_pages_are_written(tmp_path: Path) -> None:
    written = manpage.write(tmp_path)
    assert sorted(p.name for p in written) == ["vdsmconn.8", "vdsmconn.yaml.5", "vdsmconnd.8"]
    assert (tmp_path / "vdsmconnd.8").read_text().count('.TH "VDSMCONND" "8"') == 1


@pytest.mark.parametrize("name", ["vdsmconnd.8", "vdsmconn.8", "vdsmconn.yaml.5"])
def test_groff_and_man_render_without_warnings(tmp_path: Path, name: str) -> None:
    (path,) = manpage.write(tmp_path, [name])
    groff = subprocess.run(["groff", "-man", "-ww", "-z", str(path)], capture_output=True,
                           text=True, timeout=60, check=False)
    assert groff.returncode == 0 and groff.stderr == "", groff.stderr
    env = dict(os.environ, MANWIDTH="80", LC_ALL="C.UTF-8")
    env.pop("MAN_KEEP_FORMATTING", None)
    shown = subprocess.run(["man", "--warnings", "-l", str(path)], capture_output=True,
                           text=True, timeout=60, check=False, env=env)
    assert shown.returncode == 0 and shown.stderr == "", shown.stderr
    title = name.rsplit(".", 1)[0]
    assert shown.stdout.splitlines()[0].startswith(title.upper() + "(")
    assert "SEE ALSO" in shown.stdout
