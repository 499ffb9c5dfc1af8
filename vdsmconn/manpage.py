"""Man pages written from the sources of truth: the argparse parsers and the configuration.

``python -m vdsmconn.manpage --out DIR`` writes vdsmconnd.8, vdsmconn.8 and vdsmconn.yaml.5.
Options, verbs and their help come from ``daemon.build_parser()`` and ``cli.build_parser()``
(the very text of ``--help``); keys, types, defaults and what a value must be come from
``config.key_infos()`` and ``config.DESCRIPTIONS``. Only the prose around them is written
here, so a new option or key cannot be missing from its page. The packages (contrib/packaging)
run this at build time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vdsmconn import __version__, cli, config, daemon

SOURCE = f"vdsmconn {__version__}"


def escape(text: str) -> str:
    """Text for roff: backslashes and minus signs escaped, no line starting a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    lines = [("\\&" + line if line.startswith((".", "'")) else line)
             for line in text.split("\n")]
    return "\n".join(lines)


def bold(text: str) -> str:
    return f"\\fB{escape(text)}\\fR"


def italic(text: str) -> str:
    return f"\\fI{escape(text)}\\fR"


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The action's help as --help prints it (%(default)s and friends expanded)."""
    text = action.help or ""
    if "%" in text:
        params = dict(vars(action), prog=parser.prog)
        text = text % params
    return text


def _metavar(action: argparse.Action) -> str:
    if action.metavar is not None:
        return str(action.metavar)
    if action.choices is not None:
        return "{" + ",".join(str(c) for c in action.choices) + "}"
    return action.dest.upper() if action.option_strings else action.dest


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


def _visible(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Options and operands as --help lists them (sub-commands apart)."""
    return [a for a in parser._actions
            if not isinstance(a, argparse._SubParsersAction) and a.help != argparse.SUPPRESS]


def _usage(parser: argparse.ArgumentParser) -> list[str]:
    return [synopsis_item(a) for a in _visible(parser)
            if not isinstance(a, argparse._HelpAction)]


def synopsis_item(action: argparse.Action) -> str:
    if action.option_strings:
        name = bold(action.option_strings[0])
        if _takes_value(action):
            name += " " + italic(_metavar(action))
        return name if action.required else f"[{name}]"
    word = italic(_metavar(action))
    if action.nargs == "?":
        return f"[{word}]"
    if action.nargs == "*":
        return f"[{word} ...]"
    if action.nargs == "+":
        return f"{word} [{word} ...]"
    return word


def options(parser: argparse.ArgumentParser, with_help: bool = True) -> list[str]:
    """One .TP paragraph per option or operand, with its --help text."""
    out: list[str] = []
    for action in _visible(parser):
        if not with_help and isinstance(action, argparse._HelpAction):
            continue
        if action.option_strings:
            names = ", ".join(bold(n) for n in action.option_strings)
            if _takes_value(action):
                names += " " + italic(_metavar(action))
        else:
            names = italic(_metavar(action))
        text = _help(parser, action)
        if action.choices is not None and action.metavar is not None:
            text += f" (one of {', '.join(str(c) for c in action.choices)})"
        if not text and isinstance(action, argparse._VersionAction):
            text = "print the version and exit"
        out += [".TP", names, escape(_sentence(text)) if text else ""]
    return [line for line in out if line]


def _sentence(text: str) -> str:
    text = text.strip()
    if not text:
        return text
    if not text[1:2].isupper():  # iSCSI stays iSCSI
        text = text[0].upper() + text[1:]
    return text if text.endswith(".") else text + "."


def _subparsers(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(verb, help, parser) of each sub-command, in the order --help lists them."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                found.append((name, helps.get(name, ""), sub))
    return found


def header(name: str, section: int, title: str) -> list[str]:
    manual = "System Administration" if section == 8 else "File Formats"
    return [
        f".\\\" Written by vdsmconn.manpage from {name}'s own definitions; do not edit.",
        f'.TH "{name.upper()}" "{section}" "{_date()}" "{SOURCE}" "{manual}"',
        ".nh",  # no hyphenation: option names, paths and keys stay whole
        ".SH NAME",
        f"{escape(name)} \\- {escape(title)}",
    ]


def _date() -> str:
    """SOURCE_DATE_EPOCH's day for reproducible builds, else today."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = (datetime.datetime.fromtimestamp(int(epoch), datetime.UTC) if epoch
            else datetime.datetime.now(datetime.UTC))
    return when.strftime("%Y-%m-%d")


