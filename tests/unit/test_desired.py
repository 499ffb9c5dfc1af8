"""Desired state: refcounts, idempotent manage, 478/453/479, undo of failed writes."""

from __future__ import annotations

import pytest

from vdsmconn import errors
from vdsmconn.model import PosixSpec
from vdsmconn.state.desired import DesiredState

A = PosixSpec(connection="srv:/a", vfs_type="nfs")
A_OTHER_OPTIONS = PosixSpec(connection="srv:/a", vfs_type="nfs", mnt_options="ro")
B = PosixSpec(connection="srv:/b", vfs_type="nfs")


def test_refs_count_cids_per_key() -> None:
    d = DesiredState()
    for cid in ("c1", "c2", "c3"):
        assert d.check_manage(cid, A)
        d.apply_put(cid, A)
    assert d.refs(A.key) == 3 and d.cids_of(A.key) == ["c1", "c2", "c3"]
    assert d.apply_delete("c2") == A.key
    assert d.refs(A.key) == 2
    d.apply_delete("c1")
    d.apply_delete("c3")
    assert d.refs(A.key) == 0 and d.spec_of(A.key) is None and d.all_keys() == []


def test_cids_of_a_key_share_one_spec_unless_the_engine_id_differs() -> None:
    d = DesiredState()
    d.apply_put("c1", PosixSpec(connection="srv:/a", vfs_type="nfs", engine_id="e1"))
    d.apply_put("c2", PosixSpec(connection="srv:/a", vfs_type="nfs", engine_id="e1"))
    d.apply_put("c3", PosixSpec(connection="srv:/a", vfs_type="nfs", engine_id="e3"))
    c1, c2, c3 = (d.get(cid) for cid in ("c1", "c2", "c3"))
    assert c1 is not None and c2 is not None and c3 is not None
    assert c2.spec is c1.spec
    assert c3.spec is not c1.spec and c3.spec.engine_id == "e3"
    d.apply_delete("c1")
    assert c2.spec.engine_id == "e1" and d.refs(A.key) == 2


def test_same_cid_same_connection_is_idempotent() -> None:
    d = DesiredState()
    d.apply_put("c", A)
    assert d.check_manage("c", A) is False
    assert d.refs(A.key) == 1


def test_same_cid_other_connection_is_478() -> None:
    d = DesiredState()
    d.apply_put("c", A)
    with pytest.raises(errors.ConnectionIdInUse) as e:
        d.check_manage("c", B)
    assert e.value.code == 478


def test_same_key_different_parameters_is_453() -> None:
    d = DesiredState()
    d.apply_put("c1", A)
    with pytest.raises(errors.ConnectionConflict) as e:
        d.check_manage("c2", A_OTHER_OPTIONS)
    assert e.value.code == 453


def test_update_of_only_cid_may_change_parameters_of_its_key() -> None:
    d = DesiredState()
    d.apply_put("c1", A)
    assert d.check_update("c1", A_OTHER_OPTIONS)
    d.apply_put("c2", A)
    with pytest.raises(errors.ConnectionConflict):
        d.check_update("c1", A_OTHER_OPTIONS)


def test_update_moves_cid_between_keys() -> None:
    d = DesiredState()
    d.apply_put("c", A)
    assert d.apply_put("c", B) == A.key
    assert d.refs(A.key) == 0 and d.refs(B.key) == 1


def test_unknown_cid_is_479() -> None:
    d = DesiredState()
    with pytest.raises(errors.ConnectionIdNotFound) as e:
        d.check_unmanage("nope")
    assert e.value.code == 479
    with pytest.raises(errors.ConnectionIdNotFound):
        d.check_update("nope", A)


def test_prefix_selects_cids() -> None:
    d = DesiredState()
    for cid in ("FLOW1_a", "FLOW1_b", "FLOW10_a", "OTHER"):
        d.apply_put(cid, A)
    assert d.with_prefix("FLOW1_") == ["FLOW1_a", "FLOW1_b"]
    assert d.with_prefix("FLOW1") == ["FLOW10_a", "FLOW1_a", "FLOW1_b"]
