"""Deleted studies, on every backend: the index's hiding, tombstones and purge record (SQLite file, in Python and
with its C recorder, SQLite ``:memory:`` and PostgreSQL), and the state log in every blob store (file, memory, S3,
several copies) — :mod:`bastion.index.hidden`, :mod:`bastion.blobs.statelog`."""
# ruff: noqa: F811 - the tests take the imported ``index`` and ``store`` fixtures as parameters

from __future__ import annotations

import json

import pytest
from s3test import seaweed  # noqa: F401 - the session's SeaweedFS, for the "s3" store
from test_blobs import store  # noqa: F401 - the BlobStore fixture over every backend
from test_index import cond, index, obj  # noqa: F401 - the Index fixture over every backend

from bastion.blobs.base import BlobStore
from bastion.blobs.copies import Copies
from bastion.blobs.statelog import DELETE, PURGE, UNDELETE, StateLog, fold
from bastion.errors import StudyDeleted
from bastion.index import Index
from bastion.model.levels import QueryLevel
from bastion.model.records import StoredObject, StoreStatus

pytestmark = pytest.mark.timeout(60)


def _two_studies(index: Index) -> tuple[list[StoredObject], list[StoredObject]]:
    """Study 1.2.3 (patient P1: two instances, one with a superseded version) and study 1.2.4 (patient P2: one)."""
    a = [obj("1.2.3.1.1"), obj("1.2.3.1.2"), obj("1.2.3.1.1", content="v2")]
    b = [obj("1.2.4.1.1", series="1.2.4.1", study="1.2.4", patient="P2")]
    for o in [*a, *b]:
        index.record(o)
    return a, b


def _study_count(index: Index, study: str) -> int | None:
    found = index.find(QueryLevel.STUDY, [cond("StudyInstanceUID", study)])
    return None if not found else int(found[0]["00201208"]["Value"][0])


def test_a_hidden_study_leaves_the_query_tables(index: Index) -> None:
    a, b = _two_studies(index)
    before = index.statistics()
    changes = index.hide_study("1.2.3")
    assert sorted(c.sop_uid for c in changes) == ["1.2.3.1.1", "1.2.3.1.2"]
    assert {c.kind for c in changes} == {"deleted"} and {c.study_uid for c in changes} == {"1.2.3"}
    assert index.changes(before.last_change)[-2:] == changes
    assert _study_count(index, "1.2.3") is None and _study_count(index, "1.2.4") == 1
    assert index.find(QueryLevel.PATIENT, [cond("PatientID", "P1")]) == []
    assert index.instances(QueryLevel.STUDY, [cond("StudyInstanceUID", "1.2.3")]) == []
    assert index.current("1.2.3.1.1") is None and index.current("1.2.4.1.1") == b[0].instance
    st = index.statistics()
    assert (st.patients, st.studies, st.instances, st.versions) == (1, 1, 1, 0)
    # every version is kept for undelete and purge, oldest first, and held (recovery leaves it alone)
    keys = [o.instance.blob_key for o in a]
    assert index.hidden_versions("1.2.3") == sorted((o.stamp, o.instance.blob_key) for o in a)
    assert index.hidden_blobs([*keys, b[0].instance.blob_key, "x/y.dcm"]) == set(keys)
    assert index.held_blobs(keys) == set()
    assert index.hide_study("1.2.3") == []  # again: nothing left to hide


def test_a_new_arrival_into_a_deleted_study_is_refused_in_its_own_transaction(index: Index) -> None:
    _two_studies(index)
    index.set_tombstone("1.2.3", json.dumps({"study": "1.2.3"}))
    # between the tombstone and the hiding the study's row is there: the store is recorded, and the hiding takes it
    late = obj("1.2.3.1.3")
    assert index.record(late, keep_outdated=False)[0] is StoreStatus.STORED
    assert "1.2.3.1.3" in {c.sop_uid for c in index.hide_study("1.2.3")}
    before = index.statistics()
    for sop, series in (("1.2.3.1.4", "1.2.3.1"), ("1.2.3.2.1", "1.2.3.2")):
        with pytest.raises(StudyDeleted, match="1.2.3 is deleted"):
            index.record(obj(sop, series=series), keep_outdated=False)
    assert index.statistics() == before and index.current("1.2.3.1.4") is None
    assert late.instance.blob_key in {key for _, key in index.hidden_versions("1.2.3")}
    # another study of the same patient is not refused; nor is a version recorded again (undelete, rebuild)
    assert index.record(obj("1.2.5.1.1", series="1.2.5.1", study="1.2.5"), keep_outdated=False)[0] is StoreStatus.STORED
    assert index.record(late)[0] is StoreStatus.STORED


