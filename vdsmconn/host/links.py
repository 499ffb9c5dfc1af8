"""Symbolic links the daemon owns (localfs links, managed-volume links). Blocking: call
them through a thread."""

from __future__ import annotations

import contextlib
import os

from vdsmconn import errors


def make_link(target: str, link: str) -> None:
    """Point `link` at `target`, atomically replacing a link that points elsewhere."""
    os.makedirs(os.path.dirname(link), 0o755, exist_ok=True)
    try:
        current: str | None = os.readlink(link)
    except FileNotFoundError:
        current = None  # nothing there yet: created below
    except OSError as e:
        raise errors.ConnectError(f"{link} exists and is not a link") from e
    if current == target:
        return
    tmp = f"{link}.vdsmconn-tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def remove_link(link: str, target: str | None = None) -> None:
    """Remove `link` (only if it points at `target`, when given); gone already is fine."""
    try:
        if target is not None and os.readlink(link) != target:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(link)
    except FileNotFoundError:
        return
    except OSError as e:
        raise errors.DisconnectError(f"cannot remove {link}: {e.strerror}") from e
