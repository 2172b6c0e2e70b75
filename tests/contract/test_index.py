"""The Index contract, run against every backend: SQLite on a file (its common record in C where ``_crecord`` is
built, and all in Python), SQLite ``:memory:`` and PostgreSQL (a schema of its own in the test database)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import socket
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from io import BytesIO
from pathlib import Path
from typing import Any

import psycopg
import pydicom
import pytest
from conftest import make_study
from pgtest import POSTGRESQL, admin, pg_url, with_schema

from bastion.blobs.memory import MemoryBlobStore
from bastion.errors import IndexFailure
from bastion.index import Change, Index, LogPosition, log_floor, open_index
from bastion.index.postgresql import rebuild_in_place
from bastion.ingest.pipeline import Ingest
from bastion.ingest.rebuild import rebuild
from bastion.model.attributes import tag_hex, tag_of, vr_of
from bastion.model.levels import QueryLevel
from bastion.model.matching import Condition, parse_condition
from bastion.model.records import InstanceRecord, StoredObject, StoreStatus

pytestmark = pytest.mark.timeout(20)

CT, MR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT = "1.2.840.10008.1.2.1"
_stamp = iter(range(1_700_000_000_000_000_000, 1_800_000_000_000_000_000, 1_000))


@pytest.fixture(params=["file", "file-python", "memory", "postgresql"])
def index(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Index]:
    with contextlib.ExitStack() as stack:
        if request.param == "postgresql":
            location = stack.enter_context(pg_url())
        else:
            location = str(tmp_path / "index.sqlite3") if request.param != "memory" else ":memory:"
        idx = open_index(location)
        if request.param == "file-python" and idx._recorder is not None:  # type: ignore[attr-defined]
            idx._recorder.close()  # type: ignore[attr-defined]
            idx._recorder = None  # type: ignore[attr-defined]
        yield idx
        idx.close()


def _el(keyword: str, value: Any) -> tuple[str, dict[str, Any]]:
    vr = vr_of(tag_of(keyword))
    v = {"Alphabetic": value} if vr == "PN" else value
    return tag_hex(tag_of(keyword)), {"vr": vr, "Value": [v]}


def obj(sop: str, series: str = "1.2.3.1", study: str = "1.2.3", *, patient: str = "P1", name: str = "Doe^John",
        date: str = "20200101", modality: str = "CT", number: int = 1, sop_class: str = CT,
        content: str = "v1") -> StoredObject:
    """A StoredObject as ingest would record it; ``content`` stands in for the file's bytes."""
    sha = hashlib.sha256(f"{sop}:{content}".encode()).hexdigest()
    stamp = f"{next(_stamp):020d}"
    key = f"2024/01/01/00/{sop}_{stamp}_{sha}.dcm"
    attrs = {
        QueryLevel.PATIENT: dict([_el("PatientID", patient), _el("PatientName", name)]),
        QueryLevel.STUDY: dict([_el("StudyInstanceUID", study), _el("StudyDate", date),
                                _el("StudyDescription", f"desc {content}")]),
        QueryLevel.SERIES: dict([_el("SeriesInstanceUID", series), _el("Modality", modality),
                                 _el("SeriesNumber", 1)]),
        QueryLevel.IMAGE: dict([_el("SOPInstanceUID", sop), _el("SOPClassUID", sop_class),
                                _el("InstanceNumber", number)]),
    }
    record = InstanceRecord(sop, sop_class, series, study, EXPLICIT, key, sha, 1000 + len(content))
    return StoredObject(record, patient, stamp, attrs)


def cond(keyword: str, value: str) -> Condition:
    tag = tag_of(keyword)
    return parse_condition(keyword, tag, vr_of(tag), value)


def _values(results: list[dict[str, Any]], keyword: str) -> list[Any]:
    out = []
    for r in results:
        v = r[tag_hex(tag_of(keyword))].get("Value", [None])
        out.append(v if len(v) > 1 else v[0])
    return out


def test_new_index_is_empty(index: Index) -> None:
    st = index.statistics()
    assert (st.patients, st.studies, st.series, st.instances, st.versions, st.last_change) == (0, 0, 0, 0, 0, 0)
    assert index.find(QueryLevel.STUDY, []) == []
    assert index.changes() == []


def test_in_memory_indexes_do_not_share_data() -> None:
    a = open_index(":memory:")
    try:
        a.record(obj("9.9.1"))
        b = open_index(":memory:")
        try:
            assert b.statistics().instances == 0, "two in-memory indexes share one database"
        finally:
            b.close()
    finally:
        a.close()


def test_stored(index: Index) -> None:
    o = obj("1.2.3.1.1")
    status, seq = index.record(o)
    assert status is StoreStatus.STORED and seq is not None and seq > 0
    assert index.current("1.2.3.1.1") == o.instance
    assert index.current("1.2.3.1.2") is None
    st = index.statistics()
    assert (st.patients, st.studies, st.series, st.instances, st.versions) == (1, 1, 1, 1, 0)
    assert st.stored_bytes == o.instance.size
    assert index.has_blob(o.instance.blob_key) and not index.has_blob("nope")
    assert index.last_stamp() == o.stamp


def test_duplicate(index: Index) -> None:
    o = obj("1.2.3.1.1")
    index.record(o)
    last = index.statistics().last_change
    again = obj("1.2.3.1.1")  # same bytes (same SHA-256), later stamp
    assert index.record(again) == (StoreStatus.DUPLICATE, None)
    st = index.statistics()
    assert (st.instances, st.versions, st.last_change) == (1, 0, last)
    assert index.current("1.2.3.1.1") == o.instance


