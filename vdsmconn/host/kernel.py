"""What the running kernel can do for a backend: file system types and modules.

A backend whose tools are installed still cannot work when the kernel lacks its part (an NFS
client, an iSCSI transport): `getHostInfo` says so instead of failing every connect. The
files read are small and never block (procfs, sysfs, the module index of the kernel).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Kernel:
    proc: str = "/proc"
    sys: str = "/sys"
    modules: str = "/lib/modules"

    @property
    def release(self) -> str:
        return os.uname().release

    def _read(self, path: str) -> str:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def has_module(self, name: str) -> bool:
        """Loaded, built in, or loadable from the module tree of the running kernel."""
        if os.path.isdir(os.path.join(self.sys, "module", name)):
            return True
        tree = os.path.join(self.modules, self.release)
        wanted = {name, name.replace("_", "-")}
        for index in ("modules.builtin", "modules.dep"):
            for line in self._read(os.path.join(tree, index)).splitlines():
                path = line.split(":", 1)[0]
                base = os.path.basename(path).split(".ko", 1)[0]
                if base in wanted:
                    return True
        return False

    def has_filesystem(self, fstype: str) -> bool:
        """The kernel mounts `fstype` now, or can load its module."""
        for line in self._read(os.path.join(self.proc, "filesystems")).splitlines():
            if line.split()[-1:] == [fstype]:
                return True
        return self.has_module(fstype)

    def missing_filesystem(self, fstype: str, what: str) -> str | None:
        """None if the kernel has `fstype`, else the reason a backend cannot work here."""
        if self.has_filesystem(fstype):
            return None
        return (f"no {what} in this kernel ({fstype} is neither registered nor a module of "
                f"{self.release})")

    def missing_module(self, module: str, what: str) -> str | None:
        if self.has_module(module):
            return None
        return (f"no {what} in this kernel ({module} is neither loaded nor a module of "
                f"{self.release})")