def paragraphs(*texts: str) -> list[str]:
    out: list[str] = []
    for text in texts:
        out += [".PP", escape(text)]
    return out[1:]


def see_also(*pages: str) -> list[str]:
    refs = []
    for page in pages:
        name, _, section = page.partition("(")
        refs.append(f"{bold(name)}({section}")
    return [".SH SEE ALSO", ",\n".join(refs)]


# --- vdsmconnd(8) ------------------------------------------------------------------------


def daemon_page() -> str:
    parser = daemon.build_parser()
    lines = header("vdsmconnd", 8, "keeps a virtualization host connected to its storage")
    lines += [".SH SYNOPSIS", bold("vdsmconnd"),
              " ".join(_usage(parser))]
    lines += [".SH DESCRIPTION", *paragraphs(
        "vdsmconnd is the vdsmconn daemon. A management engine or an administrator tells it "
        "to manage a storage connection under a connection ID: NFS, POSIX, GlusterFS and "
        "local mounts, iSCSI sessions through chosen "
        "network interfaces, and block volumes attached with os-brick. From then on the "
        "daemon keeps the connection up through storage outages, link flaps and its own "
        "restarts, and tears it down only when the last connection ID referring to it is "
        "unmanaged.",
        "It runs in the foreground, logs to standard error, and speaks JSON-RPC 2.0 and "
        "STOMP 1.2 on a unix socket (and, if configured, on a TLS listener for the engine). "
        "Under systemd (vdsmconn.service) it sends READY=1 only once the desired state is "
        "loaded and the socket listens, and pings the watchdog.",
        "On SIGTERM it stops supervising and leaves every mount, iSCSI session and attached "
        "volume in place; the next start adopts them without a remount.",
    )]
    lines += [".SH OPTIONS", *options(parser)]
    lines += [".SH FILES", ".TP", bold(str(config.MAIN_FILE)),
              escape("The configuration, see vdsmconn.yaml(5)."),
              ".TP", bold(config.DROPIN_GLOB),
              escape("Drop-in files read after it, in name order."),
              ".TP", bold(config.Config().state_dir),
              escape("The SQLite database of managed connections."),
              ".TP", bold(config.Config().rpc.socket),
              escape("The unix socket of the client, vdsmconn(8).")]
    lines += [".SH EXIT STATUS", escape(
        "0 after a stop by SIGTERM or SIGINT, or after --show-config; 1 when the daemon "
        "failed; 2 for a configuration error (the message names the key and the file).")]
    lines += see_also("vdsmconn(8)", "vdsmconn.yaml(5)", "systemctl(1)", "mount(8)",
                      "iscsiadm(8)")
    return "\n".join(lines) + "\n"


# --- vdsmconn(8) -------------------------------------------------------------------------


def client_page() -> str:
    parser = cli.build_parser()
    lines = header("vdsmconn", 8, "the client of the vdsmconn daemon")
    lines += [".SH SYNOPSIS", bold("vdsmconn"),
              " ".join(_usage(parser)),
              italic("VERB") + " [" + italic("ARGUMENTS") + "]"]
    lines += [".SH DESCRIPTION", *paragraphs(
        "vdsmconn talks to vdsmconnd(8) over its unix socket: it manages and unmanages "
        "connections under connection IDs (CIDs), shows their status, waits for them, tests "
        "connectivity without managing anything, and shows the host's backends.",
        "Results are human tables by default; --json prints the daemon's result as JSON, "
        "for scripts. A failure exits non-zero with the daemon's error code and message.",
        "A CONNECTION is a URI (localfs:///srv/images), a JSON object, or @FILE naming a "
        "file that holds a JSON object.",
    )]
    lines += [".SH OPTIONS", *options(parser)]
    lines += [".SH COMMANDS"]
    for name, about, sub in _subparsers(parser):
        usage = " ".join([bold(name), *_usage(sub)])
        lines += [".SS " + _quoted(name), usage, ".PP", escape(_sentence(about))]
        lines += options(sub, with_help=False)
    lines += [".SH ENVIRONMENT", ".TP", bold(cli.SOCKET_ENV),
              escape(f"The daemon's socket when --socket is not given "
                     f"(default {cli.DEFAULT_SOCKET}).")]
    lines += [".SH EXIT STATUS", escape(
        "0 success; 1 the daemon returned an error, or test or wait did not succeed; "
        "2 usage error; 3 the daemon cannot be reached or the connection to it failed.")]
    lines += [".SH EXAMPLES", ".nf", escape(
        "vdsmconn manage FLOW1_local localfs:///srv/images\n"
        "vdsmconn wait FLOW1_local --timeout 10\n"
        "vdsmconn list\n"
        "vdsmconn unmanage --prefix FLOW1_\n"
        "vdsmconn info"), ".fi"]
    lines += see_also("vdsmconnd(8)", "vdsmconn.yaml(5)")
    return "\n".join(lines) + "\n"


