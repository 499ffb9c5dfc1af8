"""The core daemon's integration suite, run again inside the guest on a stock Debian kernel
with systemd as PID 1: posixfs, localfs, shared keys, restart adoption, repair."""

from __future__ import annotations

import pytest

from tests.integration import test_daemon_mounts as mounts

pytestmark = pytest.mark.guest

test_tmpfs = mounts.test_tmpfs_manage_mounts_and_unmanage_unmounts
test_localfs = mounts.test_localfs_links_directory
test_shared_key = mounts.test_two_cids_share_one_mount_and_last_unmanage_unmounts
test_kill9_adoption = mounts.test_kill9_restart_adopts_mount_without_remount
test_sigterm_leaves_mounts = mounts.test_sigterm_leaves_mounts_in_place
test_external_umount = mounts.test_external_umount_is_repaired
test_xfs_on_loop = mounts.test_xfs_on_loop_device