def _with_digest(o: StoredObject, digest: str) -> StoredObject:
    return dataclasses.replace(o, instance=dataclasses.replace(o.instance, digest=digest))


def test_a_version_named_by_an_older_digest_is_compared_by_content(index: Index) -> None:
    """The version a re-sent object meets may carry a SHA-256 digest (stored before BLAKE3): ``same_content``
    decides whether the new copy is a duplicate. Against a BLAKE3 digest it is not asked."""
    legacy = obj("1.2.3.1.1")  # the helper's digests are bare SHA-256, as such objects have
    index.record(legacy)
    asked: list[str] = []

    def same(stored: str) -> bool:
        asked.append(stored)
        return True

    resent = _with_digest(obj("1.2.3.1.1"), "b3-" + "1" * 64)
    assert index.record(resent, None, same) == (StoreStatus.DUPLICATE, None)
    assert asked == [legacy.instance.digest] and index.current("1.2.3.1.1") == legacy.instance
    changed = _with_digest(obj("1.2.3.1.1", content="v2"), "b3-" + "2" * 64)
    assert index.record(changed, None, lambda stored: False)[0] is StoreStatus.SUPERSEDED
    asked.clear()
    newer = _with_digest(obj("1.2.3.1.1", content="v3"), "b3-" + "3" * 64)
    assert index.record(newer, None, same)[0] is StoreStatus.SUPERSEDED and asked == []
    assert index.current("1.2.3.1.1") == newer.instance


def test_superseded(index: Index) -> None:
    old = obj("1.2.3.1.1", content="v1")
    new = obj("1.2.3.1.1", content="v2")
    index.record(old)
    status, seq = index.record(new)
    assert status is StoreStatus.SUPERSEDED and seq is not None
    assert index.current("1.2.3.1.1") == new.instance
    st = index.statistics()
    assert (st.instances, st.versions) == (1, 1)
    assert st.stored_bytes == old.instance.size + new.instance.size
    versions = {v.blob_key: v.current for v in index.versions()}
    assert versions == {old.instance.blob_key: False, new.instance.blob_key: True}
    kinds = [(c.kind, c.blob_key) for c in index.changes()]
    assert kinds == [("stored", old.instance.blob_key), ("superseded", old.instance.blob_key),
                     ("stored", new.instance.blob_key)]
    assert index.has_blob(old.instance.blob_key)
    # The study's attributes are now those of the current version.
    (study,) = index.find(QueryLevel.STUDY, [])
    assert _values([study], "StudyDescription") == ["desc v2"]


def test_superseded_into_another_series_moves_the_counts(index: Index) -> None:
    index.record(obj("1.2.3.1.1", series="1.2.3.1"))
    index.record(obj("1.2.3.1.1", series="1.2.3.2", content="moved"))
    st = index.statistics()
    assert (st.series, st.instances, st.versions) == (1, 1, 1)
    assert _values(index.find(QueryLevel.SERIES, []), "SeriesInstanceUID") == ["1.2.3.2"]


def test_counts_across_levels(index: Index) -> None:
    index.record(obj("1.1.1.1", series="1.1.1", study="1.1", patient="P1", modality="CT"))
    index.record(obj("1.1.1.2", series="1.1.1", study="1.1", patient="P1", modality="CT", number=2))
    index.record(obj("1.1.2.1", series="1.1.2", study="1.1", patient="P1", modality="PT", sop_class=MR))
    index.record(obj("2.1.1.1", series="2.1.1", study="2.1", patient="P1", date="20210101"))
    index.record(obj("3.1.1.1", series="3.1.1", study="3.1", patient="P2", name="Roe^Jane"))
    st = index.statistics()
    assert (st.patients, st.studies, st.series, st.instances) == (2, 3, 4, 5)

    (p1,) = index.find(QueryLevel.PATIENT, [cond("PatientID", "P1")])
    assert _values([p1], "NumberOfPatientRelatedStudies") == [2]
    assert _values([p1], "NumberOfPatientRelatedSeries") == [3]
    assert _values([p1], "NumberOfPatientRelatedInstances") == [4]

    (s11,) = index.find(QueryLevel.STUDY, [cond("StudyInstanceUID", "1.1")])
    assert _values([s11], "NumberOfStudyRelatedSeries") == [2]
    assert _values([s11], "NumberOfStudyRelatedInstances") == [3]
    assert sorted(_values([s11], "ModalitiesInStudy")[0]) == ["CT", "PT"]
    assert sorted(_values([s11], "SOPClassesInStudy")[0]) == sorted([CT, MR])
    assert _values([s11], "PatientName") == [{"Alphabetic": "Doe^John"}]  # parents' attributes included

    series = index.find(QueryLevel.SERIES, [cond("StudyInstanceUID", "1.1")])
    assert dict(zip(_values(series, "SeriesInstanceUID"), _values(series, "NumberOfSeriesRelatedInstances"),
                    strict=True)) == {"1.1.1": 2, "1.1.2": 1}


