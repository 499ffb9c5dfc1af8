#!/usr/bin/env python3
"""Lay out the tree a package is built from (both build-deb and build-rpm use it).

    stage.py --vendor deb|rpm --python /usr/bin/python3 --pip "PIP COMMAND" DEST

DEST gets the daemon's sources (vdsmconn/, systemd/, etc/, docs/, contrib/prometheus/), and in
DEST/packaging/: the entry scripts for the given Python, the configuration file that the
package installs (/etc/vdsmconn/vdsmconn.yaml: every key of etc/vdsmconn.yaml, commented out,
so built-in defaults apply until an administrator sets one), and the tmpfiles.d and
sysusers.d files. DEST/vendor/ gets the Python libraries the package bundles, downloaded from
PyPI with pip: for deb, those of vendor-deb.txt (what Debian 12 lacks); for rpm, every runtime
dependency in pyproject.toml and theirs (an EL host has none of them for Python 3.11).
Standard library only.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TREE = ("vdsmconn", "systemd", "etc", "docs", "contrib/prometheus", "README.md",
        "pyproject.toml")
ENTRY_POINTS = {"vdsmconnd": "vdsmconn.daemon", "vdsmconn": "vdsmconn.cli"}
# Wheels for a CPython 3.11 x86_64 host; manylinux_2_28 and older run on EL 9 (glibc 2.34)
# and Debian 12 (glibc 2.36) alike.
WHEEL_TARGET = ("--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
                "--abi", "abi3", "--abi", "none", "--platform", "manylinux_2_28_x86_64",
                "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64")
CONFFILE_HEADER = """\
# vdsmconn configuration. Every key is shown with its built-in default, commented out: the
# defaults apply until a key is set here or in /etc/vdsmconn/conf.d/*.yaml (read after this
# file, in name order). vdsmconn.yaml(5) describes each key; `vdsmconnd --show-config`
# prints what is in effect. Package upgrades keep the changes made here.
#
"""


def version() -> str:
    text = (REPO / "vdsmconn" / "__init__.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"', text, re.M)
    if not match:
        raise SystemExit("no __version__ in vdsmconn/__init__.py")
    return match.group(1)


def copy_tree(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in TREE:
        source, target = REPO / name, dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=ignore)
        else:
            shutil.copy2(source, target)


def conffile(example: str) -> str:
    lines = [("#" + line if line.strip() else "#").rstrip() for line in example.splitlines()]
    return CONFFILE_HEADER + "\n".join(lines) + "\n"


def write_packaging(dest: Path, python: str) -> None:
    out = dest / "packaging"
    (out / "bin").mkdir(parents=True)
    template = (HERE / "launcher.in").read_text()
    for name, module in ENTRY_POINTS.items():
        script = out / "bin" / name
        script.write_text(template.replace("@PYTHON@", python).replace("@NAME@", name)
                          .replace("@MODULE@", module))
        script.chmod(0o755)
    (out / "vdsmconn.yaml").write_text(conffile((REPO / "etc" / "vdsmconn.yaml").read_text()))
    for name in ("vdsmconn.tmpfiles", "vdsmconn.sysusers"):
        shutil.copy2(HERE / name, out / name)


def requirements(kind: str) -> list[str]:
    if kind == "deb":
        return [line.split("#", 1)[0].strip()
                for line in (HERE / "vendor-deb.txt").read_text().splitlines()
                if line.split("#", 1)[0].strip()]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"])


def vendor(dest: Path, kind: str, pip: list[str]) -> None:
    """pip download the wheels, then install them (no compiling) into dest/vendor."""
    wheels = dest / "wheels"
    reqs = requirements(kind)
    deps = ["--no-deps"] if kind == "deb" else []
    run([*pip, "download", "--quiet", "--only-binary=:all:", *WHEEL_TARGET, *deps,
         "--dest", str(wheels), *reqs])
    run([*pip, "install", "--quiet", "--no-index", "--find-links", str(wheels), "--no-deps",
         "--no-compile", "--only-binary=:all:", *WHEEL_TARGET, "--target",
         str(dest / "vendor"), *sorted(str(w) for w in wheels.glob("*.whl"))])
    shutil.rmtree(wheels)
    # Data files of the wheels (scripts like pyroute2's CLI, C headers, sample configuration)
    # are not the package's: only importable code is kept.
    for name in ("bin", "include", "etc", "share"):
        shutil.rmtree(dest / "vendor" / name, ignore_errors=True)
    # What pip notes about this install (the build directory's URL) is not the package's.
    for note in ("direct_url.json", "REQUESTED", "INSTALLER"):
        for path in (dest / "vendor").glob(f"*.dist-info/{note}"):
            path.unlink()


def run(argv: list[str]) -> None:
    print("+", shlex.join(argv), file=sys.stderr, flush=True)
    subprocess.run(argv, check=True, timeout=900)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vendor", choices=("deb", "rpm"), required=True)
    parser.add_argument("--python", required=True, help="interpreter of the entry scripts")
    parser.add_argument("--pip", default=f"{sys.executable} -m pip",
                        help="pip command line for downloading the bundled libraries")
    parser.add_argument("--print-version", action="store_true",
                        help="print the daemon's version and exit")
    parser.add_argument("dest", type=Path, nargs="?")
    args = parser.parse_args(argv)
    if args.print_version:
        print(version())
        return 0
    if args.dest is None:
        parser.error("DEST is required")
    args.dest.mkdir(parents=True, exist_ok=True)
    copy_tree(args.dest)
    write_packaging(args.dest, args.python)
    vendor(args.dest, args.vendor, shlex.split(args.pip))
    return 0


if __name__ == "__main__":
    sys.exit(main())
