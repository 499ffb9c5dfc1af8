# Sourced by the run-*.sh scripts: Debian packages and the project's virtual environment.
# Usage: . contrib/setup-env.sh [extra pip spec]   (as root, on Debian 12)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# What the backends run on the host, so `vdsmconn info` shows each one available unless the
# kernel lacks its part: NFS (nfs-common: mount.nfs), GlusterFS (glusterfs-client over FUSE),
# iSCSI (open-iscsi's iscsiadm; libiscsi-bin's iscsi-inq for testStorageServer), multipath
# and LVM (block devices and block storage domains). The Debian package depends on the same.
BACKEND_APT_PACKAGES="nfs-common glusterfs-client fuse3 open-iscsi libiscsi-bin
    multipath-tools lvm2"
APT_PACKAGES="python3 python3-venv util-linux mount xfsprogs e2fsprogs $BACKEND_APT_PACKAGES"

missing=""
for p in $APT_PACKAGES ${EXTRA_APT_PACKAGES:-}; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    [ "$(id -u)" = 0 ] || { echo "run as root (apt packages needed:$missing)" >&2; exit 1; }
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# One install gives the whole daemon (os-brick and pyudev included); PIP_EXTRAS adds the
# test tools.
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${PIP_EXTRAS:-}"