def test_study_search_by_name_follows_a_renamed_patient(index: Index) -> None:
    """A patient's name as its latest instance gives it is what every one of its studies matches (PostgreSQL keeps
    the name on each study row too: all of them follow a rename)."""
    index.record(obj("1.1.1.1", series="1.1.1", study="1.1", date="20190101", name="Doe^John"))
    index.record(obj("2.1.1.1", series="2.1.1", study="2.1", date="20200101", name="Doe^John"))
    index.record(obj("3.1.1.1", series="3.1.1", study="3.1", patient="P3", name="Doe^Jane"))

    def studies(name: str) -> list[str]:
        return sorted(_values(index.find(QueryLevel.STUDY, [cond("PatientName", name)]), "StudyInstanceUID"))

    assert studies("doe^john") == ["1.1", "2.1"]
    index.record(obj("4.1.1.1", series="4.1.1", study="4.1", date="20210101", name="Roe^John"))  # renamed
    assert studies("doe^john") == []
    assert studies("ROE*") == ["1.1", "2.1", "4.1"]
    assert studies("Roe^John") == ["1.1", "2.1", "4.1"]
    assert studies("d*") == ["3.1"]
    assert _values(index.find(QueryLevel.STUDY, [cond("PatientName", "r*")], limit=2), "StudyDate") == [
        "20210101", "20200101"]


def test_find_matching(index: Index) -> None:
    index.record(obj("1.1.1.1", series="1.1.1", study="1.1", date="20191231", name="Doe^John"))
    index.record(obj("2.1.1.1", series="2.1.1", study="2.1", date="20200101", patient="P2", name="Dole^Jane",
                     modality="MR"))
    index.record(obj("3.1.1.1", series="3.1.1", study="3.1", date="20200615", patient="P3", name="Smith^Anna"))

    def studies(*conditions: Condition) -> list[str]:
        return sorted(_values(index.find(QueryLevel.STUDY, list(conditions)), "StudyInstanceUID"))

    assert studies() == ["1.1", "2.1", "3.1"]
    assert studies(cond("StudyDate", "20200101")) == ["2.1"]
    assert studies(cond("StudyDate", "20200101-")) == ["2.1", "3.1"]
    assert studies(cond("StudyDate", "-20200101")) == ["1.1", "2.1"]
    assert studies(cond("StudyInstanceUID", "1.1\\3.1")) == ["1.1", "3.1"]
    assert studies(cond("PatientName", "do*")) == ["1.1", "2.1"]
    assert studies(cond("PatientName", "D?e^*")) == ["1.1"]
    assert studies(cond("ModalitiesInStudy", "MR")) == ["2.1"]
    assert studies(cond("StudyDescription", "desc*")) == ["1.1", "2.1", "3.1"]  # not a column: matched in Python
    assert studies(cond("StudyDate", "20200101-"), cond("PatientName", "Smith*")) == ["3.1"]
    # Dates descending is the documented study order.
    assert _values(index.find(QueryLevel.STUDY, []), "StudyDate") == ["20200615", "20200101", "20191231"]
    assert len(index.find(QueryLevel.STUDY, [], limit=2)) == 2
    assert _values(index.find(QueryLevel.STUDY, [], limit=2, offset=2), "StudyInstanceUID") == ["1.1"]
    assert len(index.find(QueryLevel.STUDY, [cond("StudyDescription", "desc*")], limit=1, offset=1)) == 1
    # Paging a condition matched in Python (fuzzy person name) gives slices of the same order as SQL paging.
    fuzzy = parse_condition("PatientName", tag_of("PatientName"), "PN", "d", fuzzy=True)
    whole = _values(index.find(QueryLevel.STUDY, [fuzzy]), "StudyInstanceUID")
    assert whole == ["2.1", "1.1"]
    for limit in range(4):
        for offset in range(4):
            page = index.find(QueryLevel.STUDY, [fuzzy], limit=limit, offset=offset)
            assert _values(page, "StudyInstanceUID") == whole[offset: offset + limit]
    images = index.find(QueryLevel.IMAGE, [cond("SOPInstanceUID", "2.1.1.1")])
    assert _values(images, "AvailableTransferSyntaxUID") == [EXPLICIT]


def test_instances_for_retrieval(index: Index) -> None:
    a = obj("1.1.1.1", series="1.1.1", study="1.1")
    b = obj("1.1.2.1", series="1.1.2", study="1.1")
    c = obj("2.1.1.1", series="2.1.1", study="2.1")
    for o in (a, b, c):
        index.record(o)
    assert sorted(index.instances(QueryLevel.STUDY, [cond("StudyInstanceUID", "1.1")]),
                  key=lambda r: r.sop_uid) == [a.instance, b.instance]
    assert index.instances(QueryLevel.SERIES, [cond("SeriesInstanceUID", "2.1.1")]) == [c.instance]
    assert index.instances(QueryLevel.IMAGE, [cond("SOPInstanceUID", "9.9")]) == []


def test_changes_paging(index: Index) -> None:
    for i in range(5):
        index.record(obj(f"1.2.3.1.{i + 1}"))
    changes = index.changes()
    assert [c.seq for c in changes] == sorted(c.seq for c in changes) and len(changes) == 5
    assert all(c.kind == "stored" and c.study_uid == "1.2.3" for c in changes)
    page = index.changes(since=changes[1].seq, limit=2)
    assert [c.sop_uid for c in page] == ["1.2.3.1.3", "1.2.3.1.4"]
    assert index.statistics().last_change == changes[-1].seq


def test_record_many_and_clear(index: Index) -> None:
    objs = [obj("1.2.3.1.1"), obj("1.2.3.1.2"), obj("1.2.3.1.1", content="v2")]
    statuses = [s for s, _ in index.record_many(objs)]
    assert statuses == [StoreStatus.STORED, StoreStatus.STORED, StoreStatus.SUPERSEDED]
    last = index.statistics().last_change
    index.clear()
    st = index.statistics()
    assert (st.instances, st.versions) == (0, 0) and st.last_change >= last  # the log never goes back
    assert list(index.versions()) == [] and index.changes() == []


