#!/usr/bin/env bash
# Install everything the tests need (Debian packages, Python packages) and run them all:
# lint, type check, unit and integration tests against real mounts, and the test guest.
set -euo pipefail
PIP_EXTRAS="[test]"
# qemu and friends boot the test guest (tests/guest): a stock Debian kernel for NFS, iSCSI,
# multipath, bonding and systemd as PID 1, which this machine's own kernel lacks.
# nfs-ganesha and rpcbind serve NFS, glusterd a volume, from network namespaces; dbus-daemon
# is a private bus for the systemd scope tests; open-iscsi gives os-brick its iscsiadm;
# prometheus brings promtool and a real server to scrape the daemon; tgt and libiscsi-bin
# are an iSCSI target and a userspace initiator for the iSCSI tests on this kernel; lvm2
# reads volume groups on loop devices (block storage domains). The packages
# (contrib/packaging) are built with debhelper, dh-python and dpkg-dev (and the build
# dependency python3-yaml) and checked with lintian, the RPM
# with rpm's rpmbuild and rpmlint; groff-base and man-db render the man pages.
EXTRA_APT_PACKAGES="qemu-system-x86 qemu-utils debootstrap dpkg apt ca-certificates
    debian-archive-keyring nfs-common nfs-ganesha nfs-ganesha-vfs rpcbind nftables
    glusterfs-server glusterfs-client fuse3 dbus-daemon iproute2 open-iscsi
    prometheus openssl systemd tgt libiscsi-bin lvm2
    debhelper dh-python dpkg-dev python3-yaml lintian
    rpm rpmlint groff-base man-db"
. "$(dirname "$0")/setup-env.sh"
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -ra "$@"
