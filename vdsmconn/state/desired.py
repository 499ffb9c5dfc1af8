"""Desired state: CID -> connection, and the refcounts of keys. Pure: no I/O.

Every change is checked (`check_*`), then applied (`apply_*`) before it is written to disk,
so the next request is checked against it; the caller undoes it if the write fails. The
caller serializes changes per CID, which makes the undo exact. Keys a change may leave
without a CID are `held` until it is durable: nothing may tear them down before.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from vdsmconn import errors
from vdsmconn.model import ConnectionKey, ConnectionSpec


@dataclass(frozen=True)
class Entry:
    cid: str
    spec: ConnectionSpec

    @property
    def key(self) -> ConnectionKey:
        return self.spec.key


class DesiredState:
    def __init__(self) -> None:
        self._cids: dict[str, Entry] = {}
        self._keys: dict[ConnectionKey, set[str]] = {}
        self._held: dict[ConnectionKey, int] = {}

    # --- queries -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._cids)

    def __iter__(self) -> Iterator[Entry]:
        return iter(list(self._cids.values()))

    def get(self, cid: str) -> Entry | None:
        return self._cids.get(cid)

    def refs(self, key: ConnectionKey) -> int:
        return len(self._keys.get(key, ()))

    def cids_of(self, key: ConnectionKey) -> list[str]:
        return sorted(self._keys.get(key, ()))

    def all_keys(self) -> list[ConnectionKey]:
        return list(self._keys)

    def spec_of(self, key: ConnectionKey) -> ConnectionSpec | None:
        cids = self._keys.get(key)
        if not cids:
            return None
        return self._cids[next(iter(cids))].spec

    def held(self, key: ConnectionKey) -> bool:
        """True while a change that may still be undone has taken CIDs from `key`."""
        return key in self._held

    def hold(self, keys: Iterable[ConnectionKey]) -> None:
        """Hold `keys` while a change that may leave them without a CID is made durable."""
        for key in keys:
            self._held[key] = self._held.get(key, 0) + 1

    def unhold(self, keys: Iterable[ConnectionKey]) -> None:
        for key in keys:
            self._held[key] -= 1
            if not self._held[key]:
                del self._held[key]

    def with_prefix(self, prefix: str) -> list[str]:
        return sorted(cid for cid in self._cids if cid.startswith(prefix))

    # --- checks (raise the error the client gets) --------------------------------------

    def check_manage(self, cid: str, spec: ConnectionSpec) -> bool:
        """True if this is new; False if the CID already holds this very connection."""
        current = self._cids.get(cid)
        if current is not None:
            if current.spec == spec:
                return False
            raise errors.ConnectionIdInUse(
                f"connection ID {cid!r} already refers to {current.key}",
                {"connectionID": cid, "key": str(current.key)},
            )
        self._check_conflict(spec, ignore=None)
        return True

    def check_update(self, cid: str, spec: ConnectionSpec) -> bool:
        """True if the CID changes; False if it already holds this connection."""
        current = self._require(cid)
        if current.spec == spec:
            return False
        self._check_conflict(spec, ignore=cid)
        return True

    def check_unmanage(self, cid: str) -> Entry:
        return self._require(cid)

    def _require(self, cid: str) -> Entry:
        entry = self._cids.get(cid)
        if entry is None:
            raise errors.ConnectionIdNotFound(
                f"connection ID {cid!r} is not managed", {"connectionID": cid}
            )
        return entry

    def _check_conflict(self, spec: ConnectionSpec, ignore: str | None) -> None:
        # Every CID of a key holds the same spec, so one other CID is enough (O(1)).
        other = next((c for c in self._keys.get(spec.key, ()) if c != ignore), None)
        if other is None:
            return
        if self._cids[other].spec != spec:
            raise errors.ConnectionConflict(
                f"key {spec.key} is managed with different connection parameters"
                f" (by {other!r})",
                {"key": str(spec.key), "connectionID": other},
            )

    # --- changes --------------------------------------------------------------------------

    def apply_put(self, cid: str, spec: ConnectionSpec) -> ConnectionKey | None:
        """Set CID -> spec; returns the key the CID left, if it moved.

        The CIDs of one key share one spec object where theirs are the same (the engine's
        id included): a CID then costs an entry, where it kept a spec, its dict and its key
        for the memory and for every pass of the garbage collector."""
        old = self._cids.get(cid)
        cids = self._keys.setdefault(spec.key, set())
        other = next(iter(cids), None)  # every CID of a key holds an equal spec
        if other is not None:
            shared = self._cids[other].spec
            if shared == spec and shared.engine_id == spec.engine_id:
                spec = shared
        self._cids[cid] = Entry(cid, spec)
        cids.add(cid)
        if old is not None and old.key != spec.key:
            self._drop_ref(old.key, cid)
            return old.key
        return None

    def apply_delete(self, cid: str) -> ConnectionKey | None:
        entry = self._cids.pop(cid, None)
        if entry is None:
            return None
        self._drop_ref(entry.key, cid)
        return entry.key

    def _drop_ref(self, key: ConnectionKey, cid: str) -> None:
        cids = self._keys.get(key)
        if cids is None:
            return
        cids.discard(cid)
        if not cids:
            del self._keys[key]