def test_file_index_survives_reopening(tmp_path: Path) -> None:
    path = str(tmp_path / "index.sqlite3")
    idx = open_index(path)
    o = obj("1.2.3.1.1")
    idx.record(o)
    idx.close()
    idx = open_index(path)
    try:
        assert idx.current("1.2.3.1.1") == o.instance
        assert idx.statistics().instances == 1
    finally:
        idx.close()


def test_integers_beyond_64_bits_are_refused_in_queries_and_dropped_from_columns(index: Index) -> None:
    """An InstanceNumber past SQLite's integers (hypothesis found QIDO answering 500 for 2**63)."""
    from bastion.errors import InvalidQuery

    index.record(obj("1.1.1.1", number=2**64))  # a malformed header: stored, its number not sortable
    index.record(obj("1.1.1.2", number=7))
    found = index.find(QueryLevel.IMAGE, [cond("SeriesInstanceUID", "1.2.3.1")])
    assert sorted(_values(found, "SOPInstanceUID")) == ["1.1.1.1", "1.1.1.2"]
    assert _values(index.find(QueryLevel.IMAGE, [cond("InstanceNumber", "7")]), "SOPInstanceUID") == ["1.1.1.2"]
    for value in (str(2**63), str(-(2**63) - 1), f"1\\{2**70}"):
        with pytest.raises(InvalidQuery, match="out of range"):
            index.find(QueryLevel.IMAGE, [cond("InstanceNumber", value)])


