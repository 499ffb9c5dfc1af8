"""Build the QEMU test guest: Debian 12's stock kernel, a tiny initrd and a root disk.

Usage (as root): ``python3 -m tests.guest.build [--force] [--print]``

Everything comes from Debian packages through the mirror this machine's apt already uses
(read from /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list); no host name is
written into the repository.  The result lands in ``CACHE_ROOT/<sha256 of the recipe>/`` and a
second run with the same recipe returns at once.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import logging
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("vdsmconn.guest.build")

HERE = Path(__file__).resolve().parent
IMAGE_DIR = HERE / "image"
CACHE_ROOT = Path(os.environ.get("VDSMCONN_GUEST_CACHE", "/var/cache/vdsmconn-guest"))
SUITE = "bookworm"
IMAGE_SIZE = "4G"

# Packages of the root file system.  Changing this list changes the recipe hash.
PACKAGES = (
    "systemd-sysv", "udev", "dbus", "iproute2", "kmod", "nfs-kernel-server", "nfs-common",
    "open-iscsi", "targetcli-fb", "multipath-tools", "glusterfs-server", "glusterfs-client",
    "python3", "python3-yaml", "python3-pytest", "python3-pytest-asyncio", "util-linux",
    "e2fsprogs", "xfsprogs", "procps", "lvm2",
    # What the vdsmconn .deb depends on beyond the above, so tests/guest/test_guest_package.py
    # installs it with apt from this image alone (the guest has no network).
    # debootstrap does not resolve virtual packages: python3-ply provides the
    # python3-ply-lex-3.10 and python3-ply-yacc-3.10 that python3-pycparser (os-brick) needs.
    "fuse3", "libiscsi-bin", "python3-pyudev", "python3-os-brick", "python3-ply", "dmidecode",
)  # fmt: skip

# Modules the initrd loads (with their dependencies) before it can mount the root disk.
INITRD_MODULES = (
    "virtio_pci", "virtio_blk", "crc32c_generic", "ext4", "9pnet_virtio", "9p",
)  # fmt: skip


@dataclass(frozen=True)
class GuestImage:
    """A built guest: boot it with runner.boot()."""

    directory: Path
    kernel: Path
    initrd: Path
    rootfs: Path


def recipe_files() -> list[Path]:
    return [Path(__file__).resolve(), *sorted(p for p in IMAGE_DIR.iterdir() if p.is_file())]


def recipe_hash() -> str:
    digest = hashlib.sha256()
    for path in recipe_files():
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def image_for(directory: Path) -> GuestImage:
    return GuestImage(
        directory=directory,
        kernel=directory / "vmlinuz",
        initrd=directory / "initrd.img",
        rootfs=directory / "rootfs.img",
    )


def cached_image() -> GuestImage | None:
    """The image of the current recipe if it has been built, else None."""
    image = image_for(CACHE_ROOT / recipe_hash())
    return image if (image.directory / "complete").exists() else None


def debian_mirror() -> str:
    """The first Debian mirror apt on this machine uses for the main archive."""
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                key, _, value = line.partition(":")
                if not line.startswith("#") and value.strip():
                    fields[key.strip().lower()] = value.strip()
            if fields.get("enabled", "yes") == "no" or "deb" not in fields.get("types", ""):
                continue
            suites = fields.get("suites", "").split()
            if SUITE in suites and fields.get("uris"):
                return fields["uris"].split()[0]
    sources_list = Path("/etc/apt/sources.list")
    if sources_list.exists():
        for line in sources_list.read_text().splitlines():
            words = [w for w in line.split() if not w.startswith("[")]
            if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                return words[1]
    raise RuntimeError(f"no apt source for {SUITE} found in /etc/apt on this machine")


def run(argv: list[str], **kwargs: object) -> None:
    log.info("RUN %s", " ".join(argv))
    subprocess.run(argv, check=True, **kwargs)  # type: ignore[call-overload]


def download(packages: list[str], directory: Path) -> list[Path]:
    """`apt-get download` into directory; returns the .deb files."""
    run(
        ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", *packages],
        cwd=directory,
        stdout=subprocess.DEVNULL,
    )
    return sorted(directory.glob("*.deb"))


def fetch_kernel(work: Path) -> Path:
    """Download linux-image-amd64's kernel package and unpack it; returns the unpack dir."""
    meta_dir = work / "meta"
    meta_dir.mkdir()
    (meta,) = download(["linux-image-amd64"], meta_dir)
    depends = subprocess.run(
        ["dpkg-deb", "-f", str(meta), "Depends"], check=True, capture_output=True, text=True
    ).stdout
    match = re.search(r"(linux-image-[0-9][^\s,(]*)", depends)
    if not match:
        raise RuntimeError(f"cannot find the kernel package in {depends!r}")
    deb_dir = work / "debs"
    deb_dir.mkdir()
    debs = download([match.group(1), "busybox-static"], deb_dir)
    unpacked = work / "kernel"
    for deb in debs:
        run(["dpkg-deb", "-x", str(deb), str(unpacked)])
    return unpacked


