"""The packages, built from this tree as a release would build them: the Debian package
(contrib/packaging/build-deb, checked by lintian) and the RPM for EL hosts
(contrib/packaging/build-rpm, checked with rpm and rpmlint). Installing, upgrading and
purging the .deb under systemd is tests/guest/test_guest_package.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from vdsmconn import config

REPO = Path(__file__).resolve().parents[2]
PACKAGING = REPO / "contrib" / "packaging"
MAN_PAGES = ("usr/share/man/man8/vdsmconnd.8.gz", "usr/share/man/man8/vdsmconn.8.gz",
             "usr/share/man/man5/vdsmconn.yaml.5.gz")
BACKEND_TOOLS = ("nfs-common", "glusterfs-client", "fuse3", "open-iscsi", "libiscsi-bin",
                 "multipath-tools", "lvm2")
DEBIAN_DEPENDS = ("python3-yaml", "python3-pyudev", "python3-os-brick", "dmidecode")
# rpmlint errors that are the distribution's policy rather than the package's layout:
# packages built here are not signed and carry no packager or (openSUSE's) group tag; the
# state directory is 0700 on purpose (as the unit's StateDirectoryMode); libiscsi-utils is
# the EL package of iscsi-inq, whatever its name says.
RPMLINT_ACCEPTED = ("no-signature", "no-packager-tag", "no-group-tag", "non-standard-dir-perm",
                    "explicit-lib-dependency", "files-duplicated-waste")


def run(*argv: str, timeout: float = 600, cwd: Path | None = None) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          check=False)
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stdout}\n" \
                                 f"{proc.stderr[-4000:]}"
    return proc.stdout


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (contrib/run-tests.sh installs them)")


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need("dpkg-buildpackage", "dh", "dh_python3")
    out = tmp_path_factory.mktemp("deb")
    path = Path(run("bash", str(PACKAGING / "build-deb"), "--out", str(out)).split()[-1])
    assert path.exists() and path.name.endswith("_amd64.deb"), path
    return path


@pytest.fixture(scope="module")
def deb_root(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("deb-root")
    run("dpkg-deb", "-x", str(deb), str(root))
    return root


@pytest.fixture(scope="module")
def rpm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need("rpmbuild", "python3.11")
    out = tmp_path_factory.mktemp("rpm")
    path = Path(run("bash", str(PACKAGING / "build-rpm"), "--out", str(out)).split()[-1])
    assert path.exists() and path.name.endswith(".x86_64.rpm"), path
    return path


def test_deb_holds_daemon_client_unit_configuration_and_man_pages(deb: Path) -> None:
    files = {line.split()[-1].removeprefix("./").rstrip("/")
             for line in run("dpkg-deb", "-c", str(deb)).splitlines()}
    for path in ("usr/bin/vdsmconnd", "usr/bin/vdsmconn", "lib/systemd/system/vdsmconn.service",
                 "etc/vdsmconn/vdsmconn.yaml", "etc/vdsmconn/conf.d", "var/lib/vdsmconn",
                 "usr/lib/tmpfiles.d/vdsmconn.conf", "usr/lib/sysusers.d/vdsmconn.conf",
                 "usr/lib/vdsmconn/vdsmconn/daemon.py", "usr/lib/vdsmconn/vendor/pyroute2",
                 "usr/lib/vdsmconn/vendor/orjson", "usr/lib/vdsmconn/vendor/dbus_fast",
                 "usr/lib/vdsmconn/vendor/prometheus_client",
                 "usr/share/doc/vdsmconn/prometheus/alerts.yml", *MAN_PAGES):
        assert path in files, path
    # Nothing in the system's site-packages, and Debian's own libraries are not bundled.
    assert not [f for f in files if "dist-packages" in f or "site-packages" in f]
    vendored = {f.split("/")[4] for f in files if f.startswith("usr/lib/vdsmconn/vendor/")}
    assert not vendored & {"yaml", "pyudev", "os_brick"}, vendored
    assert "prometheus_client" in vendored  # Debian 12's 0.16 is too old
    fields = run("dpkg-deb", "-f", str(deb), "Depends", "Architecture")
    for package in (*BACKEND_TOOLS, *DEBIAN_DEPENDS):
        assert re.search(rf"(^|[ ,]){re.escape(package)}([ ,(]|$)", fields, re.M), package
    assert "python3 (<< 3.12)" in fields  # the bundled extension modules are CPython 3.11's


def test_deb_scripts_enable_start_once_and_only_try_restart_on_upgrade(
        deb: Path, tmp_path: Path) -> None:
    run("dpkg-deb", "-e", str(deb), str(tmp_path / "DEBIAN"))
    control = tmp_path / "DEBIAN"
    assert (control / "conffiles").read_text().split() == ["/etc/vdsmconn/vdsmconn.yaml"]
    postinst = (control / "postinst").read_text()
    assert "deb-systemd-helper enable 'vdsmconn.service'" in postinst
    assert "deb-systemd-invoke try-restart 'vdsmconn.service'" in postinst
    assert re.search(r'\[ -z "\$2" \].*\n.*\n\s+deb-systemd-invoke start vdsmconn.service',
                     postinst), postinst
    assert "deb-systemd-invoke restart" not in postinst
    assert "systemd-sysusers" in postinst and "systemd-tmpfiles" in postinst
    assert "py3compile -p vdsmconn" in postinst
    assert "deb-systemd-invoke stop vdsmconn.service" in (control / "prerm").read_text()
    postrm = (control / "postrm").read_text()
    assert 'if [ "$1" = "purge" ]; then\n    rm -rf /var/lib/vdsmconn' in postrm
    assert not (control / "preinst").exists() or "stop" not in (control / "preinst").read_text()


def test_deb_configuration_file_changes_no_default(deb_root: Path) -> None:
    path = deb_root / "etc/vdsmconn/vdsmconn.yaml"
    text = path.read_text()
    assert "#  socket_group: kvm" in text and "#mount_root: /rhev/data-center/mnt" in text
    assert config.load(str(path)) == config.Config()
    example = deb_root / "usr/share/doc/vdsmconn/examples/vdsmconn.yaml"
    assert example.read_text() == (REPO / "etc" / "vdsmconn.yaml").read_text()
    assert (deb_root / "var/lib/vdsmconn").stat().st_mode & 0o777 == 0o700
    assert (deb_root / "usr/lib/sysusers.d/vdsmconn.conf").read_text().splitlines()[-1] \
        == "g kvm - -"


def test_deb_entry_scripts_run_on_debians_python_with_the_bundled_libraries(
        deb_root: Path, tmp_path: Path) -> None:
    """The installed scripts, pointed at the unpacked tree, under /usr/bin/python3 -I: the
    system's Python with Debian's libraries and the bundled ones, nothing from this venv."""
    private = deb_root / "usr/lib/vdsmconn"
    scripts = {}
    for name in ("vdsmconnd", "vdsmconn"):
        text = (deb_root / "usr/bin" / name).read_text()
        assert text.startswith("#!/usr/bin/python3\n")
        scripts[name] = tmp_path / name
        scripts[name].write_text(text.replace("/usr/lib/vdsmconn", str(private)))
    shown = run("/usr/bin/python3", "-I", str(scripts["vdsmconnd"]), "--show-config", "-c",
                str(deb_root / "etc/vdsmconn/vdsmconn.yaml"))
    assert config.load_text(shown, "shown") == config.Config()
    assert "manage" in run("/usr/bin/python3", "-I", str(scripts["vdsmconn"]), "--help")
    where = run("/usr/bin/python3", "-I", "-c", "import sys; sys.path[:0] = "
                f"[{str(private)!r}, {str(private / 'vendor')!r}]; import json, orjson, "
                "pyroute2, dbus_fast, yaml, prometheus_client; print(json.dumps({m.__name__: "
                "m.__file__ for m in (orjson, pyroute2, dbus_fast, yaml, prometheus_client)}))")
    found = json.loads(where)
    for bundled in ("orjson", "pyroute2", "dbus_fast", "prometheus_client"):
        assert found[bundled].startswith(str(private / "vendor")), found
    for debian in ("yaml",):
        assert found[debian].startswith("/usr/lib/python3/dist-packages/"), found


def test_lintian_finds_no_errors(deb: Path) -> None:
    need("lintian")
    proc = subprocess.run(["lintian", "--tag-display-limit", "0", str(deb)],
                          capture_output=True, text=True, timeout=600, check=False)
    tags = [line for line in proc.stdout.splitlines() if re.match(r"^[EWIP]: ", line)]
    print("lintian:\n" + "\n".join(tags))
    assert [t for t in tags if t.startswith("E: ")] == []
    assert proc.returncode == 0, proc.stderr


def _rpm_query(rpm: Path, *args: str) -> str:
    return run("rpm", "-qp", *args, str(rpm))


def test_rpm_holds_unit_configuration_man_pages_and_scripts(rpm: Path) -> None:
    files = set(run("rpm", "-qlp", str(rpm)).split("\n"))
    for path in ("/usr/bin/vdsmconnd", "/usr/bin/vdsmconn",
                 "/usr/lib/systemd/system/vdsmconn.service", "/etc/vdsmconn/vdsmconn.yaml",
                 "/etc/vdsmconn/conf.d", "/var/lib/vdsmconn", "/usr/lib/tmpfiles.d/vdsmconn.conf",
                 "/usr/lib/sysusers.d/vdsmconn.conf", "/usr/lib/vdsmconn/vdsmconn/daemon.py",
                 "/usr/lib/vdsmconn/vendor/os_brick/__init__.py",
                 "/usr/share/doc/vdsmconn/prometheus/alerts.yml",
                 "/usr/lib/systemd/system-preset/50-vdsmconn.preset",
                 *("/" + page for page in MAN_PAGES)):
        assert path in files, path
    assert not [f for f in files if "site-packages" in f or f.startswith("/usr/lib/.build-id")]
    flags = dict(line.rsplit(" ", 1) for line in _rpm_query(
        rpm, "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]").splitlines() if " " in line)
    assert flags["/etc/vdsmconn/vdsmconn.yaml"] == "cn"  # %config(noreplace)
    scripts = _rpm_query(rpm, "--scripts")
    assert "groupadd -r kvm" in scripts
    assert "systemctl --no-reload preset vdsmconn.service" in scripts
    assert "systemctl --no-reload disable --now vdsmconn.service" in scripts
    assert "systemctl try-restart vdsmconn.service" in scripts
    requires = _rpm_query(rpm, "-R")
    for package in ("python3.11", "nfs-utils", "glusterfs-fuse", "iscsi-initiator-utils",
                    "device-mapper-multipath", "lvm2"):
        assert package in requires.split(), package
    launcher = _rpm_query(rpm, "--dump")
    assert "/usr/bin/vdsmconnd" in launcher


def test_rpmlint_finds_no_errors_in_the_packages_own_files(rpm: Path) -> None:
    need("rpmlint")
    proc = subprocess.run(["rpmlint", str(rpm)], capture_output=True, text=True, timeout=600,
                          check=False)
    lines = proc.stdout.splitlines()
    assert any("1 packages and 0 specfiles checked" in line for line in lines), proc.stdout[-2000:]
    errors = [line for line in lines if ": E: " in line]
    print(f"rpmlint: {len(errors)} errors, "
          f"{sum(1 for line in lines if ': W: ' in line)} warnings")
    ours = [line for line in errors if "/usr/lib/vdsmconn/vendor/" not in line
            and line.split(": E: ", 1)[1].split()[0] not in RPMLINT_ACCEPTED]
    assert ours == []