def _quoted(text: str) -> str:
    return '"' + escape(text) + '"'


# --- vdsmconn.yaml(5) ----------------------------------------------------------------------

_TYPES = {"str": "string", "int": "integer", "float": "number", "bool": "true or false",
          "tuple[str, ...]": "list of strings"}


def type_text(annotation: str) -> str:
    optional = annotation.endswith("| None")
    base = annotation.removesuffix("| None").strip()
    text = _TYPES.get(base, base)
    return f"{text} or null" if optional else text


def value_text(value: Any) -> str:
    """A default as it would be written in YAML."""
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return json.dumps(value) if not isinstance(value, str) else value


def _grouped(keys: list[config.KeyInfo], prefix: str = "") -> list[config.KeyInfo]:
    """The keys of `prefix` first, then each of its groups with its own keys."""
    mine = [k for k in keys if k.name.rpartition(".")[0] == prefix.rstrip(".")]
    out = [k for k in mine if not k.group]
    for group in (k for k in mine if k.group):
        out += [group, *_grouped(keys, group.name + ".")]
    return out


def config_page() -> str:
    lines = header("vdsmconn.yaml", 5, "configuration of the vdsmconn daemon")
    lines += [".SH SYNOPSIS", bold(str(config.MAIN_FILE)), ".br", bold(config.DROPIN_GLOB)]
    lines += [".SH DESCRIPTION", *paragraphs(
        f"vdsmconnd(8) reads YAML: its built-in defaults, then {config.MAIN_FILE}, then "
        f"{config.DROPIN_GLOB} in name order, each file changing only the keys it names; "
        "vdsmconnd -c FILE reads that file alone. An unknown key or a bad value stops the "
        "start with a message naming the key and the file. vdsmconnd --show-config prints "
        "the configuration in effect.",
        "Keys below are written with dots for their nesting: rpc.tcp.listen is the key "
        "listen in the mapping tcp in the mapping rpc. Each shows its type and its default.",
    )]
    lines += [".SH KEYS"]
    for key in _grouped(config.key_infos()):
        about = config.DESCRIPTIONS.get(key.name, "")
        if key.group:
            lines += [".SS " + _quoted(key.name), escape(about)]
            continue
        lines += [".TP", f"{bold(key.name)} ({escape(type_text(key.type))}, default "
                  f"{bold(value_text(key.default))})", escape(about)]
        if key.expected:
            lines += [".br", escape(f"Must be {key.expected}.")]
    lines += [".SH EXAMPLE", ".nf", escape(
        "# /etc/vdsmconn/conf.d/50-engine.yaml\n"
        "rpc:\n"
        "  tcp:\n"
        "    listen: 0.0.0.0:54323\n"
        "    cert: /etc/pki/vdsmconn/host.pem\n"
        "    key: /etc/pki/vdsmconn/host.key\n"
        "    ca: /etc/pki/vdsmconn/engine-ca.pem\n"
        "supervisor:\n"
        "  probe_interval: 5"), ".fi"]
    lines += see_also("vdsmconnd(8)", "vdsmconn(8)")
    return "\n".join(lines) + "\n"


def pages() -> dict[str, str]:
    """File name -> roff text of every page."""
    return {"vdsmconnd.8": daemon_page(), "vdsmconn.8": client_page(),
            "vdsmconn.yaml.5": config_page()}


def write(out: Path, names: Iterable[str] | None = None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in pages().items():
        if names is None or name in names:
            (out / name).write_text(text, encoding="utf-8")
            written.append(out / name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vdsmconn.manpage",
                                     description="write the man pages of vdsmconn")
    parser.add_argument("--out", type=Path, required=True, help="directory to write to")
    args = parser.parse_args(argv)
    for path in write(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