def test_the_wal_stays_bounded_while_commits_keep_coming(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that never pauses (a scanner, a migration): no passive checkpoint catches up with it, and the WAL
    grew by every commit (158 MB after 5,000 small instances) until the first pause. The checkpoint thread holds
    the writers while it copies, so it copies every frame, and the next commit starts the WAL over."""
    from bastion.index import sqlite_writer

    monkeypatch.setattr(sqlite_writer, "_CHECKPOINT_S", 0.02, raising=False)
    path = tmp_path / "index.sqlite3"
    idx = open_index(str(path))
    wal = Path(f"{path}-wal")
    largest = 0
    try:
        for i in range(3000):  # about ten pages a commit: over 100 MB of frames
            idx.record(obj(f"1.2.3.1.{i}", number=i))
            if i % 50 == 0:
                largest = max(largest, wal.stat().st_size)
        assert idx.statistics().instances == 3000
    finally:
        idx.close()
    assert largest < 32 * 1024 * 1024, f"the WAL reached {largest} bytes"


def test_the_wal_file_is_cut_back_when_it_starts_over(tmp_path: Path) -> None:
    """A reader on an old snapshot keeps the WAL from starting over (SQLite must not overwrite frames it reads),
    so its file grows past the limit; once the reader is done, a checkpoint and the next commit start it over from
    its beginning and cut the file back (``journal_size_limit``), so that later frames go to new file pages, which
    the kernel does not read before writing into them (BENCHMARKS.md, item 49: one 4 KB read per C-STORE
    otherwise, in a server that had run for minutes)."""
    import time

    from bastion.index import sqlite_writer

    path = tmp_path / "index.sqlite3"
    idx = open_index(str(path))
    wal = Path(f"{path}-wal")
    try:
        idx.record(obj("1.2.3.1.0", number=0))
        with closing(sqlite3.connect(path, isolation_level=None)) as reader:
            reader.execute("BEGIN")
            assert reader.execute("SELECT count(*) FROM instances").fetchone() == (1,)  # a snapshot in the WAL
            i = 1
            while wal.stat().st_size <= 2 * sqlite_writer._WAL_KEEP_BYTES:  # about ten pages a commit
                idx.record(obj(f"1.2.3.1.{i}", number=i))
                i += 1
            assert reader.execute("SELECT count(*) FROM instances").fetchone() == (1,)
            reader.execute("COMMIT")
        with closing(sqlite3.connect(path)) as other:
            for _ in range(200):  # the index's checkpoint thread may be at it too (busy): until one has copied all
                busy, frames, copied = other.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                if busy == 0 and copied == frames:
                    break
                time.sleep(0.05)
            assert busy == 0 and copied == frames
        idx.record(obj(f"1.2.3.1.{i}", number=i))
        assert wal.stat().st_size <= sqlite_writer._WAL_KEEP_BYTES
    finally:
        idx.close()


# -- the change log: positions that stay valid (see bastion.index.base) ------------------------------------------

class Consumer:
    """A change-log consumer as the metadata warmer (and replication later) is one: it keeps a position and
    reads on from it in small pages, starting the new log from its start when told its log is gone."""

    def __init__(self, position: LogPosition) -> None:
        self.position = position
        self.seen: list[Change] = []
        self.resets = 0

    def follow(self, index: Index) -> list[Change]:
        """Read everything after the position; the changes read this time."""
        before = len(self.seen)
        while True:
            read = index.changes_after(self.position, limit=2)
            if read.reset:
                assert read.changes == () and read.position == index.log_start()
                self.resets += 1
            elif not read.changes:
                return self.seen[before:]
            self.seen.extend(read.changes)
            self.position = read.position


def test_a_position_is_written_and_read_back() -> None:
    position = LogPosition("0f" * 16, 12345)
    assert LogPosition.parse(str(position)) == position
    for bad in ("", "12", ":12", "abc:", "a:b:1"):
        with pytest.raises(ValueError):
            LogPosition.parse(bad)


def test_a_consumer_reads_every_change_once_in_order(index: Index) -> None:
    consumer = Consumer(index.log_start())
    for i in range(5):
        index.record(obj(f"1.2.3.1.{i + 1}"))
    assert [c.sop_uid for c in consumer.follow(index)] == [f"1.2.3.1.{i + 1}" for i in range(5)]
    assert consumer.follow(index) == [] and consumer.position == index.log_end()
    index.record(obj("1.2.3.1.1", content="v2"))
    assert [c.kind for c in consumer.follow(index)] == ["superseded", "stored"]
    assert consumer.resets == 0


def test_seq_never_goes_backwards_after_clear(index: Index) -> None:
    for i in range(3):
        index.record(obj(f"1.2.3.1.{i + 1}"))
    consumer = Consumer(index.log_start())
    consumer.follow(index)
    old = index.log_end()
    index.clear()
    start = index.log_start()
    assert start.epoch != old.epoch and start.seq >= old.seq and index.log_end() == start
    _, seq = index.record(obj("1.2.3.1.1"))
    assert seq is not None and seq > old.seq
    [again] = consumer.follow(index)  # told that its log is gone, it reads the new one from its start
    assert (consumer.resets, again.seq, again.sop_uid) == (1, seq, "1.2.3.1.1")
    index.clear()
    index.clear()  # an empty log cleared again starts after the same floor: still never back
    assert index.log_start().seq >= seq and index.record(obj("1.2.3.1.2"))[1] > seq  # type: ignore[operator]


def test_a_position_past_the_end_of_the_log_is_a_reset(index: Index) -> None:
    index.record(obj("1.2.3.1.1"))
    end = index.log_end()
    read = index.changes_after(LogPosition(end.epoch, end.seq + 10))
    assert read.reset and read.position == index.log_start() and read.changes == ()
    read = index.changes_after(LogPosition("no-such-epoch", 0))
    assert read.reset and read.position == index.log_start()
    assert not index.changes_after(end).reset


def test_deleted_is_recorded(index: Index) -> None:
    a1, a2 = obj("1.2.3.1.1", content="v1"), obj("1.2.3.1.1", content="v2")
    b = obj("1.2.3.1.2")
    other = obj("7.7.7.1.1", series="7.7.7.1", study="7.7.7", patient="P7")
    for o in (a1, a2, b, other):
        index.record(o)
    consumer = Consumer(index.log_start())
    consumer.follow(index)
    deleted = index.delete_instance("1.2.3.1.1")
    assert deleted is not None
    assert (deleted.kind, deleted.sop_uid, deleted.series_uid, deleted.study_uid, deleted.blob_key) == (
        "deleted", "1.2.3.1.1", "1.2.3.1", "1.2.3", a2.instance.blob_key)
    assert deleted.seq > consumer.position.seq and index.log_end().seq == deleted.seq
    assert consumer.follow(index) == [deleted]
    assert index.current("1.2.3.1.1") is None
    assert not index.has_blob(a1.instance.blob_key) and not index.has_blob(a2.instance.blob_key)
    assert {v.blob_key for v in index.versions()} == {b.instance.blob_key, other.instance.blob_key}
    st = index.statistics()
    assert (st.patients, st.studies, st.series, st.instances, st.versions) == (2, 2, 2, 2, 0)
    assert index.delete_instance("1.2.3.1.1") is None  # not indexed (any more): nothing recorded
    assert index.log_end().seq == deleted.seq
    last = index.delete_instance("1.2.3.1.2")
    assert last is not None and last.kind == "deleted" and last.seq > deleted.seq
    st = index.statistics()
    assert (st.patients, st.studies, st.series, st.instances) == (1, 1, 1, 1)  # the empty levels went too
    assert _values(index.find(QueryLevel.STUDY, []), "StudyInstanceUID") == ["7.7.7"]
    index.record(b)  # stored again: a new change after the deletion
    assert [c.kind for c in consumer.follow(index)] == ["deleted", "stored"]



def test_held_blobs_answers_has_blob_for_many_keys_at_once(index: Index) -> None:
    """Crash recovery asks it of every object stored in the last hour: current and superseded versions are held;
    a version never recorded, one of an instance not indexed and a key that names no instance are not."""
    old, new = obj("1.2.3.1.1", content="v1"), obj("1.2.3.1.1", content="v2")
    others = [obj(f"1.2.3.1.{n}") for n in range(2, 1202)]  # more than one batch
    for o in (old, new, *others):
        index.record(o)
    never = obj("1.2.3.1.1", content="v3")  # its record never committed
    stranger = obj("9.9.9.1.1", series="9.9.9.1", study="9.9.9")
    keys = [o.instance.blob_key for o in (old, new, *others, never, stranger)] + ["not/a/key.dcm"]
    held = index.held_blobs(keys)
    assert held == {o.instance.blob_key for o in (old, new, *others)}
    assert held == {key for key in keys if index.has_blob(key)}
    assert index.held_blobs([]) == set()

def test_copies_findings_are_recorded_in_the_change_log(index: Index) -> None:
    a = obj("1.2.3.1.1")
    index.record(a)
    consumer = Consumer(index.log_end())
    wanting = index.record_finding("copy-wanting", a.instance.blob_key)
    assert (wanting.kind, wanting.sop_uid, wanting.series_uid, wanting.study_uid, wanting.blob_key) == (
        "copy-wanting", "1.2.3.1.1", "1.2.3.1", "1.2.3", a.instance.blob_key)
    unindexed = obj("9.9.9.1.1", series="9.9.9.1", study="9.9.9")  # a copy not written before its record commits
    early = index.record_finding("copy-wanting", unindexed.instance.blob_key)
    assert (early.sop_uid, early.series_uid, early.study_uid) == ("9.9.9.1.1", "", "")
    repaired = index.record_finding("copy-repaired", a.instance.blob_key)
    assert consumer.follow(index) == [wanting, early, repaired]
    assert index.log_end().seq == repaired.seq
    assert index.current("1.2.3.1.1") is not None and index.statistics().instances == 1  # nothing else changed

def _blob_store_with_study(tmp_path: Path, index: Index, files: int) -> tuple[MemoryBlobStore, list[bytes]]:
    """A blob store and ``index`` holding a study's first ``files`` instances stored through ingest, and the
    Part 10 bytes of them all."""
    study = make_study(tmp_path / "study", series=1, per_series=files + 4)
    data = [f.read_bytes() for f in study.files]
    blobs = MemoryBlobStore()
    ingest = Ingest(blobs, index)
    for blob in data[:files]:
        assert ingest.store_bytes(blob, "test").status is StoreStatus.STORED
    return blobs, data


def _rebuild_as_the_cli_does(blobs: MemoryBlobStore, old: Index, where: str) -> Index:
    """A new index at ``where`` filled by :func:`bastion.ingest.rebuild.rebuild`, its log after the old one's:
    `bastion index rebuild` reads the old index's file (and its mark) with ``log_floor``; an in-memory index
    is asked."""
    after = max(log_floor(old.location), old.log_end().seq)
    new = open_index(where)
    report = rebuild(blobs, new, after=after)
    assert report.skipped == []
    return new


def test_a_consumer_across_a_rebuild_skips_and_repeats_nothing(index: Index, tmp_path: Path,
                                                               request: pytest.FixtureRequest) -> None:
    blobs, data = _blob_store_with_study(tmp_path, index, 4)
    changed = pydicom.dcmread(BytesIO(data[0]))
    changed.StudyDescription = "A CORRECTED COPY"  # a new version of the first instance
    out = BytesIO()
    changed.save_as(out, enforce_file_format=True)
    ingest = Ingest(blobs, index)
    assert ingest.store_bytes(out.getvalue(), "test").status is StoreStatus.SUPERSEDED
    consumer = Consumer(index.log_start())
    before = consumer.follow(index)
    assert len(before) == 6  # four stored, one superseded and its new version
    assert ingest.store_bytes(data[4], "test").status is StoreStatus.STORED  # the consumer lags behind this one

    where = ":memory:" if index.location == ":memory:" else str(tmp_path / "rebuilt.sqlite3")
    rebuilt = _rebuild_as_the_cli_does(blobs, index, where)
    request.addfinalizer(rebuilt.close)
    for blob in data[5:7]:  # stored after the rebuild
        assert Ingest(blobs, rebuilt).store_bytes(blob, "test").status is StoreStatus.STORED

    after = consumer.follow(rebuilt)
    assert consumer.resets == 1
    # no seq handed out twice, none going back: across both logs every seq the consumer saw is larger
    seqs = [c.seq for c in consumer.seen]
    assert seqs == sorted(set(seqs)) and after[0].seq > before[-1].seq
    # the new log read once, whole: every change in it, none twice
    assert after == rebuilt.changes(0, 1000)
    stored = [c.blob_key for c in after if c.kind == "stored"]
    assert len(stored) == len(set(stored))
    current = {r.blob_key for r in rebuilt.instances(QueryLevel.STUDY, [])}
    assert len(current) == 7 and current <= set(stored)  # the lagging object and those stored after it too
    # a restart: the position, written and read back, goes on with what comes next and nothing else
    again = Consumer(LogPosition.parse(str(consumer.position)))
    assert again.follow(rebuilt) == []
    assert Ingest(blobs, rebuilt).store_bytes(data[7], "test").status is StoreStatus.STORED
    assert [c.kind for c in again.follow(rebuilt)] == ["stored"] and again.resets == 0


def test_a_file_index_keeps_positions_valid_across_reopening(tmp_path: Path) -> None:
    path = str(tmp_path / "index.sqlite3")
    idx = open_index(path)
    idx.record(obj("1.2.3.1.1"))
    consumer = Consumer(idx.log_start())
    consumer.follow(idx)
    idx.close()
    idx = open_index(path)
    try:
        _, seq = idx.record(obj("1.2.3.1.2"))
        assert [c.seq for c in consumer.follow(idx)] == [seq] and consumer.resets == 0
    finally:
        idx.close()


def test_seqs_lost_with_a_power_failure_are_not_handed_out_again(tmp_path: Path) -> None:
    """SQLite with synchronous=NORMAL may lose its last commits in a power failure, which a consumer may have
    read: after crash recovery's resume_log_after_crash the log goes on after the durable mark."""
    path = str(tmp_path / "index.sqlite3")
    idx = open_index(path)
    for i in range(4):
        idx.record(obj(f"1.2.3.1.{i + 1}"))
    consumer = Consumer(idx.log_start())
    consumer.follow(idx)
    idx.close()
    with closing(sqlite3.connect(path)) as db, db:  # the last two commits never reached the disk
        db.execute("DELETE FROM changes WHERE seq > (SELECT max(seq) - 2 FROM changes)")
    idx = open_index(path)
    try:
        idx.resume_log_after_crash()
        assert idx.log_end().seq >= consumer.position.seq and idx.log_end().epoch == consumer.position.epoch
        _, seq = idx.record(obj("1.2.3.1.9"))
        assert seq is not None and seq > consumer.position.seq
        assert [c.seq for c in consumer.follow(idx)] == [seq] and consumer.resets == 0
    finally:
        idx.close()


def test_a_new_index_beside_the_mark_of_a_lost_one_goes_on_after_it(tmp_path: Path) -> None:
    path = str(tmp_path / "index.sqlite3")
    idx = open_index(path)
    _, seq = idx.record(obj("1.2.3.1.1"))
    idx.close()
    for suffix in ("", "-wal", "-shm"):
        Path(path + suffix).unlink(missing_ok=True)  # the index is lost; its mark is not
    assert log_floor(path) > (seq or 0)
    idx = open_index(path)
    try:
        _, again = idx.record(obj("1.2.3.1.1"))
        assert again is not None and seq is not None and again > seq
    finally:
        idx.close()


# -- PostgreSQL: its location, its schema's migrations, its rebuild -----------------------------------------------

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens on it once the socket is closed


def test_an_unreachable_postgresql_is_one_line_naming_the_server() -> None:
    port = _closed_port()
    with pytest.raises(IndexFailure) as failed:
        open_index(f"postgresql://postgres@127.0.0.1:{port}/archive?bastion_schema=bastion")
    message = str(failed.value)
    assert "\n" not in message and f"127.0.0.1:{port}/archive" in message and "refused" in message, message


def test_a_missing_postgresql_database_is_one_line_naming_it() -> None:
    with pg_url():  # the server is there (else skipped)
        pass
    with pytest.raises(IndexFailure) as failed:
        open_index(POSTGRESQL.rsplit("/", 1)[0] + "/no_such_database")
    message = str(failed.value)
    assert "\n" not in message and "/no_such_database" in message and "does not exist" in message, message


def test_a_multi_host_url_reaches_libpq_as_it_is() -> None:
    """libpq tries the hosts in turn: the first refuses, the second (the test server) is taken."""
    with pg_url() as url:
        schema = url.rpartition("bastion_schema=")[2]
        host = POSTGRESQL.split("@", 1)[1].split("/", 1)[0]
        user = POSTGRESQL.split("://", 1)[1].split("@", 1)[0]
        multi = f"postgresql://{user}@127.0.0.1:{_closed_port()},{host}/{POSTGRESQL.rsplit('/', 1)[1]}"
        idx = open_index(with_schema(multi + "?target_session_attrs=read-write&connect_timeout=5", schema))
        try:
            _, seq = idx.record(obj("1.2.3.1.1"))
            assert seq is not None and log_floor(idx.location) == seq
        finally:
            idx.close()


def test_a_postgresql_schema_newer_than_the_code_is_refused() -> None:
    with pg_url() as url:
        open_index(url).close()
        schema = url.rpartition("bastion_schema=")[2]
        with psycopg.connect(url.partition("?")[0], autocommit=True) as conn:
            conn.execute(f'INSERT INTO "{schema}"._yoyo_migration VALUES (%s, %s, now())',
                         ("0" * 64, "9999_from_the_future"))
        with pytest.raises(IndexFailure, match="9999_from_the_future.*newer Bastion"):
            open_index(url)


def test_a_postgresql_log_floor_reads_the_sequence_without_an_index() -> None:
    with pg_url() as url:
        assert log_floor(url) == 0  # no index made in the schema yet, and none made by asking
        idx = open_index(url)
        try:
            assert log_floor(url) == 0
            seqs = [idx.record(obj(f"1.2.3.1.{i}"))[1] for i in range(3)]
            assert log_floor(url) == seqs[-1]
            idx.start_log_after(100)
            assert log_floor(url) == 100
        finally:
            idx.close()


def test_a_postgresql_index_rebuilt_in_place_goes_on_after_its_old_log(tmp_path: Path) -> None:
    with pg_url() as url:
        index = open_index(url)
        try:
            blobs, data = _blob_store_with_study(tmp_path, index, 4)
            consumer = Consumer(index.log_start())
            before = consumer.follow(index)
        finally:
            index.close()
        after = log_floor(url)
        report = rebuild_in_place(url, lambda new: rebuild(blobs, new, after=after))
        assert report.indexed == 4 and not report.skipped
        index = open_index(url)
        try:
            again = consumer.follow(index)
            assert consumer.resets == 1 and len(again) == 4 and again[0].seq > before[-1].seq
            assert len(index.instances(QueryLevel.STUDY, [])) == 4
        finally:
            index.close()


def test_postgresql_rebuild_refuses_while_a_node_has_the_index_open() -> None:
    """A rebuild empties a PostgreSQL index in place: it refuses while any process of any node has it open, and
    leaves what it holds untouched."""
    from bastion.errors import BastionError

    with pg_url() as url:
        node = open_index(url)
        try:
            node.record(obj("1.2.3.1.1"))
            with pytest.raises(BastionError, match="in use by"):
                rebuild_in_place(url, lambda new: pytest.fail("built while a node had the index open"))
            assert node.statistics().instances == 1
        finally:
            node.close()
        assert rebuild_in_place(url, lambda new: new.statistics().instances) == 0  # every node stopped: rebuilt


def test_postgresql_connections_lost_with_the_server_are_replaced() -> None:
    """The server ends every connection of the index's pool (a restart, a fail-over): the next search and the
    next record find theirs gone and go on with new ones."""
    with pg_url() as url:
        idx = open_index(url)
        try:
            idx.record(obj("1.2.3.1.1"))
            with contextlib.ExitStack() as held:  # three connections in the pool, all idle after
                pool = idx._pool  # type: ignore[attr-defined]
                pids = {held.enter_context(pool.connection()).execute("SELECT pg_backend_pid()").fetchone()[0]
                        for _ in range(3)}
            with admin() as conn:
                for pid in pids:
                    conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            assert idx.current("1.2.3.1.1") is not None
            assert idx.record(obj("1.2.3.1.2"))[0] is StoreStatus.STORED
            assert idx.statistics().instances == 2
        finally:
            idx.close()


def test_a_postgresql_record_cancelled_while_it_runs_is_awaited_to_its_end() -> None:
    """A C-STORE's record_async cancelled (its association went away) while the record waits for another node's
    writer of the study: the cancellation is withheld until the record is done, and its outcome returned, since
    CancelledError tells the caller that nothing was recorded (it then removes the blob)."""
    study = "1.2.826.0.1.3680043.10.543.7"
    lock = "hashtextextended(%s, 0)"
    with pg_url() as url:
        idx = open_index(url)
        try:
            with admin() as node:  # another node writing the study
                node.execute(f"SELECT pg_advisory_lock({lock})", (study,))

                def waiting() -> bool:  # the record waits for the study's lock
                    row = node.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                                       f"AND objsubid = 1 AND (classid::bigint << 32 | objid::bigint) = {lock}",
                                       (study,)).fetchone()
                    return bool(row and row[0])

                async def cancelled_while_waiting() -> tuple[StoreStatus, int | None]:
                    task = asyncio.create_task(idx.record_async(obj("1.2.3.1.1", series=f"{study}.1", study=study)))
                    for _ in range(2000):
                        if waiting():
                            break
                        await asyncio.sleep(0.005)
                    task.cancel()
                    await asyncio.sleep(0.05)
                    assert not task.done()  # it cannot end while the lock is held
                    node.execute(f"SELECT pg_advisory_unlock({lock})", (study,))
                    return await task

                status, seq = asyncio.run(cancelled_while_waiting())
            assert status is StoreStatus.STORED and seq is not None
            assert idx.current("1.2.3.1.1") is not None
        finally:
            idx.close()