def test_undelete_records_the_kept_versions_again(index: Index) -> None:
    a, _ = _two_studies(index)
    found = index.find(QueryLevel.STUDY, [cond("StudyInstanceUID", "1.2.3")])
    index.hide_study("1.2.3")
    by_key = {o.instance.blob_key: o for o in a}
    statuses = index.record_many([by_key[key] for _, key in index.hidden_versions("1.2.3")])
    assert [s for s, _ in statuses] == [StoreStatus.STORED, StoreStatus.STORED, StoreStatus.SUPERSEDED]
    assert index.forget_hidden("1.2.3", purged=False) == []
    assert index.hidden_versions("1.2.3") == []
    assert index.find(QueryLevel.STUDY, [cond("StudyInstanceUID", "1.2.3")]) == found
    assert index.current("1.2.3.1.1") == a[2].instance
    assert index.statistics().versions == 1


def test_purge_records_a_deleted_change_per_instance(index: Index) -> None:
    _two_studies(index)
    index.hide_study("1.2.3")
    end = index.log_end().seq
    changes = index.forget_hidden("1.2.3", purged=True)
    assert [(c.kind, c.sop_uid, c.study_uid, c.series_uid) for c in changes] == [
        ("deleted", "1.2.3.1.1", "1.2.3", "1.2.3.1"), ("deleted", "1.2.3.1.2", "1.2.3", "1.2.3.1")]
    assert index.changes(end) == changes
    assert index.hidden_versions("1.2.3") == [] and index.forget_hidden("1.2.3", purged=True) == []


def test_tombstones_are_kept_replaced_and_dropped(index: Index) -> None:
    assert index.tombstone("1.2.3") is None and index.tombstones() == []
    index.set_tombstone("1.2.4", json.dumps({"study": "1.2.4", "state": "deleted"}))
    index.set_tombstone("1.2.3", json.dumps({"study": "1.2.3", "state": "deleted"}))
    index.set_tombstone("1.2.3", json.dumps({"study": "1.2.3", "state": "purged"}))
    assert json.loads(index.tombstone("1.2.3") or "")["state"] == "purged"
    assert [json.loads(t)["study"] for t in index.tombstones()] == ["1.2.3", "1.2.4"]
    index.set_tombstone("1.2.4", None)
    assert index.tombstone("1.2.4") is None and len(index.tombstones()) == 1


def test_clear_drops_tombstones_and_hidden_versions(index: Index) -> None:
    _two_studies(index)
    index.set_tombstone("1.2.3", "{}")
    index.hide_study("1.2.3")
    index.clear()
    assert index.tombstones() == [] and index.hidden_versions("1.2.3") == []


# -- the state log in the blob store(s) -------------------------------------------------------------------------
def test_the_state_log_is_written_once_per_entry_and_read_back_in_order(store: BlobStore) -> None:
    ticks = iter(range(1_800_000_000_000_000_000, 1_900_000_000_000_000_000, 1_000_000))
    log = StateLog(store, "node-a", clock=lambda: next(ticks))
    first = log.append(DELETE, "1.2.3", user="alice", reason="wrong patient", count=3, patient_id="P1")
    log.append(DELETE, "1.2.4", user="alice")
    log.append(UNDELETE, "1.2.4", user="bob")
    log.append(PURGE, "1.2.3", user="root", via="cli")
    keys = log.keys()
    assert len(keys) == 4 and all(k.startswith("state/node-a/") and k.endswith(".json") for k in keys)
    other = StateLog(store, "node-b", clock=lambda: next(ticks))  # a second node sharing the store
    other.append(DELETE, "1.2.5", reason="test")
    entries = StateLog(store).entries()
    assert [(e.action, e.study, e.node) for e in entries] == [
        (DELETE, "1.2.3", "node-a"), (DELETE, "1.2.4", "node-a"), (UNDELETE, "1.2.4", "node-a"),
        (PURGE, "1.2.3", "node-a"), (DELETE, "1.2.5", "node-b")]
    assert entries[0] == first and first.reason == "wrong patient" and first.count == 3
    state = fold(entries)
    assert set(state) == {"1.2.3", "1.2.5"}  # 1.2.4 was undeleted
    assert state["1.2.3"][0].action == PURGE and state["1.2.3"][1] == first
    if isinstance(store, Copies):
        for one in store.stores:
            assert sorted(one.keys("state/")) == sorted(store.keys("state/")), "an entry missing from a copy"


def test_an_unreadable_entry_is_left_out(store: BlobStore) -> None:
    StateLog(store, "n").append(DELETE, "1.2.3")
    store.put("state/n/00000000000000000001-bad.json", b"not json")
    store.put("state/n/00000000000000000002-odd.json", json.dumps({"action": "explode", "study": "x"}).encode())
    assert [e.study for e in StateLog(store).entries()] == ["1.2.3"]


def test_destroy_removes_the_object(store: BlobStore) -> None:
    store.put("a/b.dcm", b"bytes")
    store.destroy("a/b.dcm")
    assert not store.exists("a/b.dcm")
    store.destroy("a/b.dcm")  # missing is fine
