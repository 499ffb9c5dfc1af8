#!/usr/bin/env bash
# Install everything the tests need (Debian packages, Python packages) and run them all:
# lint, type check, unit and integration tests against real mounts, and the test guest.
set -euo pipefail
PIP_EXTRAS="[test]"
# qemu and friends boot the test guest (tests/guest): a stock Debian kernel for NFS, iSCSI,
# multipath, bonding and systemd as PID 1, which this machine's own kernel lacks.
# nfs-ganesha and rpcbind serve NFS from a network namespace for connectivity tests.
EXTRA_APT_PACKAGES="qemu-system-x86 qemu-utils debootstrap dpkg apt ca-certificates
    debian-archive-keyring nfs-common nfs-ganesha nfs-ganesha-vfs rpcbind nftables"
. "$(dirname "$0")/setup-env.sh"
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -ra "$@"