def test_a_version_older_than_the_current_one_is_kept_as_superseded(index: Index) -> None:
    """Versions are ordered by stamp, as ``bastion index rebuild`` orders them, whatever order they are recorded in
    (two nodes storing versions at once): an older one is kept, but does not become current."""
    older, newer = obj("1.2.3.1.1", content="v1"), obj("1.2.3.1.1", content="v2")
    assert index.record(newer)[0] is StoreStatus.STORED
    status, seq = index.record(older)
    assert status is StoreStatus.OUTDATED and seq is not None
    current = index.current("1.2.3.1.1")
    assert current is not None and current.blob_key == newer.instance.blob_key
    assert {v.blob_key: v.current for v in index.versions()} == {newer.instance.blob_key: True,
                                                                  older.instance.blob_key: False}
    assert index.changes(seq - 1)[0].kind == "superseded"
    assert index.record(obj("1.2.3.1.1", content="v1"))[0] is StoreStatus.SUPERSEDED  # a newer stamp: current


def test_an_outdated_version_not_to_be_kept_is_not_recorded(index: Index) -> None:
    """The ingest stores an outdated version again above the current one: it asks that the first not be kept."""
    older, newer = obj("1.2.3.1.1", content="v1"), obj("1.2.3.1.1", content="v2")
    index.record(newer)
    end = index.log_end()
    assert index.record(older, keep_outdated=False) == (StoreStatus.OUTDATED, None)
    assert [v.blob_key for v in index.versions()] == [newer.instance.blob_key]
    assert index.log_end() == end