def debootstrap(rootfs: Path, mirror: str) -> None:
    debs = CACHE_ROOT / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    run(
        [
            "debootstrap", "--variant=minbase", f"--cache-dir={debs}",
            "--include=" + ",".join(PACKAGES), SUITE, str(rootfs), mirror,
        ],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip


def install_kernel(kernel_dir: Path, rootfs: Path, out: Path) -> str:
    """Copy vmlinuz and the modules; returns the kernel version."""
    (vmlinuz,) = (kernel_dir / "boot").glob("vmlinuz-*")
    version = vmlinuz.name.removeprefix("vmlinuz-")
    shutil.copy(vmlinuz, out / "vmlinuz")
    modules = rootfs / "usr/lib/modules" / version
    modules.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(kernel_dir / "lib/modules" / version, modules, symlinks=True)
    run(["chroot", str(rootfs), "depmod", "-a", version])
    return version


def module_closure(modules_dir: Path, names: tuple[str, ...]) -> list[str]:
    """Module files (relative to modules_dir) for names and their dependencies, in load order."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        stem = Path(path).name.split(".ko")[0]
        by_name[stem.replace("-", "_")] = path
    builtin = (modules_dir / "modules.builtin").read_text()
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in reversed(deps[path]):
            visit(dep)
        order.append(path)

    for name in names:
        if name in by_name:
            visit(by_name[name])
        elif f"/{name}.ko" not in builtin.replace("-", "_"):
            raise RuntimeError(f"module {name} not found")
    return order


def cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (name, mode, data) entries; symlinks carry their target as data."""
    out = io.BytesIO()

    def add(ino: int, name: str, mode: int, data: bytes) -> None:
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        out.write(b"\0" * (-(110 + len(encoded)) % 4) + data + b"\0" * (-len(data) % 4))

    for ino, (name, mode, data) in enumerate(entries, start=1):
        add(ino, name, mode, data)
    add(0, "TRAILER!!!", 0, b"")
    return out.getvalue()


def build_initrd(kernel_dir: Path, rootfs: Path, version: str, target: Path) -> None:
    modules_dir = rootfs / "usr/lib/modules" / version
    entries: list[tuple[str, int, bytes]] = [
        ("bin", 0o40755, b""),
        ("modules", 0o40755, b""),
        ("init", 0o100755, (IMAGE_DIR / "init").read_bytes()),
        ("bin/busybox", 0o100755, (kernel_dir / "bin/busybox").read_bytes()),
    ]
    order = []
    for rel in module_closure(modules_dir, INITRD_MODULES):
        data = (modules_dir / rel).read_bytes()
        name = Path(rel).name
        if name.endswith(".xz"):
            data, name = lzma.decompress(data), name.removesuffix(".xz")
        entries.append((f"modules/{name}", 0o100644, data))
        order.append(name)
    entries.append(("modules/order", 0o100644, ("\n".join(order) + "\n").encode()))
    target.write_bytes(cpio_newc(entries))


def configure_rootfs(rootfs: Path) -> None:
    """Files and settings the guest needs to boot into the test run."""
    units = rootfs / "etc/systemd/system"
    for name in ("vdsmconn-test.target", "vdsmconn-guest.service"):
        shutil.copy(IMAGE_DIR / name, units / name)
    boot = rootfs / "usr/local/sbin/vdsmconn-guest-boot"
    shutil.copy(IMAGE_DIR / "vdsmconn-guest-boot", boot)
    boot.chmod(0o755)
    (rootfs / "etc/hostname").write_text("vdsmconn-guest\n")
    (rootfs / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 vdsmconn-guest\n")
    (rootfs / "etc/fstab").write_text("# root is mounted by the initrd\n")
    (rootfs / "etc/machine-id").write_text("")
    # The test fixtures start the servers themselves, with their own settings.
    for wants in (units / "multi-user.target.wants").glob("*"):
        wants.unlink()
    for path in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for item in (rootfs / path).glob("*"):
            if item.is_file():
                item.unlink()
    for path in ("usr/share/doc", "usr/share/man", "usr/share/locale"):
        shutil.rmtree(rootfs / path, ignore_errors=True)


def make_disk(rootfs: Path, target: Path) -> None:
    run(["truncate", "-s", IMAGE_SIZE, str(target)])
    run(["mkfs.ext4", "-q", "-F", "-L", "vdsmconn-root", "-d", str(rootfs), str(target)])


def unmount_below(directory: Path) -> None:
    """Lazily unmount every mount under directory, deepest first."""
    prefix = str(directory.resolve()) + "/"
    with open("/proc/self/mountinfo") as mountinfo:
        points = [line.split()[4] for line in mountinfo]
    for point in sorted((p for p in points if p.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "-l", point], check=False)


@contextlib.contextmanager
def build_lock() -> Iterator[None]:
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    with open(CACHE_ROOT / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build(force: bool = False) -> GuestImage:
    """Build the guest of the current recipe unless it is cached; returns it."""
    with build_lock():
        image = cached_image()
        if image is not None and not force:
            return image
        digest = recipe_hash()
        started = time.monotonic()
        with tempfile.TemporaryDirectory(dir=CACHE_ROOT, prefix=".build-") as tmp:
            work = Path(tmp)
            out = work / "out"
            out.mkdir()
            kernel: list[Path] = []
            fetcher = threading.Thread(target=lambda: kernel.append(fetch_kernel(work)))
            fetcher.start()
            try:
                debootstrap(work / "rootfs", debian_mirror())
            finally:
                fetcher.join()
                unmount_below(work / "rootfs")  # a failed debootstrap leaves proc/sys
            if not kernel:
                raise RuntimeError("downloading the kernel failed (see the log above)")
            version = install_kernel(kernel[0], work / "rootfs", out)
            build_initrd(kernel[0], work / "rootfs", version, out / "initrd.img")
            configure_rootfs(work / "rootfs")
            make_disk(work / "rootfs", out / "rootfs.img")
            (out / "kernel-version").write_text(version + "\n")
            (out / "complete").write_text(f"{time.monotonic() - started:.1f}\n")
            final = CACHE_ROOT / digest
            if final.exists():
                shutil.rmtree(final)
            out.rename(final)
        for old in CACHE_ROOT.iterdir():  # images of older recipes
            if old != final and re.fullmatch(r"[0-9a-f]{64}", old.name):
                shutil.rmtree(old, ignore_errors=True)
        log.info("BUILT %s in %.1fs", final, time.monotonic() - started)
        return image_for(final)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--print", action="store_true", help="print the image directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.monotonic()
    image = build(force=args.force)
    log.info("READY %s (%.1fs)", image.directory, time.monotonic() - started)
    if args.print:
        print(image.directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
