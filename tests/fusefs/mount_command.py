#!/usr/bin/env python3
"""A `mount_command` for tests: `-t fuse.vcfuse [-o OPTS] SOURCE TARGET` starts vcfuse
(mount(8)'s fuse helper would look for the file system program in a PATH we cannot set);
anything else goes to mount(8) unchanged."""

import os
import sys

args = sys.argv[1:]
if len(args) >= 4 and args[:2] == ["-t", "fuse.vcfuse"]:
    vcfuse = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vcfuse.py")
    os.execv(vcfuse, [vcfuse, args[-2], args[-1]])
os.execvp("mount", ["mount", *args])