def test_a_value_with_a_nul_matches_nothing(index: Index) -> None:
    """A query value holding a NUL character (a fuzzer's, or a client's bug) matches nothing, on every backend,
    rather than failing the search (PostgreSQL text cannot hold NUL)."""
    index.record(obj("1.2.3.1.1", name="Doe^John"))
    assert index.find(QueryLevel.STUDY, [cond("PatientName", "*\x00*")]) == []
    assert index.find(QueryLevel.STUDY, [cond("PatientID", "P\x001")]) == []
    assert len(index.find(QueryLevel.STUDY, [cond("PatientName", "Doe*")])) == 1


def test_modalities_in_study_matches_any_series_modality_whole(index: Index) -> None:
    """ModalitiesInStudy (PS3.4 C.6.2.1.2) matches a study having a series of that modality: a single value or a
    list, never part of another modality's name; a wildcard too."""
    index.record(obj("9.1.1", series="9.1", study="9", modality="CT"))
    index.record(obj("9.2.1", series="9.2", study="9", modality="PT"))
    index.record(obj("8.1.1", series="8.1", study="8", modality="MR", patient="P2"))
    index.record(obj("7.1.1", series="7.1", study="7", modality="CTX", patient="P3"))

    def studies(value: str) -> list[str]:
        return sorted(_values(index.find(QueryLevel.STUDY, [cond("ModalitiesInStudy", value)]), "StudyInstanceUID"))

    assert studies("PT") == ["9"]
    assert studies("CT") == ["9"]  # not study 7, whose modality only starts with CT
    assert studies("MR\\PT") == ["8", "9"]
    assert studies("US") == []
    assert studies("C*") == ["7", "9"]
